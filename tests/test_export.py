"""`granite-jax export`: a trained run (one device, and a sharded fsdp x tensor mesh) exported to a Hugging Face folder
loads in transformers' PyTorch GraniteMoeHybridForCausalLM with the trained model's logits (float32 rel 1e-4,
bfloat16 rel 2e-2) and generates; bad input fails clearly and writes nothing."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from granite_jax import export  # noqa: E402
from granite_jax.checkpoint import restore_model  # noqa: E402
from test_train import run_train, write_config, write_corpus  # noqa: E402

STEPS = 3
MESHES = {"one_device": ((), 1), "fsdp2_tensor2": (("--config.mesh.fsdp=2", "--config.mesh.tensor=2"), 4)}


@pytest.fixture(scope="module")
def corpus_and_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    corpus = write_corpus(root / "corpus")
    with open(os.path.join(corpus, "tokenizer.json"), "w") as f:  # stands in for the run's tokenizer
        json.dump({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}, f)
    return write_config(root, corpus), root / "cache"


@pytest.fixture(scope="module", params=sorted(MESHES))
def run(request, corpus_and_config, tmp_path_factory):
    config, cache = corpus_and_config
    mesh, devices = MESHES[request.param]
    workdir = tmp_path_factory.mktemp(request.param)
    run_train(config, workdir, f"--config.train.steps={STEPS}", *mesh, devices=devices, cache_dir=cache)
    return workdir


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_export_loads_in_transformers_with_the_trained_logits(run, tmp_path, dtype, rtol):
    out = tmp_path / "hf"
    assert export.main([str(run), "--out", str(out), "--dtype", dtype, "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]

    trained = restore_model(str(run))
    ids = np.random.default_rng(0).integers(1, trained.config.vocab_size, (2, 24)).astype(np.int32)
    expected = np.asarray(trained(ids), np.float32)
    model = transformers.GraniteMoeHybridForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert _rel_err(logits, expected) <= rtol

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == trained.config.eos_token_id
    with torch.no_grad():
        generated = model.generate(torch.as_tensor(ids[:1, :8], dtype=torch.long), max_new_tokens=5, do_sample=False,
                                   min_new_tokens=5)
    assert generated.shape == (1, 13)


def test_export_refuses_bad_input_and_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export.main([str(tmp_path / "not_a_run"), "--out", str(out)]) == 2
    assert "is not a granite-jax run" in capsys.readouterr().err
    assert export.main([str(run), "--out", str(out), "--step", "99"]) == 2
    assert "no checkpoint for step 99" in capsys.readouterr().err and not out.exists()

    out.mkdir()
    assert export.main([str(run), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert export.main([str(run), "--out", str(out), "--overwrite", "--step", "2", "--no-progress"]) == 0
    assert (out / "model.safetensors").exists()


def test_export_refuses_an_out_that_is_holds_or_is_inside_the_runs_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    (workdir / "precious.txt").write_text("x")
    for out, match in [(workdir, "is the run directory"), (tmp_path, "contains the run directory"),
                       (workdir / "checkpoints", "lies inside the checkpoints"),
                       (workdir / "checkpoints" / "5", "lies inside the checkpoints")]:
        with pytest.raises(export.ExportError, match=match) as error:
            export.export(str(workdir), str(out), overwrite=True, progress=False)
        assert str(out) in str(error.value) and str(workdir) in str(error.value)
    with pytest.raises(export.ExportError, match="no complete checkpoint"):  # past the out checks
        export.export(str(workdir), str(workdir / "hf"), progress=False)  # where `granite-jax quickstart` writes
    assert sorted(os.listdir(workdir)) == ["checkpoints", "precious.txt"]
    assert os.listdir(workdir / "checkpoints") == ["5"]


def test_export_overwrite_replaces_only_a_model_folder(tmp_path, capsys):
    workdir, user = tmp_path / "run", tmp_path / "mydata"
    (workdir / "checkpoints").mkdir(parents=True)
    user.mkdir()
    (user / "notes.txt").write_text("important")
    assert export.main([str(workdir), "--out", str(user), "--overwrite", "--no-progress"]) == 2
    assert f"{user} exists and is not a Hugging Face model folder" in capsys.readouterr().err
    assert os.listdir(user) == ["notes.txt"]


def test_export_refuses_non_finite_weights_naming_the_tensor(run, tmp_path, monkeypatch):
    read = export.CheckpointReader.__call__

    def poisoned(self, path, index):
        a = read(self, path, index)
        return np.full_like(a, np.nan) if path == ("layers", "blocks", 0, "mixer", "in_proj_x") else a

    monkeypatch.setattr(export.CheckpointReader, "__call__", poisoned)
    out = tmp_path / "hf"
    with pytest.raises(export.ExportError, match=r"model\.layers\.0\.mamba\.in_proj\.weight .*--allow-nonfinite"):
        export.export(str(run), str(out), progress=False)
    assert not out.exists() and os.listdir(tmp_path) == []
    export.export(str(run), str(out), allow_nonfinite=True, progress=False)
    assert out.exists()


# Import ------------------------------------------------------------------------------------------------------------

def test_import_then_export_reproduces_the_hugging_face_tensors_bit_for_bit(corpus_and_config, tmp_path):
    from safetensors import safe_open

    from granite_jax import hf_import, train

    config, _ = corpus_and_config
    model_cfg = train.model_config(train.load_config(config))
    assert model_cfg.num_local_experts > 1
    torch.manual_seed(0)
    reference = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**model_cfg.to_hf()))
    with torch.no_grad():  # every weight distinct from its initialisation, experts distinct from each other
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    reference.save_pretrained(tmp_path / "released")

    assert hf_import.main([str(tmp_path / "released"), "--workdir", str(tmp_path / "run"), "--config", config]) == 0
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "back"), "--dtype", "float32",
                        "--no-progress"]) == 0
    expected = {}  # the on-disk tensors (transformers renames some in memory)
    for file in os.listdir(tmp_path / "released"):
        if file.endswith(".safetensors"):
            with safe_open(str(tmp_path / "released" / file), framework="numpy") as f:
                expected.update({k: f.get_tensor(k) for k in f.keys()})
    if model_cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    with safe_open(str(tmp_path / "back" / "model.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(expected)
        for name in f.keys():
            np.testing.assert_array_equal(f.get_tensor(name), expected[name], err_msg=name)
    assert expected["model.layers.0.block_sparse_moe.input_linear.weight"].shape[0] == model_cfg.num_local_experts

    assert hf_import.main([str(tmp_path / "released"), "--workdir", str(tmp_path / "run"), "--config", config]) == 2


# Signing -----------------------------------------------------------------------------------------------------------

def test_signed_export_verifies_and_any_change_fails(corpus_and_config, tmp_path, capsys):
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from granite_jax import hf, train

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    out, pub = tmp_path / "hf", str(tmp_path / "pub.pem")
    # A small model saved straight from memory stands in for an export; `export --sign-key` signs the same way.
    model_cfg = train.model_config(train.load_config(corpus_and_config[0]))
    from flax import nnx

    from granite_jax.model import GraniteModel
    hf.save_pretrained(GraniteModel(model_cfg, rngs=nnx.Rngs(0)), out)
    export.sign(str(out), str(tmp_path / "key.pem"))
    assert export.verify_main([str(out), "--public-key", pub]) == 0

    weights = out / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert export.verify_main([str(out), "--public-key", pub]) == 1
    weights.write_bytes(original)
    (out / "extra.txt").write_text("x")
    assert export.verify_main([str(out), "--public-key", pub]) == 1
    (out / "extra.txt").unlink()
    assert export.verify_main([str(out), "--public-key", pub]) == 0
    (out / "config.json").unlink()
    assert export.verify_main([str(out), "--public-key", pub]) == 1
