"""`granite-jax launch --target slurm|tpu-vm|gke --config FILE[:ARG] --workdir DIR [--nodes N] [--dry-run]
[--config.KEY=VALUE ...]`: render the job for a cluster from launch/*.tmpl and submit it.

    slurm    launch/slurm.sbatch.tmpl -> `sbatch`; multi-node GPU, `srun` one process per GPU (or --tasks-per-node)
    tpu-vm   launch/tpu_vm.sh.tmpl -> `bash` (it calls `gcloud compute tpus tpu-vm ssh --worker=all`); --slices N
    gke      launch/gke_jobset.yaml.tmpl -> `kubectl apply -f`; a JobSet, one pod per host, one replica per slice

The config is loaded and validated here first, on the device and process counts of the requested layout, so a
mesh that does not fit fails before anything is submitted. The rendered file is written to
runs/launch/NAME.<target>.<ext> (--dry-run prints it instead of submitting). The job runs `python -m granite_jax.cli
train` in --remote-dir (default: this directory, for a shared filesystem), so config paths are repository-relative.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
TARGETS = {"slurm": ("slurm.sbatch.tmpl", "sbatch", "sbatch"),
           "tpu-vm": ("tpu_vm.sh.tmpl", "sh", "gcloud"),
           "gke": ("gke_jobset.yaml.tmpl", "yaml", "kubectl")}
GKE_ACCELERATORS = {  # --accelerator -> (node selector key, resource, devices per host)
    "tpu-v5p-slice": ("cloud.google.com/gke-tpu-accelerator", "google.com/tpu", 4),
    "tpu-v6e-slice": ("cloud.google.com/gke-tpu-accelerator", "google.com/tpu", 4),
    "tpu-v5-lite-podslice": ("cloud.google.com/gke-tpu-accelerator", "google.com/tpu", 4),
    "nvidia-h100-80gb": ("cloud.google.com/gke-accelerator", "nvidia.com/gpu", 8),
    "nvidia-h200-141gb": ("cloud.google.com/gke-accelerator", "nvidia.com/gpu", 8),
}
TPU_CHIPS_PER_HOST = 4


def fill(template: str, values: dict) -> str:
    """Replaces every {{key}}; a placeholder without a value is an error (so templates and code stay in step)."""
    out = re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
                 template)
    left = sorted(set(re.findall(r"\{\{(\w+)\}\}", out)))
    if left:
        raise ValueError(f"template placeholders without a value: {', '.join(left)}")
    return out


def train_argv(config: str, workdir: str, overrides: list[str], python: str = "python",
               heartbeat_timeout_s: int | None = None) -> list[str]:
    timeout = [] if heartbeat_timeout_s is None else [f"--heartbeat_timeout_s={heartbeat_timeout_s}"]
    return [python, "-m", "granite_jax.cli", "train", "--config", config, "--workdir", workdir, "--no_progress",
            *timeout, *(f"--config.{o}" for o in overrides)]


def layout(args) -> tuple[int, int]:
    """(devices, processes) of the requested job."""
    if args.target == "slurm":
        tasks = args.tasks_per_node or args.gpus_per_node
        # CPU nodes (--gpus-per-node 0): one CPU device per process
        return args.nodes * (args.gpus_per_node or tasks), args.nodes * tasks
    if args.target == "tpu-vm":
        hosts = args.nodes * args.slices
        return hosts * TPU_CHIPS_PER_HOST, hosts
    per_host = GKE_ACCELERATORS[args.accelerator][2]
    return args.nodes * args.slices * per_host, args.nodes * args.slices


def render(args, overrides: list[str]) -> str:
    """The job file for `args.target`."""
    name = args.name or _job_name(args.config)
    remote = args.remote_dir or os.getcwd()
    with open(os.path.join(LAUNCH_DIR, TARGETS[args.target][0])) as f:
        template = f.read()
    argv = train_argv(args.config, args.workdir, overrides, heartbeat_timeout_s=args.heartbeat_timeout)
    if args.target == "slurm":
        tasks = args.tasks_per_node or args.gpus_per_node
        gpus = f"#SBATCH --gpus-per-node={args.gpus_per_node}" if args.gpus_per_node else "# CPU nodes: no GPUs"
        return fill(template, dict(
            name=name, nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node, gpus_line=gpus,
            max_restarts=args.max_restarts,
            cpus_per_task=args.cpus_per_task, log_dir=shlex.quote(args.log_dir or args.workdir),
            sbatch_extra="\n".join(f"#SBATCH {a}" for a in args.sbatch_arg), cwd=shlex.quote(remote),
            setup=args.setup, workdir=shlex.quote(args.workdir), train_command=shlex.join(argv)))
    if args.target == "tpu-vm":
        remote_command = f"cd {shlex.quote(remote)} && " + (f"{args.setup} && " if args.setup else "") + \
            shlex.join(argv)
        return fill(template, dict(
            name=name, slices=args.slices, accelerator=args.accelerator_type, tpu=shlex.quote(args.tpu or name),
            zone=shlex.quote(args.zone),
            project=shlex.quote(args.project) if args.project else '"$(gcloud config get-value project)"',
            remote_command=shlex.quote(remote_command)))
    selector_key, resource, per_host = GKE_ACCELERATORS[args.accelerator]
    selector = {selector_key: args.accelerator}
    env = []
    if resource == "google.com/tpu":
        if args.topology:
            selector["cloud.google.com/gke-tpu-topology"] = args.topology
        if args.slices > 1:
            env += [{"name": "MEGASCALE_NUM_SLICES", "value": str(args.slices)},
                    {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
                    {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}:8080"}]
    else:
        if args.slices > 1:
            raise ValueError("--slices > 1 is for TPU slices; on GPU give the node count with --nodes")
        env += [{"name": "JAX_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}:1234"},
                {"name": "WORLD_SIZE", "value": str(args.nodes)}]  # RANK: JOB_COMPLETION_INDEX of the Indexed Job
    if args.setup:
        argv = ["bash", "-c", f"{args.setup} && {shlex.join(argv)}"]
    return fill(template, dict(
        name=name, slices=args.slices, hosts=args.nodes, devices_per_host=per_host, resource=resource,
        remote_dir=json.dumps(remote), max_restarts=args.max_restarts, node_selector=json.dumps(selector),
        image=json.dumps(args.image), command=json.dumps(argv), env=json.dumps(env)))


def _job_name(config: str) -> str:
    base = os.path.splitext(os.path.basename(config.partition(":")[0]))[0]
    return re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:40] or "granite-jax"


def _check_config(args, overrides: list[str]) -> None:
    from granite_jax import train

    cfg = train.load_config(args.config, overrides)
    devices, processes = layout(args)
    train.validate(cfg, devices, processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax launch", description=__doc__.split("\n\n")[0],
                                     epilog="--config.KEY=VALUE overrides that key in the launched run.")
    parser.add_argument("--target", required=True, choices=tuple(TARGETS))
    parser.add_argument("--config", required=True, help="experiments/FILE.py[:ARG], repository-relative")
    parser.add_argument("--workdir", required=True, help="the run directory, as the job's hosts see it")
    parser.add_argument("--nodes", type=int, default=1, help="GPU nodes (slurm, gke GPU) or hosts per TPU slice")
    parser.add_argument("--dry-run", action="store_true", help="print the rendered job; submit nothing")
    parser.add_argument("--name", default=None, help="job name (default: from the config file)")
    parser.add_argument("--setup", default="", help="shell command run first on every host (e.g. activate a venv)")
    parser.add_argument("--remote-dir", default=None, help="repository checkout on the hosts (default: here)")
    parser.add_argument("--no-check", action="store_true", help="skip loading/validating the config locally")
    g = parser.add_argument_group("slurm")
    g.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU nodes (give --tasks-per-node)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="JAX processes per node (default: one per GPU; 1 = one process drives all the node's GPUs)")
    g.add_argument("--cpus-per-task", type=int, default=12)
    g.add_argument("--log-dir", default=None, help="where slurm writes its output (default: WORKDIR)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="an extra #SBATCH line, e.g. --sbatch-arg=--partition=h100 (repeatable)")
    g = parser.add_argument_group("tpu-vm and gke")
    g.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over DCN)")
    g.add_argument("--tpu", default=None, help="tpu-vm: TPU name (slices: NAME-0, NAME-1, ...)")
    g.add_argument("--zone", default="us-east5-a")
    g.add_argument("--project", default=None, help="tpu-vm: GCP project (default: gcloud's configured one)")
    g.add_argument("--accelerator-type", default="v5p-256", help="tpu-vm: for the record (the TPU already exists)")
    g.add_argument("--accelerator", default="tpu-v5p-slice", choices=tuple(GKE_ACCELERATORS), help="gke")
    g.add_argument("--topology", default="4x4x8", help="gke TPU: the slice topology node selector")
    g.add_argument("--image", default="REGISTRY/granite-jax:latest", help="gke: container image")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="slurm: srun attempts after a failed one; gke: JobSet restarts (each resumes)")
    parser.add_argument("--heartbeat-timeout", type=int, default=None, metavar="SECONDS",
                        help="seconds after which a silent process counts as dead and the others exit (the "
                             "trainer's --heartbeat_timeout_s; default: its default)")
    from granite_jax.train import split_overrides

    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    for flag in ("nodes", "slices"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.gpus_per_node < 0 or (args.gpus_per_node == 0 and not args.tasks_per_node):
        parser.error(f"--gpus-per-node={args.gpus_per_node}: give a GPU count, or 0 (CPU nodes) with "
                     "--tasks-per-node")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts={args.max_restarts}: must be >= 0")
    try:
        if not args.no_check:
            _check_config(args, overrides)
        text = render(args, overrides)
    except ValueError as e:
        devices, processes = layout(args)
        hint = (f" (layout: {devices} devices, {processes} processes; see --nodes, --gpus-per-node, --tasks-per-node, "
                "--slices)") if "mesh" in str(e) or "batch_size" in str(e) else ""
        print(f"granite-jax launch: {e}{hint}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(text, end="")
        return 0
    path = os.path.join("runs", "launch", f"{args.name or _job_name(args.config)}.{args.target}."
                        f"{TARGETS[args.target][1]}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    from granite_jax.sweep import missing_tool

    tool = TARGETS[args.target][2]
    problem = missing_tool(tool, f"install it (or run where it is), then submit {path} yourself")
    if problem:
        print(f"granite-jax launch: wrote {path}; {problem}", file=sys.stderr)
        return 2
    if args.target == "slurm":  # slurm opens its output file before the job starts: the folder must exist
        os.makedirs(args.log_dir or args.workdir, exist_ok=True)
    command = {"slurm": ["sbatch", path], "tpu-vm": ["bash", path], "gke": ["kubectl", "apply", "-f", path]}
    print(f"granite-jax launch: wrote {path}; running {shlex.join(command[args.target])}", flush=True)
    return subprocess.call(command[args.target])
