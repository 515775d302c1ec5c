"""GPU clusters without a GPU: the Pallas SSD kernels and the train step compiled ahead of time for NVIDIA H100 (sm_90a)
by XLA's real GPU compiler and ptxas on this CPU-only machine (`granite_jax.aot_targets`). A kernel that only works in
interpret mode, spills registers or overflows shared memory fails here. Needs `pip install -e ".[gpu-aot]"` (the CUDA
plugin, ptxas and cuDNN); skips without it."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from granite_jax import aot_targets, compile_check

pytestmark = pytest.mark.skipif(not aot_targets.cuda_plugin_available(),
                                reason=f"the CUDA plugin is not installed ({aot_targets.GPU_AOT_INSTALL})")

H100 = aot_targets.GPU_SPECS["h100"]
# Mixer shapes per device: granite-4.0-h-micro (64 heads) and h-small (128 heads) x 64, d_state 128, one group.
# (h-small at 32K tokens per device: its backward spills 8 bytes per thread, docs/kernels.md.)
MIXERS = {"h-micro-4k": dict(heads=64, length=4096), "h-micro-32k": dict(heads=64, length=32768),
          "h-small-4k": dict(heads=128, length=4096)}


def _kernel_report():
    """experiments/benchmarks/gpu_kernel_report.py: the compile (with its PTX dump) this test checks."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "benchmarks",
                        "gpu_kernel_report.py")
    spec = importlib.util.spec_from_file_location("gpu_kernel_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_pallas_ssd_compiles_for_h100_without_spills(mixer, which):
    r = _kernel_report().report("h100", which=which, **MIXERS[mixer])
    kernels = r["kernels"]
    # Triton, not Mosaic GPU (the default lowering of pallas_call on jax >= 0.10).
    assert r["triton_calls"] == (1 if which == "forward" else 3)
    want = {"ssd_forward_gpu"} if which == "forward" else {"ssd_forward_gpu", "ssd_states_gpu", "ssd_backward_gpu"}
    assert set(kernels) == want, kernels
    for name, k in kernels.items():
        assert k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0, (name, k)
        assert k["registers"] * k["threads_per_block"] <= H100["registers_per_block"], (name, k)
        assert 0 < k["shared_memory_bytes"] <= H100["shared_memory_per_block_optin"], (name, k)
    assert r["temp_bytes"] > 0


def hybrid_config_args(layers: str, experts: int):
    """compile-check arguments of an h-micro-wide (hidden 2048, 64 x 64 Mamba heads, 32/8 x 64 attention heads)
    hybrid of the given layers, dense or with `experts` routed experts, on 2 GPUs at 2 x 4096 tokens."""
    types = ", ".join(f"'{t}'" for t in layers)
    moe = ([f"--config.model.num_local_experts={experts}", "--config.model.num_experts_per_tok=2",
            "--config.model.intermediate_size=512", "--config.mesh.expert=2"] if experts else
           ["--config.mesh.fsdp=2"])
    return ["--topology", "h100:1x2", "--json", "--config.model.preset=granite-4.0-h-micro",
            f"--config.model.num_hidden_layers={len(layers)}", f"--config.model.layer_types=[{types}]",
            "--config.train.batch_size=2", "--config.train.seq_len=4096",
            "--config.train.steps=10", "--config.schedule.warmup_steps=1", "--config.train.remat=full", *moe]


@pytest.mark.slow
@pytest.mark.parametrize("layers,experts", [(["mamba", "attention"], 0), (["attention"], 8)])
def test_train_step_compiles_for_h100_with_the_gpu_kernels(layers, experts, tmp_path, monkeypatch):
    """The real train step (AdamW, bfloat16 compute, full remat) of an h-micro-wide model: per-GPU memory is reported
    and fits, and the compiled program holds the Pallas SSD (Triton) for Mamba layers, cuDNN's fused attention
    (forward and backward) and, with routed experts, the grouped expert matmul."""
    captured = {}
    real = compile_check.compile_train_step

    def spy(cfg, topology, **kwargs):
        captured["result"] = real(cfg, topology, compiler_options={"xla_dump_to": str(tmp_path)}, **kwargs)
        return captured["result"]

    monkeypatch.setattr(compile_check, "compile_train_step", spy)
    assert compile_check.main(hybrid_config_args(layers, experts)) == 0
    result = captured["result"]
    assert result["platform"] == "gpu" and result["devices"] == 2 and result["fits"]
    assert result["model"]["ssd_impl"] == "pallas_gpu" and result["model"]["attention_impl"] == "cudnn"
    assert 0 < result["argument_size_in_bytes"] < result["peak_bytes_per_device"] < H100["memory_bytes"]
    assert result["temp_size_in_bytes"] > 0 and "autotuning is off" in result["notes"][0]
    hlo = "\n".join(p.read_text() for p in tmp_path.glob("*after_optimizations.txt"))
    if "mamba" in layers:  # SSD forward, states, backward
        assert hlo.count('custom_call_target="__gpu$xla.gpu.triton"') >= 3
    assert 'custom_call_target="__cudnn$fmhaScaleBiasSoftmax"' in hlo
    assert 'custom_call_target="__cudnn$fmhaScaleBiasSoftmaxBackward"' in hlo
    if experts:
        # "blocked" on GPU (docs/moe.md): one matmul batched over blocks of one expert's rows, as a GEMM fusion.
        assert result["model"]["moe_impl"] == "blocked"
        assert re.search(r"dot\(.*lhs_batch_dims=\{0\}.*op_name=\"[^\"]*blocked_experts", hlo)


def test_gpu_topology_has_its_hosts_and_memory():
    target = aot_targets.target("h200:2x4")
    assert target.platform == "gpu" and len(target.devices) == 8 and target.memory_bytes > 140e9
    assert {d.process_index for d in target.devices} == {0, 1}  # devices on 2 hosts
    assert np.unique([d.id for d in target.devices]).size == 8


@pytest.mark.slow
def test_h_small_fits_64_h100s(monkeypatch, capsys):
    """granite-4.0-h-small, all 40 layers, 4K tokens, one row per GPU on 8 hosts x 8 H100 (fsdp 8 x expert 8): the
    compiled train step fits 80 GB per GPU (figure in docs/benchmarks.md)."""
    args = ["--topology", "h100:8x8", "--json", "--config.model.preset=granite-4.0-h-small", "--config.mesh.fsdp=8",
            "--config.mesh.expert=8", "--config.train.batch_size=64", "--config.train.seq_len=4096",
            "--config.train.remat=full", "--config.train.steps=10", "--config.schedule.warmup_steps=1"]
    assert compile_check.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["devices"] == 64 and result["mesh"]["fsdp"] == 8 and result["mesh"]["expert"] == 8
    assert result["model"]["layers"] == 40 and result["model"]["experts"] == 72
    assert result["fits"] and result["peak_bytes_per_device"] < 80e9
