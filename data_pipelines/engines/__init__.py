"""Where `prepare`'s tasks run: `local` (this machine's processes, the default) or `ray` (a Ray cluster, or a local
Ray started for the run). Both run `part.prepare_part` per input file, so their output is the same byte for byte."""

from __future__ import annotations

from collections.abc import Sequence

from data_pipelines.engines.part import PartTask, part_settings, prepare_part
from data_pipelines.engines.progress import Progress

ENGINES = ("local", "ray")

__all__ = ["ENGINES", "PartTask", "Progress", "part_settings", "prepare_part", "run_tasks"]


def run_tasks(engine: str, tasks: Sequence[PartTask], *, workers: int | None, bar: Progress,
              **engine_options) -> list[dict]:
    """Runs `prepare_part` over `tasks` on `engine`; returns the parts. `engine_options`: the Ray engine's
    `address`, `max_retries`, `task_fn`."""
    if engine == "local":
        if engine_options:
            raise ValueError(f"options {sorted(engine_options)} are for --engine ray, not local")
        from data_pipelines.engines.local import run_local

        return run_local(tasks, workers=workers or 1, bar=bar)
    if engine == "ray":
        from data_pipelines.engines.ray import run_ray

        return run_ray(tasks, workers=workers, bar=bar, **engine_options)
    raise ValueError(f"--engine {engine!r}: expected one of {ENGINES}")
