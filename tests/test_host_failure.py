"""A process of a multi-process job dies (`kill -9`): the others exit non-zero within the heartbeat timeout
(`--heartbeat_timeout_s`, short here) instead of waiting in a collective, and the job resumes from its last
checkpoint on as many processes as are left (train.data_feed=global): 4 processes, whose coordinator is killed,
continue as 2 through launch/local.sh, whose worker is killed and which restarts them bit for bit, and then as 1 to
the end. Every logged loss equals an uninterrupted 1-process run's to rel 1e-5, the data position exactly, and no
checkpoint is moved. CPU processes of 1 device each, gloo collectives; a 1-layer attention + MoE model (the layout
is what is tested here; the 2-layer hybrid's resume is tested in test_checkpoint.py)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_checkpoint import _steps, _wait_for_lines
from test_train import REPO, losses, metric_lines, run_train, subprocess_env, train_cmd, write_config, write_corpus

HEARTBEAT_S = 4
STEPS = 10
OVERRIDES = ("--config.train.data_feed=global", f"--config.train.steps={STEPS}",
             "--config.model.num_hidden_layers=1", "--config.model.layer_types=['attention']")
# The survivors' bound: the heartbeat timeout plus the time to notice it and abort on a loaded 2-core machine.
EXIT_BOUND_S = HEARTBEAT_S + 26
# Losses of two process layouts: the same global batches, but the batch's sums (loss, gradients) are split over 4, 2
# or 1 devices and reduced in another order, so float32 results differ in the last bits, a few ulp per step that
# the steps carry on; a lost optimizer state or data position changes the loss by percents.
LAYOUT_RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped by its parent has exited
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def kill_and_time_exits(pids: list[int], victim: int) -> float:
    """kill -9 of `pids[victim]`; seconds from the kill to the last survivor's exit (asserted within the bound)."""
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    survivors = [p for i, p in enumerate(pids) if i != victim]
    while any(map(_alive, survivors)) and time.monotonic() - killed < EXIT_BOUND_S:
        time.sleep(0.05)
    lost = time.monotonic() - killed
    hung = [i for i, p in enumerate(pids) if i != victim and _alive(p)]
    assert not hung, f"processes {hung} still running {lost:.0f} s after process {victim} was killed"
    return lost


def _wait_for_checkpoint_then_a_step(proc, workdir, after: int = 0, skip_lines: int = 0, timeout: float = 600):
    """Waits for a complete checkpoint past step `after` and for this attempt (the metrics.jsonl lines after the
    first `skip_lines`) to log a step beyond it, so that the next attempt repeats a step this one logged."""
    deadline, metrics = time.monotonic() + timeout, os.path.join(workdir, "metrics.jsonl")
    while True:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be interrupted"
        assert time.monotonic() < deadline, f"no checkpoint past step {after} and a step logged after it"
        new = [s for s in _steps(workdir) if s > after]
        if new and os.path.exists(metrics):
            with open(metrics) as f:
                lines = [line for line in f.readlines()[skip_lines:] if line.endswith("\n")]  # complete lines
            if any(json.loads(line)["step"] > new[0] for line in lines):
                return
        time.sleep(0.05)


def _attempts(workdir, ends: list[int]) -> list[dict[int, float]]:
    """{step: loss} of each attempt; `ends`: the number of metrics.jsonl lines when each attempt before the last
    ended."""
    lines = metric_lines(workdir)
    return [{m["step"]: m["loss"] for m in lines[a:b]} for a, b in zip([0, *ends], [*ends, len(lines)])]


def _data_states(workdir, step) -> set[str]:
    """The distinct data iterator states saved by the processes of checkpoint `step`."""
    directory = os.path.join(workdir, "checkpoints", str(step), "data")
    return {json.dumps(json.load(open(os.path.join(directory, f))), sort_keys=True) for f in os.listdir(directory)
            if f.startswith("process_")}


def _final_state(workdir) -> dict[str, np.ndarray]:
    """The parameters and the rest of the train state (optimizer, counters) of a 1-process run's last checkpoint."""
    import orbax.checkpoint as ocp

    checkpointer, step = ocp.StandardCheckpointer(), os.path.join(workdir, "checkpoints", str(STEPS))
    return {f"{item}.{k}": np.asarray(v) for item in ("params", "train")
            for k, v in checkpointer.restore(os.path.join(step, item)).items()}


@pytest.mark.slow
def test_a_killed_process_stops_the_others_and_the_job_resumes_on_fewer_processes(tmp_path):
    data = write_corpus(tmp_path / "corpus")
    config, cache = write_config(tmp_path, data), tmp_path / "cache"
    sources = f"--config.data.sources=[{{'name': 'demo', 'path': '{data}', 'weight': 1.0}}]"  # as local.sh names it
    reference = tmp_path / "uninterrupted"
    run_train(config, reference, *OVERRIDES, sources, cache_dir=cache)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))

    # 4 processes; kill -9 of process 0, which runs the coordination service: the 3 others exit.
    workdir = tmp_path / "run"
    port, four = free_port(), []
    for i in range(4):
        with open(tmp_path / f"four_{i}.log", "w") as log:
            four.append(subprocess.Popen(
                train_cmd(config, workdir, *OVERRIDES, sources, f"--heartbeat_timeout_s={HEARTBEAT_S}",
                          f"--coordinator_address=localhost:{port}", "--num_processes=4", f"--process_id={i}"),
                env=subprocess_env(1, cache), cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    _wait_for_checkpoint_then_a_step(four[0], workdir)
    lost = kill_and_time_exits([p.pid for p in four], victim=0)
    print(f"survivors of 4 exit {lost:.1f} s after the kill of process 0 (heartbeat timeout {HEARTBEAT_S} s)")
    for i, p in enumerate(four[1:], 1):
        out = (tmp_path / f"four_{i}.log").read_text()
        assert p.wait() != 0 and "JAX distributed service detected fatal errors" in out, out[-3000:]
    ends, from_four = [len(metric_lines(workdir))], _steps(workdir)[-1]

    # Resumed by 2 processes (launch/local.sh 2, RESTARTS=1); kill -9 of process 1: process 0 exits naming it, and
    # local.sh starts both again from the last checkpoint.
    env = dict(subprocess_env(1, cache), CONFIG=str(config), WORKDIR=str(workdir), DATA=data, RESTARTS="1",
               HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S), PYTHON=sys.executable)
    job = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local.sh"), "2", *OVERRIDES], env=env,
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint_then_a_step(job, workdir, after=from_four, skip_lines=ends[0])
    lost = kill_and_time_exits([int((workdir / f"process_{i}.pid").read_text()) for i in (0, 1)], victim=1)
    print(f"survivor of 2 exits {lost:.1f} s after the kill of process 1 (heartbeat timeout {HEARTBEAT_S} s)")
    ends.append(len(metric_lines(workdir)))
    from_two = _steps(workdir)[-1]  # the complete checkpoints when the job went down
    restarted = time.monotonic()
    _wait_for_lines(job, workdir, ends[-1] + 1)
    print(f"relaunch to the first resumed step: {time.monotonic() - restarted:.1f} s")
    out = job.communicate(timeout=600)[0]
    assert job.returncode == 0, out[-4000:]
    log0 = (workdir / "process_0.log").read_text()
    assert "Task 1 heartbeat timeout" in log0 or "stopped sending heartbeats):\n1" in log0, log0[-3000:]
    assert "restarting all 2 from the last checkpoint" in out
    assert f"resuming from step {from_four}:" in log0 and f"resuming from step {from_two}:" in log0, log0[-3000:]
    by_four, by_two, again = _attempts(workdir, ends)
    assert min(by_two) == from_four + 1 and min(again) == from_two + 1 and max(again) == STEPS
    assert set(by_two) & set(by_four) and set(again) & set(by_two)  # each resumed layout repeated logged steps
    for step in set(again) & set(by_two):  # the same layout again: bit for bit
        assert again[step] == by_two[step], (step, by_two[step], again[step])
    assert _steps(workdir) == list(range(2, STEPS + 1, 2)) and not os.path.exists(workdir / "checkpoints_damaged")

    # The 2-process checkpoint before the last, resumed by 1 process to the end.
    one = tmp_path / "one"
    last = _steps(workdir)[-2]
    for step in _steps(workdir)[:-1]:
        shutil.copytree(workdir / "checkpoints" / str(step), one / "checkpoints" / str(step))
    run_train(config, one, *OVERRIDES, sources, cache_dir=cache)
    by_one = losses(one)
    assert sorted(by_one) == list(range(last + 1, STEPS + 1))
    assert _steps(one) == list(range(2, STEPS + 1, 2)) and not os.path.exists(one / "checkpoints_damaged")

    for name, got in [("4 processes", by_four), ("2 processes", {**by_two, **again}), ("1 process", by_one)]:
        steps = sorted(got)
        worst = max(abs(got[s] / expected[s] - 1) for s in steps)
        print(f"{name}, steps {steps[0]}-{steps[-1]}: largest relative loss difference {worst:.1e}")
        np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=LAYOUT_RTOL,
                                   err_msg=name)
    # The data position, exactly: every process of every layout saved the uninterrupted run's stream state.
    for step in _steps(workdir):
        assert _data_states(workdir, step) == _data_states(reference, step), step
    assert _data_states(one, STEPS) == _data_states(reference, STEPS)
    # Parameters and optimizer moments of the last step: the uninterrupted run's to float32 reduction order; the
    # step counters (optimizer and schedule) exactly.
    got, want = _final_state(one), _final_state(reference)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value.dtype.kind == "f":
            assert np.linalg.norm(got[key] - value) <= LAYOUT_RTOL * np.linalg.norm(value), key
        else:
            assert np.array_equal(got[key], value), (key, got[key], value)
