"""Devices of a cluster that is not here, for ahead-of-time compiles on a CPU-only machine: TPU pods through libtpu,
NVIDIA H100/H200 clusters through the CUDA plugin's compile-only client (`jax.experimental.topologies`).

`target(spec)` reads a topology spec and returns its devices and per-device memory:

    v5p:8x8x4, v5e:16x16, v6e:8x8, v4:4x4x4   a TPU slice (libtpu: `pip install -e ".[tpu]"`)
    h100:8x8, h200:2x8                          HOSTS x GPUS-per-host NVIDIA GPUs (`pip install -e ".[gpu-aot]"`)

A GPU target is described to XLA by a `stream_executor.GpuTargetConfigProto` (text format). `gpu_target_config`
writes one from the table below instead of asking a device: the field names are those of XLA's proto (as in the
reference specs under xla/backends/gpu/target_config/specs/ in openxla/xla), the values are NVIDIA's published figures
for the SXM parts (H100 SXM5 80 GB HBM3, H200 SXM 141 GB HBM3e) and the limits of compute capability 9.0.

Without a device XLA cannot autotune: GEMM and fusion tiles are its defaults, and `cost_analysis()` is empty; the
memory figures are those of the compiled program and do not depend on tiling choices beyond workspace sizes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

# HBM per TPU chip, bytes (matched against the topology name's prefix).
TPU_HBM_BYTES = {"v5p": 95e9, "v5e": 16e9, "v5litepod": 16e9, "v6e": 32e9, "v4": 32e9}

# Hopper (compute capability 9.0) limits shared by both parts.
_SM90 = dict(compute_capability=(9, 0), sm_count=132, threads_per_block=1024, threads_per_sm=2048, warp=32,
             shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=227 * 1024,
             shared_memory_per_sm=228 * 1024, registers_per_sm=65536, registers_per_block=65536,
             fp32_lanes_per_sm=128, l2_cache_bytes=50 * 2**20, boost_clock_ghz=1.98, pcie_bytes_per_s=32 * 2**30,
             nvlink_links=18)

GPU_SPECS = {
    "h100": dict(_SM90, name="NVIDIA H100 80GB HBM3", memory_bytes=84_942_979_072,
                 memory_bandwidth_bytes_per_s=3.35e12, bf16_dense_flops=989e12),
    "h200": dict(_SM90, name="NVIDIA H200 141GB HBM3e", memory_bytes=151_397_597_184,
                 memory_bandwidth_bytes_per_s=4.8e12, bf16_dense_flops=989e12),
}

GPU_AOT_INSTALL = 'pip install -e ".[gpu-aot]"'


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # as given, e.g. "h100:8x8"
    platform: str  # "tpu" or "gpu" (the key of config.AUTO_CHOICES)
    devices: tuple  # the topology's devices, in order
    memory_bytes: float | None  # per device
    notes: tuple[str, ...] = ()  # what the compile of this target cannot do


def gpu_target_config(kind: str) -> str:
    """The GpuTargetConfigProto text of GPU `kind` (a key of GPU_SPECS)."""
    s = _gpu_spec(kind)
    major, minor = s["compute_capability"]
    return "\n".join([
        "gpu_device_info {",
        f"  threads_per_block_limit: {s['threads_per_block']}",
        f"  threads_per_warp: {s['warp']}",
        f"  shared_memory_per_block: {s['shared_memory_per_block']}",
        f"  shared_memory_per_core: {s['shared_memory_per_sm']}",
        f"  threads_per_core_limit: {s['threads_per_sm']}",
        f"  core_count: {s['sm_count']}",
        f"  fpus_per_core: {s['fp32_lanes_per_sm']}",
        "  block_dim_limit_x: 2147483647",
        "  block_dim_limit_y: 65535",
        "  block_dim_limit_z: 65535",
        f"  memory_bandwidth: {int(s['memory_bandwidth_bytes_per_s'])}",
        f"  l2_cache_size: {s['l2_cache_bytes']}",
        f"  clock_rate_ghz: {s['boost_clock_ghz']}",
        f"  device_memory_size: {s['memory_bytes']}",
        f"  shared_memory_per_block_optin: {s['shared_memory_per_block_optin']}",
        # The "a" of sm_90a: wgmma and the other Hopper-only instructions.
        f"  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: ACCELERATED_FEATURES }}",
        f"  registers_per_core_limit: {s['registers_per_sm']}",
        f"  registers_per_block_limit: {s['registers_per_block']}",
        f'  device_vendor: "NVIDIA Corporation"',
        f'  name: "{s["name"]}"',
        f"  pcie_bandwidth: {s['pcie_bytes_per_s']}",
        f"  device_interconnect_info {{ active_links: {s['nvlink_links']} }}",
        "}",
        'platform_name: "CUDA"',
        # cuDNN's version as the fused-attention rewriter sees it (the wheel `.[gpu-aot]` installs is 9.x).
        "dnn_version_info { major: 9 minor: 10 patch: 0 }",
        f'device_description_str: "{s["name"]}"',
    ]) + "\n"


def _gpu_spec(kind: str) -> dict:
    if kind not in GPU_SPECS:
        raise ValueError(f"GPU {kind!r} is not known; choose one of {sorted(GPU_SPECS)} (granite_jax.aot_targets)")
    return GPU_SPECS[kind]


def parse_gpu_spec(spec: str) -> tuple[str, int, int] | None:
    """("h100", hosts, gpus_per_host) for "h100:8x8"; None when `spec` names no GPU."""
    kind, _, shape = spec.partition(":")
    if kind.lower() not in GPU_SPECS:
        return None
    m = re.fullmatch(r"(\d+)x(\d+)", shape)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"GPU topology {spec!r} must be {kind}:HOSTSxGPUS, e.g. {kind}:8x8 for 64 GPUs on 8 hosts")
    return kind.lower(), int(m.group(1)), int(m.group(2))


def prepare_gpu_compile() -> None:
    """Let the CUDA plugin load on a machine without a GPU; call before JAX initialises its backends. Without this
    the plugin's start-up check fails on cuInit and JAX drops the CUDA platform, and with it the compile-only client."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def cuda_plugin_available() -> bool:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def target(spec: str) -> Target:
    """The devices and per-device memory of topology `spec` (see the module docstring)."""
    from jax.experimental import topologies

    gpu = parse_gpu_spec(spec)
    if gpu is None:
        if not any(spec.startswith(k) for k in TPU_HBM_BYTES):
            raise ValueError(f"topology {spec!r}: not a TPU ({', '.join(TPU_HBM_BYTES)}, e.g. v5p:8x8x4) or GPU "
                             f"({', '.join(GPU_SPECS)} as HOSTSxGPUS, e.g. h100:8x8) target")
        devices = topologies.get_topology_desc(platform="tpu", topology_name=spec).devices
        hbm = next((v for k, v in TPU_HBM_BYTES.items() if spec.startswith(k)), None)
        return Target(spec, "tpu", tuple(devices), hbm)
    kind, hosts, per_host = gpu
    if not cuda_plugin_available():
        raise ValueError(f"compiling for {spec} needs the CUDA plugin and ptxas: {GPU_AOT_INSTALL}")
    prepare_gpu_compile()
    desc = topologies.get_topology_desc(platform="cuda", topology_name=kind, target_config=gpu_target_config(kind),
                                        topology=f"1x{hosts}x{per_host}")
    notes = ("no device: XLA's autotuning is off (default GEMM and fusion tiles) and cost_analysis() is empty",)
    return Target(spec, "gpu", tuple(desc.devices), float(_gpu_spec(kind)["memory_bytes"]), notes)


def ptxas_path() -> str:
    """The ptxas of the nvidia-cuda-nvcc wheel (what XLA itself compiles with), else the one on PATH."""
    import shutil

    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(root, "bin", "ptxas")
        if os.path.exists(candidate):
            return candidate
    found = shutil.which("ptxas")
    if found is None:
        raise FileNotFoundError(f"ptxas not found: {GPU_AOT_INSTALL} installs it (nvidia-cuda-nvcc-cu12)")
    return found


def kernel_resources(dump_dir: str, prefix: str = "", arch: str = "sm_90a") -> dict[str, dict]:
    """Per-thread registers, spills and per-block shared memory of the GPU kernels whose names start with `prefix`,
    from a compile dumped with compiler_options={"xla_dump_to": dump_dir}: ptxas -v re-run on the dumped PTX (the
    registers and spills XLA's own ptxas call got) and the launch figures of XLA's thunk sequence (shared memory,
    threads per block). {name: {"registers", "spill_store_bytes", "spill_load_bytes", "stack_bytes",
    "shared_memory_bytes", "threads_per_block"}}."""
    import glob
    import subprocess

    out: dict[str, dict] = {}
    for ptx in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
        with open(ptx) as f:
            if f".entry {prefix}" not in f.read():
                continue
        log = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", ptx, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
        for block in log.split("Compiling entry function")[1:]:
            name = re.search(r"'(\w+)'", block).group(1)
            if not name.startswith(prefix):
                continue
            number = lambda pattern: int(re.search(pattern, block).group(1))
            out[name] = dict(registers=number(r"Used (\d+) registers"),
                             spill_store_bytes=number(r"(\d+) bytes spill stores"),
                             spill_load_bytes=number(r"(\d+) bytes spill loads"),
                             stack_bytes=number(r"(\d+) bytes stack frame"))
    for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence*")):
        with open(path) as f:
            for line in f:
                m = re.search(r"\] (\w+) grid: \[.*?\] threads: \[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+)", line)
                if m and m.group(1) in out:
                    threads = int(m.group(2)) * int(m.group(3)) * int(m.group(4))
                    out[m.group(1)].update(threads_per_block=threads, shared_memory_bytes=int(m.group(5)))
    return out
