"""prepare's engines: tokens/s of `prepare --engine ray` at 1 and 2 workers against the local engine on the same
inputs, Ray's start-up and per-task overhead, and the projected wall time of a 22T-token corpus on a Ray cluster.

    python experiments/benchmarks/prepare_bench.py [--copies 4] [--cluster-cores 1000] [--corpus-tokens 22e12]

A last row converts the same documents from the Parquet layout of Data Prep Kit's tokenization transform
(`--from-dpk`): the cost of reading DPK-tokenized data instead of tokenizing the text again.

Input: `--copies` x the demo's raw JSONL (Python's standard library, ~1M tokens per copy in 4 files), built in
--work. Every run writes a fresh output directory; each Ray run's output is compared with the local one's byte for
byte. Ray's start-up (`ray.init`) is timed apart: a long-lived cluster pays it once. On a shared machine the local
and Ray runs alternate (`--repeats` each, best kept), and CPU-seconds (this process and every process under it:
pool workers, Ray's raylet and workers) give a per-core rate that other jobs' load cannot depress.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import tempfile
import time

import psutil
from data_bench import prepare_input

from data_pipelines.demo import build_demo
from data_pipelines.prepare import PrepareOptions, prepare


def cpu_seconds(live_descendants: bool) -> float:
    """CPU time of this process and its finished children (a local run's pool workers), and with `live_descendants`
    of every process under it too (Ray's raylet, GCS and workers, which a Ray run's cost includes)."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in psutil.Process().children(recursive=True) if live_descendants else ():
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed_prepare(raw: str, tokenizer: str, out: str, from_dpk: bool = False,
                  **kwargs) -> tuple[int, float, float, int]:
    """(tokens, wall seconds, CPU seconds, files) of one prepare run into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    on_ray = kwargs.get("engine") == "ray"
    start, cpu = time.perf_counter(), cpu_seconds(on_ray)
    options = PrepareOptions(tokenizer=tokenizer, out=out, from_dpk=from_dpk)
    manifest = prepare([raw], options, progress=False, **kwargs)
    return manifest["tokens"], time.perf_counter() - start, cpu_seconds(on_ray) - cpu, len(manifest["files"])


def best(runs: list[tuple]) -> tuple:
    """The run of least wall time, with the least CPU time of all runs."""
    fastest = min(runs, key=lambda r: r[1])
    return (fastest[0], fastest[1], min(r[2] for r in runs), fastest[3])


def dpk_copy(prepared: str, dpk_dir: str) -> str:
    """The documents of a prepared directory (eos dropped) as Parquet files in the layout Data Prep Kit's
    tokenization transform writes (tokens, document_id, document_length, token_count), one per shard."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordReader

    if os.path.isdir(dpk_dir):
        return dpk_dir
    os.makedirs(dpk_dir)
    with open(os.path.join(prepared, "manifest.json")) as f:
        manifest = json.load(f)
    for k, entry in enumerate(manifest["files"]):
        reader = ArrayRecordReader(os.path.join(prepared, entry["shard"]))
        docs = [np.frombuffer(r, manifest["dtype"])[:-1].astype(np.int64) for r in reader.read_all()]
        reader.close()
        pq.write_table(pa.table({"tokens": [d.tolist() for d in docs],
                                 "document_id": [f"{k}-{i}" for i in range(len(docs))],
                                 "document_length": [0] * len(docs), "token_count": [len(d) for d in docs]}),
                       os.path.join(dpk_dir, f"{k:05d}.parquet"))
    return dpk_dir


def same_tree(a: str, b: str) -> bool:
    names = sorted(os.path.relpath(os.path.join(r, n), a) for r, _, ns in os.walk(a) for n in ns)
    names_b = sorted(os.path.relpath(os.path.join(r, n), b) for r, _, ns in os.walk(b) for n in ns)
    return names == names_b and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "granite_prepare_bench"))
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cluster-cores", type=int, default=1000)
    parser.add_argument("--corpus-tokens", type=float, default=22e12)
    args = parser.parse_args()
    import ray

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # per-core figures: one thread per worker on every engine
    demo = os.path.join(args.work, "demo")
    if not os.path.exists(os.path.join(demo, "manifest.json")):
        build_demo(demo, progress=False, eval_every=0)
    raw = prepare_input(demo, os.path.join(args.work, f"raw_x{args.copies}"), args.copies)
    tokenizer = os.path.join(demo, "tokenizer.json")
    load = os.getloadavg()[0]
    rows = []  # (what, workers, tokens, wall s, CPU s, files, Ray start-up s)
    for workers in (1, 2):
        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
        startup = time.perf_counter() - start
        local_runs, ray_runs = [], []
        for _ in range(args.repeats):
            local_out, ray_out = (os.path.join(args.work, f"{e}_{workers}") for e in ("local", "ray"))
            ray_runs.append(timed_prepare(raw, tokenizer, ray_out, workers=workers, engine="ray"))
            local_runs.append(timed_prepare(raw, tokenizer, local_out, workers=workers))
            assert same_tree(ray_out, local_out), f"{ray_out} differs from the local engine's output"
        ray.shutdown()
        rows.append((f"local, {workers} worker(s)", workers, *best(local_runs), 0.0))
        rows.append((f"ray, {workers} worker(s)", workers, *best(ray_runs), startup))

    dpk = dpk_copy(os.path.join(args.work, "local_1"), os.path.join(args.work, "dpk_layout"))
    rows.append(("local, 1 worker, --from-dpk (the same documents as DPK Parquet)", 1,
                 *best([timed_prepare(dpk, tokenizer, os.path.join(args.work, "from_dpk"), from_dpk=True, workers=1)
                        for _ in range(args.repeats)]), 0.0))

    local_1_cpu = rows[0][4]
    tokens, files = rows[0][2], rows[0][5]
    print(f"{files} input files, {tokens:,} tokens; {len(os.sched_getaffinity(0))} cores; load average (1 min) "
          f"at start {load:.1f}, at end {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    print("| engine | M tokens/s (wall) | M tokens per CPU-s | CPU-s vs local 1 worker | Ray start-up s | "
          "CPU-s overhead per task |")
    print("|---|---:|---:|---:|---:|---:|")
    for what, _, tokens, wall, cpu, files, startup in rows:
        overhead = f"{(cpu - local_1_cpu) / files:.3f}" if what.startswith("ray") else ""
        print(f"| {what} | {tokens / wall / 1e6:.3f} | {tokens / cpu / 1e6:.3f} | {cpu / local_1_cpu:.2f}x | "
              f"{startup:.1f} | {overhead} |")
    ray_1 = rows[1]
    per_core = ray_1[2] / ray_1[4]  # Ray, 1 worker: tokens per CPU-second, Ray's own processes included
    hours = args.corpus_tokens / (per_core * args.cluster_cores) / 3600
    print(f"projection: {args.corpus_tokens:.3g} tokens / ({per_core / 1e6:.3f}M tokens per CPU-s x "
          f"{args.cluster_cores} cores) = {hours:,.0f} h = {hours / 24:.1f} days (perfect scaling, I/O not counted)")

if __name__ == "__main__":
    main()
