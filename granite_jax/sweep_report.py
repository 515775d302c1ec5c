"""`granite-jax sweep-report DIR`: the summary of a sweep directory (written by `granite-jax sweep`), from what its
points wrote so far — DIR/summary.csv, DIR/summary.md and DIR/loss_curves.png.

Per point: overrides, parameters total/active, status (done / failed / incomplete at step k / pending), steps
reached, final train loss, final and best eval loss (`eval_loss` in metrics.jsonl, the held-out loss the trainer
logs every eval.every_steps; empty when the run logged none), median tokens/s (the median is robust to the
compile-time step of each (re)start), wall time.
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


def summarize_point(point_dir: str) -> dict:
    """One row of the summary (COLUMNS) for the point in `point_dir`."""
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
    """Writes summary.csv, summary.md and loss_curves.png of the sweep in `workdir`; returns their paths."""
    sweep = read_json(os.path.join(workdir, SWEEP_JSON))
    if sweep is None:
        raise ValueError(f"{workdir}: no {SWEEP_JSON}; is this the --workdir of a `granite-jax sweep`?")
    rows = [summarize_point(os.path.join(workdir, name)) for name in sweep["points"]]
    csv_path, md_path, png_path = (os.path.join(workdir, f) for f in ("summary.csv", "summary.md", "loss_curves.png"))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Sweep {os.path.splitext(os.path.basename(sweep['sweep']))[0]}", "",
             f"Base `{os.path.relpath(sweep['base'].partition(':')[0])}`"
             + (f", every point: `{_joined(sweep['common'])}`" if sweep["common"] else "")
             + (f", command line: `{' '.join(sweep['extra'])}`" if sweep["extra"] else "") + ".", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(k, row[k]) for k in COLUMNS) + " |" for row in rows]
    lines += ["", "Losses: next-token cross entropy (nats/token); eval on the fixed held-out batches. "
              "tokens/s: median over logged steps. Curves: loss_curves.png."]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_curves({name: read_metrics(os.path.join(workdir, name)) for name in sweep["points"]}, png_path,
                title=os.path.splitext(os.path.basename(sweep["sweep"]))[0])
    return [csv_path, md_path, png_path]


def plot_curves(metrics: dict[str, list[dict]], path: str, *, title: str) -> None:
    """Train loss (left) and, when logged, eval loss (right) against step, one curve per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_eval = any(_finite(m, "eval_loss") for m in metrics.values())
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(12 if has_eval else 7, 4.5), squeeze=False)
    panels = [("loss", "train loss")] + ([("eval_loss", "eval loss (held out)")] if has_eval else [])
    for ax, (key, label) in zip(axes[0], panels):
        for name, records in metrics.items():
            points = _finite(records, key)
            if points:
                ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sweep {title}")
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
