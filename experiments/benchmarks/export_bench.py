"""Export throughput and peak host memory: `granite-jax export` (streams tensor by tensor from the Orbax checkpoint)
vs what a user would otherwise write, restoring the whole model in memory (`checkpoint.restore_model`) and saving it
(`hf.save_pretrained`). Each runs in a fresh process on the same checkpoint; the peak resident memory of each
process is reported with a baseline process that only imports the same modules.

    python experiments/benchmarks/export_bench.py                                  # granite-4.0-h-micro, bfloat16
    python experiments/benchmarks/export_bench.py --preset debug-hybrid-moe --param-dtype float32    # a quick check

The checkpoint (random weights, `checkpoint.save_model`) is written once under --workdir and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CHILD = """
import json, sys, time
how, workdir, out, dtype = sys.argv[1:]
from granite_jax import checkpoint, export, hf
from granite_jax.metrics import peak_rss
t = time.perf_counter()
if how == "export":
    export.export(workdir, out, dtype=dtype, progress=False)
elif how == "in-memory":
    import jax.numpy as jnp
    hf.save_pretrained(checkpoint.restore_model(workdir), out, dtype=jnp.dtype(dtype))
else:  # the modules both of the others load, nothing else
    import jax.numpy, flax.nnx, tensorstore, granite_jax.model
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))
"""


def run(how: str, workdir: str, out: str, dtype: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, "-c", _CHILD, how, workdir, out, dtype], capture_output=True,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if result.returncode:
        raise SystemExit(f"{how} failed:\n{result.stderr[-3000:]}")
    r = json.loads(result.stdout.strip().splitlines()[-1])
    if how != "imports":
        r["bytes"] = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return r


def make_checkpoint(preset_name: str, param_dtype: str, workdir: str) -> None:
    import jax
    from flax import nnx

    from granite_jax.checkpoint import save_model
    from granite_jax.config import preset
    from granite_jax.model import GraniteModel

    if os.path.isdir(os.path.join(workdir, "checkpoints", "0")):
        return
    cfg = preset(preset_name, param_dtype=param_dtype)
    t = time.perf_counter()
    model = nnx.jit(lambda: GraniteModel(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))()
    save_model(model, workdir)
    print(f"wrote the {preset_name} checkpoint ({param_dtype}) in {time.perf_counter() - t:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="granite-4.0-h-micro")
    ap.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="export dtype")
    ap.add_argument("--workdir", default="/tmp/granite_export_bench")
    args = ap.parse_args()
    from granite_jax.config import param_count, preset

    run_dir = os.path.join(args.workdir, f"{args.preset}-{args.param_dtype}")
    make_checkpoint(args.preset, args.param_dtype, run_dir)
    total = param_count(preset(args.preset))[0]
    largest = max(preset(args.preset).vocab_size * preset(args.preset).hidden_size, 0)
    rows = {how: run(how, run_dir, os.path.join(args.workdir, "out"), args.dtype)
            for how in ("imports", "export", "in-memory")}
    base = rows["imports"]["peak_rss"]
    print(f"{args.preset}: {total / 1e9:.2f}B parameters, checkpoint {args.param_dtype}, exported as {args.dtype}; "
          f"embedding {largest * 2 / 1e9:.2f} GB in bfloat16\n")
    print("| how | seconds | GB/s written | peak RSS (GB) | above imports (GB) |\n|---|---:|---:|---:|---:|")
    for how in ("export", "in-memory"):
        r = rows[how]
        print(f"| {how} | {r['seconds']:.1f} | {r['bytes'] / r['seconds'] / 1e9:.2f} | {r['peak_rss'] / 1e9:.2f} | "
              f"{(r['peak_rss'] - base) / 1e9:.2f} |")
    e, m = rows["export"], rows["in-memory"]
    print(f"\nexport vs in-memory: {m['seconds'] / e['seconds']:.2f}x the speed, "
          f"{(e['peak_rss'] - base) / (m['peak_rss'] - base):.3f}x the memory above imports")


if __name__ == "__main__":
    main()
