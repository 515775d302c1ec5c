"""Model FLOPs utilisation (MFU) of the training step on one accelerator: a granite-4.0-h-micro-shaped hybrid at 4K
context, cut in depth to fit one device, side by side in one run with the dense granite-4.0-micro shape cut the same
way (the transformer a user would otherwise train).

    python experiments/benchmarks/mfu_bench.py                         # 20 of 40 layers, batch 2 x 4096, both shapes
    python experiments/benchmarks/mfu_bench.py --variants h-micro,h-micro-xla-ssd   # Pallas SSD vs the pure-JAX one
    python experiments/benchmarks/mfu_bench.py --layers 2 --batch 1 --seq-len 256 --steps 2   # a quick run on CPU

Each variant runs the real `granite-jax train` step (`train_step.make_train_step`: next-token loss, global-norm
clipping, AdamW; float32 master weights, bfloat16 compute, full remat unless told otherwise) on the first device, one
document per row. MFU = tokens/s x model FLOPs per token (`granite_jax.flops`: 3 x forward, causal attention counted
half, no rematerialisation counted) / the device's dense bfloat16 peak (`flops.PEAK_BF16_FLOPS`); a device without a
listed peak (a CPU) gets the achieved TFLOP/s only. The compiled step's own memory figures (arguments + temporaries)
are printed with it. Needs jax, flax, optax and ml-collections (not grain or array-record).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from train_bench import one_device_train_step

# name -> (preset, fields replaced in it)
VARIANTS = {
    "h-micro": ("granite-4.0-h-micro", {}),
    "h-micro-xla-ssd": ("granite-4.0-h-micro", {"ssd_impl": "xla"}),
    "micro": ("granite-4.0-micro", {}),
}


def variant_config(name: str, layers: int, dtype: str, remat: str, fields: dict):
    """The variant's preset cut to its first `layers` layers (the layer pattern kept), in the given compute dtype."""
    from granite_jax.config import preset

    preset_name, own = VARIANTS[name]
    cfg = preset(preset_name, dtype=dtype, param_dtype="float32", remat=remat, **own, **fields)
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise SystemExit(f"--layers {layers}: must be between 1 and {preset_name}'s {cfg.num_hidden_layers} layers")
    return cfg.replace(num_hidden_layers=layers, layer_types=cfg.layer_types[:layers])


def measure(cfg, batch: int, seq_len: int, steps: int) -> dict:
    """Compile and time the train step of `cfg` on [batch, seq_len] random tokens: seconds per step (mean of `steps`
    after one warm-up step), compile seconds and the compiled step's memory figures."""
    import jax

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
    step_fn, state, batch_arrays = one_device_train_step(cfg, tokens)
    t = time.perf_counter()
    with jax.set_mesh(batch_arrays["tokens"].sharding.mesh):  # as the step itself lowers
        compiled = step_fn.jitted.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()
    state, metrics = compiled(state, batch_arrays)  # warm-up
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / steps
    gb = lambda n: (n or 0) / 1e9  # noqa: E731
    return {"step_s": step_s, "compile_s": compile_s, "loss": float(metrics["loss"]),
            "arguments_gb": gb(getattr(memory, "argument_size_in_bytes", 0)),
            "temporaries_gb": gb(getattr(memory, "temp_size_in_bytes", 0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="h-micro,micro", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--layers", type=int, default=20, help="the first N layers of each preset (40 in full)")
    parser.add_argument("--batch", type=int, default=2, help="rows of --seq-len tokens per step")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a ModelConfig field for every variant, e.g. --set logits_chunk_tokens=1024")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"--variants {args.variants!r}: each must be one of {', '.join(VARIANTS)}")
    import jax

    from granite_jax import flops
    from granite_jax.config import param_count, parse_field_overrides

    fields = parse_field_overrides(args.set)

    device = jax.devices()[0]
    peak = flops.peak_flops_per_device(device)
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; bf16 peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'not listed: MFU not reported'}; batch {args.batch} x "
          f"{args.seq_len}, {args.dtype} compute, remat {args.remat}, {args.steps} timed steps", flush=True)
    rows = []
    for name in names:
        cfg = variant_config(name, args.layers, args.dtype, args.remat, fields)
        per_token = flops.model_flops_per_token(cfg, args.seq_len)["training"]
        r = measure(cfg, args.batch, args.seq_len, args.steps)
        tokens_s = args.batch * args.seq_len / r["step_s"]
        mfu = flops.mfu(tokens_s, per_token, peak)
        rows.append({"name": name, "cfg": cfg, "per_token": per_token, "tokens_s": tokens_s,
                     "rate": tokens_s * per_token, "mfu": mfu, **r})
        print(f"  {name}: {r['step_s']:.3f} s/step (compile {r['compile_s']:.0f} s), loss {r['loss']:.3f}",
              flush=True)
    print("| variant | layers (attention) | params | training GFLOP/token | step (s) | tokens/s | TFLOP/s | MFU "
          "| arguments + temporaries (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cfg, mfu = row["cfg"], row["mfu"]
        print(f"| {row['name']} | {cfg.num_hidden_layers} ({len(cfg.attention_layer_indices)}) | "
              f"{param_count(cfg)[0] / 1e9:.2f}B | {row['per_token'] / 1e9:.2f} | {row['step_s']:.3f} | "
              f"{row['tokens_s']:,.0f} | {row['rate'] / 1e12:.1f} | {'-' if mfu is None else f'{mfu:.1%}'} | "
              f"{row['arguments_gb']:.1f} + {row['temporaries_gb']:.1f} |")
    for row in rows[:-1]:
        print(f"{row['name']} / {rows[-1]['name']}: {row['rate'] / rows[-1]['rate']:.2f}x the achieved FLOP/s")


if __name__ == "__main__":
    main()
