"""The small lm-eval tasks shipped in experiments/data/eval_tasks/ (custom YAML tasks over local JSONL), so that
evaluation runs offline: tests, the quickstart, in-training eval on machines without the harness's datasets."""

from __future__ import annotations

import os

TASK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments",
                        "data", "eval_tasks")


def shipped_tasks() -> tuple[str, ...]:
    if not os.path.isdir(TASK_DIR):
        return ()
    return tuple(sorted(name[:-5] for name in os.listdir(TASK_DIR) if name.endswith(".yaml")))


def task_config(name: str):
    """The task config dict of a shipped task (its JSONL path made absolute), else the name for lm-eval to find."""
    if name not in shipped_tasks():
        return name
    import yaml

    with open(os.path.join(TASK_DIR, f"{name}.yaml")) as f:
        cfg = yaml.safe_load(f)
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {split: os.path.join(TASK_DIR, path) for split, path in files.items()}
    return cfg
