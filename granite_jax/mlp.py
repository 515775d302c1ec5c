"""The shared (always-on, ungated) SwiGLU expert, which is the whole FFN of dense models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.params import normal, param


def swiglu(gate_up_BL2F):
    """[..., 2, F] fused gate/up activations -> [..., F]: silu(gate) * up (gate is the first half, as on disk)."""
    return jax.nn.silu(gate_up_BL2F[..., 0, :]) * gate_up_BL2F[..., 1, :]


class SharedMLP(nnx.Module):
    """x -> W_out(silu(x W_gate) * x W_up). `input_linear` is stored [H, 2, F] so the gate/up halves shard alike."""

    def __init__(self, hidden: int, ffn: int, *, init_std: float, param_dtype, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.input_linear = param(rngs, normal(init_std), (hidden, 2, ffn), ("embed", None, "mlp"), param_dtype)
        self.output_linear = param(rngs, normal(init_std), (ffn, hidden), ("mlp", "embed"), param_dtype)

    def __call__(self, x_BLD):
        x_BLD = x_BLD.astype(self.dtype)
        h_BL2F = jnp.einsum("bld,dgf->blgf", x_BLD, self.input_linear[...].astype(self.dtype))
        return jnp.einsum("blf,fd->bld", swiglu(h_BL2F), self.output_linear[...].astype(self.dtype))
