"""Prepare: raw text -> token arrays in ArrayRecord shards + `manifest.json`.

Layout of a prepared directory `DIR`:

    DIR/tokenizer.json            copy of the tokenizer used (its sha256 is the manifest's tokenizer identity)
    DIR/shards/000042.arrayrecord one shard per input file (index in the sorted input list); one record per document:
                                  the document's token ids as raw little-endian `dtype` bytes, eos last
    DIR/parts/000042.json         that shard's manifest part, written after the shard: it is the shard's done marker
    DIR/manifest.json             the merge of all parts (documents, tokens, files, tokenizer, eos id, skipped records)

Every file is written to a temporary name and renamed into place, so an interrupted run leaves no half shard, and a
re-run skips each input whose part exists and still matches the input's path, size and mtime, the tokenizer (eos
included), --text-field, --text-split and the number of inputs. A run with work to do first deletes manifest.json
(written again at the end) and the parts of inputs no longer in the list; a part is deleted before its shard is
replaced. So whenever a run is killed, what is left is either no manifest or a manifest whose parts all hold.

This module decides what to do; `engines/` runs it (`engines.part.prepare_part` per input file, locally or on Ray),
`shards.py` writes shards and `manifest.py` parts and the manifest.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

from data_pipelines.engines import ENGINES, PartTask, Progress, part_settings, run_tasks
from data_pipelines.formats import input_format
from data_pipelines.manifest import (  # noqa: F401  (MANIFEST_FORMAT, merge_manifests: re-exported)
    MANIFEST_FORMAT,
    invalidate,
    load_part,
    merge_manifests,
    part_is_current,
    remove,
    stale_parts,
    temporary_name,
)
from data_pipelines.shards import synthetic_identity, write_token_documents  # noqa: F401  (re-exported)

DEFAULT_EOS_TOKEN = "<|end_of_text|>"  # Granite's end-of-text token


@dataclass(frozen=True)
class PrepareOptions:
    tokenizer: str
    out: str
    text_field: str = "text"
    text_split: str = "file"  # plain-text files: "file" (one document each), "line" or "blank" (blank-line separated)
    eos_token: str = DEFAULT_EOS_TOKEN
    from_dpk: bool = False  # inputs are Parquet files of Data Prep Kit's tokenization transform (token ids)


def resolve_inputs(patterns: Sequence[str], formats: Sequence[str] = ("jsonl", "parquet", "text")) -> list[str]:
    """Sorted, de-duplicated files from paths, globs (`**` allowed) and directories (searched for `formats`)."""
    files: set[str] = set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if os.path.exists(pattern) else [])
        if not matches:
            raise ValueError(f"--input {pattern!r} matches no file; check the path or quote the glob")
        for match in matches:
            if os.path.isdir(match):
                for root, _, names in os.walk(match):
                    files.update(os.path.join(root, n) for n in names if _known_format(n) in formats)
            else:
                fmt = input_format(match)  # raises a clear error for an unknown extension
                if fmt not in formats:
                    raise ValueError(f"--input {match!r} is {fmt}; --from-dpk reads the Parquet files of Data Prep "
                                     "Kit's tokenization transform only")
                files.add(match)
    return sorted(os.path.abspath(f) for f in files)


def _known_format(name: str) -> str | None:
    try:
        return input_format(name)
    except ValueError:
        return None


def tokenizer_identity(tokenizer_path: str, eos_token: str) -> dict:
    """{sha256, vocab_size, eos_token, eos_id, dtype} for a tokenizer.json; ValueError if the file is missing or not a
    tokenizer, or if eos_token is not in its vocab."""
    from tokenizers import Tokenizer

    if not os.path.isfile(tokenizer_path):
        raise ValueError(f"--tokenizer {tokenizer_path!r} does not exist; pass the path of a Hugging Face "
                         "tokenizer.json")
    with open(tokenizer_path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"--tokenizer {tokenizer_path!r} is not a Hugging Face tokenizer.json: {e}") from None
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(
            f"eos token {eos_token!r} is not in the vocabulary of {tokenizer_path}; pass the tokenizer's end-of-text "
            f"token with --eos-token (Granite's is {DEFAULT_EOS_TOKEN!r}, GPT-2's is '<|endoftext|>')"
        )
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    return {"sha256": sha256, "vocab_size": vocab_size, "eos_token": eos_token, "eos_id": eos_id, "dtype": dtype}


# ---------------------------------------------------------------------------------------------------------- driver
def prepare(
    inputs: Sequence[str],
    options: PrepareOptions,
    *,
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    engine: str = "local",
    **engine_options,
) -> dict:
    """Tokenizes the input files (this process's `shard` = (i, n) slice of them) into `options.out`.

    `engine` "local" runs `workers` processes (default: all cores); "ray" runs one Ray task per file (`workers`: at
    most that many at once, default the cluster's CPUs; `engine_options`: `address`, `max_retries`, see
    engines/ray.py). Returns the merged manifest when `shard` covers everything (n == 1), else a summary of this
    slice; the manifest of a split run is written by `merge_manifests` once every slice is done.
    """
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {i}/{n}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers}: expected a positive count")
    out_abs = os.path.abspath(options.out)
    own = tuple(os.path.join(out_abs, d) + os.sep for d in ("shards", "parts"))
    own_files = {os.path.join(out_abs, n) for n in ("manifest.json", "tokenizer.json")}
    # --input may contain --out: never read our own output as input.
    formats = ("parquet",) if options.from_dpk else ("jsonl", "parquet", "text")
    files = [f for f in resolve_inputs(inputs, formats) if not f.startswith(own) and f not in own_files]
    if not files:
        wanted = "Parquet (Data Prep Kit tokenization output)" if options.from_dpk else "JSONL, Parquet or text"
        raise ValueError(f"--input {' '.join(inputs)} holds no {wanted} files")
    identity = tokenizer_identity(options.tokenizer, options.eos_token)
    os.makedirs(os.path.join(options.out, "shards"), exist_ok=True)
    os.makedirs(os.path.join(options.out, "parts"), exist_ok=True)

    settings = part_settings(options, len(files))
    mine = [PartTask(idx, path, len(files), options, identity) for idx, path in enumerate(files) if idx % n == i]
    todo = [t for t in mine if not part_is_current(options.out, t.index, t.path, identity, settings)]
    stale = stale_parts(options.out, files, owns=lambda idx: idx % n == i)
    if todo or stale:
        invalidate(options.out, stale)
    tok_copy = os.path.join(options.out, "tokenizer.json")
    if os.path.abspath(options.tokenizer) != os.path.abspath(tok_copy):
        shutil.copyfile(options.tokenizer, temporary_name(tok_copy))
        os.replace(temporary_name(tok_copy), tok_copy)
    if engine == "local":
        workers = max(1, min(workers or _cpu_count(), len(todo) or 1))
    started = time.perf_counter()
    with Progress(total=len(mine), done=len(mine) - len(todo), enabled=progress) as bar:
        if todo:
            run_tasks(engine, todo, workers=workers, bar=bar, **engine_options)
    _remove_temporaries(options.out, [t.index for t in todo])
    seconds = time.perf_counter() - started
    if n == 1:
        manifest = merge_manifests([options.out], options.out)
        manifest["prepare_seconds"] = seconds
        return manifest
    parts = [load_part(options.out, t.index) for t in mine]
    return {
        "shard": f"{i}/{n}",
        "files": len(parts),
        "documents": sum(p["documents"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "prepare_seconds": seconds,
    }


def _remove_temporaries(out: str, indices: Sequence[int]) -> None:
    """Deletes the temporary shards that killed (and since retried) attempts at these indices left behind; only ours:
    another --shard job's are in use."""
    for index in indices:
        for path in glob.glob(os.path.join(out, "shards", f"{index:06d}.arrayrecord.tmp-*")):
            remove(path)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
