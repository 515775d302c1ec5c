"""MoE layer benchmark: expert parallelism vs none, grouped-matmul throughput, all-to-all volume.

    python experiments/benchmarks/moe_bench.py            # CPU, 8 host devices: MoE layer fwd+bwd, EP vs local (~3 min)
    python experiments/benchmarks/moe_bench.py --flops    # GPU/TPU: routed-expert FFN TFLOP/s vs a dense matmul of
                                                          # equal FLOPs at Granite's shapes (add --smoke on CPU)
    python experiments/benchmarks/moe_bench.py --volume   # all-to-all bytes per layer, h-small / h-tiny on v5p-256
    python experiments/benchmarks/moe_bench.py --grouped  # CPU: the grouped matmuls (moe_impl) on one device (~1 min)

Default mode: one MoE layer (router, top-k, routed experts; the shared MLP is not part of it) at scaled-down Granite
ratios (64 experts top-6 like h-tiny, 72 top-10 like h-small), forward+backward w.r.t. weights and input, jitted, the
same global batch on the same 8 devices with three layouts: `local` (mesh fsdp=8: every device runs all experts on its
own tokens, expert weights all-gathered), and expert-parallel over expert=8 and expert=4 x fsdp=2 (padded all-to-all:
XLA:CPU has no ragged all-to-all). `single` is one device doing all the work. Prints median ms and the ratio to
`local`. The 8 CPU "devices" share this machine's cores, so the figures compare total work, not scaling.
Record results in docs/moe.md.
"""

import argparse
import os
import statistics
import sys
import time

if not {"--flops", "--volume", "--grouped"} & set(sys.argv):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from granite_jax import expert_parallel, sharding  # noqa: E402
from granite_jax.config import preset  # noqa: E402
from granite_jax.moe import EXPERT_FFNS, MoE  # noqa: E402

# Dense bf16 peak FLOP/s (datasheets), for the fraction of peak.
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
         "TPU v6 lite": 918e12}


def timed(fn, *args, repeats=5):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def moe_layer_ms(experts, top_k, hidden, ffn, tokens, mesh_cfg, impl, repeats):
    """Median ms of jitted fwd+bwd of one MoE layer on `tokens` tokens ([8, tokens/8, hidden]); mesh None = 1 device."""
    moe = MoE(hidden, ffn, experts, top_k, init_std=0.02, impl=impl, param_dtype=jnp.float32, dtype=jnp.float32,
              rngs=nnx.Rngs(0), dispatch="auto")
    x = jax.random.normal(jax.random.key(1), (8, tokens // 8, hidden))
    mask = jnp.ones(x.shape[:2], bool)
    graphdef, state = nnx.split(moe)

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x, mask)
        return jnp.sum(y * y) + stats["z_sq"]

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    if mesh_cfg is None:
        device = jax.devices()[0]
        return timed(step, jax.device_put(state, device), jax.device_put(x, device), repeats=repeats)
    mesh = sharding.make_mesh(mesh_cfg)
    state = jax.device_put(state, sharding.param_shardings(state, mesh))
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "length", None), mesh)))
    with jax.set_mesh(mesh):
        return timed(step, state, x, repeats=repeats)


def cpu_table(args):
    layouts = [("single (1 device)", None), ("local, fsdp=8", {"fsdp": 8}),
               ("EP expert=8", {"expert": 8}), ("EP expert=4 x fsdp=2", {"expert": 4, "fsdp": 2})]
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, hidden {args.hidden}, expert FFN {args.ffn}, float32, "
          f"{len(jax.devices())} CPU devices on {os.cpu_count()} cores")
    print(f"{'experts/top-k':>13} {'impl':>10} {'layout':>22} {'ms':>9} {'vs local':>9}")
    for experts, top_k in ((64, 6), (72, 10)):
        for impl in args.impls.split(","):
            base = None
            for name, mesh_cfg in layouts:
                ms = moe_layer_ms(experts, top_k, args.hidden, args.ffn, args.tokens, mesh_cfg, impl, args.repeats)
                base = ms if mesh_cfg == {"fsdp": 8} else base
                ratio = f"{ms / base:.2f}x" if base else ""
                print(f"{f'{experts}/{top_k}':>13} {impl:>10} {name:>22} {ms:9.1f} {ratio:>9}", flush=True)


def flops_table(args):
    """Routed-expert FFN (sorted tokens, two grouped matmuls, combine) vs the same matmuls for one expert."""
    device = jax.devices()[0]
    peak = next((v for k, v in sorted(PEAKS.items(), key=lambda kv: -len(kv[0])) if k in device.device_kind), None)
    dtype = jnp.bfloat16
    shapes = ([("tiny-smoke", 256, 128, 16, 4, 1024)] if args.smoke else
              [("h-tiny", 1536, 512, 64, 6, args.flops_tokens), ("h-small", 4096, 768, 72, 10, args.flops_tokens)])
    print(f"device: {device.device_kind}; bf16; fwd+bwd; FLOPs = 3 x 6 x tokens x top_k x hidden x ffn")
    print(f"{'shape':>10} {'impl':>10} {'tokens':>7} {'moe ms':>8} {'TFLOP/s':>8} {'dense ms':>9} {'TFLOP/s':>8} "
          f"{'moe/dense':>9} {'of peak':>8}")
    for name, D, F, E, K, T in shapes:
        keys = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(keys[0], (T, D), dtype)
        w_in = (jax.random.normal(keys[1], (E, D, 2, F)) * 0.02).astype(dtype)
        w_out = (jax.random.normal(keys[2], (E, F, D)) * 0.02).astype(dtype)
        logits = jax.random.normal(keys[3], (T, E))
        top_logits, top_idx = jax.lax.top_k(logits, K)
        top_w = jax.nn.softmax(top_logits, -1)
        flops = 3 * 6 * T * K * D * F
        xs = jax.random.normal(keys[4], (T * K, D), dtype)  # the dense matmuls of equal FLOPs

        def dense(xs, w1, w2):
            h = jnp.einsum("sd,dgf->sgf", xs, w1)
            return jnp.einsum("sf,fd->sd", jax.nn.silu(h[:, 0]) * h[:, 1], w2)

        dense_step = jax.jit(jax.grad(lambda *a: jnp.sum(dense(*a).astype(jnp.float32)), argnums=(0, 1, 2)))
        dense_ms = timed(dense_step, xs, w_in[0], w_out[0], repeats=args.repeats)
        for impl in args.impls.split(","):
            ffn = EXPERT_FFNS[impl]
            step = jax.jit(jax.grad(lambda x, a, b: jnp.sum(ffn(x, a, b, top_idx, top_w).astype(jnp.float32)),
                                    argnums=(0, 1, 2)))
            ms = timed(step, x, w_in, w_out, repeats=args.repeats)
            tf, dtf = flops / ms / 1e9, flops / dense_ms / 1e9
            frac = f"{tf * 1e12 / peak:.0%}" if peak else "n/a"
            print(f"{name:>10} {impl:>10} {T:>7} {ms:8.2f} {tf:8.1f} {dense_ms:9.2f} {dtf:8.1f} {tf / dtf:9.0%} "
                  f"{frac:>8}", flush=True)


def grouped_table(args):
    """The routed-expert FFN alone (fwd+bwd w.r.t. input and weights, float32, one device) per `moe_impl`, at the
    shapes of the CPU benchmarks and at a released model's experts/top-k: what `moe_impl="auto"` picks on CPU from."""
    device = jax.devices()[0]
    shapes = [("model_bench", 1024, 512, 256, 8, 2), ("quickstart", 512, 192, 96, 8, 2),
              ("64/6 experts", 1024, 512, 256, 64, 6)]
    print(f"routed-expert FFN fwd+bwd, float32, one {device.platform} device, {os.cpu_count()} cores")
    print(f"{'shape':>13} {'tokens':>6} {'hidden':>6} {'ffn':>4} {'E/k':>5} {'impl':>10} {'ms':>8} {'vs dense':>8}")
    for name, T, D, F, E, K in shapes:
        keys = jax.random.split(jax.random.key(0), 4)
        x = jax.random.normal(keys[0], (T, D))
        w_in = jax.random.normal(keys[1], (E, D, 2, F)) * 0.05
        w_out = jax.random.normal(keys[2], (E, F, D)) * 0.05
        top_logits, top_idx = jax.lax.top_k(jax.random.normal(keys[3], (T, E)), K)
        top_w = jax.nn.softmax(top_logits, -1)
        base = None
        for impl in args.impls.split(","):
            ffn = EXPERT_FFNS[impl]
            step = jax.jit(jax.grad(lambda x, a, b, ffn=ffn: jnp.sum(ffn(x, a, b, top_idx, top_w) ** 2),
                                    argnums=(0, 1, 2)))
            ms = timed(step, x, w_in, w_out, repeats=args.repeats)
            base = base or ms
            print(f"{name:>13} {T:>6} {D:>6} {F:>4} {f'{E}/{K}':>5} {impl:>10} {ms:8.1f} {ms / base:7.2f}x",
                  flush=True)


def volume_table(args):
    print("all-to-all bytes per device, MoE layer, forward (backward: as much again), bf16")
    print(f"{'model':>20} {'mesh':>28} {'tokens/dev':>10} {'padded':>9} {'ragged bal.':>11} {'ragged worst':>12} "
          f"{'recv buffer':>11} {'w gather':>9}")
    gb = 1e9
    for name, mesh in (("granite-4.0-h-small", {"fsdp": 32, "expert": 8}),
                       ("granite-4.0-h-small", {"fsdp": 16, "expert": 8, "tensor": 2}),
                       ("granite-4.0-h-tiny", {"fsdp": 32, "expert": 8}),
                       ("granite-4.0-h-tiny", {"fsdp": 16, "expert": 16})):
        cfg = preset(name, dtype="bfloat16")
        for tokens in (4096, 8192):
            v = expert_parallel.all_to_all_bytes(cfg, mesh, tokens_per_device=tokens)
            desc = " x ".join(f"{a}={s}" for a, s in mesh.items())
            print(f"{name:>20} {desc:>28} {tokens:>10} {v['padded_all_to_all'] / gb:8.2f}G "
                  f"{v['ragged_all_to_all_balanced'] / gb:10.2f}G {v['ragged_all_to_all_worst'] / gb:11.2f}G "
                  f"{v['receive_buffer'] / gb:10.2f}G {v['weight_all_gather'] / gb:8.2f}G")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", action="store_true", help="grouped-matmul TFLOP/s vs dense (GPU/TPU)")
    parser.add_argument("--volume", action="store_true", help="all-to-all volume table (no device needed)")
    parser.add_argument("--grouped", action="store_true", help="the grouped matmuls on one CPU device")
    parser.add_argument("--smoke", action="store_true", help="with --flops: tiny shape, runs on CPU")
    parser.add_argument("--impls", default=None, help="grouped matmuls, comma-separated (default: dense for the CPU "
                        "table, ragged_dot for --flops, dense,blocked,ragged_dot for --grouped)")
    parser.add_argument("--tokens", type=int, default=2048, help="global tokens of the CPU table")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=64)
    parser.add_argument("--flops-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.volume:
        return volume_table(args)
    if args.flops:
        args.impls = args.impls or "ragged_dot"
        return flops_table(args)
    if args.grouped:
        args.impls = args.impls or "dense,blocked,ragged_dot"
        return grouped_table(args)
    args.impls = args.impls or "dense"
    cpu_table(args)


if __name__ == "__main__":
    main()
