"""Logit parity with transformers' PyTorch GraniteMoeHybridForCausalLM, both directions, and exact round trips."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from granite_jax import hf  # noqa: E402

BASE = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8,
            mamba_d_state=16, mamba_d_head=16, mamba_chunk_size=16, shared_intermediate_size=48,
            embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.5, attention_multiplier=0.2,
            rms_norm_eps=1e-5)

CONFIGS = {
    # hybrid, MoE, several Mamba groups, every bias, untied head
    "hybrid_moe_groups": dict(num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"],
                              mamba_n_groups=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                              tie_word_embeddings=False, mamba_conv_bias=True, mamba_proj_bias=True,
                              attention_bias=True),
    # dense hybrid (shared MLP only), tied embeddings, transformers 5 layer-type spelling, no conv bias
    "dense_hybrid_tied": dict(num_hidden_layers=3, layer_types=["linear_attention", "linear_attention",
                                                                "full_attention"],
                              num_local_experts=0, num_experts_per_tok=0, tie_word_embeddings=True,
                              mamba_conv_bias=False, time_step_limit=(0.01, 0.5)),
    # all attention with RoPE, attention biases, GQA 4:1, MoE top-1
    "attention_rope": dict(num_hidden_layers=2, layer_types=["attention", "attention"], num_attention_heads=8,
                           num_key_value_heads=2, position_embedding_type="rope", rope_parameters={
                               "rope_type": "default", "rope_theta": 500.0}, attention_bias=True,
                           num_local_experts=3, num_experts_per_tok=1, intermediate_size=24,
                           tie_word_embeddings=False),
}


def _reference_model(kwargs, seed):
    cfg = transformers.GraniteMoeHybridConfig(**{**BASE, **kwargs})
    torch.manual_seed(seed)
    model = transformers.GraniteMoeHybridForCausalLM(cfg).eval()
    with torch.no_grad():  # move every weight well away from its initialisation (norms, A_log, D, dt_bias too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logit_parity_both_ways(name, tmp_path):
    ref = _reference_model(CONFIGS[name], seed=len(name))
    ref.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, BASE["vocab_size"], size=(2, 37))  # 37: not a chunk multiple
    ref_logits = _torch_logits(ref, ids)

    ours = hf.from_pretrained(tmp_path / "hf")
    ours_logits = np.asarray(ours(jnp.asarray(ids)))
    assert ours_logits.dtype == np.float32
    assert _rel_err(ours_logits, ref_logits) <= 1e-4

    hf.save_pretrained(ours, tmp_path / "ours")
    back = transformers.GraniteMoeHybridForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert _rel_err(ours_logits, _torch_logits(back, ids)) <= 1e-4

    # load -> save reproduces every tensor bit for bit, with the same key set
    with safe_open(tmp_path / "hf" / "model.safetensors", "numpy") as a, \
            safe_open(tmp_path / "ours" / "model.safetensors", "numpy") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert np.array_equal(a.get_tensor(key), b.get_tensor(key)), key


def test_save_writes_released_layout_and_config(tmp_path):
    ref = _reference_model(CONFIGS["hybrid_moe_groups"], seed=1)
    ref.save_pretrained(tmp_path / "hf")
    ours = hf.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "granitemoehybrid"
    assert cfg["layer_types"] == ["mamba", "attention", "mamba", "mamba"]
    with safe_open(tmp_path / "out" / "model.safetensors", "numpy") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    H, E, I = 64, 4, 32
    in_proj = 2 * 2 * H + 2 * 2 * 16 + 8
    assert shapes["model.layers.0.mamba.in_proj.weight"] == [in_proj, H]
    assert shapes["model.layers.0.mamba.conv1d.weight"] == [2 * H + 2 * 2 * 16, 1, 4]
    assert shapes["model.layers.1.block_sparse_moe.input_linear.weight"] == [E, 2 * I, H]
    assert shapes["model.layers.1.block_sparse_moe.output_linear.weight"] == [E, H, I]
    assert shapes["model.layers.1.block_sparse_moe.router.layer.weight"] == [E, H]
    assert shapes["model.layers.3.shared_mlp.input_linear.weight"] == [96, H]
    assert "lm_head.weight" in shapes


def test_sharded_checkpoint_round_trip(tmp_path):
    ref = _reference_model(CONFIGS["dense_hybrid_tied"], seed=3)
    ref.save_pretrained(tmp_path / "hf")
    ours = hf.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "sharded" / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = hf.from_pretrained(tmp_path / "sharded")
    ids = jnp.arange(30).reshape(1, 30) % 300
    np.testing.assert_array_equal(np.asarray(ours(ids)), np.asarray(again(ids)))
    back = transformers.GraniteMoeHybridForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    assert _rel_err(np.asarray(ours(ids)), _torch_logits(back, np.asarray(ids))) <= 1e-4


def test_bad_checkpoints_name_the_tensor(tmp_path):
    ref = _reference_model(CONFIGS["dense_hybrid_tied"], seed=4)
    ref.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "shared_intermediate_size": 40}))
    with pytest.raises(ValueError, match="shared_mlp.input_linear.weight has shape"):
        hf.from_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        hf.from_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.from_pretrained(tmp_path)


def test_shared_mlp_of_width_zero_loads_and_saves_as_transformers_does(tmp_path):
    # transformers builds the shared MLP whatever its width: [0, H] and [H, 0] tensors are on disk
    ref = _reference_model(dict(num_hidden_layers=2, layer_types=["mamba", "attention"], num_local_experts=4,
                                num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=0), seed=5)
    ref.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, BASE["vocab_size"], size=(2, 21))
    ours = hf.from_pretrained(tmp_path / "hf")
    ours_logits = np.asarray(ours(jnp.asarray(ids)))
    assert _rel_err(ours_logits, _torch_logits(ref, ids)) <= 1e-4

    hf.save_pretrained(ours, tmp_path / "ours")
    with safe_open(tmp_path / "hf" / "model.safetensors", "numpy") as a, \
            safe_open(tmp_path / "ours" / "model.safetensors", "numpy") as b:
        assert set(a.keys()) == set(b.keys())
        assert b.get_slice("model.layers.1.shared_mlp.input_linear.weight").get_shape() == [0, 64]
        assert b.get_slice("model.layers.1.shared_mlp.output_linear.weight").get_shape() == [64, 0]
    back, info = transformers.GraniteMoeHybridForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _rel_err(ours_logits, _torch_logits(back.eval(), ids)) <= 1e-4


# Replacing a folder ------------------------------------------------------------------------------------------------

def _small_model():
    from flax import nnx

    from granite_jax.config import preset
    from granite_jax.model import GraniteModel
    return GraniteModel(preset("debug-hybrid-dense"), rngs=nnx.Rngs(0))


def test_save_refuses_to_replace_anything_but_a_model_folder(tmp_path):
    model = _small_model()
    user = tmp_path / "mydata"
    user.mkdir()
    (user / "notes.txt").write_text("important")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"{user} exists and is not a Hugging Face model folder"):
            hf.save_pretrained(model, user, overwrite=overwrite)
    assert os.listdir(user) == ["notes.txt"]

    out = tmp_path / "out"
    hf.save_pretrained(model, out)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        hf.save_pretrained(model, out)  # the default keeps an existing model folder
    hf.save_pretrained(model, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["mydata", "out"]


@pytest.mark.parametrize("failing_rename", [1, 2])  # moving the old folder aside; moving the new one into place
def test_save_keeps_the_old_folder_when_replacing_it_fails(tmp_path, monkeypatch, failing_rename):
    model = _small_model()
    out = tmp_path / "out"
    hf.save_pretrained(model, out)
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # marks the old copy
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}
    rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_rename:
            raise OSError("simulated failure")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="simulated failure"):
        hf.save_pretrained(model, out, overwrite=True)
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old
    assert os.listdir(tmp_path) == ["out"]  # no temporary or backup folder left
