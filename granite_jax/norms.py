"""RMSNorm and the Mamba-2 gated RMSNorm. Both normalise in float32, as the reference does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.params import constant, param


def rms_normalize(x, eps: float):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """`weight * (x * rsqrt(mean(x^2) + eps))` over the last axis, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, constant(1.0), (dim,), ("norm",), param_dtype)

    def __call__(self, x_BLD):
        return (self.weight[...].astype(jnp.float32) * rms_normalize(x_BLD, self.eps)).astype(x_BLD.dtype)


class GatedRMSNorm(nnx.Module):
    """Mamba-2's output norm: `y * silu(z)` first, then RMS-normalise within `n_groups` groups, then scale.

    y, z: [..., heads, head_dim]; the weight is stored per (head, head_dim) so it shards with the heads.
    """

    def __init__(self, n_heads: int, head_dim: int, n_groups: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps, self.n_groups = eps, n_groups
        self.weight = param(rngs, constant(1.0), (n_heads, head_dim), ("ssm_heads", "head_dim"), param_dtype)

    def __call__(self, y_BLHP, z_BLHP):
        gated = y_BLHP.astype(jnp.float32) * jax.nn.silu(z_BLHP.astype(jnp.float32))
        *lead, h, p = gated.shape
        grouped = gated.reshape(*lead, self.n_groups, (h // self.n_groups) * p)
        normed = rms_normalize(grouped, self.eps).reshape(gated.shape)
        return (self.weight[...].astype(jnp.float32) * normed).astype(y_BLHP.dtype)
