"""How parameters are declared: `nnx.Param`s carrying one logical axis name per dimension.

Models are built with eager sharding off, so they can be created without a mesh (tests, conversion, notebooks);
`granite_jax.sharding` turns the logical names into shardings when a trainer places them on a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = jax.nn.initializers.Initializer


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype) -> nnx.Param:
    """A parameter of `shape` drawn from `init`, annotated with logical `axes` (one name, or None, per dim)."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} got {len(axes)} logical axes {axes}")
    with nnx.use_eager_sharding(False):
        return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes))


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


def constant(value: float) -> Initializer:
    return jax.nn.initializers.constant(value)


def dtype_of(name: str):
    return jnp.dtype(name)
