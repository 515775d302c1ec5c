"""The generation cache of the hybrid model and the attention layer's cached step.

Per Mamba layer a `MambaState` (the last d_conv - 1 conv inputs and the [heads, head_dim, d_state] float32 SSM
state: constant in the context length), per attention layer a `KVCache` preallocated to the maximum length. Prompts
of different lengths share a batch LEFT-padded: row b's first `start_B[b]` slots are padding, its real tokens end at
the same slot as every other row's, so every decode step writes one slot, `length`, for the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.attention import rope
from granite_jax.config import ModelConfig
from granite_jax.mamba2 import MambaState


class KVCache(NamedTuple):
    k: jax.Array  # [B, T, kv_heads, head_dim], T = the maximum length
    v: jax.Array  # [B, T, kv_heads, head_dim]


class Cache(NamedTuple):
    layers: tuple  # per model layer: MambaState or KVCache
    start_B: jax.Array  # int32 [B]: left-padding slots of each row
    length: jax.Array  # int32 scalar: slots filled so far (the next token's slot)


def _layer_shapes(cfg: ModelConfig, batch: int, max_len: int, layer_type: str) -> dict:
    dtype = jnp.dtype(cfg.dtype)
    if layer_type == "mamba":
        K1, nh, p, G, N = (cfg.mamba_d_conv - 1, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups,
                           cfg.mamba_d_state)
        return dict(conv_x=((batch, K1, nh, p), dtype), conv_bc=((batch, K1, 2, G, N), dtype),
                    ssm=((batch, nh, p, N), jnp.float32))
    kv = ((batch, max_len, cfg.num_key_value_heads, cfg.head_dim), dtype)
    return dict(k=kv, v=kv)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, start_B=None) -> Cache:
    """An empty cache for `batch` rows of at most `max_len` tokens (prompt + generated); `start_B` [B] the rows'
    left-padding slots (default none)."""
    layers = []
    for layer_type in cfg.layer_types:
        arrays = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in _layer_shapes(cfg, batch, max_len,
                                                                                     layer_type).items()}
        layers.append(MambaState(**arrays) if layer_type == "mamba" else KVCache(**arrays))
    start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32)
    return Cache(tuple(layers), start_B, jnp.zeros((), jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
    """Bytes of the generation cache of `batch` sequences of `max_len` tokens (computed from the shapes)."""
    total = 0
    for layer_type in cfg.layer_types:
        for shape, dtype in _layer_shapes(cfg, batch, max_len, layer_type).values():
            total += int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    return total


def cached_attention(attn, x_BLD, kv: KVCache, length, start_B) -> tuple[jax.Array, KVCache]:
    """`attn` (an attention.Attention) over x [B,L,D] at slots length..length+L-1, with keys/values of the earlier
    slots from `kv`; returns (out [B,L,D], kv with x's keys/values written). A query sees the keys of its own row
    from its first real slot (start_B) up to itself; a padding query sees only itself (its output is never read)."""
    L, T = x_BLD.shape[1], kv.k.shape[1]
    x_BLD = x_BLD.astype(attn.dtype)
    slots_L = length + jnp.arange(L, dtype=jnp.int32)
    q_BLNH = attn._project(x_BLD, attn.q_proj, attn.q_bias)
    k_BLKH = attn._project(x_BLD, attn.k_proj, attn.k_bias)
    v_BLKH = attn._project(x_BLD, attn.v_proj, attn.v_bias)
    if attn.rope_theta is not None:
        positions_BL = slots_L[None] - start_B[:, None]
        q_BLNH = rope(q_BLNH, positions_BL, attn.rope_theta)
        k_BLKH = rope(k_BLKH, positions_BL, attn.rope_theta)
    kv = KVCache(jax.lax.dynamic_update_slice(kv.k, k_BLKH.astype(kv.k.dtype), (0, length, 0, 0)),
                 jax.lax.dynamic_update_slice(kv.v, v_BLKH.astype(kv.v.dtype), (0, length, 0, 0)))
    t_1L1, s_11T, start_B11 = slots_L[None, :, None], jnp.arange(T)[None, None], start_B[:, None, None]
    visible_BLT = (s_11T <= t_1L1) & (s_11T >= jnp.minimum(start_B11, t_1L1))
    out_BLNH = jax.nn.dot_product_attention(q_BLNH, kv.k.astype(attn.dtype), kv.v.astype(attn.dtype),
                                            mask=visible_BLT[:, None], scale=attn.scale)
    y_BLD = jnp.einsum("blnh,nhd->bld", out_BLNH, attn.o_proj[...].astype(attn.dtype))
    return (y_BLD if attn.o_bias is None else y_BLD + attn.o_bias[...].astype(attn.dtype)), kv
