"""Per-device HBM of a full training step vs sequence length, hybrid (Mamba-2 + 4 attention layers) vs all-attention,
read from the TPU compiler itself: the step is compiled ahead of time for a real TPU topology on this CPU-only machine
(libtpu, FACTS.md §4) and `compiled.memory_analysis()` gives what one chip needs. Nothing is allocated or run.

    python experiments/benchmarks/memory_scaling.py                       # the study in docs/long_context.md
    python experiments/benchmarks/memory_scaling.py --presets granite-4.0-h-micro --lengths 524288 \
        --context-attention ring --remat full --no-write                  # one configuration

The step: next-token cross entropy of one packed row of `length` tokens (bfloat16 compute, float32 master weights),
value_and_grad with per-layer remat, an AdamW update, parameters and optimizer state donated. The mesh is
`context=<chips>` (the sequence and, FSDP-style, the parameters split over every chip of the topology).
Peak = arguments + outputs - aliased (donated) + temporaries, per chip.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT compiles only: other processes may hold libtpu too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from granite_jax import sharding  # noqa: E402
from granite_jax.config import preset  # noqa: E402
from granite_jax.model import GraniteModel  # noqa: E402
from granite_jax.train_step import chunked_cross_entropy_sum, next_token_targets  # noqa: E402

GiB = 2 ** 30
DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
TABLE_BEGIN, TABLE_END = "<!-- memory-table:begin -->", "<!-- memory-table:end -->"


def next_token_loss(model, tokens_BL, segment_ids_BL):
    """The trainer's loss (granite_jax.train_step): targets are shifted, the logits computed
    `logits_chunk_tokens` tokens per shard at a time (0: the whole [B,L,V] at once)."""
    targets_BL, weights_BL = next_token_targets(tokens_BL, segment_ids_BL)
    h_BLD = model(tokens_BL, segment_ids=segment_ids_BL, return_hidden=True)
    ce = chunked_cross_entropy_sum(h_BLD, model.head(), targets_BL, weights_BL, model.config.logits_chunk_tokens)
    return ce / jnp.maximum(jnp.sum(weights_BL), 1.0)


def compile_step(preset_name: str, length: int, topology: str, *, context_attention: str, remat: str,
                 logits_chunk: int, batch: int = 1):
    """The compiled train step (a `jax.stages.Compiled`) for `topology`, mesh context = all its chips."""
    from jax.experimental import topologies

    cfg = preset(preset_name, dtype="bfloat16", remat=remat, context_attention=context_attention,
                 logits_chunk_tokens=logits_chunk).for_platform("tpu")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = sharding.make_mesh({"context": -1}, devices=devices)
    tx = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0))))
    param_sh = sharding.param_shardings(params, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), params, param_sh)
    # Adam moments are sharded like the parameters; counters are replicated.
    params_def = jax.tree.structure(params)

    def moment_shardings(sub):
        if jax.tree.structure(sub) == params_def:
            return param_sh
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), sub)

    opt_state = jax.eval_shape(tx.init, params)
    opt_sh = jax.tree.map(moment_shardings, opt_state, is_leaf=lambda x: jax.tree.structure(x) == params_def)
    opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), opt_state, opt_sh)
    row = NamedSharding(mesh, sharding.logical_to_spec(sharding.batch_names(2), mesh))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=row)

    def step(params, opt_state, tokens_BL, segment_ids_BL):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), tokens_BL,
                                                                   segment_ids_BL))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, out_shardings=(param_sh, opt_sh, NamedSharding(mesh, P())), donate_argnums=(0, 1))
    with jax.set_mesh(mesh):
        return jitted.lower(params, opt_state, tokens, tokens).compile()


def measure(preset_name, length, topology, **kw) -> dict:
    """{'peak', 'temp', 'args'} in bytes per chip, or {'error': ...} when the compiler rejects it (e.g. out of HBM:
    then 'peak' is what the compiler says the program needs, when it says)."""
    start = time.perf_counter()
    try:
        mem = compile_step(preset_name, length, topology, **kw).memory_analysis()
    except Exception as e:  # noqa: BLE001 - the compiler's verdict is a result here
        text = str(e)
        needed = re.search(r"Used ([0-9.]+)([GMK]) of ([0-9.]+)([GMK]) hbm", text)
        out = {"error": text.splitlines()[0][:200], "seconds": time.perf_counter() - start}
        if needed:
            scale = {"G": GiB, "M": 2 ** 20, "K": 2 ** 10}
            out["peak"] = float(needed.group(1)) * scale[needed.group(2)]
        return out
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    return {"peak": peak, "temp": mem.temp_size_in_bytes, "args": mem.argument_size_in_bytes,
            "seconds": time.perf_counter() - start}


def slope(points: dict[int, dict]) -> float:
    """Least-squares bytes per token of the peak over the lengths that compiled."""
    xs = [n for n, r in points.items() if "error" not in r]
    if len(xs) < 2:
        return float("nan")
    ys = [points[n]["peak"] for n in xs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def markdown(results: dict[str, dict[int, dict]], topology: str, kw: dict) -> str:
    names = list(results)
    lengths = sorted({n for r in results.values() for n in r})
    lines = [f"Per-chip HBM of one training step on `{topology}` (mesh context = all chips, "
             f"remat={kw['remat']}, context_attention={kw['context_attention']}, "
             f"logits_chunk_tokens={kw['logits_chunk']}), GiB:", "",
             "| tokens | " + " | ".join(names) + (" | hybrid / dense |" if len(names) == 2 else " |"),
             "|---:|" + "---:|" * (len(names) + (len(names) == 2))]
    for n in lengths:
        cells = []
        for name in names:
            r = results[name].get(n)
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append(f"does not compile ({r['peak'] / GiB:.1f} needed)" if "peak" in r else "error")
            else:
                cells.append(f"{r['peak'] / GiB:.2f}")
        if len(names) == 2:
            a, b = (results[name].get(n, {}) for name in names)
            ok = all("error" not in r and r for r in (a, b))
            cells.append(f"{a['peak'] / b['peak']:.2f}" if ok else "")
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines.append("")
    for name in names:
        lines.append(f"- {name}: slope {slope(results[name]):,.0f} bytes/token per chip "
                     f"({slope(results[name]) * len(_chips(topology)):,.0f} bytes/token summed over chips)")
    return "\n".join(lines)


def _chips(topology):
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def plot(results, topology, path, hbm_gib):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in results.items():
        xs = sorted(n for n, r in points.items() if "peak" in r)
        ax.plot(xs, [points[n]["peak"] / GiB for n in xs], marker="o", label=name)
        bad = [n for n in xs if "error" in points[n]]
        ax.scatter(bad, [points[n]["peak"] / GiB for n in bad], marker="x", color="red", zorder=3)
    ax.axhline(hbm_gib, color="grey", linestyle="--", label=f"HBM per chip ({hbm_gib:.0f} GiB)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per sample (one packed row)")
    ax.set_ylabel("HBM per chip (GiB)")
    ax.set_title(f"Training-step memory per chip, {topology}, context={len(_chips(topology))}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_table(text: str, path: str) -> None:
    """Replace the generated table between the markers of docs/long_context.md (or append it)."""
    doc = open(path).read() if os.path.exists(path) else ""
    block = f"{TABLE_BEGIN}\n{text}\n{TABLE_END}"
    if TABLE_BEGIN in doc:
        doc = doc[:doc.index(TABLE_BEGIN)] + block + doc[doc.index(TABLE_END) + len(TABLE_END):]
    else:
        doc = doc + "\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["granite-4.0-h-micro", "granite-4.0-micro"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 65536, 131072, 262144, 524288])
    ap.add_argument("--topology", default="v5p:2x2x2")
    ap.add_argument("--hbm-gib", type=float, default=95.0 * 1e9 / GiB, help="HBM per chip, for the plot")
    ap.add_argument("--context-attention", default="all_gather", choices=["all_gather", "ring"])
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    ap.add_argument("--logits-chunk", type=int, default=4096,
                    help="train.logits_chunk_tokens: logits this many tokens per chip at a time (0 = all)")
    ap.add_argument("--results", default="/tmp/granite_memory_scaling.json",
                    help="JSON file the measurements accumulate in")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/long_context.md and the plot")
    args = ap.parse_args()
    kw = dict(context_attention=args.context_attention, remat=args.remat, logits_chunk=args.logits_chunk)
    # Results accumulate in a JSON file (one compile takes minutes on a small CPU host): rerunning skips what is there.
    saved = json.load(open(args.results)) if os.path.exists(args.results) else {}
    key = f"{args.topology}|{args.context_attention}|{args.remat}|{args.logits_chunk}"
    results = {name: {int(n): r for n, r in saved.get(key, {}).get(name, {}).items()} for name in args.presets}
    for n in args.lengths:
        for name in args.presets:
            if n in results[name]:
                continue
            r = results[name][n] = measure(name, n, args.topology, **kw)
            what = r.get("error") or f"peak {r['peak'] / GiB:.2f} GiB (temp {r['temp'] / GiB:.2f})"
            print(f"{name:22s} {n:>8,} tokens: {what}  [{r['seconds']:.0f}s]", flush=True)
            saved.setdefault(key, {}).setdefault(name, {})[str(n)] = r
            with open(args.results, "w") as f:
                json.dump(saved, f, indent=1)
    text = markdown(results, args.topology, kw)
    print(text)
    if not args.no_write:
        write_table(text, os.path.join(DOCS, "long_context.md"))
        plot(results, args.topology, os.path.join(DOCS, "memory_scaling.png"), args.hbm_gib)


if __name__ == "__main__":
    main()
