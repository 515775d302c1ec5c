"""Document-level row packing with numpy: each document (or piece) is one slice copy, never a per-token loop.

A document shorter than a row goes whole into the open row with the least room that still fits it (best fit); if no
open row fits, the fullest open row is emitted (its tail padded) and the document starts a fresh one. A document of
seq_len tokens or more is cut into full rows emitted one after another, and its remainder is packed like a short
document. Within a row, `segment_ids` number the pieces 1, 2, ... (0 = padding) and `positions` count each piece's
tokens from its offset in its document (`continue_positions`) or from 0.

Memory is (open_rows + one batch) rows: it depends on seq_len, never on the corpus. Each open row remembers its
pieces as (source slot, document id, offset, length), so the packer's state is small and rows can be rebuilt exactly.
"""

from __future__ import annotations

from collections import deque

import numpy as np

Piece = tuple[int, int, int, int]  # (source slot, document id, offset in the document, length)


class RowPacker:
    def __init__(self, seq_len: int, open_rows: int, *, continue_positions: bool = True, pad_id: int = 0):
        self.seq_len, self.open_rows = seq_len, max(1, open_rows)
        self.continue_positions, self.pad_id = continue_positions, pad_id
        shape = (self.open_rows, seq_len)
        self.tokens = np.full(shape, pad_id, np.int32)
        self.segment_ids = np.zeros(shape, np.int32)
        self.positions = np.zeros(shape, np.int32)
        self.fill = [0] * self.open_rows
        self.pieces: list[list[Piece]] = [[] for _ in range(self.open_rows)]
        self._arange = np.arange(seq_len, dtype=np.int32)
        # Pieces waiting to be packed before any new document: the rest of a long document, or the pieces carried
        # over from another packer at a stage switch. Each entry: (slot, doc id, offset, tokens of the piece).
        self.pending: deque[tuple[int, int, int, np.ndarray]] = deque()
        self._out: dict[str, np.ndarray] | None = None
        self._n_out = 0

    # ------------------------------------------------------------------------------------------------ batches
    def start_batch(self, batch_size: int) -> None:
        shape = (batch_size, self.seq_len)
        self._out = {
            "tokens": np.empty(shape, np.int32),
            "segment_ids": np.empty(shape, np.int32),
            "positions": np.empty(shape, np.int32),
        }
        self._n_out = 0

    @property
    def batch_full(self) -> bool:
        return self._n_out == len(self._out["tokens"])

    def finish_batch(self) -> dict[str, np.ndarray]:
        """The batch; rows not filled (end of data) are all padding."""
        out, n = self._out, self._n_out
        out["tokens"][n:] = self.pad_id
        out["segment_ids"][n:] = 0
        out["positions"][n:] = 0
        self._out = None
        return out

    @property
    def rows_in_batch(self) -> int:
        return self._n_out

    # ------------------------------------------------------------------------------------------------ packing
    def add(self, slot: int, doc_id: int, doc: np.ndarray, offset: int = 0) -> None:
        """Packs `doc` (a document, or its piece starting at `offset`). Emits at most one row into the batch for a
        piece shorter than a row; a longer one is queued and emitted row by row by `step_pending`."""
        n = len(doc)
        if n >= self.seq_len:
            self.pending.append((slot, doc_id, offset, doc))
            return
        room = self.seq_len + 1
        best = -1
        for r in range(self.open_rows):
            free = self.seq_len - self.fill[r]
            if n <= free < room:
                best, room = r, free
        if best < 0:
            best = max(range(self.open_rows), key=self.fill.__getitem__)
            self._emit(best)
        self._place(best, slot, doc_id, offset, doc)
        if self.fill[best] == self.seq_len:
            self._emit(best)

    def step_pending(self) -> bool:
        """Packs the next pending piece (one full row of a long document, or a carried piece); False if none."""
        if not self.pending:
            return False
        slot, doc_id, offset, doc = self.pending.popleft()
        if len(doc) < self.seq_len:
            self.add(slot, doc_id, doc, offset)
            return True
        L = self.seq_len
        out, i = self._out, self._n_out
        out["tokens"][i] = doc[:L]
        out["segment_ids"][i] = 1
        np.add(self._arange, offset if self.continue_positions else 0, out=out["positions"][i])
        self._n_out += 1
        if len(doc) > L:
            self.pending.appendleft((slot, doc_id, offset + L, doc[L:]))
        return True

    def flush(self) -> None:
        """Emits open rows that hold tokens (fullest first) until the batch is full or none is left: end of data."""
        for r in sorted(range(self.open_rows), key=lambda r: -self.fill[r]):
            if self.fill[r] and not self.batch_full:
                self._emit(r)

    @property
    def empty(self) -> bool:
        return not self.pending and not any(self.fill)

    def _place(self, r: int, slot: int, doc_id: int, offset: int, doc: np.ndarray) -> None:
        f, n = self.fill[r], len(doc)
        self.tokens[r, f : f + n] = doc
        self.segment_ids[r, f : f + n] = len(self.pieces[r]) + 1
        np.add(self._arange[:n], offset if self.continue_positions else 0, out=self.positions[r, f : f + n])
        self.fill[r] = f + n
        self.pieces[r].append((slot, doc_id, offset, n))

    def _emit(self, r: int) -> None:
        out, i, f = self._out, self._n_out, self.fill[r]
        out["tokens"][i, :f] = self.tokens[r, :f]
        out["tokens"][i, f:] = self.pad_id
        out["segment_ids"][i, :f] = self.segment_ids[r, :f]
        out["segment_ids"][i, f:] = 0
        out["positions"][i, :f] = self.positions[r, :f]
        out["positions"][i, f:] = 0
        self._n_out += 1
        self.fill[r] = 0
        self.pieces[r] = []

    # ------------------------------------------------------------------------------------------------ state
    def open_pieces(self) -> list[list[Piece]]:
        """The pieces of each open row, then the pending pieces (as one more list): all the packer holds."""
        pending = [(s, d, o, len(doc)) for s, d, o, doc in self.pending]
        return [list(p) for p in self.pieces] + [pending]

    def restore(self, rows: list[list[Piece]], read) -> None:
        """Rebuilds the rows and pending pieces saved by `open_pieces`; `read(slot, ids)` returns documents."""
        *open_rows, pending = rows
        if len(open_rows) != self.open_rows:
            raise ValueError(f"the saved state has {len(open_rows)} open rows, this packer {self.open_rows}")
        docs = _read_all(open_rows + [pending], read)
        for r, pieces in enumerate(open_rows):
            for slot, doc_id, offset, n in pieces:
                self._place(r, slot, doc_id, offset, docs[slot, doc_id][offset : offset + n])
        for slot, doc_id, offset, n in pending:
            self.pending.append((slot, doc_id, offset, docs[slot, doc_id][offset : offset + n]))

    def take_all(self, read) -> list[tuple[int, int, int, np.ndarray]]:
        """Removes and returns every piece the packer holds, in row order (to carry into another packer)."""
        rows = self.open_pieces()
        docs = _read_all(rows, read)
        out = [(s, d, o, docs[s, d][o : o + n]) for row in rows[:-1] for s, d, o, n in row]
        out += list(self.pending)
        self.pending.clear()
        self.fill = [0] * self.open_rows
        self.pieces = [[] for _ in range(self.open_rows)]
        return out


def _read_all(rows: list[list[Piece]], read) -> dict[tuple[int, int], np.ndarray]:
    wanted: dict[int, set[int]] = {}
    for row in rows:
        for slot, doc_id, _, _ in row:
            wanted.setdefault(slot, set()).add(doc_id)
    docs = {}
    for slot, ids in wanted.items():
        ids = sorted(ids)
        docs.update({(slot, d): doc for d, doc in zip(ids, read(slot, ids))})
    return docs
