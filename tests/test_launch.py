"""Launchers: each target renders for a released-size config (scripts pass `bash -n`, the manifest parses as YAML,
the commands carry config, workdir and process layout); a layout the config's mesh cannot use and a missing
cluster tool are clear errors; `launch/local.sh 2` trains the quickstart with 2 processes."""

import os
import subprocess

import pytest
import yaml

from granite_jax import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/granite_4_0_h_tiny.py"
WORKDIR = "/ckpt/granite-4.0-h-tiny"


def _render(capsys, *args) -> str:
    assert launch.main([*args, "--dry-run"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _bash_n(tmp_path, text) -> None:
    path = tmp_path / "script.sh"
    path.write_text(text)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_renders_cpu_nodes_and_a_restart_loop(capsys, tmp_path):
    text = _render(capsys, "--target", "slurm", "--config", "experiments/quickstart.py", "--workdir", "w",
                   "--gpus-per-node", "0", "--tasks-per-node", "2", "--max-restarts", "2", "--heartbeat-timeout", "60")
    _bash_n(tmp_path, text)
    assert "--gpus-per-node" not in text and "#SBATCH --requeue" in text and "seq 0 2" in text
    assert "--heartbeat_timeout_s=60" in text
    with pytest.raises(SystemExit):  # CPU nodes need the process count
        launch.main(["--target", "slurm", "--config", "experiments/quickstart.py", "--workdir", "w",
                     "--gpus-per-node", "0", "--dry-run"])
    assert "--gpus-per-node=0: give a GPU count, or 0 (CPU nodes) with --tasks-per-node" in capsys.readouterr().err


def test_slurm_renders_a_multi_node_job(capsys, tmp_path):
    text = _render(capsys, "--target", "slurm", "--config", f"{TINY}:h100x64", "--workdir", WORKDIR, "--nodes", "8",
                   "--sbatch-arg=--partition=h100", "--setup", "source .venv/bin/activate",
                   "--config.checkpoint.every_steps=500")
    _bash_n(tmp_path, text)
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=h100", "source .venv/bin/activate", "srun --kill-on-bad-exit=1 --nodes=8"):
        assert line in text
    assert (f"python -m granite_jax.cli train --config {TINY}:h100x64 --workdir {WORKDIR} --no_progress "
            "--config.checkpoint.every_steps=500") in text


def test_tpu_vm_renders_single_and_multi_slice(capsys, tmp_path):
    one = _render(capsys, "--target", "tpu-vm", "--config", f"{TINY}:v5p-256", "--workdir", WORKDIR, "--nodes", "32",
                  "--tpu", "my-v5p", "--project", "proj")
    _bash_n(tmp_path, one)
    assert "--worker=all" in one and "TPU=my-v5p" in one and "SLICES=1" in one and "PROJECT=proj" in one
    assert f"--config {TINY}:v5p-256 --workdir {WORKDIR}" in one
    two = _render(capsys, "--target", "tpu-vm", "--config", f"{TINY}:v5p-256x2", "--workdir", WORKDIR, "--nodes", "32",
                  "--slices", "2", "--tpu", "my-v5p")
    _bash_n(tmp_path, two)
    assert "SLICES=2" in two and "MEGASCALE_SLICE_ID=$i" in two and '"$TPU-$i"' in two


@pytest.mark.parametrize("accelerator, slices, nodes, config", [
    ("tpu-v5p-slice", 2, 32, f"{TINY}:v5p-256x2"),
    ("nvidia-h100-80gb", 1, 8, f"{TINY}:h100x64"),
])
def test_gke_renders_a_jobset(capsys, accelerator, slices, nodes, config):
    text = _render(capsys, "--target", "gke", "--config", config, "--workdir", WORKDIR, "--nodes", str(nodes),
                   "--slices", str(slices), "--accelerator", accelerator, "--image", "ghcr.io/x/granite-jax:1",
                   "--max-restarts", "5")
    manifest = yaml.safe_load(text)
    assert manifest["kind"] == "JobSet"
    job = manifest["spec"]["replicatedJobs"][0]
    assert job["replicas"] == slices
    assert job["template"]["spec"]["parallelism"] == job["template"]["spec"]["completions"] == nodes
    pod = job["template"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/x/granite-jax:1"
    # Every attempt runs this command on the same workdir: the trainer resumes from WORKDIR/checkpoints.
    assert container["command"][3:8] == ["train", "--config", config, "--workdir", WORKDIR]
    # The restart path: a failed pod fails its Job at once, the JobSet recreates all pods up to 5 times; exit code 2
    # (a config or checkpoint the run refuses) fails the JobSet instead.
    policy = manifest["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 5 and job["template"]["spec"]["backoffLimit"] == 0
    assert pod["restartPolicy"] == "Never"
    (refused,) = job["template"]["spec"]["podFailurePolicy"]["rules"]
    assert refused["action"] == "FailJob" and refused["onExitCodes"] == {"containerName": container["name"],
                                                                         "operator": "In", "values": [2]}
    assert policy["rules"] == [{"name": "refused-config-or-checkpoint", "action": "FailJobSet",
                                "onJobFailureReasons": ["PodFailurePolicy"]}]
    env = {e["name"]: e for e in container["env"]}
    if accelerator.startswith("tpu"):
        assert container["resources"]["limits"] == {"google.com/tpu": 4}
        assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x8"
        assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    else:
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
        assert env["WORLD_SIZE"]["value"] == "8" and env["JAX_COORDINATOR_ADDRESS"]["value"].endswith(":1234")


@pytest.mark.parametrize("accelerator, slices, nodes, config", [
    ("tpu-v5p-slice", 2, 32, f"{TINY}:v5p-256x2"),
    ("nvidia-h100-80gb", 1, 8, f"{TINY}:h100x64"),
])
def test_gke_jobset_validates_against_the_jobset_crd_schema(capsys, accelerator, slices, nodes, config):
    """tests/data/jobset_v1alpha2_schema.json: the CRD's openAPIV3Schema (its source and version in `$comment`)."""
    import json

    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (in the test extra) is not installed")
    with open(os.path.join(REPO, "tests", "data", "jobset_v1alpha2_schema.json")) as f:
        schema = json.load(f)
    validator = jsonschema.Draft7Validator(schema)
    manifest = yaml.safe_load(_render(capsys, "--target", "gke", "--config", config, "--workdir", WORKDIR,
                                      "--nodes", str(nodes), "--slices", str(slices), "--accelerator", accelerator))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors
    manifest["spec"]["replicatedJobs"][0]["replicas"] = str(slices)  # the schema does catch a wrong type
    assert not validator.is_valid(manifest)


def test_a_layout_the_mesh_cannot_use_is_a_clear_error(capsys):
    assert launch.main(["--target", "slurm", "--config", f"{TINY}:h100x64", "--workdir", WORKDIR, "--nodes", "2",
                        "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "found 16" in err and "layout: 16 devices, 16 processes" in err


@pytest.mark.parametrize("target, tool", [("slurm", "sbatch"), ("tpu-vm", "gcloud"), ("gke", "kubectl")])
def test_missing_tool_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys, target, tool):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert launch.main(["--target", target, "--config", os.path.join(REPO, "experiments", "quickstart.py"),
                        "--workdir", "w", "--no-check"]) == 2
    err = capsys.readouterr().err
    assert f"`{tool}` not found on PATH" in err and "Traceback" not in err
    assert len(os.listdir(tmp_path / "runs" / "launch")) == 1  # the rendered job is kept to submit by hand


@pytest.mark.slow
def test_local_sh_trains_the_quickstart_with_two_processes(tmp_path):
    from test_train import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    env = dict(os.environ, WORKDIR=str(tmp_path / "run"), DATA=corpus, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "c"))
    small = ["--config.train.steps=3", "--config.schedule.warmup_steps=1", "--config.train.log_every_steps=1",
             "--config.train.seq_len=32", "--config.model.num_hidden_layers=2",
             "--config.model.layer_types=['mamba', 'attention']"]
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "2", *small], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log0 = (tmp_path / "run" / "process_0.log").read_text()
    assert "2 process(es)" in log0 and "done: step 3" in log0, log0[-2000:]
    assert "done: step 3" in proc.stdout
    assert (tmp_path / "run" / "process_1.log").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
