"""Forward+backward of a ~20M-parameter 4-layer hybrid (Mamba-2 + attention + MoE) at sequence 1024 on CPU:
granite-jax vs transformers' PyTorch GraniteMoeHybridForCausalLM on the same weights, timed side by side.

    python experiments/benchmarks/model_bench.py [--preset bench-hybrid-20m] [--seq-len 1024] [--batch 1] [--iters 5]
    python experiments/benchmarks/model_bench.py --dtype bfloat16   # bf16 compute vs PyTorch under bf16 autocast
    python experiments/benchmarks/model_bench.py --profile          # also: where our step's time goes, by source op
    python experiments/benchmarks/model_bench.py --matmuls          # also: the matrix products alone (both)
    python experiments/benchmarks/model_bench.py --set num_local_experts=0 --set num_experts_per_tok=0  # a cut model

It also prints the step's floor on this machine: the model FLOPs of a training step (`granite_jax.flops`, matmuls and
the SSD/attention contractions) at the rate this machine multiplies matrices of the model's width in the compute
dtype (the faster of JAX and PyTorch), as if nothing else took time. `--matmuls` measures what the matrix products
themselves take: each `dot_general` of our step (from its jaxpr) compiled and timed alone, and the self time of
PyTorch's matmul kernels (mm, bmm, ...) inside its step (`torch.profiler`).

Both compute the mean next-token cross-entropy and its gradient with respect to every parameter from float32
parameters, in float32 (default) or with bfloat16 compute (ours: `ModelConfig.dtype`; PyTorch: `torch.autocast`).
Ours is compiled with the XLA options the framework's own steps use (`granite_jax.xla_options`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gzip
import json
import os
import pathlib
import re
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

from granite_jax import hf, xla_options  # noqa: E402
from granite_jax.config import param_count, parse_field_overrides, preset  # noqa: E402
from granite_jax.flops import model_flops_per_token  # noqa: E402
from granite_jax.model import GraniteModel  # noqa: E402


def _median_seconds(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_flops_per_s(rows: int, width: int, dtype: str, iters: int = 20) -> float:
    """This machine's best rate, JAX or PyTorch, for [rows, width] x [width, 4 * width] matmuls in `dtype`."""
    flops = 2 * rows * width * 4 * width
    a, b = jnp.ones((rows, width), dtype), jnp.ones((width, 4 * width), dtype)
    mm = jax.jit(jnp.matmul)
    jax_s = _median_seconds(lambda: jax.block_until_ready(mm(a, b)), iters + 1)
    t_dtype = getattr(torch, dtype)
    ta, tb = torch.ones(rows, width, dtype=t_dtype), torch.ones(width, 4 * width, dtype=t_dtype)
    torch_s = _median_seconds(lambda: ta @ tb, iters + 1)
    return flops / min(jax_s, torch_s)


def print_profile(step, *args, top: int = 20) -> None:
    """Traces `step(*args)` with jax.profiler and prints the time of its XLA operations grouped by the JAX source
    operation they came from (forward / backward), largest first, as a share of the step."""
    hlo = step.lower(*args).compile().as_text()
    source = dict(re.findall(r'%(\S+) = .*?metadata=\{op_name="([^"]+)"', hlo))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        jax.block_until_ready(step(*args))
        jax.profiler.stop_trace()
        with gzip.open(next(pathlib.Path(tmp).rglob("*.json.gz"))) as f:
            events = json.load(f)["traceEvents"]
    by_op, total = collections.Counter(), 0.0
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in source:
            op = source[name]
            part = "backward" if "transpose(" in op else "forward"
            op = re.sub(r"jit\([^)]*\)/|(transpose\()?jvp\(\)\)?/|while/body/|closed_call/", "", op)
            by_op[f"{part}: {op}"] += e["dur"]
            total += e["dur"]
    print(f"our step, {total / 1e3:.0f} ms in XLA operations, by source operation:")
    for op, us in by_op.most_common(top):
        print(f"  {us / total:6.1%} {us / 1e3:8.1f} ms  {op}")


@dataclasses.dataclass(frozen=True)
class Matmul:
    lhs: jax.ShapeDtypeStruct
    rhs: jax.ShapeDtypeStruct
    dimension_numbers: tuple
    preferred_element_type: object

    @property
    def flops(self) -> int:
        (_, rhs_contract), (_, rhs_batch) = self.dimension_numbers
        rhs_free = [n for i, n in enumerate(self.rhs.shape) if i not in rhs_contract and i not in rhs_batch]
        return 2 * int(np.prod(self.lhs.shape)) * int(np.prod(rhs_free))


def step_matmuls(closed_jaxpr) -> tuple[collections.Counter, int]:
    """(how often each distinct `dot_general` runs in one call of `closed_jaxpr`, counting scan bodies once per step;
    the number of `lax.cond` calls, whose products are left out): the products that surely run."""
    counts, under_cond = collections.Counter(), 0

    def walk(jaxpr, times):
        nonlocal under_cond
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "cond":
                under_cond += times
                continue
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
                counts[Matmul(lhs, rhs, eqn.params["dimension_numbers"],
                              eqn.params["preferred_element_type"])] += times
            inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
                        walk(getattr(sub, "jaxpr", sub), inner)

    walk(closed_jaxpr.jaxpr, 1)
    return counts, under_cond


def time_matmuls(counts: collections.Counter, iters: int) -> tuple[float, int]:
    """(seconds, FLOPs) of the products in `counts`, each compiled alone with the framework's XLA options and timed
    on random operands, times how often it runs."""
    seconds, flops, key = 0.0, 0, jax.random.key(0)
    options = xla_options.compiler_options(jax.default_backend())
    for mm, times in counts.items():
        dot = jax.jit(functools.partial(jax.lax.dot_general, dimension_numbers=mm.dimension_numbers,
                                        preferred_element_type=mm.preferred_element_type), compiler_options=options)
        lhs, rhs = (jax.random.normal(key, a.shape).astype(a.dtype) for a in (mm.lhs, mm.rhs))
        jax.block_until_ready(dot(lhs, rhs))
        seconds += times * _median_seconds(lambda: jax.block_until_ready(dot(lhs, rhs)), iters)
        flops += times * mm.flops
    return seconds, flops


_TORCH_MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::_grouped_mm")


def torch_matmul_seconds(step) -> float:
    """Self CPU time of PyTorch's matrix-product kernels in one call of `step` (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in _TORCH_MATMULS) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-hybrid-20m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--profile", action="store_true", help="print our step's time per source operation")
    parser.add_argument("--matmuls", action="store_true",
                        help="also time the matrix products alone: each of our step's, and PyTorch's inside its step")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a ModelConfig field of the preset, e.g. --set num_local_experts=0 (repeatable)")
    args = parser.parse_args()

    cfg = preset(args.preset, **parse_field_overrides(args.set))
    torch.manual_seed(0)
    ref = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**cfg.to_hf()))
    ids_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len))
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = hf.from_pretrained(tmp)
    # The same float32 parameters in a model of the whole config: config.json keeps only the Hugging Face fields, so
    # the compute dtype and framework fields given with --set (kernels, loops) are set here.
    full = nnx.eval_shape(lambda: GraniteModel(cfg.replace(dtype=args.dtype), rngs=nnx.Rngs(0)))
    nnx.update(full, nnx.state(ours))
    ours = full

    # granite-jax: jit(value_and_grad) over all parameters.
    graphdef, state = nnx.split(ours)

    @functools.partial(jax.jit, compiler_options=xla_options.compiler_options(jax.default_backend()))
    def jax_step(state, ids):
        def loss_fn(state):
            logits = nnx.merge(graphdef, state)(ids)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
        return jax.value_and_grad(loss_fn)(state)

    ids = jnp.asarray(ids_np)
    t0 = time.perf_counter()
    jax.block_until_ready(jax_step(state, ids))
    compile_s = time.perf_counter() - t0
    jax_s = _median_seconds(lambda: jax.block_until_ready(jax_step(state, ids)), args.iters)
    if args.profile:
        print_profile(jax_step, state, ids)

    # transformers (PyTorch, eager, the same weights).
    ref.train()
    ids_t = torch.as_tensor(ids_np)

    def torch_step():
        ref.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            out = ref(ids_t, labels=ids_t, use_cache=False)  # transformers' cache fails on all-Mamba models
        out.loss.backward()

    torch_step()
    torch_s = _median_seconds(torch_step, args.iters)

    total, active = param_count(cfg)
    tokens = args.batch * args.seq_len
    cut = "".join(f" --set {item}" for item in args.set)
    print(f"{args.preset}{cut}: {total / 1e6:.1f}M params ({active / 1e6:.1f}M active), batch {args.batch} x "
          f"{args.seq_len}, {args.dtype} compute, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| implementation | fwd+bwd (s) | tokens/s |\n|---|---|---|")
    print(f"| granite-jax (jit, compile {compile_s:.1f} s) | {jax_s:.3f} | {tokens / jax_s:,.0f} |")
    print(f"| transformers PyTorch | {torch_s:.3f} | {tokens / torch_s:,.0f} |")
    print(f"speed-up: {torch_s / jax_s:.2f}x")
    step_flops = model_flops_per_token(cfg, args.seq_len)["training"] * tokens
    rate = matmul_flops_per_s(tokens, cfg.hidden_size, args.dtype)
    print(f"floor: {step_flops / 1e9:.0f} GFLOP per step at this machine's {args.dtype} matmul rate "
          f"({rate / 1e9:.0f} GFLOP/s) = {step_flops / rate:.3f} s; 2x PyTorch needs {torch_s / 2:.3f} s")
    if args.matmuls:
        counts, under_cond = step_matmuls(jax_step.trace(state, ids).jaxpr)
        mm_s, mm_flops = time_matmuls(counts, args.iters)
        print(f"matrix products: ours {sum(counts.values())} ({len(counts)} distinct), {mm_flops / 1e9:.0f} GFLOP, "
              f"each timed alone: {mm_s:.3f} s ({mm_flops / mm_s / 1e9:.0f} GFLOP/s), a lower bound: the products "
              f"inside {under_cond} lax.cond calls (attention blocks the causal mask may skip) are left out. "
              f"PyTorch's matmul kernels inside its step (torch.profiler): {torch_matmul_seconds(torch_step):.3f} s")


if __name__ == "__main__":
    main()
