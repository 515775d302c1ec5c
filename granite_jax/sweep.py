"""`granite-jax sweep SWEEP.py --workdir DIR [--executor local|slurm] [--parallel N] [--dry-run] [--only NAMES]
[--config.KEY=VALUE ...]`: run every point of a sweep, each a `granite-jax train` of the base config with overrides.

A sweep file is a Python module (see experiments/sweeps/):

    BASE = "../ablation_base.py"        # the base config; relative paths are relative to the sweep file
    COMMON = {"train.steps": 300}       # optional: overrides of every point
    POINTS = {"9to1": {...}, ...}       # name -> {dotted key: value}; or a list of (name, overrides)
    GRID = {"model.num_experts_per_tok": [1, 2, 4],                     # or: the product of per-key values;
            "schedule.lr": {"lr_low": 1e-3, "lr_high": 3e-3}}          # a dict gives each value its name

Grid points are named `num_experts_per_tok=2,lr_low`. `--config.KEY=VALUE` on the command line overrides every
point after COMMON (short runs, smoke tests).

Each point trains in DIR/<point>/ (its `granite-jax train` workdir, with train.log). A point is finished when its
run exits 0 having reached train.steps: DIR/<point>/DONE is then written, and later invocations skip it. A point
without DONE is run again and resumes from its own checkpoints, so a crashed or killed sweep is finished by running
the same command again. After the local executor: DIR/summary.csv, DIR/summary.md, DIR/loss_curves.png and, when
the points scored `eval.tasks`, DIR/task_curves.png (`granite-jax sweep-report DIR` rewrites them at any time;
granite_jax/sweep_report.py).

`--executor slurm` writes DIR/sweep.sbatch, one array job whose task i runs point i through this same command
(`--only <point>`), and submits it with sbatch (or only prints it with --dry-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

DONE, FAILED, POINT_JSON, SWEEP_JSON, LOG = "DONE", "FAILED", "point.json", "sweep.json", "train.log"


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    overrides: dict[str, Any]  # dotted config key -> value


@dataclasses.dataclass
class Sweep:
    path: str  # the sweep file
    base: str  # the base config file (absolute; may end in :ARG)
    common: dict[str, Any]
    points: list[Point]
    extra: list[str] = dataclasses.field(default_factory=list)  # KEY=VALUE from the command line

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def overrides(self, point: Point) -> list[str]:
        """`KEY=VALUE` strings for `train.load_config`: COMMON, then the point's, then the command line's."""
        return [f"{k}={v!r}" for k, v in {**self.common, **point.overrides}.items()] + list(self.extra)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "-", text).strip("-")


def load_sweep(path: str, extra: list[str] = ()) -> Sweep:
    """Reads a sweep file. Raises ValueError naming what is wrong."""
    if not os.path.isfile(path):
        raise ValueError(f"sweep file {path!r}: no such file")
    spec = importlib.util.spec_from_file_location("granite_jax_sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    where = os.path.basename(path)
    base = getattr(module, "BASE", None)
    if not isinstance(base, str):
        raise ValueError(f"{where}: define BASE = 'path/to/config.py' (the config every point starts from)")
    base_file, sep, arg = base.partition(":")
    if not os.path.isabs(base_file):
        base_file = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), base_file))
    if not os.path.isfile(base_file):
        raise ValueError(f"{where}: BASE={base!r}: no such file ({base_file})")
    has_points, has_grid = hasattr(module, "POINTS"), hasattr(module, "GRID")
    if has_points == has_grid:
        raise ValueError(f"{where}: define exactly one of POINTS (name -> overrides) and GRID (key -> values)")
    points = _points(module.POINTS, where) if has_points else _grid(module.GRID, where)
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: point names {dup} occur twice; every point needs its own name (its directory)")
    return Sweep(os.path.abspath(path), base_file + sep + arg, dict(getattr(module, "COMMON", {})), points,
                 list(extra))


def _points(points, where: str) -> list[Point]:
    items = points.items() if isinstance(points, dict) else points
    out = []
    for name, overrides in items:
        if not isinstance(name, str) or _safe(name) != name or not name:
            raise ValueError(f"{where}: point name {name!r}: use letters, digits and . _ = + , - only")
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}: point {name!r}: overrides must be a dict of dotted keys, got {overrides!r}")
        out.append(Point(name, dict(overrides)))
    return out


def _grid(grid: dict, where: str) -> list[Point]:
    axes = []
    for key, values in grid.items():
        if isinstance(values, dict):
            axes.append([(str(label), key, v) for label, v in values.items()])
        elif isinstance(values, (list, tuple)) and values:
            axes.append([(f"{key.rsplit('.', 1)[-1]}={v}", key, v) for v in values])
        else:
            raise ValueError(f"{where}: GRID[{key!r}] must be a non-empty list of values or a dict name -> value")
    return [Point(_safe(",".join(label for label, _, _ in combo)), {k: v for _, k, v in combo})
            for combo in itertools.product(*axes)]


# Planning and bookkeeping -----------------------------------------------------------------------------------------

def plan(spec: Sweep, workdir: str) -> list[dict]:
    """Validates every point's config (before anything runs) and writes DIR/sweep.json and DIR/<point>/point.json.
    Returns the point records: name, overrides, params_total, params_active, steps, command."""
    from granite_jax import train
    from granite_jax.config import param_count

    records = []
    for point in spec.points:
        try:
            cfg = train.load_config(spec.base, spec.overrides(point))
            total, active = param_count(train.model_config(cfg))
        except ValueError as e:
            raise ValueError(f"point {point.name!r}: {e}") from None
        records.append({"name": point.name, "overrides": {**spec.common, **point.overrides}, "extra": spec.extra,
                        "params_total": total, "params_active": active, "steps": cfg.train.steps,
                        "command": train_command(spec, point, os.path.join(workdir, point.name))})
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, SWEEP_JSON), {
        "sweep": spec.path, "base": spec.base, "common": spec.common, "extra": spec.extra,
        "points": [r["name"] for r in records]})
    for record in records:
        pdir = os.path.join(workdir, record["name"])
        os.makedirs(pdir, exist_ok=True)
        old = read_json(os.path.join(pdir, POINT_JSON))
        if old and os.path.exists(os.path.join(pdir, DONE)) and old["overrides"] != record["overrides"]:
            print(f"warning: point {record['name']} finished with overrides {old['overrides']}, the sweep file now "
                  f"says {record['overrides']}; delete {pdir} to run it again", file=sys.stderr)
            continue
        _write_json(os.path.join(pdir, POINT_JSON), record)
    return records


def train_command(spec: Sweep, point: Point, point_dir: str) -> list[str]:
    return [sys.executable, "-m", "granite_jax.cli", "train", "--config", spec.base, "--workdir", point_dir,
            "--no_progress", *(f"--config.{o}" for o in spec.overrides(point))]


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def last_step(point_dir: str) -> int:
    """The highest step in the point's metrics.jsonl (0 when none)."""
    path = os.path.join(point_dir, "metrics.jsonl")
    step = 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    step = max(step, int(json.loads(line)["step"]))
                except (ValueError, KeyError):  # a line cut short by a kill
                    pass
    return step


def is_done(point_dir: str) -> bool:
    return os.path.exists(os.path.join(point_dir, DONE))


# The local executor -----------------------------------------------------------------------------------------------

def _finish(record: dict, point_dir: str, code: int, wall_s: float) -> str:
    reached = last_step(point_dir)
    if code == 0 and reached >= record["steps"]:
        _write_json(os.path.join(point_dir, DONE), {"step": reached, "wall_s": round(wall_s, 1), "time": time.time()})
        return "done"
    why = f"exit code {code}" if code else f"stopped at step {reached} of {record['steps']}"
    _write_json(os.path.join(point_dir, FAILED), {"exit_code": code, "step": reached, "why": why})
    return f"failed ({why}; see {os.path.join(point_dir, LOG)})"


def run_local(records: list[dict], workdir: str, *, parallel: int = 1, env: dict | None = None,
              echo=print) -> dict[str, str]:
    """Runs the unfinished points as subprocesses, `parallel` at a time. Returns point -> outcome."""
    env = dict(os.environ if env is None else env)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(workdir), ".compile_cache"))
    queue, running, outcome = [], {}, {}
    for r in records:
        pdir = os.path.join(workdir, r["name"])
        if is_done(pdir):
            outcome[r["name"]] = "skipped (done)"
            echo(f"[sweep] {r['name']}: done before, skipped")
        else:
            queue.append(r)
    try:
        _drive(queue, running, outcome, workdir, parallel, env, echo)
    except KeyboardInterrupt:
        for proc, log, _, _ in running.values():
            proc.wait()
            log.close()
        raise
    return outcome


def _drive(queue, running, outcome, workdir, parallel, env, echo) -> None:
    while queue or running:
        while queue and len(running) < parallel:
            r = queue.pop(0)
            pdir = os.path.join(workdir, r["name"])
            if os.path.exists(os.path.join(pdir, FAILED)):
                os.remove(os.path.join(pdir, FAILED))
            resume = last_step(pdir)
            echo(f"[sweep] {r['name']}: {'resuming after step ' + str(resume) if resume else 'starting'} "
                 f"(log: {os.path.join(pdir, LOG)})")
            log = open(os.path.join(pdir, LOG), "a")
            proc = subprocess.Popen(r["command"], stdout=log, stderr=subprocess.STDOUT, env=env)
            running[r["name"]] = (proc, log, r, time.perf_counter())
        time.sleep(0.2)
        for name, (proc, log, r, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            outcome[name] = _finish(r, os.path.join(workdir, name), proc.returncode, time.perf_counter() - t0)
            echo(f"[sweep] {name}: {outcome[name]}")


# The slurm executor -----------------------------------------------------------------------------------------------

SBATCH_TEMPLATE = """#!/bin/bash
# Sweep {name}: {n} points, one array task each. Written by `granite-jax sweep --executor slurm`; submit again
# with `sbatch {script}` (finished points are skipped), then `granite-jax sweep-report {workdir}`.
#SBATCH --job-name=sweep-{name}
#SBATCH --array=0-{last}{throttle}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --output={workdir}/slurm-%A_%a.out
{extra}
set -euo pipefail
POINTS=({points})
POINT="${{POINTS[$SLURM_ARRAY_TASK_ID]}}"
cd {cwd}
{setup}
exec {command} --only "$POINT" --no-report
"""


def render_sbatch(spec: Sweep, workdir: str, *, parallel: int = 0, gpus: int = 1, cpus: int = 8,
                  sbatch_args: list[str] = (), setup: str = "") -> str:
    """The array job script: task i runs point i with this command (`--only`), in the current directory."""
    workdir = os.path.abspath(workdir)
    # `python` as the job's environment resolves it (sbatch exports the submitting shell's PATH; or --setup).
    command = ["python", "-m", "granite_jax.cli", "sweep", spec.path, "--workdir", workdir,
               *(f"--config.{o}" for o in spec.extra)]
    return SBATCH_TEMPLATE.format(
        name=spec.name, n=len(spec.points), script=os.path.join(workdir, "sweep.sbatch"), workdir=workdir,
        last=len(spec.points) - 1, throttle=f"%{parallel}" if parallel else "", gpus=gpus, cpus=cpus,
        extra="\n".join(f"#SBATCH {a}" for a in sbatch_args), points=" ".join(shlex.quote(p.name) for p in spec.points),
        cwd=shlex.quote(os.getcwd()), setup=setup, command=shlex.join(command))


def missing_tool(tool: str, what: str) -> str | None:
    """A message when `tool` is not on PATH, else None."""
    if shutil.which(tool):
        return None
    return f"`{tool}` not found on PATH: {what}"


# The command -------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax sweep", description=__doc__.split("\n\n")[0],
                                     epilog="--config.KEY=VALUE overrides that key in every point.")
    parser.add_argument("sweep", help="experiments/sweeps/NAME.py")
    parser.add_argument("--workdir", required=True, help="one subdirectory per point; summary files")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--parallel", type=int, default=1, help="points at a time (local), array throttle (slurm)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run (slurm: the script)")
    parser.add_argument("--only", default=None, help="comma-separated point names (default: all)")
    parser.add_argument("--no-report", action="store_true", help="skip writing the summary files")
    slurm = parser.add_argument_group("slurm executor")
    slurm.add_argument("--gpus-per-point", type=int, default=1)
    slurm.add_argument("--cpus-per-point", type=int, default=8)
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                       help="an extra #SBATCH line, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    slurm.add_argument("--setup", default="", help="shell line run before each point (e.g. 'source venv/bin/activate')")
    from granite_jax.train import split_overrides

    extra, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    try:
        spec = load_sweep(args.sweep, extra)
        records = plan(spec, args.workdir)
        if args.only:
            wanted = args.only.split(",")
            unknown = sorted(set(wanted) - {p.name for p in spec.points})
            if unknown:
                raise ValueError(f"--only {unknown}: not points of {spec.name}; it has "
                                 f"{', '.join(p.name for p in spec.points)}")
            records = [r for r in records if r["name"] in wanted]
    except ValueError as e:
        print(f"granite-jax sweep: {e}", file=sys.stderr)
        return 2
    if args.executor == "slurm":
        return _submit_slurm(spec, args)
    if args.dry_run:
        for r in records:
            state = "done, skipped" if is_done(os.path.join(args.workdir, r["name"])) else "would run"
            print(f"# {r['name']} ({state}; {r['params_total']:,} params, {r['params_active']:,} active)\n"
                  f"{shlex.join(r['command'])}")
        return 0
    try:
        outcome = run_local(records, args.workdir, parallel=args.parallel)
    except KeyboardInterrupt:  # the points got the SIGINT too: they checkpoint and exit
        print("[sweep] interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if not args.no_report:
        from granite_jax import sweep_report
        paths = sweep_report.write_report(args.workdir)
        print(f"[sweep] wrote {', '.join(paths)}")
    return 0 if all(o.startswith(("done", "skipped")) for o in outcome.values()) else 1


def _submit_slurm(spec: Sweep, args) -> int:
    script = render_sbatch(spec, args.workdir, parallel=args.parallel if args.parallel > 1 else 0,
                           gpus=args.gpus_per_point, cpus=args.cpus_per_point, sbatch_args=args.sbatch_arg,
                           setup=args.setup)
    path = os.path.join(os.path.abspath(args.workdir), "sweep.sbatch")
    with open(path, "w") as f:
        f.write(script)
    if args.dry_run:
        print(script, end="")
        print(f"# written to {path}; submit with: sbatch {path}", file=sys.stderr)
        return 0
    problem = missing_tool("sbatch", f"submit from a SLURM login node, or run with --dry-run to only write {path}")
    if problem:
        print(f"granite-jax sweep: {problem}", file=sys.stderr)
        return 2
    proc = subprocess.run(["sbatch", path], capture_output=True, text=True)
    if proc.returncode:
        print(f"granite-jax sweep: sbatch {path} failed: {proc.stderr.strip()}", file=sys.stderr)
        return proc.returncode
    print(f"{proc.stdout.strip()}\nwhen the array job ends: granite-jax sweep-report {args.workdir}")
    return 0
