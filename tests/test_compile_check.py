"""`granite-jax compile-check`: the real train step compiled ahead of time by libtpu for a TPU topology on this
CPU-only machine, with per-device memory figures. Skips without libtpu (`pip install -e '.[tpu]'`)."""

import importlib.util
import json

import pytest

from granite_jax import compile_check

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


@pytest.mark.slow
def test_compile_check_reports_memory_for_a_small_config(monkeypatch, capsys):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    args = ["--topology", "v5p:2x2x1", "--json", "--config.mesh.fsdp=2", "--config.mesh.expert=2",
            "--config.model.num_hidden_layers=2", "--config.model.layer_types=['mamba', 'attention']",
            "--config.train.batch_size=8", "--config.train.seq_len=256", "--config.train.steps=10",
            "--config.schedule.warmup_steps=1", "--config.train.grad_accum_steps=2"]
    assert compile_check.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["mesh"]["fsdp"] == 2 and result["mesh"]["expert"] == 2
    # "auto" resolves for the pod, not for this CPU machine.
    assert result["model"]["ssd_impl"] == "pallas_tpu" and result["model"]["moe_impl"] == "ragged_dot"
    assert result["model"]["attention_impl"] == "xla" and result["model"]["layer_loop"] == "scan"
    assert 0 < result["argument_size_in_bytes"] < result["peak_bytes_per_device"] and result["fits"]
    assert result["compile_s"] > 0


def test_compile_check_rejects_a_mesh_that_does_not_fit_the_topology(monkeypatch, capsys):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    assert compile_check.main(["--topology", "v5p:2x2x1", "--config.mesh.fsdp=3", "--config.train.steps=10",
                               "--config.schedule.warmup_steps=1"]) == 2
    assert "fsdp=3" in capsys.readouterr().err
