"""Grouped-query attention without positional encoding (or RoPE), scale `attention_multiplier`, causal within each
packed document, through `jax.nn.dot_product_attention` (as XLA writes it, or cuDNN's fused kernel on GPU) or, on
CPU, the flash-style
`blockwise_attention`; with the sequence sharded over the `context` mesh axis, through `context_parallel.attention`
(all-gathered or ring-passed keys, blockwise)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax import blockwise_attention, context_parallel, sharding
from granite_jax.config import resolve_auto
from granite_jax.params import constant, normal, param


def rope(x_BLNH, positions_BL, theta: float):
    """Rotary embedding, rotate-half convention (the reference's): frequencies theta^(-2i/d) on both halves."""
    half = x_BLNH.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x_BLNH.shape[-1]))
    angles_BLH = positions_BL[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles_BLH)[:, :, None, :], jnp.sin(angles_BLH)[:, :, None, :]
    x1, x2 = x_BLNH[..., :half].astype(jnp.float32), x_BLNH[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLNH.dtype)


# Query/key block of the blockwise attention on one device: on CPU 256 ran fastest of 128/256/512 at 1K-4K tokens
# (experiments/benchmarks/attention_bench.py).
BLOCK = 256


def _fused_implementation(impl: str, q_BLNH) -> str | None:
    """"cudnn" where cuDNN's fused attention takes the shapes (16-bit inputs, head_dim a multiple of 8 up to 128,
    heads not split over the mesh), else None (XLA's attention). The document mask reaches cuDNN as an additive
    [B, 1, L, L] bias, which its partitioner cannot split over heads."""
    if resolve_auto("attention_impl", impl) != "cudnn":
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and dict(mesh.shape).get("tensor", 1) > 1:
        return None
    head_dim = q_BLNH.shape[-1]
    if q_BLNH.dtype in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0:
        return "cudnn"
    return None


def document_causal_mask(segment_ids_BL):
    """[B,1,L,L] boolean: query t sees key s <= t of the same segment."""
    L = segment_ids_BL.shape[1]
    causal_LL = jnp.tril(jnp.ones((L, L), dtype=bool))
    same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (causal_LL[None] & same_BLL)[:, None]


class Attention(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        H, N, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd, init = cfg.param_dtype, normal(cfg.initializer_range)
        self.dtype, self.scale = jnp.dtype(cfg.dtype), cfg.attention_multiplier
        self.rope_theta = cfg.rope_theta if cfg.use_rope else None
        self.context_attention = cfg.context_attention
        self.impl = cfg.attention_impl
        self.q_proj = param(rngs, init, (H, N, hd), ("embed", "q_heads", "head_dim"), pd)
        self.k_proj = param(rngs, init, (H, K, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, init, (H, K, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, init, (N, hd, H), ("q_heads", "head_dim", "embed"), pd)
        if cfg.attention_bias:
            zeros = constant(0.0)
            self.q_bias = param(rngs, zeros, (N, hd), ("q_heads", "head_dim"), pd)
            self.k_bias = param(rngs, zeros, (K, hd), ("kv_heads", "head_dim"), pd)
            self.v_bias = param(rngs, zeros, (K, hd), ("kv_heads", "head_dim"), pd)
            self.o_bias = param(rngs, zeros, (H,), ("embed",), pd)
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None

    def _project(self, x_BLD, kernel, bias):
        y = jnp.einsum("bld,dnh->blnh", x_BLD, kernel[...].astype(self.dtype))
        return y if bias is None else y + bias[...].astype(self.dtype)

    def __call__(self, x_BLD, segment_ids_BL, positions_BL):
        x_BLD = x_BLD.astype(self.dtype)
        q_BLNH = self._project(x_BLD, self.q_proj, self.q_bias)
        k_BLKH = self._project(x_BLD, self.k_proj, self.k_bias)
        v_BLKH = self._project(x_BLD, self.v_proj, self.v_bias)
        if self.rope_theta is not None:
            q_BLNH = rope(q_BLNH, positions_BL, self.rope_theta)
            k_BLKH = rope(k_BLKH, positions_BL, self.rope_theta)
        if context_parallel.context_size() > 1:
            out_BLNH = context_parallel.attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, scale=self.scale,
                                                  strategy=self.context_attention)
        elif resolve_auto("attention_impl", self.impl) == "blockwise":
            out_BLNH = blockwise_attention.attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, scale=self.scale,
                                                     block=BLOCK)
        else:
            implementation = _fused_implementation(self.impl, q_BLNH)
            mask_B1LL = document_causal_mask(segment_ids_BL)
            if implementation == "cudnn":
                # cuDNN's partitioner wants queries, keys, values and the mask split over the batch alike.
                batch_only = ("batch", None, None, None)
                q_BLNH, k_BLKH, v_BLKH, mask_B1LL = (sharding.constrain(a, batch_only)
                                                     for a in (q_BLNH, k_BLKH, v_BLKH, mask_B1LL))
            out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, mask=mask_B1LL, scale=self.scale,
                                                    implementation=implementation)
        y_BLD = jnp.einsum("blnh,nhd->bld", out_BLNH, self.o_proj[...].astype(self.dtype))
        return y_BLD if self.o_bias is None else y_BLD + self.o_bias[...].astype(self.dtype)
