"""A process of a multi-process job dies (`kill -9`): the others exit non-zero within the heartbeat timeout, naming
the lost process, instead of waiting in a collective; the relaunched job resumes from the last checkpoint, bit for
bit on the same layout, and on fewer processes (train.data_feed=global) with the same losses as the unsharded run
computes (rel 1e-5) and no checkpoint moved. Runs are `granite-jax train` subprocesses on CPU (gloo collectives)."""

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
STEPS = 8
OVERRIDES = ("--config.train.data_feed=global", f"--config.train.steps={STEPS}",
             f"--heartbeat_timeout_s={HEARTBEAT_S}", f"--shutdown_timeout_s={HEARTBEAT_S}")
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


def start_processes(config, workdir, n: int, cache, *overrides) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(train_cmd(config, workdir, *overrides, "--coordinator_address", f"localhost:{port}",
                                       "--num_processes", str(n), "--process_id", str(i)),
                             env=subprocess_env(1, cache), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(n)]


def wait_all(procs, timeout=600) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


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


@pytest.mark.slow
def test_a_killed_process_stops_the_others_and_the_relaunch_resumes(setup, tmp_path):
    config, cache = setup
    workdir = tmp_path / "run"
    procs = start_processes(config, workdir, 2, cache, *OVERRIDES)
    _wait_for_lines(procs[0], workdir, 5)  # mid-run: checkpoints 2 and 4 written, steps go on
    lost, outs = kill_and_time_exits(procs, victim=1, timeout=EXIT_BOUND_S)
    print(f"survivor exit {lost[0]:.1f} s after the kill (heartbeat timeout {HEARTBEAT_S} s)")
    assert "Task 1 heartbeat timeout" in outs[0] or "stopped sending heartbeats):\n1" in outs[0], outs[0][-3000:]
    before = losses(workdir)
    killed_at = max(before)
    assert killed_at < STEPS and _steps(workdir)[-1] >= 4

    # On one process with two devices (fewer processes, the same mesh) from a copy of the checkpoints.
    fewer = tmp_path / "fewer"
    shutil.copytree(workdir, fewer)
    kept = _steps(fewer)
    run_train(config, fewer, *OVERRIDES[:2], devices=2, cache_dir=cache)
    assert set(kept) <= set(_steps(fewer)) and not os.path.exists(fewer / "checkpoints_damaged")
    resumed = {m["step"]: m["loss"] for m in metric_lines(fewer)[len(before):]}
    assert min(resumed) == kept[-1] + 1 and max(resumed) == STEPS
    overlap = sorted(set(resumed) & set(before))
    assert overlap, (before, resumed)
    np.testing.assert_allclose([resumed[s] for s in overlap], [before[s] for s in overlap], rtol=1e-5)

    # The same layout again: the steps the killed run logged come out bit for bit.
    started = time.monotonic()
    outs = wait_all(start_processes(config, workdir, 2, cache, *OVERRIDES))
    print(f"relaunch to done: {time.monotonic() - started:.1f} s")
    assert f"resuming from step {kept[-1]}" in outs[0]
    again = {m["step"]: m["loss"] for m in metric_lines(workdir)[len(before):]}
    assert sorted(again) == list(range(kept[-1] + 1, STEPS + 1))
    for s in set(again) & set(before):
        assert again[s] == before[s], (s, again[s], before[s])
    np.testing.assert_allclose([again[s] for s in sorted(resumed)], [resumed[s] for s in sorted(resumed)], rtol=1e-5)


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
    for out in outs:
        print([l for l in out.splitlines() if "task" in l.lower()][:6])
