"""XLA compiler options for the framework's compiled steps, per platform (`jax.jit(..., compiler_options=...)`).

XLA:CPU hands dots, elementwise ops and reductions to YNNPACK fusions by default. On the CPUs measured
(docs/benchmarks.md, jax 0.10) its reduction fusions ran far below the machine's speed (a row sum over a [1024, 1024]
float32 array took about 27 ms), so the CPU steps keep YNNPACK for dots only: `experiments/benchmarks/model_bench.py`
went from 1.63 s to 1.31 s. An XLA that does not know the option gets none (checked once per process).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def compiler_options(platform: str) -> dict[str, str]:
    """Options for computations that run on `platform` ("cpu", "gpu", "tpu"); {} where the defaults are kept."""
    if platform != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU, backend="cpu")(jnp.zeros(()))
    except jax.errors.JaxRuntimeError:
        return {}
    return dict(_CPU)


def for_mesh(mesh) -> dict[str, str]:
    """`compiler_options` for a computation over `mesh`'s devices."""
    return compiler_options(mesh.devices.flat[0].platform)
