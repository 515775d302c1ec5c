"""A process of a multi-process job dies (`kill -9`): the others exit non-zero within the heartbeat timeout
(`--heartbeat_timeout_s`, short here), naming the lost process, instead of waiting in a collective; launch/local.sh's
restart resumes the job from the last checkpoint bit for bit, and the same checkpoints resume on fewer processes
(train.data_feed=global) with the same losses (rel 1e-5), nothing moved. CPU processes, gloo collectives."""

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
from test_train import REPO, losses, metric_lines, run_train, subprocess_env, write_config, write_corpus

HEARTBEAT_S = 4
STEPS = 8
OVERRIDES = ("--config.train.data_feed=global", f"--config.train.steps={STEPS}")
# The survivors' bound: the heartbeat timeout plus the time to notice it and abort on a loaded 2-core machine.
EXIT_BOUND_S = HEARTBEAT_S + 26


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("host_failure")
    return write_config(root, write_corpus(root / "corpus")), root / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def kill_and_time_exits(procs, victim: int, timeout: float) -> tuple[list[float], list[str]]:
    """kill -9 of `procs[victim]`; (seconds from the kill to each survivor's exit, their output)."""
    procs[victim].kill()
    killed = time.monotonic()
    survivors = [p for i, p in enumerate(procs) if i != victim]
    exited = {}
    while len(exited) < len(survivors) and time.monotonic() - killed < timeout:
        for p in survivors:
            if p not in exited and p.poll() is not None:
                exited[p] = time.monotonic() - killed
        time.sleep(0.05)
    for p in survivors:
        if p not in exited:
            p.kill()
    outs = [p.communicate()[0] for p in survivors]
    procs[victim].communicate()
    hung = [i for i, p in enumerate(survivors) if p not in exited]
    assert not hung, f"survivors {hung} still running {timeout:.0f} s after the kill"
    for p, out in zip(survivors, outs):
        assert p.returncode != 0, out[-3000:]
    return [exited[p] for p in survivors], outs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped by its parent has exited
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_a_killed_process_stops_the_others_and_local_sh_resumes_the_job(setup, tmp_path):
    """launch/local.sh 2 with RESTARTS=1: kill -9 of process 1 mid-run; process 0 exits within the bound naming
    process 1; local.sh starts both again and they resume from the last checkpoint, bit for bit. Then the
    checkpoints of that 2-process run resume on 1 process (2 devices) with the same losses (rel 1e-5)."""
    config, cache = setup
    workdir = tmp_path / "run"
    env = dict(subprocess_env(1, cache), CONFIG=str(config), WORKDIR=str(workdir), DATA=os.path.dirname(config) +
               "/corpus", RESTARTS="1", HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S), PYTHON=sys.executable)
    job = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local.sh"), "2", *OVERRIDES], env=env,
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_lines(job, workdir, 5)  # mid-run: checkpoint 2 (and 4) written, steps go on
    victim, survivor = (int((workdir / f"process_{i}.pid").read_text()) for i in (1, 0))
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    while _alive(survivor) and time.monotonic() - killed < EXIT_BOUND_S:
        time.sleep(0.05)
    lost = time.monotonic() - killed
    print(f"survivor exit {lost:.1f} s after the kill (heartbeat timeout {HEARTBEAT_S} s)")
    assert lost < EXIT_BOUND_S, f"process 0 still running {lost:.0f} s after process 1 was killed"
    before, kept = losses(workdir), _steps(workdir)  # the complete checkpoints when the job went down
    restarted = time.monotonic()
    _wait_for_lines(job, workdir, len(before) + 1)
    print(f"relaunch to the first resumed step: {time.monotonic() - restarted:.1f} s")
    out = job.communicate(timeout=600)[0]
    assert job.returncode == 0, out[-4000:]
    log0 = (workdir / "process_0.log").read_text()
    assert "Task 1 heartbeat timeout" in log0 or "stopped sending heartbeats):\n1" in log0, log0[-3000:]
    assert "restarting all 2 from the last checkpoint" in out
    lines = metric_lines(workdir)
    first, again = lines[:len(before)], {m["step"]: m["loss"] for m in lines[len(before):]}
    resumed_from = min(again) - 1
    assert resumed_from == kept[-1] and f"resuming from step {resumed_from}" in log0 and max(again) == STEPS
    assert sorted(again) == list(range(resumed_from + 1, STEPS + 1)) and max(before) < STEPS
    for m in first:  # the steps both attempts ran: bit for bit
        assert again.get(m["step"], m["loss"]) == m["loss"], (m["step"], m["loss"], again[m["step"]])
    assert set(again) & set(before)

    # The checkpoint of step 4 of that 2-process run, resumed by 1 process with 2 devices.
    fewer = tmp_path / "fewer"
    for step in (2, 4):
        shutil.copytree(workdir / "checkpoints" / str(step), fewer / "checkpoints" / str(step))
    sources = f"[{{'name': 'demo', 'path': '{env['DATA']}', 'weight': 1.0}}]"  # as local.sh names it
    run_train(config, fewer, *OVERRIDES, f"--config.data.sources={sources}", devices=2, cache_dir=cache)
    assert _steps(fewer) == list(range(2, STEPS + 1, 2)) and not os.path.exists(fewer / "checkpoints_damaged")
    two = {**before, **again}
    one = losses(fewer)
    assert sorted(one) == list(range(5, STEPS + 1))
    np.testing.assert_allclose([one[s] for s in sorted(one)], [two[s] for s in sorted(one)], rtol=1e-5)


COLLECTIVE_LOOP = '''
import sys
import jax, numpy as np
from jax.experimental import multihost_utils
from granite_jax import distributed
port, n, i, timeout = sys.argv[1:]
distributed.initialize(distributed.DistributedArgs(f"localhost:{port}", int(n), int(i), int(timeout), int(timeout)))
print("ready", flush=True)
while True:
    multihost_utils.process_allgather(np.zeros(()))
'''


def test_four_processes_in_a_collective_exit_when_the_coordinator_is_killed(tmp_path):
    """Four processes looping over an all-gather: killing process 0, which runs the coordination service, ends the
    other three within the heartbeat timeout's bound (the train test above kills a worker)."""
    script = tmp_path / "loop.py"
    script.write_text(COLLECTIVE_LOOP)
    port = free_port()
    env = dict(subprocess_env(1, tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, str(script), str(port), "4", str(i), str(HEARTBEAT_S)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    for p in procs:
        while not p.stdout.readline().startswith("ready"):
            assert p.poll() is None, p.stdout.read()[-3000:]
    time.sleep(1)
    lost, outs = kill_and_time_exits(procs, victim=0, timeout=EXIT_BOUND_S)
    print(f"survivors exit {max(lost):.1f} s after the kill of process 0")
    for out in outs:  # the service is gone with process 0: each survivor says so
        assert "JAX distributed service detected fatal errors" in out, out[-3000:]
