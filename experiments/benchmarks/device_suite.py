"""Everything a GPU must confirm, in one command of under 8 minutes: the Pallas GPU SSD kernels against the pure-JAX
reference on the device (forward and gradients, float32 and bfloat16), `ssd_bench.py`, `mfu_bench.py`, the MoE grouped
matmul throughput (`moe_bench.py --flops`) and a 50-step quickstart training run; one JSON and one Markdown table.

    python experiments/benchmarks/device_suite.py --out suite      # writes suite.json and suite.md
    python experiments/benchmarks/device_suite.py --smoke --out s  # CPU: tiny shapes, checks the suite itself runs

Each stage runs in its own process with its own time limit, so one that fails or hangs costs only its own row. Runs on
the jax of this project (0.10.x, CUDA 12) and on jax 0.11 (CUDA 13). The training run needs grain, array-record and
ml-collections installed beside jax. Put the table in docs/benchmarks.md with the device it names.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def stages(smoke: bool, workdir: str) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each stage; the limits add up to under 8 minutes."""
    py = sys.executable
    bench = lambda name: os.path.join(HERE, name)
    if smoke:
        return [("kernels", [py, __file__, "--kernel-check", "--smoke"], 300),
                ("ssd_bench", [py, bench("ssd_bench.py"), "--smoke"], 120),
                ("mfu_bench", [py, bench("mfu_bench.py"), "--layers", "2", "--batch", "1", "--seq-len", "256",
                               "--steps", "1", "--variants", "h-micro"], 300),
                ("moe_flops", [py, bench("moe_bench.py"), "--flops", "--smoke"], 120),
                ("train_50", [py, "-m", "granite_jax.cli", "quickstart", "--steps", "5", "--workdir", workdir], 300)]
    return [("kernels", [py, __file__, "--kernel-check"], 60),
            ("ssd_bench", [py, bench("ssd_bench.py"), "--lengths", "4096,32768", "--reps", "5"], 100),
            ("mfu_bench", [py, bench("mfu_bench.py"), "--steps", "5"], 150),
            ("moe_flops", [py, bench("moe_bench.py"), "--flops"], 60),
            ("train_50", [py, "-m", "granite_jax.cli", "quickstart", "--steps", "50", "--workdir", workdir], 90)]


def kernel_check(smoke: bool) -> int:
    """pallas_gpu against xla on this device: y, final state and every gradient; prints one JSON line per case."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.ssd import ssd

    impl = "pallas_gpu" if jax.default_backend() == "gpu" else "xla"
    interpret = impl == "xla"  # CPU smoke: the check itself runs, against itself
    length, heads = (96, 4) if smoke else (4096, 64)
    failed = 0
    for dtype, tol in (("float32", 2e-3), ("bfloat16", 3e-2)):
        keys = jax.random.split(jax.random.key(0), 6)
        dt_type = jnp.dtype(dtype)
        x = jax.random.normal(keys[0], (1, length, heads, 64), dt_type)
        dt = jax.random.normal(keys[1], (1, length, heads), jnp.float32) - 2.0
        A = -jnp.exp(jax.random.normal(keys[2], (heads,), jnp.float32))
        B = jax.random.normal(keys[3], (1, length, 1, 128), dt_type) * 0.3
        C = jax.random.normal(keys[4], (1, length, 1, 128), dt_type) * 0.3
        seg = jnp.cumsum(jax.random.uniform(keys[5], (1, length)) < 2.0 / 1024, axis=1).astype(jnp.int32)
        args = (x, dt, A, B, C)

        def run(which, *a):
            y, final = ssd(*a, chunk_size=256, D=jnp.ones((heads,)), dt_softplus=True, segment_ids=seg,
                           return_final_state=True, impl=which, interpret=interpret and which != "xla")
            return y, final

        def loss(which, *a):
            y, final = run(which, *a)
            return jnp.sum(jnp.sin(y.astype(jnp.float32))) + jnp.sum(final)

        got = jax.jit(lambda *a: (run(impl, *a), jax.grad(lambda *b: loss(impl, *b), argnums=range(5))(*a)))(*args)
        want = jax.jit(lambda *a: (run("xla", *a), jax.grad(lambda *b: loss("xla", *b), argnums=range(5))(*a)))(*args)
        errors = {}
        for name, g, w in zip(("y", "final", "dx", "ddt", "dA", "dB", "dC"), jax.tree.leaves(got),
                              jax.tree.leaves(want)):
            g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
            errors[name] = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
        ok = all(np.isfinite(v) and v <= tol for v in errors.values())
        failed += not ok
        print(json.dumps({"impl": impl, "dtype": dtype, "length": length, "heads": heads, "tolerance": tol,
                          "ok": ok, "rel_err": errors}))
    return 1 if failed else 0


def run_stage(name: str, command: list[str], limit: int) -> dict:
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
        status, out, err = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit} s"
        out, err = ((s or b"").decode(errors="replace") for s in (e.stdout, e.stderr))
    # A stage's figures are its stdout; its stderr (logs, progress bars) only says why a stage failed.
    lines = [line for line in (out if status == "ok" else out + err).splitlines() if line.strip()]
    return {"stage": name, "status": status, "seconds": round(time.perf_counter() - start, 1),
            "command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in command),
            "output_tail": lines[-40:]}


def device_line() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform} {getattr(d, 'device_kind', '')} x{jax.device_count()}, jax {jax.__version__}"


def markdown(device: str, rows: list[dict]) -> str:
    out = [f"Device suite on {device}", "", "| stage | status | seconds | command |", "|---|---|---|---|"]
    out += [f"| {r['stage']} | {r['status']} | {r['seconds']} | `{r['command']}` |" for r in rows]
    for r in rows:
        out += ["", f"### {r['stage']}", "", "```", *r["output_tail"][-20:], "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="device_suite", help="writes OUT.json and OUT.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (checks the suite runs)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of the stages")
    parser.add_argument("--kernel-check", action="store_true", help=argparse.SUPPRESS)  # one stage, in-process
    args = parser.parse_args(argv)
    if args.kernel_check:
        return kernel_check(args.smoke)
    import tempfile

    device = device_line()
    print(f"device suite on {device}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, command, limit in stages(args.smoke, os.path.join(workdir, "quickstart")):
            if args.stages and name not in args.stages.split(","):
                continue
            rows.append(run_stage(name, command, limit))
            print(f"{name}: {rows[-1]['status']} in {rows[-1]['seconds']} s", flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"device": device, "stages": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(device, rows))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
