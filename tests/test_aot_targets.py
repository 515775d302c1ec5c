"""Topology specs of `granite_jax.aot_targets` and the GPU target description, without compiling anything (no CUDA
plugin or libtpu needed)."""

import pytest

from granite_jax import aot_targets


def test_gpu_specs_parse_and_bad_ones_name_the_form():
    assert aot_targets.parse_gpu_spec("h200:2x8") == ("h200", 2, 8)
    assert aot_targets.parse_gpu_spec("H100:1x4") == ("h100", 1, 4)
    assert aot_targets.parse_gpu_spec("v5p:2x2x1") is None
    for bad in ("h100:8", "h100:0x8", "h100:2x8x1"):
        with pytest.raises(ValueError, match="h100:HOSTSxGPUS"):
            aot_targets.parse_gpu_spec(bad)


def test_unknown_target_and_missing_plugin_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="'a100:1x8': not a TPU .* or GPU"):
        aot_targets.target("a100:1x8")
    monkeypatch.setattr(aot_targets, "cuda_plugin_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs the CUDA plugin and ptxas: pip install -e \"\.\[gpu-aot\]\""):
        aot_targets.target("h100:1x8")


def test_h100_and_h200_differ_in_memory_and_bandwidth_only():
    h100, h200 = (aot_targets.gpu_target_config(k).splitlines() for k in ("h100", "h200"))
    differing = {a.split(":")[0].strip() for a, b in zip(h100, h200) if a != b}
    assert differing == {"memory_bandwidth", "device_memory_size", "name", "device_description_str"}
    assert "  device_memory_size: 84942979072" in h100 and "  device_memory_size: 151397597184" in h200
    assert any("major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES" in line for line in h100)
