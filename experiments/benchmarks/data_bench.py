"""Data-pipeline throughput: the packed training stream, grain's own packer on the same data, and prepare.

    python experiments/benchmarks/data_bench.py [--work /tmp/granite_data_bench] [--seconds 10]

Builds (once, in --work) the demo corpus and a synthetic web-like corpus of three sources (lognormal document
lengths, mean ~700 tokens, Granite's 100K vocab so tokens are uint32), then prints a table:
  stream      load + mix + shuffle + pack at seq_len 4096 from ArrayRecord (make_batches, one process)
  grain       grain's FirstFitPackIterDataset + batch on the same shards (one source, no mixing), and on the same
              documents held in memory (the packer alone)
  prepare     read + tokenize + write of 4 copies of the demo's raw JSONL (~4M tokens of Python source) with one
              worker (tokens/s per core) and with all cores
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time

import numpy as np

import data_pipelines as dp
from data_pipelines.demo import build_demo
from data_pipelines.prepare import PrepareOptions, prepare, synthetic_identity, write_token_documents
from data_pipelines.sources import load_manifest

SEQ_LEN, BATCH = 4096, 8


def synthetic_sources(root: str, tokens_per_source: int = 8_000_000) -> dict[str, str]:
    paths = {}
    for i, name in enumerate(("web", "code", "math")):
        path = os.path.join(root, name)
        paths[name] = path
        if os.path.exists(os.path.join(path, "manifest.json")):
            continue
        rng = np.random.default_rng(i)
        docs, n = [], 0
        while n < tokens_per_source:
            length = int(min(rng.lognormal(6.0, 1.1), 50_000)) + 1
            docs.append(rng.integers(1, 100_352, length, dtype=np.uint32))
            n += length + 1
        write_token_documents(path, [docs[k::8] for k in range(8)], synthetic_identity(100_352))
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine, rate per CPU-second is the per-core
    figure that other jobs cannot depress."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_iterator(it, seconds: float) -> tuple[float, float, float]:
    """(tokens per wall second, tokens per CPU second, padding fraction) over ~`seconds` after one warm-up batch;
    tokens count padding."""
    next(it)
    tokens = pad = 0
    start, cpu = time.perf_counter(), cpu_seconds()
    while time.perf_counter() - start < seconds:
        try:
            batch = next(it)
        except StopIteration:
            break
        tokens += batch["segment_ids"].size
        pad += int((batch["segment_ids"] == 0).sum())
    return tokens / (time.perf_counter() - start), tokens / (cpu_seconds() - cpu), pad / max(tokens, 1)


def stream(sources: dict[str, str], weights: dict[str, float], seconds: float):
    cfg = dp.default_data_config([{"name": n, "path": p, "weight": weights[n]} for n, p in sources.items()])
    return time_iterator(dp.make_batches(cfg, batch_size=BATCH, seq_len=SEQ_LEN, seed=0), seconds)


def grain_packer(path: str, seconds: float, *, in_memory: bool):
    """grain's first-fit packer on the same documents (truncated to a row, as grain's packers do), read through
    grain's ArrayRecordDataSource, or from a list in memory to time the packer alone."""
    import grain
    from grain.experimental import FirstFitPackIterDataset

    manifest = load_manifest(path)
    shards = [os.path.join(path, f["shard"]) for f in manifest["files"]]
    dtype = np.dtype(manifest["dtype"])
    source = grain.sources.ArrayRecordDataSource(shards)
    if in_memory:
        source = [source[i] for i in range(min(len(source), 20_000))]
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=0)
        .repeat(None)
        .map(lambda b: {"tokens": np.frombuffer(b, dtype)[:SEQ_LEN].astype(np.int32)})
        .to_iter_dataset()
    )
    ds = FirstFitPackIterDataset(ds, length_struct={"tokens": SEQ_LEN}, num_packing_bins=BATCH).batch(BATCH)

    def renamed():
        for b in iter(ds):
            yield {"tokens": b["tokens"], "segment_ids": b["tokens_segment_ids"]}

    return time_iterator(renamed(), seconds)


def prepare_input(demo_dir: str, raw: str, copies: int = 4) -> str:
    """`raw`, holding `copies` x the demo's raw JSONL files (so that process start-up is amortised)."""
    import shutil

    if not os.path.isdir(raw):
        os.makedirs(raw)
        for k in range(copies):
            for name in sorted(os.listdir(os.path.join(demo_dir, "raw"))):
                shutil.copyfile(os.path.join(demo_dir, "raw", name), os.path.join(raw, f"{k}-{name}"))
    return raw


def prepare_rate(demo_dir: str, out: str, workers: int, copies: int = 4) -> float:
    """Prepare tokens/s on `copies` x the demo's raw JSONL files."""
    import shutil

    raw = prepare_input(demo_dir, os.path.join(os.path.dirname(out), "prepare_input"), copies)
    shutil.rmtree(out, ignore_errors=True)
    options = PrepareOptions(tokenizer=os.path.join(demo_dir, "tokenizer.json"), out=out)
    start, cpu = time.perf_counter(), cpu_seconds()
    manifest = prepare([raw], options, workers=workers, progress=False)
    return manifest["tokens"] / (time.perf_counter() - start), manifest["tokens"] / (cpu_seconds() - cpu), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "granite_data_bench"))
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    demo = os.path.join(args.work, "demo")
    if not os.path.exists(os.path.join(demo, "manifest.json")):
        build_demo(demo, progress=False)
    sources = synthetic_sources(os.path.join(args.work, "synthetic"))
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores; seq_len {SEQ_LEN}, batch {BATCH}")
    load = os.getloadavg()[0]
    rows = []
    rows.append(("stream: 3 synthetic sources mixed 60/25/15, shuffled, packed",
                 *stream(sources, {"web": 0.6, "code": 0.25, "math": 0.15}, args.seconds)))
    rows.append(("stream: demo corpus (stdlib sources, long documents)",
                 *stream({"demo": demo}, {"demo": 1.0}, args.seconds)))
    rows.append(("grain: ArrayRecordDataSource, shuffle, FirstFitPack, batch ('web')",
                 *grain_packer(sources["web"], args.seconds, in_memory=False)))
    rows.append(("grain: FirstFitPack + batch alone, documents in memory ('web')",
                 *grain_packer(sources["web"], args.seconds, in_memory=True)))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # per-core figure: one process, one thread
    for workers in (1, cores):
        rows.append((f"prepare: 4x demo raw JSONL, {workers} worker(s)",
                     *prepare_rate(demo, os.path.join(args.work, f"prepared_{workers}"), workers)))
    width = max(len(r[0]) for r in rows)
    print(f"load average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"| {'what':<{width}} | M tokens/s (wall) | M tokens per CPU-s | padding |")
    print(f"|{'-' * (width + 2)}|------------------:|-------------------:|--------:|")
    for what, rate, cpu_rate, pad in rows:
        pad_text = "" if pad is None else f"{pad:.2%}"
        print(f"| {what:<{width}} | {rate / 1e6:>17.2f} | {cpu_rate / 1e6:>18.2f} | {pad_text:>7} |")


if __name__ == "__main__":
    main()
