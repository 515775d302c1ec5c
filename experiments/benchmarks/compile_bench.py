"""Compile time of a full-size forward+backward, and how it changes with depth (the layer stack is a scan).

    python experiments/benchmarks/compile_bench.py --preset granite-4.0-h-small --layers 10 20 40 --target cpu
    python experiments/benchmarks/compile_bench.py --preset granite-4.0-h-small --layers 10 20 40 --target v5p:2x2x1
    python experiments/benchmarks/compile_bench.py --layers 10 --pattern mamba --seq-len 1024 --target v5p:2x2x2

Shapes are abstract (`nnx.eval_shape`): nothing of the model is allocated. A TPU target compiles ahead of time with
libtpu's compiler on this (CPU-only) machine; parameters are sharded FSDP over all chips of the topology.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from granite_jax import sharding  # noqa: E402
from granite_jax.config import parse_field_overrides, preset  # noqa: E402
from granite_jax.model import GraniteModel  # noqa: E402


def _layer_types(base: tuple[str, ...], n_layers: int) -> tuple[str, ...]:
    return tuple(base[i % len(base)] for i in range(n_layers))


def compile_time(preset_name: str, n_layers: int, target: str, batch: int, seq_len: int,
                 remat: str = "full", pattern: tuple[str, ...] = (), fields: dict | None = None) -> tuple[float, float]:
    """(lower seconds, compile seconds) of jit(value_and_grad(next-token loss)) for the preset cut to n_layers
    (layer types repeating `pattern`, default the preset's own; `fields` replace ModelConfig fields)."""
    # "auto" choices are resolved for the target, not for this machine.
    cfg = preset(preset_name, **{"dtype": "bfloat16", "remat": remat, **(fields or {})})
    cfg = cfg.for_platform("cpu" if target == "cpu" else "tpu")
    cfg = cfg.replace(num_hidden_layers=n_layers, layer_types=_layer_types(pattern or cfg.layer_types, n_layers))
    abstract = nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def loss_fn(state, ids):
        logits = nnx.merge(graphdef, state)(ids)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    step = jax.value_and_grad(loss_fn)
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    if target == "cpu":
        jitted, args, mesh = jax.jit(step), (state, ids), None
    else:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=target).devices
        mesh = sharding.make_mesh({"fsdp": -1}, devices=devices)
        state_sh = sharding.param_shardings(state, mesh)
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, state_sh)
        batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
        ids = jax.ShapeDtypeStruct(ids.shape, ids.dtype, sharding=batch_sh)
        jitted, args = jax.jit(step, out_shardings=(None, state_sh)), (state, ids)
    t0 = time.perf_counter()
    if mesh is None:
        lowered = jitted.lower(*args)
    else:
        with jax.set_mesh(mesh):  # the SSD op runs its Pallas kernel per shard under the mesh
            lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="granite-4.0-h-small")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--target", default="cpu", help="'cpu' or a TPU topology name such as v5p:2x2x1")
    parser.add_argument("--batch", type=int, default=0, help="default: one row per device")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--pattern", default="", help="layer types to repeat, e.g. 'mamba' or 'mamba,attention'")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a ModelConfig field, e.g. --set num_local_experts=0 (repeatable)")
    args = parser.parse_args()
    fields = parse_field_overrides(args.set)
    pattern = tuple(t for t in args.pattern.split(",") if t)
    print(f"{args.preset} forward+backward, seq {args.seq_len}, remat {args.remat}, target {args.target}, "
          f"jax {jax.__version__}")
    print(f"| layers | lower (s) | compile (s) | total (s) |\n|---|---|---|---|")
    for n in args.layers:
        n_dev = 1 if args.target == "cpu" else None
        batch = args.batch or (n_dev or _tpu_chips(args.target))
        lower_s, compile_s = compile_time(args.preset, n, args.target, batch, args.seq_len, args.remat, pattern,
                                          fields)
        print(f"| {n} | {lower_s:.1f} | {compile_s:.1f} | {lower_s + compile_s:.1f} |", flush=True)


def _tpu_chips(target: str) -> int:
    from jax.experimental import topologies

    return len(topologies.get_topology_desc(platform="tpu", topology_name=target).devices)


if __name__ == "__main__":
    main()
