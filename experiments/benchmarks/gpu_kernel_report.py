"""The Pallas GPU SSD kernels compiled for an NVIDIA H100 (sm_90a) on a machine without a GPU: compile time, ptxas's
registers and spills per thread, shared memory per block and the program's temporaries, forward and backward, at the
granite-4.0-h-micro (64 heads) and h-small (128 heads) mixer shapes per device (head_dim 64, d_state 128, one group,
bfloat16, one row) at 4K and 32K tokens.

    pip install -e ".[gpu-aot]"
    python experiments/benchmarks/gpu_kernel_report.py                  # the 8 compiles, a Markdown table
    python experiments/benchmarks/gpu_kernel_report.py --target h200    # the same for H200

Without a device XLA does not autotune, so these are the figures of XLA's default choices around the kernels; the
kernels' own tiles are fixed in pallas_kernels/ssd/pallas_gpu.py. Results go to docs/kernels.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

SHAPES = {"h-micro": 64, "h-small": 128}  # Mamba heads per device (no tensor parallelism)


def report(target: str, heads: int, length: int, which: str) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from granite_jax import aot_targets
    from pallas_kernels.ssd import ssd

    mesh = Mesh(aot_targets.target(f"{target}:1x1").devices, ("data",))
    rep = NamedSharding(mesh, P())
    sds = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
    args = (sds((1, length, heads, 64)), sds((1, length, heads), jnp.float32), sds((heads,), jnp.float32),
            sds((1, length, 1, 128)), sds((1, length, 1, 128)))
    forward = lambda *a: ssd(*a, chunk_size=256, impl="pallas_gpu")
    loss = lambda *a: jnp.sum(forward(*a).astype(jnp.float32) ** 2)
    fn = forward if which == "forward" else jax.grad(loss, argnums=tuple(range(5)))
    with tempfile.TemporaryDirectory() as dump:
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile(compiler_options={"xla_dump_to": dump})
        seconds = time.perf_counter() - start
        kernels = aot_targets.kernel_resources(dump, prefix="ssd_")
    return {"compile_s": seconds, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "kernels": kernels,
            "triton_calls": compiled.as_text().count('custom_call_target="__gpu$xla.gpu.triton"')}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="h100", choices=["h100", "h200"])
    parser.add_argument("--lengths", default="4096,32768")
    args = parser.parse_args()
    from granite_jax import aot_targets

    aot_targets.prepare_gpu_compile()
    print(f"| shape | tokens | pass | compile | temporaries | kernel | registers | spills (store/load) | shared memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, heads in SHAPES.items():
        for length in map(int, args.lengths.split(",")):
            for which in ("forward", "backward"):
                r = report(args.target, heads, length, which)
                for kernel, k in sorted(r["kernels"].items()):
                    print(f"| {name} | {length} | {which} | {r['compile_s']:.1f} s | {r['temp_bytes'] / 1e9:.2f} GB "
                          f"| {kernel} | {k['registers']} x {k.get('threads_per_block', '?')} threads | "
                          f"{k['spill_store_bytes']}/{k['spill_load_bytes']} B | "
                          f"{k.get('shared_memory_bytes', 0) / 1024:.0f} KiB |", flush=True)


if __name__ == "__main__":
    main()
