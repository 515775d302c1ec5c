"""The one tokenize-and-write function every engine runs: `prepare_part(task)` turns one input file into its shard
and manifest part. Engines differ only in where and how often it runs (a local process pool, Ray tasks)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from data_pipelines.formats import Skip, read_dpk_tokens, read_records
from data_pipelines.shards import ShardWriter

EXAMPLES_PER_REASON = 10
_ENCODE_BATCH_DOCS = 512
_ENCODE_BATCH_CHARS = 4 << 20

Report = Callable[[int, int, int], None]  # (files, documents, tokens) done since the last call


@dataclass(frozen=True)
class PartTask:
    """Input file `path`, number `index` of `inputs_total` sorted inputs, prepared into `options.out`."""

    index: int
    path: str
    inputs_total: int
    options: object  # prepare.PrepareOptions
    identity: dict  # prepare.tokenizer_identity of options.tokenizer


_tokenizers: dict[str, object] = {}  # sha256 -> Tokenizer: one load per worker process, not per task


def _tokenizer(task: PartTask):
    tok = _tokenizers.get(task.identity["sha256"])
    if tok is None:
        from tokenizers import Tokenizer

        tok = _tokenizers[task.identity["sha256"]] = Tokenizer.from_file(task.options.tokenizer)
    return tok


def part_settings(options, inputs_total: int) -> dict:
    """The options besides the tokenizer that change a part's content (inputs_total: its index's meaning). Parts of
    Data Prep Kit token files have no text options: a text part never passes for one, nor the other way round."""
    if options.from_dpk:
        return {"inputs_total": inputs_total, "text_field": None, "text_split": None, "input_kind": "dpk-tokens"}
    return {"inputs_total": inputs_total, "text_field": options.text_field, "text_split": options.text_split}


def _encode(tok, texts: list[str]) -> list[list[int] | None]:
    """Token ids per text; None where the text cannot be encoded (lone surrogates)."""
    try:
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    except Exception:  # one bad text fails the whole batch: redo it one by one
        out = []
        for text in texts:
            try:
                out.append(tok.encode(text, add_special_tokens=False).ids)
            except Exception:
                out.append(None)
        return out


def prepare_part(task: PartTask, report: Report | None = None) -> dict:
    """Tokenizes `task.path` into shard `task.index` (documents in file order, eos appended, malformed records counted
    by reason); writes the shard, then its part, and returns the part. `report` is told progress per encode batch."""
    options, path = task.options, task.path
    tok = None if options.from_dpk else _tokenizer(task)
    skipped: dict[str, int] = {}
    examples: list[dict] = []
    stat = os.stat(path)
    writer = ShardWriter(options.out, task.index, task.identity)

    def skip(line: int, reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] <= EXAMPLES_PER_REASON:
            examples.append({"file": path, "line": line, "reason": reason})

    if options.from_dpk:
        _write_dpk_file(path, writer, skip, report)
    else:
        _write_text_file(path, options, tok, writer, skip, report)
    part = writer.close(
        **part_settings(options, task.inputs_total),
        input=path,
        input_size=stat.st_size,
        input_mtime_ns=stat.st_mtime_ns,
        skipped=skipped,
        skipped_examples=examples,
    )
    if report is not None:
        report(1, 0, 0)
    return part


def _write_text_file(path: str, options, tok, writer: ShardWriter, skip, report: Report | None) -> None:
    """Encodes the documents of a raw-text file in batches and writes them."""

    def flush(texts: list[str], lines: list[int]) -> None:
        n_tokens = 0
        for line, ids in zip(lines, _encode(tok, texts)):
            if ids is None:
                skip(line, "invalid_utf8")
            else:
                n_tokens += writer.write(ids)
        if report is not None:
            report(0, len(texts), n_tokens)

    texts: list[str] = []
    lines: list[int] = []
    n_chars = 0
    for line, record in read_records(path, text_field=options.text_field, text_split=options.text_split):
        if isinstance(record, Skip):
            skip(line, record.reason)
            continue
        texts.append(record)
        lines.append(line)
        n_chars += len(record)
        if len(texts) >= _ENCODE_BATCH_DOCS or n_chars >= _ENCODE_BATCH_CHARS:
            flush(texts, lines)
            texts, lines, n_chars = [], [], 0
    if texts:
        flush(texts, lines)


def _write_dpk_file(path: str, writer: ShardWriter, skip, report: Report | None) -> None:
    """Writes the token lists of a Data Prep Kit tokenization file as they are (eos appended), ids range-checked."""
    vocab_size = writer.identity["vocab_size"]
    docs = tokens = 0
    for row, ids in read_dpk_tokens(path):
        if isinstance(ids, Skip):
            skip(row, ids.reason)
            continue
        if ids.min() < 0 or ids.max() >= vocab_size:  # another tokenizer's ids, or a corrupt row
            skip(row, "bad_token_id")
            continue
        tokens += writer.write(ids)
        docs += 1
        if report is not None and docs == _ENCODE_BATCH_DOCS:
            report(0, docs, tokens)
            docs = tokens = 0
    if report is not None and docs:
        report(0, docs, tokens)
