"""Test-wide JAX set-up: CPU only, 8 host devices for the sharding tests. Must run before JAX is imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
# The CUDA plugin, where installed for the GPU ahead-of-time compile tests, must not give up on a machine without a GPU.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(params=[False, True], ids=["x32", "x64"])
def x64(request):
    """Runs the test with jax_enable_x64 off and on (users turn it on to debug numerics)."""
    with jax.enable_x64(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    """Files made only of slow tests first, then files with some, each file's tests in their order: on several
    workers (`-n 2`, whole files per worker) the long multi-process runs start early instead of ending the suite."""
    slow = {}
    for item in items:
        slow.setdefault(item.path, []).append(item.get_closest_marker("slow") is not None)
    rank = {path: 0 if all(marks) else 1 if any(marks) else 2 for path, marks in slow.items()}
    items.sort(key=lambda item: rank[item.path])
