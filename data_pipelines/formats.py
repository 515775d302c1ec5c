"""Raw-text readers for `prepare`: JSONL (plain or gzip), Parquet and plain text.

Each reader yields `(line, text)` for a good record and `(line, Skip(reason))` for a malformed one, so the caller
counts every record and never crashes on bad data. `line` is 1-based: the line of a JSONL record, the row of a
Parquet record, the first line of a plain-text document, 0 for a whole-file problem.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from typing import NamedTuple

# Every reason a record can be skipped; the manifest reports a count for each one that occurred.
SKIP_REASONS = {
    "bad_json": "the line is not valid JSON",
    "not_object": "the JSON value is not an object",
    "missing_field": "the text field is absent or null",
    "not_string": "the text field is not a string",
    "invalid_utf8": "the bytes are not valid UTF-8 (or the text holds lone surrogates)",
    "empty_text": "the text is empty or only whitespace",
    "unreadable_file": "the file (or its remainder) could not be read: truncated gzip, corrupt Parquet, ...",
    "not_token_list": "a Data Prep Kit file's `tokens` column is not a list of integers",
    "bad_token_id": "a token id is negative or not below the tokenizer's vocab_size",
}

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".rst")
TEXT_SPLITS = ("file", "line", "blank")


class Skip(NamedTuple):
    reason: str


def input_format(path: str) -> str:
    """'jsonl', 'parquet' or 'text' from the file name; ValueError for anything else."""
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(
        f"cannot tell the format of {path!r}: expected a name ending in one of "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)}; rename the file or narrow --input"
    )


def read_records(path: str, *, text_field: str = "text", text_split: str = "file") -> Iterator[tuple[int, str | Skip]]:
    """Yields `(line, text | Skip)` for every record of `path` (format from its name, see `input_format`)."""
    fmt = input_format(path)
    if fmt == "jsonl":
        yield from _read_jsonl(path, text_field)
    elif fmt == "parquet":
        yield from _read_parquet(path, text_field)
    else:
        yield from _read_text(path, text_split)


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _checked(text: str) -> str | Skip:
    if not text.strip():
        return Skip("empty_text")
    return text


def _read_jsonl(path: str, text_field: str) -> Iterator[tuple[int, str | Skip]]:
    line_no = 0
    try:
        with _open_binary(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines separate nothing and hold no record
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield line_no, Skip("invalid_utf8")
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    yield line_no, Skip("bad_json")
                    continue
                if not isinstance(obj, dict):
                    yield line_no, Skip("not_object")
                    continue
                text = obj.get(text_field)
                if text is None:
                    yield line_no, Skip("missing_field")
                elif not isinstance(text, str):
                    yield line_no, Skip("not_string")
                else:
                    yield line_no, _checked(text)
    except (OSError, EOFError, zlib.error):
        yield line_no + 1, Skip("unreadable_file")


def _read_parquet(path: str, text_field: str) -> Iterator[tuple[int, str | Skip]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            for row in range(1, pf.metadata.num_rows + 1):
                yield row, Skip("missing_field")
            return
        is_string = pa.types.is_string(pf.schema_arrow.field(text_field).type) or pa.types.is_large_string(
            pf.schema_arrow.field(text_field).type
        )
        for batch in pf.iter_batches(columns=[text_field], batch_size=8192):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    yield row, Skip("missing_field")
                elif not is_string or not isinstance(value, str):
                    yield row, Skip("not_string")
                else:
                    yield row, _checked(value)
    except (OSError, EOFError, pa.ArrowException):
        yield row + 1, Skip("unreadable_file")


def _read_text(path: str, text_split: str) -> Iterator[tuple[int, str | Skip]]:
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split={text_split!r}; expected one of {TEXT_SPLITS}")
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error):
        yield 0, Skip("unreadable_file")
        return
    if text_split == "file":
        try:
            yield 1, _checked(data.decode("utf-8"))
        except UnicodeDecodeError:
            yield 1, Skip("invalid_utf8")
        return
    # "line": each non-blank line is a document; "blank": paragraphs separated by blank lines are documents.
    start_line, chunk = 0, []
    for line_no, raw in enumerate(data.splitlines(keepends=True), start=1):
        if raw.strip():
            if not chunk:
                start_line = line_no
            chunk.append(raw)
            if text_split == "blank":
                continue
        if chunk:
            yield start_line, _decode_chunk(chunk)
            chunk = []
    if chunk:
        yield start_line, _decode_chunk(chunk)


def _decode_chunk(chunk: list[bytes]) -> str | Skip:
    try:
        return b"".join(chunk).decode("utf-8").rstrip("\n")
    except UnicodeDecodeError:
        return Skip("invalid_utf8")


DPK_TOKENS_COLUMN = "tokens"  # the column Data Prep Kit's tokenization transform writes (a fixed name there)


def read_dpk_tokens(path: str) -> Iterator[tuple[int, "np.ndarray | Skip"]]:
    """Yields `(row, token ids)` for every row of a Parquet file written by Data Prep Kit's tokenization transform
    (columns `tokens` list<int64>, its document id column, `document_length`, `token_count`), in file order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(path)
        field = pf.schema_arrow.field(DPK_TOKENS_COLUMN) if DPK_TOKENS_COLUMN in pf.schema_arrow.names else None
        if field is None or not (pa.types.is_list(field.type) or pa.types.is_large_list(field.type)) or not (
                pa.types.is_integer(field.type.value_type)):
            reason = "missing_field" if field is None else "not_token_list"
            for row in range(1, pf.metadata.num_rows + 1):
                yield row, Skip(reason)
            return
        for batch in pf.iter_batches(columns=[DPK_TOKENS_COLUMN], batch_size=8192):
            lists = batch.column(0)
            values = lists.flatten()  # the ids of the non-null rows, in order
            lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            null_rows = np.asarray(lists.is_null())
            holes = np.zeros(len(lists), bool)  # rows with a null id inside their list
            if values.null_count:
                holes[pc.list_parent_indices(lists).to_numpy()[np.asarray(values.is_null())]] = True
            ids_all = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)  # holes are skipped above
            for k in range(len(lists)):
                row += 1
                if null_rows[k]:
                    yield row, Skip("missing_field")
                elif holes[k]:
                    yield row, Skip("not_token_list")
                elif lengths[k] == 0:
                    yield row, Skip("empty_text")
                else:
                    yield row, ids_all[offsets[k]:offsets[k + 1]]
    except (OSError, EOFError, pa.ArrowException):
        yield row + 1, Skip("unreadable_file")
