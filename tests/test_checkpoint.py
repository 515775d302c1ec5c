"""Checkpoints of real runs (subprocesses of `granite-jax train` on a tiny model): exact resume after SIGKILL,
SIGTERM saves at the step it was received and exits 0, a truncated latest checkpoint falls back to the previous one
and is kept, and `restore_model` gives the trained model back. The data state of another process count: restored
when all processes saved one global stream, a clear error naming both counts for per-process shards."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from test_train import REPO, losses, metric_lines, run_train, subprocess_env, train_cmd, write_config, write_corpus

STEPS = 20
OVERRIDES = (f"--config.train.steps={STEPS}",)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    corpus = write_corpus(root / "corpus")
    return write_config(root, corpus), root / "cache"


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    config, cache = setup
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_train(config, workdir, *OVERRIDES, cache_dir=cache)
    return workdir


def _steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _wait_for_lines(proc, workdir, n, timeout=600):
    """Waits until metrics.jsonl of `workdir` has at least `n` lines."""
    deadline = time.time() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stdout.read()[-2000:]
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= n:
                    return
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not reach {n} lines")


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_gives_the_same_losses_bit_for_bit(setup, uninterrupted, tmp_path):
    config, cache = setup
    reference = losses(uninterrupted)
    assert sorted(reference) == list(range(1, STEPS + 1))
    workdir = tmp_path / "interrupted"
    popen = lambda: subprocess.Popen(train_cmd(config, workdir, *OVERRIDES), env=subprocess_env(1, cache),  # noqa
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # SIGTERM: checkpoint at the step the signal was seen, exit code 0.
    proc = popen()
    _wait_for_lines(proc, workdir, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    term_step = max(m["step"] for m in metric_lines(workdir))
    assert term_step < STEPS and _steps(workdir)[-1] == term_step, (term_step, _steps(workdir))
    assert f"saving a checkpoint at step {term_step}" in out

    # SIGKILL mid-way: no chance to save; the restart goes back to the last periodic checkpoint.
    proc = popen()
    _wait_for_lines(proc, workdir, term_step + 5)
    proc.kill()
    proc.wait(timeout=60)
    killed_at = max(m["step"] for m in metric_lines(workdir))
    assert killed_at < STEPS

    run_train(config, workdir, *OVERRIDES, cache_dir=cache)
    lines = metric_lines(workdir)
    assert {m["step"] for m in lines} == set(reference)
    for m in lines:  # every step logged by every attempt, re-run steps included, equals the uninterrupted run
        assert m["loss"] == reference[m["step"]], (m["step"], m["loss"], reference[m["step"]])


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous(setup, uninterrupted, tmp_path):
    config, cache = setup
    workdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(uninterrupted), str(workdir)], check=True)
    latest = _steps(workdir)[-1]
    _truncate_params(workdir, latest)
    open(workdir / "metrics.jsonl", "w").close()

    damaged_bytes = _params_bytes(workdir / "checkpoints" / str(latest))

    proc = run_train(config, workdir, *OVERRIDES, cache_dir=cache)
    assert f"checkpoint {workdir}/checkpoints/{latest} cannot be restored" in proc.stderr
    # kept where it was until the run saved that step anew; then set aside whole, never deleted
    (kept,) = os.listdir(workdir / "checkpoints_damaged")
    assert kept.startswith(f"{latest}-") and _params_bytes(workdir / "checkpoints_damaged" / kept) == damaged_bytes
    redone = losses(workdir)
    previous = _steps(uninterrupted)[-2]
    assert sorted(redone) == list(range(previous + 1, STEPS + 1))
    reference = losses(uninterrupted)
    assert all(redone[s] == reference[s] for s in redone)
    assert _steps(workdir)[-1] == STEPS


def _params_bytes(step_dir) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), step_dir): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(step_dir / "params") for f in fs}


def _truncate_params(workdir, step):
    files = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "checkpoints" / str(step) / "params") for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


@pytest.mark.slow
def test_a_different_model_or_data_stream_stops_the_resume_and_moves_nothing(setup, uninterrupted, tmp_path):
    config, cache = setup
    workdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(uninterrupted), str(workdir)], check=True)
    proc = subprocess.run(train_cmd(config, workdir, *OVERRIDES, "--config.model.intermediate_size=48"),
                          env=subprocess_env(1, cache), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "was saved by a different model (intermediate_size: checkpoint" in proc.stderr
    assert _steps(workdir) == _steps(uninterrupted) and not os.path.exists(workdir / "checkpoints_corrupt")
    # The same model reading its data with other settings: the stream's state is refused, nothing moves either.
    proc = subprocess.run(train_cmd(config, workdir, *OVERRIDES, "--config.data.shuffle=False"),
                          env=subprocess_env(1, cache), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "different stream (shuffle: saved True, now False)" in proc.stderr, proc.stderr
    assert _steps(workdir) == _steps(uninterrupted) and not os.path.exists(workdir / "checkpoints_corrupt")


@pytest.mark.slow
def test_when_no_checkpoint_can_be_restored_the_run_stops(setup, uninterrupted, tmp_path):
    config, cache = setup
    workdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(uninterrupted), str(workdir)], check=True)
    steps = _steps(workdir)
    for step in steps:
        _truncate_params(workdir, step)
    proc = subprocess.run(train_cmd(config, workdir, *OVERRIDES), env=subprocess_env(1, cache), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and f"none of the checkpoints {steps}" in proc.stderr, proc.stderr[-3000:]
    assert "nothing was moved or deleted" in proc.stderr
    assert _steps(workdir) == steps and not os.path.exists(workdir / "checkpoints_damaged")


@pytest.mark.slow
def test_restore_model_returns_the_trained_parameters(uninterrupted):
    import jax
    from flax import nnx

    from granite_jax.checkpoint import restore_model

    model = restore_model(str(uninterrupted))
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 256
    first = restore_model(str(uninterrupted), step=_steps(uninterrupted)[0])
    a, b = jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(first, nnx.Param))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b)), "the first and last checkpoints should hold different weights"
    logits = model(np.ones((1, 8), np.int32))
    assert logits.shape == (1, 8, 256) and bool(np.isfinite(np.asarray(logits)).all())
    with pytest.raises(FileNotFoundError, match="step 3"):
        restore_model(str(uninterrupted), step=3)


def test_expert_load_is_logged_every_logged_step(uninterrupted):
    """metrics.jsonl carries the per-layer expert load (share of routed slots per expert) and its imbalance."""
    from granite_jax.config import preset

    experts = preset("debug-hybrid-moe").num_local_experts
    for record in metric_lines(uninterrupted):
        load = np.asarray(record["expert_load"])
        assert load.shape == (2, experts)  # both layers of the tiny model have experts
        np.testing.assert_allclose(load.sum(axis=-1), 1.0, atol=1e-3)
        np.testing.assert_allclose(record["expert_max_over_mean"], load.max(axis=-1) * experts, rtol=1e-3)
        assert record["expert_max_over_mean_worst"] == pytest.approx(load.max() * experts, rel=1e-3)
        assert record["expert_unused_fraction_worst"] == pytest.approx(np.mean(load <= 0, axis=-1).max())


def _batches(corpus, **kwargs):
    import data_pipelines
    from data_pipelines.config import default_data_config

    cfg = default_data_config()
    cfg.sources = [{"name": "syn", "path": corpus, "weight": 1.0}]
    return data_pipelines.make_batches(cfg, batch_size=4, seq_len=32, seed=0, vocab_size=256, **kwargs)


def _write_states(directory, states):
    directory.mkdir()
    for i, state in enumerate(states):
        (directory / f"process_{i}-of-{len(states)}.json").write_text(json.dumps(state))


def test_data_state_of_another_process_count(setup, tmp_path):
    from etils import epath

    from data_pipelines.stream import StreamMismatch
    from granite_jax.checkpoint import DataHandler

    corpus = os.path.join(os.path.dirname(setup[0]), "corpus")
    stream = _batches(corpus)
    next(stream), next(stream)
    _write_states(tmp_path / "global", [stream.get_state()] * 2)  # data_feed=global: 2 processes, one stream
    resumed = DataHandler().restore(epath.Path(tmp_path / "global"), item=_batches(corpus))
    expected, got = next(stream), next(resumed)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)

    shards = [_batches(corpus, process_index=i, process_count=2) for i in range(2)]  # data_feed=process
    _write_states(tmp_path / "process", [next(s) and s.get_state() for s in shards])
    with pytest.raises(StreamMismatch, match=r"saved by 2 processes each reading its own document shard.*1 "
                                             r"process\(es\) cannot continue"):
        DataHandler().restore(epath.Path(tmp_path / "process"), item=_batches(corpus))
    assert sorted(os.listdir(tmp_path / "process")) == ["process_0-of-2.json", "process_1-of-2.json"]
