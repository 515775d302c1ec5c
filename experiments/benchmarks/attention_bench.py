"""One device's document-causal attention, forward+backward, on CPU: granite-jax's blockwise attention (the CPU default,
`attention_impl="auto"`) vs XLA's `jax.nn.dot_product_attention` with the same mask (`attention_impl="xla"`), and
PyTorch's `scaled_dot_product_attention` (causal, grouped queries) for scale, timed side by side.

    python experiments/benchmarks/attention_bench.py [--seq-lens 256 1024 4096] [--blocks 128 256 512] [--dtype float32]

Shapes are the 4-layer benchmark model's attention (8 query heads, 4 kv heads, head dim 64), batch 1.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from model_bench import _median_seconds  # noqa: E402

from granite_jax import blockwise_attention, xla_options  # noqa: E402
from granite_jax.attention import document_causal_mask  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, SCALE = 8, 4, 64, 0.125


def _jax_seconds(attend, q, k, v, seg, iters):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg).astype(jnp.float32) ** 2)  # noqa: E731
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), compiler_options=xla_options.compiler_options("cpu"))
    jax.block_until_ready(step(q, k, v))
    return _median_seconds(lambda: jax.block_until_ready(step(q, k, v)), iters)


def _torch_seconds(q, k, v, iters):
    t_dtype = getattr(torch, str(q.dtype))
    tq, tk, tv = (torch.tensor(np.asarray(a.astype(jnp.float32))).to(t_dtype).transpose(1, 2).requires_grad_()
                  for a in (q, k, v))

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=SCALE,
                                                               enable_gqa=True)
        (out.float() ** 2).sum().backward()

    step()
    return _median_seconds(step, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=7)
    args = parser.parse_args()
    print(f"attention forward+backward, batch 1, {HEADS} heads / {KV_HEADS} kv heads x {HEAD_DIM}, {args.dtype}, "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| tokens | dot_product_attention (ms) | " + " | ".join(f"blockwise {b} (ms)" for b in args.blocks)
          + " | best speed-up | PyTorch SDPA (ms) |")
    print("|---" * (len(args.blocks) + 4) + "|")
    for L in args.seq_lens:
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((1, L, n, HEAD_DIM)), args.dtype) for n in (HEADS, KV_HEADS,
                                                                                               KV_HEADS))
        seg = jnp.zeros((1, L), jnp.int32)
        xla_s = _jax_seconds(lambda q, k, v, seg: jax.nn.dot_product_attention(
            q, k, v, mask=document_causal_mask(seg), scale=SCALE), q, k, v, seg, args.iters)
        block_s = [_jax_seconds(lambda q, k, v, seg, b=b: blockwise_attention.attention(q, k, v, seg, scale=SCALE,
                                                                                         block=b),
                                q, k, v, seg, args.iters) for b in args.blocks]
        torch_s = _torch_seconds(q, k, v, args.iters)
        print(f"| {L} | {xla_s * 1e3:.1f} | " + " | ".join(f"{s * 1e3:.1f}" for s in block_s)
              + f" | {xla_s / min(block_s):.2f}x | {torch_s * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
