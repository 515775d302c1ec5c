"""`granite-jax sweep-report DIR`: the summary of a sweep directory (written by `granite-jax sweep`), from what its
points wrote so far — DIR/summary.csv, DIR/summary.md, DIR/loss_curves.png and, when the points scored
lm-eval tasks, DIR/task_curves.png.

Per point: overrides, parameters total/active, status (done / failed / incomplete at step k / pending), steps
reached, final train loss, final and best eval loss (`eval_loss` in metrics.jsonl, the held-out loss the trainer
logs every eval.every_steps; empty when the run logged none), final and best of every task score any point logged
(`eval_TASK_METRIC`, e.g. `eval_tiny_stdlib_choice_acc`, from `eval.tasks`; best is the highest, the lowest for
perplexities and bits per byte), median tokens/s (the median is robust to the compile-time step of each (re)start),
wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys

from granite_jax.sweep import DONE, FAILED, POINT_JSON, SWEEP_JSON, read_json

COLUMNS = ("point", "overrides", "params_total", "params_active", "status", "steps", "final_loss",
           "final_eval_loss", "best_eval_loss", "best_eval_step", "tokens_per_s", "wall_s")
NOT_TASK_SCORES = {"eval_loss", "eval_tokens"}  # the held-out loss; every other eval_* series is a task score
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")  # metric name endings; accuracies and the rest: higher


def read_metrics(point_dir: str) -> list[dict]:
    """The point's metrics.jsonl records, one per step (a step logged again after a resume: the last one wins)."""
    path = os.path.join(point_dir, "metrics.jsonl")
    by_step = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    by_step[int(record["step"])] = record
                except (ValueError, KeyError):  # a line cut short by a kill
                    continue
    return [by_step[s] for s in sorted(by_step)]


def _finite(records, key) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def task_keys(records: list[dict]) -> list[str]:
    """The task scores (`eval_TASK_METRIC`) among the records' numeric series, in first-logged order."""
    keys = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("eval_") and k not in NOT_TASK_SCORES and isinstance(v, (int, float)):
                keys[k] = None
    return list(keys)


def summarize_point(point_dir: str, tasks: list[str] = ()) -> dict:
    """One row of the summary for the point in `point_dir`: COLUMNS, then final_KEY and best_KEY of each task
    score KEY in `tasks`."""
    meta = read_json(os.path.join(point_dir, POINT_JSON)) or {}
    records = read_metrics(point_dir)
    steps = records[-1]["step"] if records else 0
    done, failed = read_json(os.path.join(point_dir, DONE)), read_json(os.path.join(point_dir, FAILED))
    if done:
        status = "done"
    elif failed:
        status = f"failed: {failed['why']}"
    elif records:
        status = f"incomplete (step {steps} of {meta.get('steps', '?')})"
    else:
        status = "pending"
    losses, evals = _finite(records, "loss"), _finite(records, "eval_loss")
    speeds = [v for _, v in _finite(records, "tokens_per_s")]
    best = min(evals, key=lambda sv: sv[1]) if evals else None
    overrides = meta.get("overrides", {})
    scores = {}
    for key in tasks:
        values = [v for _, v in _finite(records, key)]
        pick = min if key.endswith(LOWER_IS_BETTER) else max
        scores[f"final_{key}"] = round(values[-1], 4) if values else ""
        scores[f"best_{key}"] = round(pick(values), 4) if values else ""
    return {
        "point": os.path.basename(os.path.normpath(point_dir)),
        "overrides": _joined(overrides),
        "params_total": meta.get("params_total", ""), "params_active": meta.get("params_active", ""),
        "status": status, "steps": steps,
        "final_loss": round(losses[-1][1], 4) if losses else "",
        "final_eval_loss": round(evals[-1][1], 4) if evals else "",
        "best_eval_loss": round(best[1], 4) if best else "", "best_eval_step": best[0] if best else "",
        "tokens_per_s": round(statistics.median(speeds[1:] or speeds), 1) if speeds else "",
        "wall_s": done.get("wall_s", "") if done else "",
        **scores,
    }


def _joined(overrides: dict) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in overrides.items())


def _short(value) -> str:
    """Lists run-length encoded ('mamba*5,attention,mamba*14'), so layer patterns fit a table cell."""
    if not isinstance(value, (list, tuple)) or len(value) < 4:
        return str(value)
    runs = []
    for item in value:
        if runs and runs[-1][0] == item:
            runs[-1][1] += 1
        else:
            runs.append([item, 1])
    return ",".join(f"{item}*{n}" if n > 1 else str(item) for item, n in runs)


def _md_cell(key, value) -> str:
    if key.startswith("params") and isinstance(value, int):
        return f"{value / 1e6:.2f}M"
    if key == "overrides":
        return f"`{value}`" if value else ""
    return str(value).replace("|", "\\|")


def write_report(workdir: str) -> list[str]:
    """Writes summary.csv, summary.md, loss_curves.png and (when any point logged task scores) task_curves.png of
    the sweep in `workdir`; returns their paths."""
    sweep = read_json(os.path.join(workdir, SWEEP_JSON))
    if sweep is None:
        raise ValueError(f"{workdir}: no {SWEEP_JSON}; is this the --workdir of a `granite-jax sweep`?")
    metrics = {name: read_metrics(os.path.join(workdir, name)) for name in sweep["points"]}
    tasks = task_keys([r for records in metrics.values() for r in records])
    rows = [summarize_point(os.path.join(workdir, name), tasks) for name in sweep["points"]]
    # The task columns sit beside the eval loss; speed and wall time stay last.
    at = COLUMNS.index("best_eval_step") + 1
    columns = COLUMNS[:at] + tuple(f"{which}_{key}" for key in tasks for which in ("final", "best")) + COLUMNS[at:]
    csv_path, md_path, png_path, tasks_png = (os.path.join(workdir, f) for f in (
        "summary.csv", "summary.md", "loss_curves.png", "task_curves.png"))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Sweep {os.path.splitext(os.path.basename(sweep['sweep']))[0]}", "",
             f"Base `{os.path.relpath(sweep['base'].partition(':')[0])}`"
             + (f", every point: `{_joined(sweep['common'])}`" if sweep["common"] else "")
             + (f", command line: `{' '.join(sweep['extra'])}`" if sweep["extra"] else "") + ".", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(k, row[k]) for k in columns) + " |" for row in rows]
    lines += ["", "Losses: next-token cross entropy (nats/token); eval on the fixed held-out batches. "
              "tokens/s: median over logged steps. Curves: loss_curves.png."]
    if tasks:
        lines += ["", "Task scores (lm-eval, `eval.tasks`): final = at the point's last evaluation, best = the highest "
                  "(the lowest for perplexities and bits per byte) over its evaluations. Curves: task_curves.png."]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    title = os.path.splitext(os.path.basename(sweep["sweep"]))[0]
    plot_curves(metrics, png_path, title=title)
    if not tasks:
        return [csv_path, md_path, png_path]
    plot_task_curves(metrics, tasks, tasks_png, title=title)
    return [csv_path, md_path, png_path, tasks_png]


def plot_curves(metrics: dict[str, list[dict]], path: str, *, title: str) -> None:
    """Train loss (left) and, when logged, eval loss (right) against step, one curve per point."""
    has_eval = any(_finite(m, "eval_loss") for m in metrics.values())
    _plot_panels(metrics, [("loss", "train loss")] + ([("eval_loss", "eval loss (held out)")] if has_eval else []),
                 path, title=f"sweep {title}")


def plot_task_curves(metrics: dict[str, list[dict]], keys: list[str], path: str, *, title: str) -> None:
    """One panel per task score (`eval_TASK_METRIC`) against step, one curve per point; the same x axis as
    plot_curves, so the two figures read side by side."""
    _plot_panels(metrics, [(key, key.removeprefix("eval_")) for key in keys], path,
                 title=f"sweep {title}: task scores")


def _plot_panels(metrics: dict[str, list[dict]], panels: list[tuple[str, str]], path: str, *, title: str) -> None:
    """Panels (key, y label) in rows of at most 3, each a curve per point against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols if cols > 1 else 7, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        fig.delaxes(ax)
    for ax, (key, label) in zip(axes.flat, panels):
        for name, records in metrics.items():
            points = _finite(records, key)
            if points:
                ax.plot(*zip(*points), marker=None if key == "loss" else "o", markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax sweep-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the --workdir of a granite-jax sweep")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        paths = write_report(args.workdir)
    except ValueError as e:
        print(f"granite-jax sweep-report: {e}", file=sys.stderr)
        return 2
    with open(paths[1]) as f:
        print(f.read(), end="")
    print(f"wrote {', '.join(paths)}")
    return 0
