"""ArrayRecord token shards: `ShardWriter` (one shard and its manifest part) and `write_token_documents` for
corpora that are token ids already (synthetic corpora in tests and benchmarks)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from data_pipelines.manifest import (
    invalidate,
    merge_manifests,
    part_path,
    remove,
    shard_rel,
    stale_parts,
    temporary_name,
    write_json,
)

ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: fast random access for global shuffling


class ShardWriter:
    """Writes one shard (temp file, renamed on `close`) and then its manifest part, the shard's done marker."""

    def __init__(self, out: str, index: int, identity: dict):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.out, self.index, self.identity = out, index, identity
        self.dtype = np.dtype(identity["dtype"]).newbyteorder("<")
        self.shard_rel = shard_rel(index)
        self._tmp = temporary_name(os.path.join(out, self.shard_rel))
        self._writer = ArrayRecordWriter(self._tmp, ARRAY_RECORD_OPTIONS)
        self.documents = self.tokens = self.max_document_tokens = self.max_token_id = 0

    def write(self, ids) -> int:
        """Appends one document (token ids without eos; eos is appended). Returns its length with eos."""
        doc = np.empty(len(ids) + 1, self.dtype)
        doc[:-1] = ids
        doc[-1] = self.identity["eos_id"]
        self._writer.write(doc.tobytes())
        self.documents += 1
        self.tokens += doc.size
        self.max_document_tokens = max(self.max_document_tokens, doc.size)
        self.max_token_id = max(self.max_token_id, int(doc.max()))
        return doc.size

    def close(self, **part) -> dict:
        self._writer.close()
        # The old part must go before its shard does: killed in between, a re-run would take the new shard for done.
        path = part_path(self.out, self.index)
        remove(path)
        os.replace(self._tmp, os.path.join(self.out, self.shard_rel))
        part = {
            "index": self.index,
            "inputs_total": 1,
            "shard": self.shard_rel,
            "documents": self.documents,
            "tokens": self.tokens,
            "max_document_tokens": self.max_document_tokens,
            "max_token_id": self.max_token_id,
            "skipped": {},
            "skipped_examples": [],
            "tokenizer": self.identity,
            "text_field": None,
            "text_split": None,
            **part,
        }
        write_json(path, part)
        return part


def synthetic_identity(vocab_size: int, eos_id: int = 0) -> dict:
    """A tokenizer identity for corpora made of token ids directly (no tokenizer.json)."""
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    return {"sha256": f"synthetic-{vocab_size}", "vocab_size": vocab_size, "eos_token": None, "eos_id": eos_id,
            "dtype": dtype}


def write_token_documents(out: str, shards: Sequence[Sequence], identity: dict) -> dict:
    """Writes already-tokenized documents (`shards[i]` = list of id arrays, eos not included) as a prepared
    directory and returns its manifest. For synthetic corpora in tests and benchmarks."""
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    inputs = [f"<synthetic {index}>" for index in range(len(shards))]
    invalidate(out, stale_parts(out, inputs, owns=lambda index: True))
    for index, docs in enumerate(shards):
        writer = ShardWriter(out, index, identity)
        for ids in docs:
            writer.write(ids)
        writer.close(inputs_total=len(shards), input=inputs[index])
    return merge_manifests([out], out)
