"""Data pipelines: prepare raw text into ArrayRecord token shards, then mix, shuffle and pack them into training
batches (`make_batches`). See docs/data.md.

The public names are imported on first use, so `prepare` workers start without importing grain."""

import importlib

_EXPORTS = {
    "PackedBatchIterator": "data_pipelines.stream",
    "make_batches": "data_pipelines.stream",
    "Stage": "data_pipelines.config",
    "StageSchedule": "data_pipelines.config",
    "default_data_config": "data_pipelines.config",
    "single_source_config": "data_pipelines.config",
    "stage_at": "data_pipelines.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")
