"""Sharded and multi-process training compute what one device computes (float32 compute):
2 processes x 2 CPU devices (jax.distributed on localhost, gloo collectives) == 1 process x 4 devices (rel 1e-5);
an fsdp x tensor x expert mesh of 8 devices == 1 device (rel 1e-4). Runs are `granite-jax train` subprocesses."""

import socket
import subprocess

import numpy as np
import pytest

from test_train import REPO, losses, metric_lines, run_train, subprocess_env, train_cmd, write_config, write_corpus

pytestmark = pytest.mark.slow
GLOBAL_FEED = "--config.train.data_feed=global"  # the same global batches whatever the number of processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "corpus")
    return write_config(root, corpus), root / "cache"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _assert_close(a: dict, b: dict, rtol: float):
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=rtol)


def test_two_processes_match_one_process(setup, tmp_path):
    config, cache = setup
    mesh = ("--config.mesh.fsdp=2", "--config.mesh.expert=2")
    run_train(config, tmp_path / "one", GLOBAL_FEED, *mesh, devices=4, cache_dir=cache)

    port = _free_port()
    workdir = tmp_path / "two"
    procs = [subprocess.Popen(train_cmd(config, workdir, GLOBAL_FEED, *mesh, "--coordinator_address",
                                        f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)),
                              env=subprocess_env(2, cache), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "4 devices, 2 process(es)" in outs[0]
    _assert_close(losses(tmp_path / "one"), losses(workdir), rtol=1e-5)
    assert metric_lines(workdir)[-1]["tokens_per_s"] > 0


def test_fsdp_tensor_expert_mesh_matches_one_device(setup, tmp_path):
    config, cache = setup
    run_train(config, tmp_path / "single", devices=1, cache_dir=cache)
    run_train(config, tmp_path / "mesh", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.mesh.expert=2",
              devices=8, cache_dir=cache)
    _assert_close(losses(tmp_path / "single"), losses(tmp_path / "mesh"), rtol=1e-4)
