"""The training stream: `make_batches(data_cfg, ...)` -> packed batches, mixed by token shares, stage by stage.

Per source, grain orders the documents (global shuffle, per-process slice, epochs; see sources.py). The mixer hands
the packer the next document of the source that is furthest below its token share (taken_tokens / weight smallest),
so shares hold to within one document at any point, not just on average. At a stage switch the rows still open are
carried into the new stage's packer, so no token is lost or duplicated when seq_len changes.

The iterator is a `grain.DatasetIterator`: `get_state()` returns a small JSON-serialisable dict (per-source stream
positions, the mixer's counters and the (source, document, offset, length) of every piece the packer holds), and
`set_state()` rebuilds exactly that, so the next batch is the one the saved iterator would have produced. The state
also holds the settings that stream depends on (`_stream_settings`); a state saved with other settings is refused
by name. Being a grain iterator, it checkpoints with Orbax through grain's checkpoint handler like any grain iterator.
"""

from __future__ import annotations

import json
import logging
import zlib

import grain
import numpy as np

from data_pipelines.config import Stage, StageSchedule, complete_data_config, open_rows_for
from data_pipelines.packing import RowPacker
from data_pipelines.sources import DocumentSource, DocumentStream

_STATE_VERSION = 2  # 2: the fingerprint is the settings dict of `_stream_settings`; 1 (a hash) is still read

log = logging.getLogger(__name__)


class StreamMismatch(ValueError):
    """A saved iterator state belongs to another stream (other settings, or a state version this code cannot read)."""


def make_batches(
    data_cfg,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    vocab_size: int | None = None,
) -> "PackedBatchIterator":
    """Iterator of packed batches: dicts of int32 numpy arrays `tokens`, `segment_ids`, `positions`, each
    `[batch_size, seq_len]` (per process; a stage may override both). Validates the config up front.

    `vocab_size`, when given, is the model's: a source holding a token id >= vocab_size is an error.
    `iterator.stage` is the `Stage` of the batch last returned; `iterator.schedule.at(step)` that of any step.
    """
    return PackedBatchIterator(
        data_cfg,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        vocab_size=vocab_size,
    )


class PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, data_cfg, *, batch_size, seq_len, seed, process_index=0, process_count=1, vocab_size=None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; it must be >= 1 (rows per process)")
        if not (process_count >= 1 and 0 <= process_index < process_count):
            raise ValueError(f"process_index={process_index}, process_count={process_count}: need 0 <= index < count")
        data_cfg = complete_data_config(data_cfg)
        if not data_cfg.sources:
            raise ValueError("data_cfg.sources is empty; add {name, path, weight} entries for prepared directories")
        names = [s["name"] for s in data_cfg.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data_cfg.sources has duplicate names {names}; every source needs its own name")
        num_epochs = data_cfg.num_epochs
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs={num_epochs}; use a positive count, or None to repeat forever")
        self.cfg = data_cfg
        self.schedule = StageSchedule(data_cfg, batch_size=batch_size, seq_len=seq_len, process_count=process_count)
        self.sources = [DocumentSource(s["name"], s["path"]) for s in data_cfg.sources]
        _check_compatible(self.sources, vocab_size)
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self._streams = [
            DocumentStream(
                src,
                src.order(seed=seed, shuffle=bool(data_cfg.shuffle), num_epochs=num_epochs,
                          process_index=process_index, process_count=process_count),
                block_docs=_block_docs(data_cfg.read_block_tokens, src, process_count),
            )
            for src in self.sources
        ]
        self._fingerprint = self._stream_settings()
        self._reset()

    def _stream_settings(self) -> dict:
        """Everything the stream's content depends on, by name, as JSON would return it: a state saved under other
        settings would resume a different stream (another order, mixture or row layout), so set_state compares them."""
        cfg = self.cfg
        settings = {
            "sources": [s.name for s in self.sources],
            "documents": [s.num_documents for s in self.sources],
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "shuffle": bool(cfg.shuffle),
            "num_epochs": None if cfg.num_epochs is None else int(cfg.num_epochs),
            "continue_positions": bool(cfg.continue_positions),
            "pad_id": int(cfg.pad_id),
        }
        for st in self.schedule.stages:
            stage = {"seq_len": st.seq_len, "batch_size": st.batch_size, "num_steps": st.num_steps,
                     "open_rows": open_rows_for(cfg, st.seq_len), "mixture": st.mixture}
            settings.update({f"stages[{st.index}].{key}": value for key, value in stage.items()})
        return json.loads(json.dumps(settings))

    def _reset(self) -> None:
        for stream in self._streams:
            stream.seek(0)
        self.step = 0
        self._taken = [0] * len(self.sources)  # tokens taken per source in the current stage
        self._draining = False  # a source ran out: no new documents, only what the packer holds
        self.stage: Stage = self.schedule.stages[0]
        self._packer = self._new_packer(self.stage)

    def _new_packer(self, stage: Stage) -> RowPacker:
        return RowPacker(stage.seq_len, open_rows_for(self.cfg, stage.seq_len),
                         continue_positions=bool(self.cfg.continue_positions), pad_id=int(self.cfg.pad_id))

    def _read(self, slot: int, ids) -> list[np.ndarray]:
        return self.sources[slot].read(ids)

    # ------------------------------------------------------------------------------------------------ iteration
    def __next__(self) -> dict[str, np.ndarray]:
        stage = self.schedule.at(self.step)
        if stage is None:
            raise StopIteration
        if stage.index != self.stage.index:
            self._switch_stage(stage)
        packer = self._packer
        packer.start_batch(stage.batch_size)
        slots = [i for i, s in enumerate(self.sources) if s.name in stage.mixture]
        shares = [stage.mixture[self.sources[i].name] for i in slots]
        taken = self._taken
        while not packer.batch_full:
            if packer.step_pending():
                continue
            if self._draining:  # a finite stream ends with its first exhausted source: emit what is left
                packer.flush()
                break
            # The source furthest below its share gives the next document.
            slot = slots[min(range(len(slots)), key=lambda j: taken[slots[j]] / shares[j])]
            nxt = self._streams[slot].next()
            if nxt is None:
                self._draining = True
                continue
            doc_id, doc = nxt
            taken[slot] += len(doc)
            packer.add(slot, doc_id, doc)
        if packer.rows_in_batch == 0:
            packer.finish_batch()
            raise StopIteration
        self.step += 1
        return packer.finish_batch()

    def _switch_stage(self, stage: Stage) -> None:
        carried = self._packer.take_all(self._read)
        self.stage, self._packer = stage, self._new_packer(stage)
        self._packer.pending.extend(carried)
        self._taken = [0] * len(self.sources)

    # ------------------------------------------------------------------------------------------------ state
    def get_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "fingerprint": self._fingerprint,
            "step": self.step,
            "stage": self.stage.index,
            "positions": [s.position for s in self._streams],
            "taken": list(self._taken),
            "draining": self._draining,
            "rows": [[list(p) for p in row] for row in self._packer.open_pieces()],
        }

    def _version_1_fingerprint(self) -> int:
        """The hash that version-1 states hold: of sources, seed, process and stage layout only."""
        return zlib.crc32(repr(([s.name for s in self.sources], [s.num_documents for s in self.sources], self.seed,
                                self.process_index, self.process_count,
                                [(st.seq_len, st.batch_size, st.num_steps) for st in self.schedule.stages])).encode())

    def set_state(self, state: dict) -> None:
        version = state.get("version")
        if version == 1 and state["fingerprint"] == self._version_1_fingerprint():
            log.warning("data iterator state of an older version: its sources, seed, processes and stages match; "
                        "shuffle, num_epochs, continue_positions, pad_id and the mixtures cannot be checked")
        elif version == 1:
            raise StreamMismatch("the saved (version 1) data iterator state belongs to a different stream (sources, "
                                 "seed, process, batch or stage layout differ); restore with the data config and "
                                 "arguments the checkpoint was made with")
        elif version != _STATE_VERSION:
            raise StreamMismatch(f"data iterator state version {version!r}, this code reads {_STATE_VERSION}; resume "
                                 "it with the code that saved it, or start the data stream afresh")
        else:
            saved, now = state["fingerprint"], self._fingerprint
            differ = [k for k in {**saved, **now} if saved.get(k) != now.get(k)]
            if differ:
                changes = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in differ)
                raise StreamMismatch(f"the saved data iterator state belongs to a different stream ({changes}); "
                                     "restore with the data config and arguments the checkpoint was made with")
        self._reset()
        for stream, position in zip(self._streams, state["positions"]):
            stream.seek(int(position))
        self.step = int(state["step"])
        self._taken = [int(t) for t in state["taken"]]
        self._draining = bool(state["draining"])
        self.stage = self.schedule.stages[int(state["stage"])]
        self._packer = self._new_packer(self.stage)
        self._packer.restore([[tuple(p) for p in row] for row in state["rows"]], self._read)


def _check_compatible(sources: list[DocumentSource], vocab_size: int | None) -> None:
    hashes = {s.manifest["tokenizer"]["sha256"] for s in sources}
    if len(hashes) > 1:
        used = {s.name: s.manifest["tokenizer"]["sha256"][:12] for s in sources}
        raise ValueError(f"sources were prepared with different tokenizers {used}; prepare all with the same one")
    if vocab_size is None:
        return
    for s in sources:
        top = s.manifest.get("max_token_id", s.manifest["tokenizer"]["vocab_size"] - 1)
        if top >= vocab_size:
            raise ValueError(
                f"source {s.name!r} holds token id {top} but the model's vocab_size is {vocab_size}; prepare the "
                f"data with the model's tokenizer or build the model with vocab_size >= {top + 1}"
            )


def _block_docs(block_tokens: int, source: DocumentSource, process_count: int) -> int:
    """Documents per batched read: about `block_tokens` tokens, at most one epoch of this process, at most 4096 (the
    ids of a block cost a grain index-shuffle call each)."""
    per_epoch = -(-source.num_documents // process_count)
    return max(1, min(int(block_tokens / source.mean_document_tokens), per_epoch, 4096))
