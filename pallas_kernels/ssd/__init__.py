"""The SSD (Mamba-2 selective state-space scan) op and its registry of implementations.

`ssd(...)` validates its inputs, applies the dt transform in float32 and dispatches to a core with the signature

    core(x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, interpret) -> (y, final_state)

Cores: "xla" (pure JAX, `xla.py`, always available), "pallas_tpu" and "pallas_gpu" (imported lazily from the modules
of the same name, which either call `register_impl` or expose `ssd_core`). Semantics: docs/architecture.md and
FACTS.md §3.
"""

import importlib
import logging
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.ssd import xla

_log = logging.getLogger(__name__)

SsdCore = Callable[..., tuple[jax.Array, jax.Array]]

_CORES: dict[str, SsdCore] = {"xla": xla.ssd_core}
# Implementations living in their own module, imported on first use.
_LAZY_MODULES = {"pallas_tpu": "pallas_kernels.ssd.pallas_tpu", "pallas_gpu": "pallas_kernels.ssd.pallas_gpu"}
# The Pallas kernel `impl="auto"` prefers on each backend; anything else (CPU) uses "xla".
_AUTO_BY_BACKEND = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}
_warned_fallback: set[str] = set()


def register_impl(name: str, core: SsdCore) -> None:
    """Make `core` available as `ssd(..., impl=name)`."""
    _CORES[name] = core


def available_impls() -> tuple[str, ...]:
    """The impl names `ssd` accepts besides "auto" (lazily imported ones may still fail to import)."""
    return tuple(sorted(set(_CORES) | set(_LAZY_MODULES)))


def get_impl(name: str) -> SsdCore:
    """The core registered as `name`, importing its module first if needed."""
    if name in _CORES:
        return _CORES[name]
    if name not in _LAZY_MODULES:
        raise ValueError(f"impl={name!r} is not an SSD implementation; choose 'auto' or one of {available_impls()}")
    module_name = _LAZY_MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == module_name:
            raise ImportError(
                f"SSD impl={name!r} is not available: its module {module_name} does not exist in this install; "
                f"use impl='xla' or impl='auto'"
            ) from e
        raise ImportError(f"SSD impl={name!r} failed to import ({module_name}): {e}") from e
    if name not in _CORES:
        if not hasattr(module, "ssd_core"):
            raise ImportError(f"SSD impl={name!r}: module {module_name} neither registers itself nor has `ssd_core`")
        register_impl(name, module.ssd_core)
    return _CORES[name]


def _resolve_auto() -> str:
    backend = jax.default_backend()
    name = _AUTO_BY_BACKEND.get(backend)
    if name is None:
        return "xla"
    try:
        get_impl(name)
    except ImportError as e:
        if backend not in _warned_fallback:
            _warned_fallback.add(backend)
            _log.warning("ssd impl='auto' on %s: %s; falling back to the slower impl='xla'", backend, e)
        return "xla"
    return name


def _check_shape(name: str, value, expected: tuple[int, ...], why: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but expected {expected} ({why})")


def _validate(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_state, segment_ids) -> None:
    if x.ndim != 4:
        raise ValueError(f"x has shape {tuple(x.shape)} but expected 4 dims [batch, length, heads, head_dim]")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x has dtype {x.dtype}; expected a floating dtype")
    b, l, h, p = x.shape
    _check_shape("dt", dt, (b, l, h), "[batch, length, heads] from x")
    _check_shape("A", A, (h,), "[heads] from x")
    if B.ndim != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B has shape {tuple(B.shape)} but expected ({b}, {l}, n_groups, d_state) from x")
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g:
        raise ValueError(f"B has shape {tuple(B.shape)} but x has {h} heads: n_groups={g} must divide the heads")
    _check_shape("C", C, (b, l, g, n), "[batch, length, n_groups, d_state], the same as B")
    if D is not None:
        _check_shape("D", D, (h,), "[heads] from x")
    if dt_bias is not None:
        _check_shape("dt_bias", dt_bias, (h,), "[heads] from x")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (b, h, p, n), "[batch, heads, head_dim, d_state] from x and B")
    if segment_ids is not None:
        _check_shape("segment_ids", segment_ids, (b, l), "[batch, length] from x")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids has dtype {segment_ids.dtype}; expected an integer dtype")
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"dt_limit={dt_limit!r} must be a pair (low, high) with low <= high")


def transform_dt(dt, dt_bias=None, dt_softplus: bool = False, dt_limit=(0.0, float("inf"))):
    """The op's dt transform, in float32: clip(softplus?(dt + dt_bias), *dt_limit)."""
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return jnp.clip(dt, dt_limit[0], dt_limit[1])


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int = 256,
    D=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_state=None,
    segment_ids=None,
    return_final_state: bool = False,
    impl: str = "auto",
    interpret: bool = False,
):
    """Mamba-2 selective state-space scan (FACTS.md §3), per batch row and head:

        dt_t = clip(softplus?(dt_t + dt_bias), *dt_limit)          (in float32)
        S = 0 if segment_ids[t] != segment_ids[t-1] (t > 0)
        S = exp(dt_t * A) * S + dt_t * outer(x_t, B_t);   y_t = S @ C_t + D * x_t

    starting from `initial_state` (zeros if None). Head i reads group i // (heads // n_groups) of B and C.

    Args:
      x: [b, l, h, p]. dt: [b, l, h]. A: [h]. B, C: [b, l, g, n] with g dividing h.
      chunk_size: tokens per chunk; l need not be a multiple of it.
      D, dt_bias: [h] or None. initial_state: [b, h, p, n] or None. segment_ids: [b, l] int or None.
      impl: "auto" (Pallas on GPU/TPU when available, else "xla"), "xla", "pallas_tpu", "pallas_gpu", or a name
        passed to `register_impl`. interpret: run a Pallas kernel in interpret mode.

    Returns:
      y [b, l, h, p] in x's dtype, or (y, final_state [b, h, p, n] float32) when return_final_state.
    """
    _validate(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_state, segment_ids)
    name = _resolve_auto() if impl == "auto" else impl
    core = get_impl(name)
    mesh = jax.sharding.get_abstract_mesh()
    if name != "xla" and not mesh.empty:
        # Pallas kernels are not partitioned by XLA: under a mesh each device runs the kernel on its own batch rows
        # and heads. The batch axes are those the sharding rules put the batch on.
        from pallas_kernels.ssd._kernel_common import shard_ssd_core

        core = shard_ssd_core(core, mesh, batch_axes=("data", "fsdp", "expert"), head_axes=("tensor",))

    dt_BLH = transform_dt(dt, dt_bias, dt_softplus, dt_limit)

    y_BLHP, final_BHPN = core(
        x, dt_BLH, A, B, C, D, initial_state, segment_ids, chunk_size=int(chunk_size), interpret=interpret
    )
    return (y_BLHP, final_BHPN) if return_final_state else y_BLHP
