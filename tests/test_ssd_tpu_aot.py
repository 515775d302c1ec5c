"""The Pallas TPU SSD kernel compiled by libtpu's real ahead-of-time compiler for v5e, v5p and v6e on a CPU-only host
(FACTS.md §4): forward and backward at Granite's shapes, called per shard through the shard_map wrapper on a 2x2 mesh.
A kernel that only works in interpret mode fails here. Needs libtpu (`pip install -e '.[tpu]'`); skips without it."""

import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.ssd import _kernel_common, pallas_tpu

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); it is what compiles for real TPU targets",
)

TOPOLOGIES = ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
GRANITE = dict(batch=2, length=2048, heads=8, head_dim=64, groups=1, d_state=128, dtype=jnp.bfloat16)
ODD = dict(batch=2, length=700, heads=4, head_dim=32, groups=2, d_state=64, dtype=jnp.float32)


def topology_mesh(name):
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    assert len(devices) == 4, f"{name} should have 4 chips, got {len(devices)}"
    return Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))


def sharded_args(mesh, batch, length, heads, head_dim, groups, d_state, dtype):
    def sds(shape, dt, *spec):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P(*spec)))

    bc_spec = ("data", None, "tensor") if groups > 1 else ("data",)
    f32 = jnp.float32
    return (sds((batch, length, heads, head_dim), dtype, "data", None, "tensor"),
            sds((batch, length, heads), f32, "data", None, "tensor"), sds((heads,), f32, "tensor"),
            sds((batch, length, groups, d_state), dtype, *bc_spec),
            sds((batch, length, groups, d_state), dtype, *bc_spec),
            sds((heads,), f32, "tensor"), sds((batch, heads, head_dim, d_state), f32, "data", "tensor"),
            sds((batch, length), jnp.int32, "data"))


def compile_for(mesh, shapes, which):
    core = _kernel_common.shard_ssd_core(pallas_tpu.ssd_core, mesh)

    def forward(*args):
        return core(*args, chunk_size=256)

    def loss(*args):
        y, final = core(*args, chunk_size=256)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(final)

    fn = forward if which == "forward" else jax.grad(loss, argnums=tuple(range(7)))
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*sharded_args(mesh, **shapes)).compile()
    return compiled, time.perf_counter() - start


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_compiles_for_tpu_at_granite_shapes(topology, which):
    mesh = topology_mesh(topology)
    compiled, seconds = compile_for(mesh, GRANITE, which)
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == (1 if which == "forward" else 3), hlo[:2000]
    memory = compiled.memory_analysis()
    temp_mib = memory.temp_size_in_bytes / 2**20
    print(f"{topology} {which}: compiled in {seconds:.2f}s, per-device temp {temp_mib:.1f} MiB")


def test_compiles_odd_shapes_float32():
    compiled, _ = compile_for(topology_mesh("v5p:2x2x1"), ODD, "backward")
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()
