"""Sweeps: sweep files expand into named points; the local executor skips finished points and reruns the others;
the report (CSV, Markdown, loss curves) is built from metrics.jsonl; the slurm executor renders an array job. The
slow test runs a real two-point sweep of the ablation base, kills it mid-point and finishes it."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from granite_jax import sweep, sweep_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION_BASE = os.path.join(REPO, "experiments", "ablation_base.py")


def _write(path, text) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_points_and_grid_are_named_and_overrides_ordered(tmp_path):
    path = _write(tmp_path / "s.py", f"BASE = {ABLATION_BASE!r}\nCOMMON = {{'train.steps': 7}}\n"
                  "GRID = {'model.num_experts_per_tok': [1, 2], 'schedule.lr': {'lo': 1e-3, 'hi': 3e-3}}\n")
    spec = sweep.load_sweep(path, ["train.steps=9"])
    assert [p.name for p in spec.points] == ["num_experts_per_tok=1,lo", "num_experts_per_tok=1,hi",
                                             "num_experts_per_tok=2,lo", "num_experts_per_tok=2,hi"]
    assert spec.overrides(spec.points[1]) == ["train.steps=7", "model.num_experts_per_tok=1", "schedule.lr=0.003",
                                              "train.steps=9"]
    (tmp_path / "sub").mkdir()
    rel = _write(tmp_path / "sub" / "r.py", "BASE = '../" + os.path.relpath(ABLATION_BASE, tmp_path) + "'\n"
                 "POINTS = [('a', {}), ('b', {'model.position_embedding_type': 'rope'})]\n")
    assert sweep.load_sweep(rel).base == ABLATION_BASE


@pytest.mark.parametrize("body, message", [
    ("POINTS = {'a': {}}", "define BASE"),
    (f"BASE = {ABLATION_BASE!r}", "exactly one of POINTS"),
    (f"BASE = {ABLATION_BASE!r}\nPOINTS = {{'a b': {{}}}}", "point name 'a b'"),
    (f"BASE = {ABLATION_BASE!r}\nPOINTS = [('a', {{}}), ('a', {{}})]", "occur twice"),
    ("BASE = 'nope.py'\nPOINTS = {'a': {}}", "no such file"),
])
def test_bad_sweep_files_are_clear_errors(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        sweep.load_sweep(_write(tmp_path / "bad.py", body + "\n"))


def test_invalid_point_config_fails_before_running(tmp_path, capsys):
    path = _write(tmp_path / "s.py", f"BASE = {ABLATION_BASE!r}\nPOINTS = {{'ok': {{}}, "
                  "'bad': {'model.num_experts_per_tok': 99}}\n")
    assert sweep.main([path, "--workdir", str(tmp_path / "w")]) == 2
    assert "point 'bad'" in capsys.readouterr().err and not (tmp_path / "w" / "ok" / "train.log").exists()


FAKE_TRAIN = '''
import json, os, sys
workdir, steps, crash_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(workdir, exist_ok=True)
path = os.path.join(workdir, "metrics.jsonl")
start = 0
if os.path.exists(path):
    start = max(json.loads(l)["step"] for l in open(path))
marker = os.path.join(workdir, "crashed_once")
with open(path, "a") as f:
    for step in range(start + 1, steps + 1):
        f.write(json.dumps({"step": step, "loss": 5.0 / step, "tokens_per_s": 100.0 + step,
                            **({"eval_loss": 6.0 / step} if step % 2 == 0 else {})}) + "\\n")
        f.flush()
        if step == crash_at and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)
'''


def _fake_records(tmp_path, crash_at: dict) -> list[dict]:
    script = _write(tmp_path / "fake_train.py", FAKE_TRAIN)
    return [{"name": n, "steps": 6, "overrides": {}, "command": [sys.executable, script, str(tmp_path / "w" / n), "6",
                                                                   str(crash_at.get(n, 0))]} for n in ("a", "b")]


def test_local_executor_skips_finished_points_and_reruns_crashed_ones(tmp_path):
    records = _fake_records(tmp_path, crash_at={"b": 3})
    for r in records:
        os.makedirs(tmp_path / "w" / r["name"])
    out = sweep.run_local(records, str(tmp_path / "w"), echo=lambda s: None)
    assert out["a"] == "done" and out["b"].startswith("failed (exit code 9")
    assert sweep.last_step(str(tmp_path / "w" / "b")) == 3
    out = sweep.run_local(records, str(tmp_path / "w"), parallel=2, echo=lambda s: None)
    assert out == {"a": "skipped (done)", "b": "done"}
    assert sweep.last_step(str(tmp_path / "w" / "b")) == 6 and not (tmp_path / "w" / "b" / sweep.FAILED).exists()


def test_report_from_metrics(tmp_path):
    w = tmp_path / "w"
    for name in ("done_pt", "crashed", "running", "pending"):
        (w / name).mkdir(parents=True)
        _write(w / name / sweep.POINT_JSON, json.dumps({"name": name, "overrides": {"model.x": 1}, "steps": 4,
                                                         "params_total": 2_000_000, "params_active": 1_000_000}))
    _write(w / sweep.SWEEP_JSON, json.dumps({"sweep": "/x/demo_sweep.py", "base": ABLATION_BASE, "common": {},
                                             "extra": ["train.steps=4"],
                                             "points": ["done_pt", "crashed", "running", "pending"]}))
    lines = [{"step": 1, "loss": 4.0, "tokens_per_s": 10.0}, {"step": 2, "loss": 3.0, "eval_loss": 3.5,
                                                               "tokens_per_s": 100.0},
             {"step": 2, "loss": 2.9, "eval_loss": 3.4, "tokens_per_s": 110.0},  # logged again after a resume
             {"step": 4, "loss": 2.5, "eval_loss": 3.6, "tokens_per_s": 120.0}]
    for name in ("done_pt", "crashed", "running"):
        _write(w / name / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in lines[:4 if name == "done_pt" else 2])
               + '{"step": 5, "lo')  # a line cut short by a kill
    _write(w / "done_pt" / sweep.DONE, json.dumps({"wall_s": 12.5}))
    _write(w / "crashed" / sweep.FAILED, json.dumps({"why": "exit code -9"}))
    paths = sweep_report.write_report(str(w))
    rows = {r["point"]: r for r in csv.DictReader(open(paths[0]))}
    done = rows["done_pt"]
    assert (done["status"], done["steps"], done["final_loss"], done["final_eval_loss"]) == ("done", "4", "2.5", "3.6")
    assert (done["best_eval_loss"], done["best_eval_step"], done["tokens_per_s"]) == ("3.4", "2", "115.0")
    assert done["params_total"] == "2000000" and done["wall_s"] == "12.5"
    assert rows["crashed"]["status"] == "failed: exit code -9"
    assert rows["running"]["status"] == "incomplete (step 2 of 4)" and rows["pending"]["status"] == "pending"
    md = open(paths[1]).read()
    assert "| done_pt | `model.x=1` | 2.00M | 1.00M | done |" in md
    with open(paths[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # No task scores logged: the table has exactly the loss columns, and there is no task figure.
    assert next(csv.reader(open(paths[0]))) == list(sweep_report.COLUMNS) and len(paths) == 3
    assert "task_curves.png" not in md and not (w / "task_curves.png").exists()
    assert sweep_report.main([str(tmp_path / "nothing")]) == 2


def test_report_has_task_score_columns_and_curves(tmp_path):
    w = tmp_path / "w"
    acc, ppl = "eval_tiny_stdlib_choice_acc", "eval_tiny_text_word_perplexity"
    runs = {  # (step, loss, eval loss, acc, perplexity); the "loss_only" point logged no task scores
        "a": [(1, 4.0, None, None, None), (2, 3.0, 3.5, 0.25, 90.0), (4, 2.5, 3.2, 0.45, 60.0),
              (6, 2.4, 3.3, 0.40, 70.0)],
        "b": [(2, 3.1, 3.6, 0.30, 80.0), (4, 2.9, 3.4, 0.35, 85.0)],
        "loss_only": [(2, 3.3, 3.7, None, None)],
    }
    for name, rows in runs.items():
        (w / name).mkdir(parents=True)
        _write(w / name / sweep.POINT_JSON, json.dumps({"name": name, "overrides": {}, "steps": 6}))
        records = [{"step": s, "loss": l, "tokens_per_s": 10.0, **({"eval_loss": e, "eval_tokens": 64} if e else {}),
                    **({acc: a, acc + "_norm": a / 2, ppl: p} if a else {})} for s, l, e, a, p in rows]
        _write(w / name / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    _write(w / sweep.SWEEP_JSON, json.dumps({"sweep": "/x/s.py", "base": ABLATION_BASE, "common": {}, "extra": [],
                                             "points": list(runs)}))
    paths = sweep_report.write_report(str(w))
    header = next(csv.reader(open(paths[0])))
    tasks = [f"{which}_{key}" for key in (acc, acc + "_norm", ppl) for which in ("final", "best")]
    at = header.index("best_eval_step") + 1
    assert header[at:at + len(tasks)] == tasks and header[at + len(tasks)] == "tokens_per_s"
    assert "final_eval_tokens" not in header
    rows = {r["point"]: r for r in csv.DictReader(open(paths[0]))}
    a, b, loss_only = rows["a"], rows["b"], rows["loss_only"]
    assert (a[f"final_{acc}"], a[f"best_{acc}"], a[f"final_{acc}_norm"], a[f"best_{acc}_norm"]) == (
        "0.4", "0.45", "0.2", "0.225")
    assert (a[f"final_{ppl}"], a[f"best_{ppl}"]) == ("70.0", "60.0")  # perplexity: the lowest is best
    assert (b[f"final_{acc}"], b[f"best_{acc}"], b[f"final_{ppl}"], b[f"best_{ppl}"]) == ("0.35", "0.35", "85.0", "80.0")
    assert all(loss_only[c] == "" for c in tasks) and loss_only["final_eval_loss"] == "3.7"
    md = open(paths[1]).read()
    assert "| " + " | ".join(header) + " |" in md and "task_curves.png" in md
    assert paths[3] == str(w / "task_curves.png")
    with open(paths[3], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_has_one_curve_per_point(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **k: saved.update(fig=fig))
    metrics = {n: [{"step": s, "loss": 1.0 / s, "eval_loss": 2.0 / s} for s in (1, 2, 3)] for n in ("p", "q")}
    sweep_report.plot_curves(metrics, str(tmp_path / "x.png"), title="t")
    train_ax, eval_ax = saved["fig"].axes
    assert [line.get_label() for line in train_ax.lines] == ["p", "q"] == [ln.get_label() for ln in eval_ax.lines]
    keys = [f"eval_t{i}_acc" for i in range(4)]
    metrics["q"] = [{"step": s, **{k: 0.1 * s for k in keys[:2]}} for s in (2, 4)]  # q scored two of the tasks
    sweep_report.plot_task_curves(metrics, keys, str(tmp_path / "y.png"), title="t")
    axes = saved["fig"].axes  # one panel per task score, 3 to a row: the grid's two spare panels are removed
    assert [ax.get_ylabel() for ax in axes] == [k.removeprefix("eval_") for k in keys]
    assert [[ln.get_label() for ln in ax.lines] for ax in axes] == [["q"], ["q"], [], []]
    assert list(axes[1].lines[0].get_xdata()) == [2, 4]


def test_shipped_sweeps_score_the_shipped_task():
    """The ablation base scores tiny_stdlib_choice at its evaluations (lm-eval is in the test extras), so the shipped
    sweeps' reports get its columns; the speed-only sweep turns it off."""
    from granite_jax import train
    from granite_jax.inference.tasks import shipped_tasks

    sweeps = os.path.join(REPO, "experiments", "sweeps")
    for name in sorted(os.listdir(sweeps)):
        spec = sweep.load_sweep(os.path.join(sweeps, name))
        cfg = train.load_config(spec.base, spec.overrides(spec.points[0]))
        assert tuple(cfg.eval.tasks) == (() if name == "ssd_chunk_size.py" else ("tiny_stdlib_choice",)), name
        assert set(cfg.eval.tasks) <= set(shipped_tasks()) and cfg.eval.every_steps > 0


def test_slurm_executor_renders_an_array_job(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path / "s.py", f"BASE = {ABLATION_BASE!r}\nPOINTS = {{'a': {{}}, 'b': {{'train.seed': 1}}}}\n")
    w = tmp_path / "w"
    assert sweep.main([path, "--workdir", str(w), "--executor", "slurm", "--dry-run", "--parallel", "2",
                       "--sbatch-arg=--partition=gpu", "--config.train.steps=50"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=gpu" in script and "POINTS=(a b)" in script
    assert f"sweep {path} --workdir {w} --config.train.steps=50 --only \"$POINT\"" in script
    assert subprocess.run(["bash", "-n", str(w / "sweep.sbatch")]).returncode == 0
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert sweep.main([path, "--workdir", str(w), "--executor", "slurm"]) == 2
    assert "`sbatch` not found on PATH" in capsys.readouterr().err


# A real sweep ------------------------------------------------------------------------------------------------------

TINY = {  # the ablation base shrunk to seconds per point, on the synthetic corpus of test_train
    "model.vocab_size": 256, "model.hidden_size": 64, "model.num_hidden_layers": 2,
    "model.layer_types": ["mamba", "attention"], "model.num_attention_heads": 2, "model.num_key_value_heads": 1,
    "model.mamba_n_heads": 2, "model.mamba_d_head": 64, "model.mamba_d_state": 16, "model.mamba_chunk_size": 16,
    "model.num_local_experts": 4, "model.intermediate_size": 32, "model.shared_intermediate_size": 64,
    "train.steps": 24, "train.batch_size": 4, "train.seq_len": 32, "train.log_every_steps": 1,
    "schedule.warmup_steps": 2, "checkpoint.every_steps": 4,
}


def _sweep_cmd(path, workdir):
    return [sys.executable, "-m", "granite_jax.cli", "sweep", str(path), "--workdir", str(workdir)]


@pytest.mark.slow
def test_two_point_sweep_runs_skips_and_finishes_after_a_kill(tmp_path):
    from test_train import subprocess_env, write_corpus

    from granite_jax.train import default_config

    corpus = write_corpus(tmp_path / "corpus")
    common = {**TINY, "data.sources": [{"name": "syn", "path": corpus, "weight": 1.0}]}
    if "eval" in default_config():
        common["eval.every_steps"] = 6
        common["eval.data.sources"] = common["data.sources"]
        common["eval.tasks"] = []  # the ablation base's task needs the demo corpus's tokenizer
    path = _write(tmp_path / "two.py", f"BASE = {ABLATION_BASE!r}\nCOMMON = {common!r}\n"
                  "POINTS = {'seed0': {'train.seed': 0}, 'seed1': {'train.seed': 1}}\n")
    w = tmp_path / "sweep"
    env = subprocess_env(1, tmp_path / "cache")

    # Run 1: seed0 finishes; seed1 is killed (SIGKILL to the whole sweep) after a few steps.
    proc = subprocess.Popen(_sweep_cmd(path, w), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 400
    while sweep.last_step(str(w / "seed1")) < 10:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "seed1 did not get going"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (w / "seed0" / sweep.DONE).exists() and not (w / "seed1" / sweep.DONE).exists()
    killed_at = sweep.last_step(str(w / "seed1"))
    assert killed_at < TINY["train.steps"]

    # Run 2: seed0 is skipped, seed1 resumes from its checkpoint and finishes; the report covers both.
    out = subprocess.run(_sweep_cmd(path, w), env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "seed0: done before, skipped" in out.stdout and "seed1: resuming after step" in out.stdout
    assert "resuming from step" in (w / "seed1" / "train.log").read_text()
    rows = {r["point"]: r for r in csv.DictReader(open(w / "summary.csv"))}
    assert set(rows) == {"seed0", "seed1"}
    for row in rows.values():
        assert row["status"] == "done" and row["steps"] == str(TINY["train.steps"]) and float(row["final_loss"]) > 0
        assert int(row["params_total"]) > int(row["params_active"]) > 0 and float(row["tokens_per_s"]) > 0
    assert "| seed1 |" in (w / "summary.md").read_text()
    assert (w / "loss_curves.png").stat().st_size > 10_000

    # Run 3: nothing left to do.
    logs = {n: (w / n / "train.log").stat().st_size for n in rows}
    out = subprocess.run(_sweep_cmd(path, w), env=env, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0 and out.stdout.count("done before, skipped") == 2, out.stdout + out.stderr
    assert logs == {n: (w / n / "train.log").stat().st_size for n in rows}
