"""A prepared directory as a source of documents.

Document order is grain's: `MapDataset.range(documents)[process_index::process_count].shuffle(seed).repeat(epochs)`
gives, for stream position k, the id of the document this process reads next (a global shuffle that costs no memory,
reshuffled every epoch; processes get disjoint slices that together cover the source). The documents themselves are
read with ArrayRecord's batched reader, one call per shard per block of ids: grain's per-record
ArrayRecordDataSource path measured ~10x slower for small records.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence

import grain
import numpy as np

from data_pipelines.manifest import MANIFEST_FORMAT

_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


def load_manifest(path: str, name: str = "") -> dict:
    label = f"source {name!r} " if name else ""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise ValueError(
            f"{label}path {path!r} does not exist; prepare it with `granite-jax prepare --input ... --tokenizer ... "
            f"--out {path}` (or `granite-jax prepare --demo --out {path}`)"
        )
    if not os.path.exists(manifest_path):
        hint = "run `granite-jax merge-manifests` on it" if os.path.isdir(os.path.join(path, "parts")) else (
            "is it the --out of a finished `granite-jax prepare`?")
        raise ValueError(f"{label}directory {path!r} has no manifest.json; {hint}")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}; re-prepare")
    return manifest


class DocumentSource:
    """The documents of one prepared directory: `read(ids)` returns their token arrays (uint16/uint32 views)."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        self.manifest = load_manifest(path, name)
        files = [f for f in self.manifest["files"] if f["documents"] > 0]
        self.shard_paths = [os.path.join(path, f["shard"]) for f in files]
        counts = np.array([f["documents"] for f in files], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_documents = int(self._starts[-1])
        self.num_tokens = int(self.manifest["tokens"])
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self._readers: dict[int, object] = {}
        if self.num_documents == 0:
            raise ValueError(f"source {name!r} at {path!r} holds no documents (manifest.json counts 0)")

    @property
    def mean_document_tokens(self) -> float:
        return self.num_tokens / self.num_documents

    def order(self, *, seed: int, shuffle: bool, num_epochs: int | None, process_index: int, process_count: int):
        """grain MapDataset of document ids in this process's reading order (see module doc)."""
        if self.num_documents < process_count:
            raise ValueError(
                f"source {self.name!r} has {self.num_documents} documents, fewer than the {process_count} processes "
                "that must each read a disjoint part; prepare more data or use fewer processes"
            )
        ds = grain.MapDataset.range(self.num_documents)[process_index::process_count]
        if shuffle:
            ds = ds.shuffle(seed=(seed * 1_000_003 + zlib.crc32(self.name.encode())) % (1 << 31))
        return ds.repeat(num_epochs) if num_epochs != 1 else ds

    def read(self, ids: Sequence[int]) -> list[np.ndarray]:
        """Token arrays of documents `ids` (global ids, any order), one batched read per shard touched."""
        ids_arr = np.asarray(ids, np.int64)
        shard_of = np.searchsorted(self._starts, ids_arr, side="right") - 1
        out: list[np.ndarray | None] = [None] * len(ids_arr)
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            local = (ids_arr[where] - self._starts[shard]).tolist()
            for i, record in zip(where.tolist(), self._reader(int(shard)).read(local)):
                out[i] = np.frombuffer(record, self.dtype)
        return out

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            reader = self._readers[shard] = ArrayRecordReader(self.shard_paths[shard], _READER_OPTIONS)
        return reader


class DocumentStream:
    """Reads one source's documents in this process's order, a block of ids at a time. Its state is one integer."""

    def __init__(self, source: DocumentSource, order, block_docs: int):
        self.source, self.order, self.block_docs = source, order, max(1, block_docs)
        self.position = 0  # stream index of the next document to hand out
        self._block_start = 0
        self._ids: list[int] = []
        self._docs: list[np.ndarray] = []

    def seek(self, position: int) -> None:
        self.position = position
        self._block_start, self._ids, self._docs = position, [], []

    def next(self) -> tuple[int, np.ndarray] | None:
        """(document id, tokens) of the next document, or None when the stream is exhausted."""
        k = self.position - self._block_start
        if k >= len(self._ids):
            if self.position >= len(self.order):
                return None
            end = min(self.position + self.block_docs, len(self.order))
            self._ids = list(self.order._getitems(range(self.position, end)))  # pylint: disable=protected-access
            self._docs = self.source.read(self._ids)
            self._block_start, k = self.position, 0
        self.position += 1
        return self._ids[k], self._docs[k]
