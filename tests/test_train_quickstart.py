"""`granite-jax quickstart` end to end on the demo corpus (fewer steps than the README run): the loss falls, the
shipped lm-eval task is scored during training, the model is exported in the Hugging Face layout and sampled from,
and training the same config with the same seed again gives bit-identical losses."""

import os
import subprocess
import sys

import numpy as np
import pytest

from test_train import REPO, losses, metric_lines, run_train, subprocess_env

pytestmark = pytest.mark.slow
STEPS = 40


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from data_pipelines.demo import build_demo

    out = str(tmp_path_factory.mktemp("demo"))
    build_demo(out, progress=False)
    return out


def test_quickstart_trains_exports_and_is_deterministic(demo, tmp_path):
    cache = tmp_path / "cache"
    first = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "granite_jax.cli", "quickstart", "--workdir", str(first),
                           "--data", demo, "--steps", str(STEPS)], env=subprocess_env(1, cache), cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = losses(first)
    assert a[STEPS] < a[1] - 1.0, a  # from ~ln(8192) = 9.0 down by more than a nat
    scores = [m for m in metric_lines(first) if "eval_tiny_stdlib_choice_acc" in m]
    assert [m["step"] for m in scores] == [STEPS], scores  # every 100 steps and after the last
    acc = scores[0]["eval_tiny_stdlib_choice_acc"]
    assert 0 <= acc <= 1 and abs(acc * 20 - round(acc * 20)) < 1e-4, acc  # a share of the 20 questions
    assert f"tiny_stdlib_choice accuracy (20 questions, chance 0.25), scored during training: step {STEPS}: " \
           f"{acc:.2f}" in proc.stdout, proc.stdout[-3000:]
    sample = proc.stdout.split("sampled continuation", 1)[1].splitlines()[1]
    assert sample.startswith("    def __init__(self") and len(sample) > len("    def __init__(self"), sample

    from granite_jax import hf
    from granite_jax.checkpoint import restore_model

    exported, trained = hf.from_pretrained(str(first / "hf")), restore_model(str(first))
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= set(os.listdir(first / "hf"))
    ids = np.arange(16, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(exported(ids)), np.asarray(trained(ids)))

    sources = f"--config.data.sources=[{{'name': 'demo', 'path': {os.path.abspath(demo)!r}, 'weight': 1.0}}]"
    second = tmp_path / "again"
    run_train(os.path.join(REPO, "experiments", "quickstart.py"), second, sources, f"--config.train.steps={STEPS}",
              f"--config.schedule.warmup_steps={STEPS // 10}", "--config.eval.every_steps=0", cache_dir=cache,
              timeout=1200)
    assert losses(second) == a  # bit for bit
