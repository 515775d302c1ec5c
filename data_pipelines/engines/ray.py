"""The Ray engine: one Ray task per input file, each running the same `prepare_part` as the local engine.

A worker that dies mid-task (killed, out of memory, node lost) is retried by Ray (`max_retries`); the retry rewrites
the shard from the start under a fresh temporary name, so nothing is lost or duplicated. The driver keeps at most
`workers` tasks in flight (default: the cluster's CPUs) and updates the progress bar as each file finishes.

Inputs, `--out` and the tokenizer are opened by path on the workers: on a multi-node cluster they must sit on a
filesystem every node mounts at the same path, and granite-jax must be installed on every node.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from data_pipelines.engines.part import PartTask, prepare_part
from data_pipelines.engines.progress import Progress

DEFAULT_MAX_RETRIES = 3
_LOCAL_OBJECT_STORE_BYTES = 128 << 20  # tasks return a small dict each: a big store would only reserve memory


def _run_task(task: PartTask, task_fn: Callable[[PartTask], dict]) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # Ray gives each task one CPU; no nested thread pools
    return task_fn(task)


def run_ray(
    tasks: Sequence[PartTask],
    *,
    bar: Progress,
    workers: int | None = None,
    address: str | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    task_fn: Callable[[PartTask], dict] = prepare_part,
) -> list[dict]:
    """Runs every task on Ray; returns their parts in completion order.

    Uses the Ray this process is already connected to, else connects to `address`, else starts a local Ray with
    `workers` CPUs (shut down again at the end). `task_fn` is what each task runs (`prepare_part`; tests wrap it).
    """
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None

    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address)
    elif started:
        ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=_LOCAL_OBJECT_STORE_BYTES)
    try:
        slots = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=max_retries)(_run_task)
        queue, pending, parts = list(tasks), {}, []
        while queue or pending:
            while queue and len(pending) < slots:
                task = queue.pop(0)
                pending[remote.remote(task, task_fn)] = task
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ref)
            try:
                part = ray.get(ref)
            except ray.exceptions.RayError as e:
                for other in pending:
                    ray.cancel(other, force=True)
                raise RuntimeError(f"preparing input {task.index} ({task.path}) failed on Ray after up to "
                                   f"{max_retries} retries: {e}; the files finished so far are kept, re-run the same "
                                   "command to redo the rest") from e
            bar.update(1, part["documents"], part["tokens"])
            parts.append(part)
        return parts
    finally:
        if started:
            ray.shutdown()
