"""SSD kernel benchmark at the granite-4.0-h-micro mixer shape (64 heads x 64, d_state 128, n_groups 1, chunk 256).

    python experiments/benchmarks/ssd_bench.py                 # GPU: pallas_gpu vs xla vs causal attention, 2K/8K/32K
    python experiments/benchmarks/ssd_bench.py --impls xla,pallas_tpu   # TPU
    python experiments/benchmarks/ssd_bench.py --smoke         # CPU smoke run (xla path, tiny shape, < 1 minute)

For each sequence length it prints forward and forward+backward milliseconds per impl, and for the SSD impls the FLOP
and byte floors at that shape and the fraction of the floor reached (floor time / measured time, where floor time =
max(FLOPs / peak FLOP/s, bytes / peak bandwidth) for the device's datasheet peaks). "attention" is causal
`jax.nn.dot_product_attention` (cuDNN on GPU) with the same heads and head_dim, the comparison the Mamba-2 paper makes.
Record results and the device in docs/benchmarks.md.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.ssd import ssd

HEADS, HEAD_DIM, D_STATE, GROUPS, CHUNK = 64, 64, 128, 1, 256
# Dense bf16 peak FLOP/s and HBM bandwidth (datasheets). Unknown devices get no fraction of floor.
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12),
         "TPU v5 lite": (197e12, 0.82e12), "TPU v5": (459e12, 2.77e12), "TPU v6 lite": (918e12, 1.64e12)}


def ssd_floors(batch, length, heads=HEADS, p=HEAD_DIM, n=D_STATE, groups=GROUPS, chunk=CHUNK, itemsize=2):
    """(forward FLOPs, forward bytes, forward+backward FLOPs, forward+backward bytes) of the chunked SSD.

    FLOPs per token and head: the causal half of the intra-chunk products C.B^T and (.)x, Q(n+p), plus the chunk-state
    and carried-state matmuls, 4pn; the backward does twice the forward's matmul work. Bytes: the forward reads x, B, C
    and dt and writes y once; the backward reads those plus dy and writes dx, dB, dC, ddt."""
    tokens = batch * length
    flops = tokens * heads * (chunk * (n + p) + 4 * p * n)
    x_bytes = tokens * heads * p * itemsize
    bc_bytes = 2 * tokens * groups * n * itemsize
    dt_bytes = tokens * heads * 4
    fwd_bytes = 2 * x_bytes + bc_bytes + dt_bytes
    bwd_bytes = 3 * x_bytes + 2 * bc_bytes + 2 * dt_bytes
    return flops, fwd_bytes, 3 * flops, fwd_bytes + bwd_bytes


def peaks_for(device):
    kind = device.device_kind
    for name in sorted(PEAKS, key=len, reverse=True):
        if name in kind:
            return PEAKS[name]
    return None


def time_ms(fn, args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm up
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def ssd_fns(impl, interpret):
    def forward(x, dt, A, B, C, D, dt_bias):
        return ssd(x, dt, A, B, C, chunk_size=CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True, impl=impl,
                   interpret=interpret)

    def loss(*args):
        return jnp.sum(forward(*args).astype(jnp.float32) ** 2)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(7))))


def attention_fns():
    impl = "cudnn" if jax.default_backend() == "gpu" else None

    def forward(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    def loss(q, k, v):
        return jnp.sum(forward(q, k, v).astype(jnp.float32) ** 2)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def make_ssd_inputs(batch, length, heads, dtype, key):
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (batch, length, heads, HEAD_DIM), dtype)
    dt = jax.random.normal(ks[1], (batch, length, heads), jnp.float32)
    A = -jnp.arange(1, heads + 1, dtype=jnp.float32)
    B = jax.random.normal(ks[2], (batch, length, GROUPS, D_STATE), dtype)
    C = jax.random.normal(ks[3], (batch, length, GROUPS, D_STATE), dtype)
    return x, dt, A, B, C, jnp.ones((heads,), jnp.float32), jnp.full((heads,), -3.0, jnp.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument("--impls", default="pallas_gpu,xla,attention" if on_gpu else "xla",
                        help="comma-separated: SSD impls and/or 'attention'")
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--tokens", type=int, default=2**17, help="tokens per batch (batch = tokens // length, >= 1)")
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--interpret", action="store_true", help="run Pallas impls in interpret mode (debug only)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one rep: checks the script runs (CI, CPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.tokens, args.heads, args.reps = "512", 512, 4, 1
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    peaks = peaks_for(device)
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, dtype {dtype.name}, "
          f"heads {args.heads} x {HEAD_DIM}, d_state {D_STATE}, chunk {CHUNK}")
    header = f"{'length':>7} {'batch':>5} {'impl':>11} {'fwd ms':>9} {'fwd+bwd ms':>11} {'floor fwd/fwd+bwd':>20}"
    print(header + ("  fraction of floor fwd / fwd+bwd" if peaks else "  (no peak figures for this device)"))
    for length in (int(v) for v in args.lengths.split(",")):
        batch = max(1, args.tokens // length)
        key = jax.random.PRNGKey(length)
        flops, fwd_bytes, total_flops, total_bytes = ssd_floors(batch, length, heads=args.heads,
                                                                itemsize=dtype.itemsize)
        for impl in args.impls.split(","):
            if impl == "attention":
                shape = (batch, length, args.heads, HEAD_DIM)
                qkv = [jax.random.normal(k, shape, dtype) for k in jax.random.split(key, 3)]
                forward, backward = attention_fns()
                inputs = qkv
            else:
                forward, backward = ssd_fns(impl, args.interpret)
                inputs = make_ssd_inputs(batch, length, args.heads, dtype, key)
            fwd = time_ms(forward, inputs, args.reps)
            both = time_ms(backward, inputs, args.reps)  # the gradient includes its forward
            line = f"{length:>7} {batch:>5} {impl:>11} {fwd:>9.2f} {both:>11.2f}"
            if impl != "attention":
                line += f" {flops / 1e9:>8.1f}/{total_flops / 1e9:.1f} GFLOP"
                line += f" {fwd_bytes / 2**20:.0f}/{total_bytes / 2**20:.0f} MiB"
                if peaks:
                    floor_fwd = max(flops / peaks[0], fwd_bytes / peaks[1]) * 1e3
                    floor_both = max(total_flops / peaks[0], total_bytes / peaks[1]) * 1e3
                    line += f"  {floor_fwd / fwd:.0%} / {floor_both / both:.0%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
