"""The data config (`default_data_config`), its validation, and the stage schedule that maps a step to its stage.

A data config is an ml_collections ConfigDict:

    sources            list of {name, path, weight}: prepared directories and their default token shares
    shuffle            global shuffle of each source's documents, reshuffled every epoch
    num_epochs         passes over each source; None repeats forever. A finite stream ends when a source runs out
    stages             None, or a curriculum: list of {tokens, seq_len, mixture: {name: weight}, batch_size?};
                       `tokens` is the stage's global token budget (None on the last stage = forever), `seq_len` and
                       `batch_size` (per process) default to make_batches' arguments, `mixture` to the source weights
    pack_open_rows     rows kept open by the packer; more rows = less padding, memory (open_rows + batch) x seq_len;
                       None = auto: 2**19 // seq_len clamped to [2, 32] (32 at 4K, 2 at 256K and up)
    continue_positions True: a document continued from an earlier row keeps counting its positions; False: restart
    pad_id             token id written where segment_ids == 0
    read_block_tokens  tokens read per ArrayRecord batch read of one source
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import ml_collections

SOURCE_KEYS = ("name", "path", "weight")
STAGE_KEYS = ("tokens", "seq_len", "mixture", "batch_size")
REQUIRED_KEYS = ("sources",)


def default_data_config(sources: Sequence[Mapping] | None = None) -> ml_collections.ConfigDict:
    """A data config with every field at its default; `sources` is a list of {name, path, weight}."""
    cfg = ml_collections.ConfigDict()
    cfg.sources = [dict(s) for s in (sources or [])]
    cfg.shuffle = True
    cfg.num_epochs = None
    cfg.stages = None
    cfg.pack_open_rows = None
    cfg.continue_positions = True
    cfg.pad_id = 0
    cfg.read_block_tokens = 1 << 20
    return cfg


def complete_data_config(data_cfg) -> ml_collections.ConfigDict:
    """`data_cfg` (a ConfigDict or a plain mapping) with every optional key it lacks at its default, as a new
    ConfigDict. A missing required key or an unknown (misspelt) key is a ValueError naming it."""
    given = dict(data_cfg.items()) if hasattr(data_cfg, "items") else None
    if given is None:
        raise ValueError(f"data config {data_cfg!r}: expected a ConfigDict or a dict; start from "
                         "default_data_config()")
    missing = [k for k in REQUIRED_KEYS if k not in given]
    if missing:
        raise ValueError(f"data config has no {', '.join(map(repr, missing))} key; give it a list of {{name, path, "
                         "weight}} entries for prepared directories (see default_data_config)")
    cfg = default_data_config()
    _check_keys(given, tuple(cfg), "data config")
    cfg.update(given)
    return cfg


def open_rows_for(data_cfg, seq_len: int) -> int:
    """The packer's open-row count for `seq_len` (see pack_open_rows)."""
    if data_cfg.get("pack_open_rows"):
        return int(data_cfg.pack_open_rows)
    return max(2, min(32, (1 << 19) // seq_len))


def single_source_config(path: str, **overrides) -> ml_collections.ConfigDict:
    """A data config reading one prepared directory (the demo corpus, an eval set)."""
    cfg = default_data_config([{"name": os.path.basename(os.path.normpath(path)) or "data", "path": path, "weight": 1.0}])
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@dataclasses.dataclass(frozen=True)
class Stage:
    """One curriculum stage as the stream runs it. Steps are batches of this process; tokens are global."""

    index: int
    first_step: int
    num_steps: int | None  # None: runs until the data ends
    seq_len: int
    batch_size: int  # per process
    mixture: dict[str, float]  # source name -> normalised token share
    tokens: int | None  # the configured budget; the stage actually yields num_steps * global batch tokens

    def contains(self, step: int) -> bool:
        return step >= self.first_step and (self.num_steps is None or step < self.first_step + self.num_steps)


class StageSchedule:
    """Maps a training step to its `Stage`. `make_batches` follows the same schedule, so a trainer can ask ahead of
    time which seq_len, batch size and mixture step `s` will have (to compile, or to switch the learning rate).

    A stage with a token budget T lasts ceil(T / (batch_size * seq_len * process_count)) steps.
    """

    def __init__(self, data_cfg, *, batch_size: int, seq_len: int, process_count: int = 1):
        data_cfg = complete_data_config(data_cfg)
        for i, source in enumerate(data_cfg.sources):
            _check_keys(source, SOURCE_KEYS, f"sources[{i}]")
        source_names = [s["name"] for s in data_cfg.sources]
        default_mixture = {s["name"]: s.get("weight", 1.0) for s in data_cfg.sources}
        specs = data_cfg.stages or [{"tokens": None}]
        stages, step = [], 0
        for i, spec in enumerate(specs):
            spec = dict(spec)
            _check_keys(spec, STAGE_KEYS, f"stages[{i}]")
            stage_seq_len = int(spec.get("seq_len") or seq_len)
            stage_batch = int(spec.get("batch_size") or batch_size)
            tokens = spec.get("tokens")
            where = f"stages[{i}]" if data_cfg.stages else "make_batches"
            _check_seq_len(stage_seq_len, where)
            if stage_batch < 1:
                raise ValueError(f"{where}: batch_size={stage_batch}; it must be >= 1")
            mixture = _normalise(dict(spec.get("mixture") or default_mixture), source_names, where)
            if tokens is None:
                if i != len(specs) - 1:
                    raise ValueError(f"{where}: tokens=None is only allowed on the last stage; give it a token budget")
                num_steps = None
            else:
                if tokens <= 0:
                    raise ValueError(f"{where}: tokens={tokens}; a stage's token budget must be positive")
                num_steps = math.ceil(tokens / (stage_batch * stage_seq_len * process_count))
            stages.append(Stage(i, step, num_steps, stage_seq_len, stage_batch, mixture, tokens))
            step += num_steps or 0
        self.stages: tuple[Stage, ...] = tuple(stages)

    def at(self, step: int) -> Stage | None:
        """The stage of batch `step` (0-based), or None once the last stage's budget is spent."""
        for stage in self.stages:
            if stage.contains(step):
                return stage
        return None

    @property
    def total_steps(self) -> int | None:
        last = self.stages[-1]
        return None if last.num_steps is None else last.first_step + last.num_steps


def stage_at(data_cfg, step: int, *, batch_size: int, seq_len: int, process_count: int = 1) -> Stage | None:
    """The stage that `make_batches(data_cfg, batch_size=..., seq_len=..., ...)` is in at batch `step`."""
    return StageSchedule(data_cfg, batch_size=batch_size, seq_len=seq_len, process_count=process_count).at(step)


def _check_seq_len(seq_len: int, where: str) -> None:
    if seq_len < 2:
        raise ValueError(f"{where}: seq_len={seq_len}; a training row needs at least 2 tokens (input and target)")


def _check_keys(spec: Mapping, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:  # a misspelt key would otherwise fall back to its default without a word
        raise ValueError(f"{where}: unknown keys {unknown}; the allowed keys are {list(allowed)}")


def _normalise(weights: dict[str, float], source_names: list[str], where: str) -> dict[str, float]:
    unknown = sorted(set(weights) - set(source_names))
    if unknown:
        raise ValueError(f"{where}: mixture names unknown sources {unknown}; data_cfg.sources has {source_names}")
    bad = {k: v for k, v in weights.items() if not _is_share(v)}
    if bad:  # an infinite weight would make every share nan or 0
        raise ValueError(f"{where}: weights {bad} are not finite numbers >= 0; weights are token shares, use 0 to "
                         "leave a source out")
    shares = {k: float(v) for k, v in weights.items()}
    total = sum(shares.values())
    if not total > 0:
        raise ValueError(
            f"{where}: the weights {weights} sum to {total}; give at least one source a positive weight"
        )
    return {k: v / total for k, v in shares.items() if v > 0}


def _is_share(weight) -> bool:
    try:
        return math.isfinite(float(weight)) and float(weight) >= 0
    except (TypeError, ValueError):
        return False
