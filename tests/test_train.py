"""The train job's pieces that need no compilation (loss masking, config validation), the skip of non-finite
updates, and the helpers the other train tests share (a synthetic corpus, a tiny run config, subprocess runs)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from granite_jax import train
from granite_jax.train_step import cross_entropy_sum, next_token_targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256


# Shared helpers ---------------------------------------------------------------------------------------------------

def write_corpus(path) -> str:
    """A prepared directory of 600 random documents (ids 1..255, eos 0), 2 shards."""
    from data_pipelines.prepare import synthetic_identity, write_token_documents

    rng = np.random.default_rng(0)
    docs = [rng.integers(1, VOCAB, rng.integers(5, 80)) for _ in range(600)]
    write_token_documents(str(path), [docs[i::2] for i in range(2)], synthetic_identity(VOCAB))
    return str(path)


TINY_CONFIG = '''
from granite_jax.train import default_config
def get_config():
    c = default_config()
    c.model.preset = "debug-hybrid-moe"
    c.model.update(dict(vocab_size={vocab}, num_hidden_layers=2, layer_types=["mamba", "attention"]))
    c.data.sources = [{{"name": "syn", "path": {corpus!r}, "weight": 1.0}}]
    c.train.update(dict(steps=8, batch_size=8, seq_len=32, log_every_steps=1, compute_dtype="float32"))
    c.schedule.update(dict(warmup_steps=2, lr=1e-3))
    c.checkpoint.update({{"every_steps": 2, "keep": 10}})
    return c
'''


def write_config(directory, corpus) -> str:
    path = os.path.join(str(directory), "tiny_config.py")
    with open(path, "w") as f:
        f.write(TINY_CONFIG.format(vocab=VOCAB, corpus=corpus))
    return path


def subprocess_env(devices: int, cache_dir) -> dict:
    """CPU-only JAX with `devices` host devices and a shared persistent compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=REPO)
    return env


def train_cmd(config, workdir, *overrides) -> list[str]:
    return [sys.executable, "-m", "granite_jax.cli", "train", "--config", str(config), "--workdir", str(workdir),
            "--no_progress", *overrides]


def run_train(config, workdir, *overrides, devices=1, cache_dir, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(config, workdir, *overrides), env=subprocess_env(devices, cache_dir), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metric_lines(workdir) -> list[dict]:
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metric_lines(workdir)}


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_compile_cache")


# Loss masking -------------------------------------------------------------------------------------------------------

def test_targets_count_only_next_tokens_of_the_same_document():
    tokens = jnp.array([[5, 6, 7, 8, 9, 1]])
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])  # doc 1: 5 6 | doc 2: 7 8 9 | padding
    targets, weights = next_token_targets(tokens, segments)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 1, 0]])
    np.testing.assert_array_equal(weights, [[1, 0, 1, 1, 0, 0]])  # 5->6, 7->8, 8->9


def test_cross_entropy_sum_is_the_masked_negative_log_likelihood():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 7))
    targets = jnp.array([[1, 2, 3, 4], [0, 6, 5, 1]])
    weights = jnp.array([[1.0, 0, 1, 1], [0, 0, 1, 0]])
    nll = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(4)[None], targets]
    np.testing.assert_allclose(cross_entropy_sum(logits, targets, weights), jnp.sum(nll * weights), rtol=1e-6)


# Config validation: everything fails before compiling, naming the key -----------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=-1", "train.steps"),
    ("train.batch_size='eight'", "train.batch_size"),
    ("model.hidden_sise=64", "model.hidden_sise"),
    ("model.num_experts_per_tok=9", "num_experts_per_tok"),
    ("model.preset='granite-9'", "model.preset"),
    ("mesh.fsdp=3", "fsdp=3"),
    ("optimizer.b1=1.5", "optimizer.b1"),
    ("schedule.warmup_steps=100", "schedule.warmup_steps"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("data.shuffel=False", "data.shuffel"),
    ("nosection.x=1", "nosection"),
    ("train.logits_chunk_tokens=5", "train.logits_chunk_tokens=5"),
    ("mesh.dcn.data=3", "dcn.data=3"),
])
def test_invalid_config_names_the_key(tmp_path, override, message):
    config = write_config(tmp_path, str(tmp_path / "corpus"))
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        cfg = train.load_config(config, [override])
        train.validate(cfg, n_devices=8)


def test_every_data_stage_obeys_the_batch_and_length_rules(tmp_path):
    config = write_config(tmp_path, str(tmp_path / "corpus"))
    stages = "data.stages=[{'tokens': 1024, 'batch_size': 4}, {'tokens': None, 'batch_size': 3}]"
    train.validate(train.load_config(config, [stages.replace("3}", "2}"), "train.grad_accum_steps=2"]), n_devices=8)
    with pytest.raises(ValueError, match=r"data\.stages\[1\]: batch_size=3"):
        train.validate(train.load_config(config, [stages, "train.grad_accum_steps=2"]), n_devices=8)
    with pytest.raises(ValueError, match=r"data\.stages\[1\]: seq_len=40 .*logits_chunk_tokens=16"):
        train.validate(train.load_config(config, ["data.stages=[{'tokens': 1024}, {'tokens': None, 'seq_len': 40}]",
                                                  "train.logits_chunk_tokens=16"]), n_devices=8)


def test_cli_reports_an_invalid_config_without_running(tmp_path, capsys):
    config = write_config(tmp_path, str(tmp_path / "corpus"))
    assert train.main(["--config", config, "--workdir", str(tmp_path / "w"), "--config.train.seq_len", "1"]) == 2
    assert "train.seq_len=1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")


def test_model_config_takes_dtypes_from_train(tmp_path):
    cfg = train.load_config(write_config(tmp_path, "x"), ["train.compute_dtype='bfloat16'", "train.remat='dots'",
                                                           "model.hidden_size=128"])
    m = train.model_config(cfg)
    assert (m.dtype, m.param_dtype, m.remat, m.hidden_size, m.num_local_experts) == ("bfloat16", "float32", "dots",
                                                                                       128, 4)


# Non-finite updates are skipped -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_nonfinite_step_leaves_params_and_optimizer_untouched():
    from granite_jax import optim, sharding, train_step
    from granite_jax.config import preset

    cfg = preset("debug-hybrid-moe", vocab_size=VOCAB, num_hidden_layers=2, layer_types=("mamba", "attention"))
    tx, schedule = optim.make_optimizer({}, {"warmup_steps": 0}, total_steps=10, tokens_per_step=64)
    mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    graphdef, state = train_step.init_state(cfg, tx, mesh, seed=0)
    _, abstract = train_step.abstract_state(cfg, tx)
    step_fn = train_step.make_train_step(graphdef, mesh, schedule=schedule, abstract_state=abstract, donate=False)
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch({"tokens": rng.integers(1, VOCAB, (2, 32)).astype(np.int32),
                                  "segment_ids": np.ones((2, 32), np.int32),
                                  "positions": np.tile(np.arange(32, dtype=np.int32), (2, 1))}, mesh)
    norm = state["params"]["norm"]["weight"]
    norm.set_value(norm.get_value().at[0].set(jnp.nan))
    before = jax.tree.map(np.asarray, state)
    after, m = step_fn(state, batch)
    assert not bool(m["finite"]) and int(m["nonfinite_total"]) == 1 and int(m["nonfinite_streak"]) == 1
    assert int(after["step"]) == 1
    for key in ("params", "opt"):  # bit-identical, the NaN included
        for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key]), strict=True):
            np.testing.assert_array_equal(x, y)


# Multi-host detection -------------------------------------------------------------------------------------------------

def test_distributed_launchers_are_detected():
    from granite_jax.distributed import DistributedArgs, detect

    none = DistributedArgs()
    assert detect(none, {}) is None
    assert detect(DistributedArgs("h:1", 2, 1), {}) == ("flags", dict(coordinator_address="h:1", num_processes=2,
                                                                       process_id=1))
    with pytest.raises(ValueError, match="go together"):
        detect(DistributedArgs("h:1", 2, None), {})
    assert detect(none, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == ("slurm", {})
    assert detect(none, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert detect(none, {"TPU_WORKER_HOSTNAMES": "a,b"}) == ("tpu", {})
    k8s = {"MASTER_ADDR": "job-0.svc", "WORLD_SIZE": "4", "JOB_COMPLETION_INDEX": "3"}
    assert detect(none, k8s) == ("kubernetes", dict(coordinator_address="job-0.svc:1234", num_processes=4,
                                                    process_id=3))


def test_tensorboard_events_round_trip(tmp_path):
    from granite_jax.metrics import EventFileWriter, crc32c, read_events

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    writer = EventFileWriter(str(tmp_path))
    writer.add_scalars(3, {"loss": 2.5, "lr": 1e-3})
    writer.close()
    assert read_events(writer.path) == [(3, {"loss": 2.5, "lr": pytest.approx(1e-3)})]
