"""The local engine: `prepare_part` over the tasks in this process (1 worker) or a spawned process pool."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from collections.abc import Sequence
from queue import Empty

from data_pipelines.engines.part import PartTask, prepare_part
from data_pipelines.engines.progress import Progress

_queue = None  # in a pool worker: the parent's progress queue


def _init_worker(queue) -> None:
    global _queue
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pools
    _queue = queue


def _run_in_worker(task: PartTask) -> dict:
    return prepare_part(task, report=lambda *counts: _queue.put(counts))


def run_local(tasks: Sequence[PartTask], *, workers: int, bar: Progress) -> list[dict]:
    """Runs every task; returns their parts in completion order."""
    if workers == 1 or len(tasks) <= 1:
        return [prepare_part(task, report=bar.update) for task in tasks]
    ctx = mp.get_context("spawn")  # fork after jax/grain threads exist is unsafe
    queue = ctx.Queue()
    done = threading.Event()

    def drain():
        # Polls rather than waiting for a sentinel: a worker terminated while writing may hold the queue's write
        # lock forever, and a sentinel put by this process would then never arrive.
        while True:
            try:
                bar.update(*queue.get(timeout=0.1))
            except Empty:
                if done.is_set():
                    return

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    pool = ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(queue,))
    try:
        parts = list(pool.imap_unordered(_run_in_worker, tasks))
        pool.close()
        pool.join()  # workers exit normally, flushing what they put on the queue
        return parts
    finally:
        pool.terminate()
        done.set()
        thread.join()
