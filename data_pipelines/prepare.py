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
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_pipelines.formats import SKIP_REASONS, Skip, input_format, read_records

MANIFEST_FORMAT = "granite-jax/tokens-v1"
DEFAULT_EOS_TOKEN = "<|end_of_text|>"  # Granite's end-of-text token
ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: fast random access for global shuffling
EXAMPLES_PER_REASON = 10
_ENCODE_BATCH_DOCS = 512
_ENCODE_BATCH_CHARS = 4 << 20


@dataclass(frozen=True)
class PrepareOptions:
    tokenizer: str
    out: str
    text_field: str = "text"
    text_split: str = "file"  # plain-text files: "file" (one document each), "line" or "blank" (blank-line separated)
    eos_token: str = DEFAULT_EOS_TOKEN


def resolve_inputs(patterns: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated files from paths, globs (`**` allowed) and directories (searched for known formats)."""
    files: set[str] = set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if os.path.exists(pattern) else [])
        if not matches:
            raise ValueError(f"--input {pattern!r} matches no file; check the path or quote the glob")
        for match in matches:
            if os.path.isdir(match):
                for root, _, names in os.walk(match):
                    files.update(os.path.join(root, n) for n in names if _known_format(n))
            else:
                input_format(match)  # raises a clear error for an unknown extension
                files.add(match)
    return sorted(os.path.abspath(f) for f in files)


def _known_format(name: str) -> bool:
    try:
        input_format(name)
        return True
    except ValueError:
        return False


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


# ---------------------------------------------------------------------------------------------------------- worker
_worker: dict = {}


def _init_worker(options: PrepareOptions, identity: dict, progress_queue, single_process: bool) -> None:
    if not single_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pools
    from tokenizers import Tokenizer

    _worker.update(
        options=options,
        identity=identity,
        tokenizer=Tokenizer.from_file(options.tokenizer),
        progress=progress_queue,
    )


def _report(docs: int, tokens: int, files: int = 0) -> None:
    progress = _worker["progress"]
    if hasattr(progress, "put"):  # a worker process: the parent's queue
        progress.put((files, docs, tokens))
    elif progress is not None:
        progress(files, docs, tokens)


def _encode(texts: list[str]) -> list[list[int] | None]:
    """Token ids per text; None where the text cannot be encoded (lone surrogates)."""
    tok = _worker["tokenizer"]
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


class ShardWriter:
    """Writes one shard (temp file, renamed on `close`) and then its manifest part, the shard's done marker."""

    def __init__(self, out: str, index: int, identity: dict):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.out, self.index, self.identity = out, index, identity
        self.dtype = np.dtype(identity["dtype"]).newbyteorder("<")
        self.shard_rel = _shard_rel(index)
        self._tmp = os.path.join(out, f"{self.shard_rel}.tmp-{os.getpid()}")
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
        part_path = _part_path(self.out, self.index)
        _remove(part_path)
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
        _write_json(part_path, part)
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
    _invalidate(out, _stale_parts(out, inputs, owns=lambda index: True))
    for index, docs in enumerate(shards):
        writer = ShardWriter(out, index, identity)
        for ids in docs:
            writer.write(ids)
        writer.close(inputs_total=len(shards), input=inputs[index])
    return merge_manifests([out], out)


def _prepare_file(task: tuple[int, str, int]) -> dict:
    """Tokenizes one input file into one shard; returns (and writes) its manifest part."""
    index, path, inputs_total = task
    options = _worker["options"]
    skipped: dict[str, int] = {}
    examples: list[dict] = []
    stat = os.stat(path)
    writer = ShardWriter(options.out, index, _worker["identity"])

    def skip(line: int, reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] <= EXAMPLES_PER_REASON:
            examples.append({"file": path, "line": line, "reason": reason})

    def flush(texts: list[str], lines: list[int]) -> None:
        n_tokens = 0
        for line, ids in zip(lines, _encode(texts)):
            if ids is None:
                skip(line, "invalid_utf8")
            else:
                n_tokens += writer.write(ids)
        _report(len(texts), n_tokens)

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
    part = writer.close(
        **_part_settings(options, inputs_total),
        input=path,
        input_size=stat.st_size,
        input_mtime_ns=stat.st_mtime_ns,
        skipped=skipped,
        skipped_examples=examples,
    )
    _report(0, 0, files=1)
    return part


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _part_path(out: str, index: int) -> str:
    return os.path.join(out, "parts", f"{index:06d}.json")


def _shard_rel(index: int) -> str:
    return f"shards/{index:06d}.arrayrecord"


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # another --shard job sharing the directory may be faster
        os.remove(path)


def _part_settings(options: PrepareOptions, inputs_total: int) -> dict:
    """The options besides the tokenizer that change a part's content (inputs_total: its index's meaning)."""
    return {"inputs_total": inputs_total, "text_field": options.text_field, "text_split": options.text_split}


def _part_is_current(out: str, index: int, path: str, identity: dict, settings: dict) -> bool:
    try:
        part = _load_part(out, index)
        stat = os.stat(path)
    except (OSError, ValueError):
        return False
    expected = {"input": path, "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns, "tokenizer": identity,
                **settings}
    return all(part.get(k) == v for k, v in expected.items()) and os.path.exists(os.path.join(out, part["shard"]))


def _stale_parts(out: str, inputs: Sequence[str], owns) -> list[int]:
    """Indices of the parts this run `owns(index)` that belong to no current input: left from a run over other files."""
    stale = []
    for name in sorted(os.listdir(os.path.join(out, "parts"))):
        stem = name.removesuffix(".json")
        if name == stem or not stem.isdigit() or not owns(int(stem)):
            continue
        index = int(stem)
        try:
            current = index < len(inputs) and _load_part(out, index).get("input") == inputs[index]
        except (OSError, ValueError):
            current = False
        if not current:
            stale.append(index)
    return stale


def _invalidate(out: str, stale: Sequence[int]) -> None:
    """Before a run changes anything: deletes manifest.json (a run killed midway leaves none rather than a wrong one),
    then each stale part before its shard."""
    _remove(os.path.join(out, "manifest.json"))
    for index in stale:
        _remove(_part_path(out, index))
        _remove(os.path.join(out, _shard_rel(index)))


# ---------------------------------------------------------------------------------------------------------- driver
def prepare(
    inputs: Sequence[str],
    options: PrepareOptions,
    *,
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict:
    """Tokenizes the input files (this process's `shard` = (i, n) slice of them) into `options.out`.

    Returns the merged manifest when `shard` covers everything (n == 1), else a summary of this slice; the manifest
    of a split run is written by `merge_manifests` once every slice is done.
    """
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {i}/{n}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    out_abs = os.path.abspath(options.out)
    own = tuple(os.path.join(out_abs, d) + os.sep for d in ("shards", "parts"))
    own_files = {os.path.join(out_abs, n) for n in ("manifest.json", "tokenizer.json")}
    # --input may contain --out: never read our own output as input.
    files = [f for f in resolve_inputs(inputs) if not f.startswith(own) and f not in own_files]
    if not files:
        raise ValueError(f"--input {' '.join(inputs)} holds no JSONL, Parquet or text files")
    identity = tokenizer_identity(options.tokenizer, options.eos_token)
    os.makedirs(os.path.join(options.out, "shards"), exist_ok=True)
    os.makedirs(os.path.join(options.out, "parts"), exist_ok=True)

    settings = _part_settings(options, len(files))
    mine = [(idx, path, len(files)) for idx, path in enumerate(files) if idx % n == i]
    todo = [t for t in mine if not _part_is_current(options.out, t[0], t[1], identity, settings)]
    stale = _stale_parts(options.out, files, owns=lambda idx: idx % n == i)
    if todo or stale:
        _invalidate(options.out, stale)
    tok_copy = os.path.join(options.out, "tokenizer.json")
    if os.path.abspath(options.tokenizer) != os.path.abspath(tok_copy):
        shutil.copyfile(options.tokenizer, f"{tok_copy}.tmp-{os.getpid()}")
        os.replace(f"{tok_copy}.tmp-{os.getpid()}", tok_copy)
    workers = max(1, min(workers or _cpu_count(), len(todo) or 1))
    started = time.perf_counter()
    with _Progress(total=len(mine), done=len(mine) - len(todo), enabled=progress) as bar:
        if workers == 1:
            _init_worker(options, identity, bar.update, single_process=True)
            for task in todo:
                _prepare_file(task)
        else:
            queue = mp.get_context("spawn").Queue()
            bar.listen(queue)
            with mp.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(options, identity, queue, False)
            ) as pool:
                for _ in pool.imap_unordered(_prepare_file, todo):
                    pass
            bar.stop(queue)
    seconds = time.perf_counter() - started
    if n == 1:
        manifest = merge_manifests([options.out], options.out)
        manifest["prepare_seconds"] = seconds
        return manifest
    parts = [_load_part(options.out, idx) for idx, _, _ in mine]
    return {
        "shard": f"{i}/{n}",
        "files": len(parts),
        "documents": sum(p["documents"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "prepare_seconds": seconds,
    }


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_part(out: str, index: int) -> dict:
    with open(_part_path(out, index)) as f:
        return json.load(f)


def merge_manifests(dirs: Sequence[str], out: str) -> dict:
    """Combines the manifest parts found in `dirs` into `out/manifest.json` (shard paths relative to `out`).

    Raises ValueError, naming what to re-run, when parts disagree on the tokenizer, the text options or the number of
    input files (they come from runs over different inputs), or when input files are missing (the slices of a
    `--shard I/N` run that have not finished), left over or prepared twice.
    """
    parts = []
    for d in dirs:
        part_dir = os.path.join(d, "parts")
        if not os.path.isdir(part_dir):
            raise ValueError(f"{d} holds no parts/ directory: is it the --out of a `granite-jax prepare` run?")
        for name in sorted(os.listdir(part_dir)):
            if name.endswith(".json"):
                with open(os.path.join(part_dir, name)) as f:
                    part = json.load(f)
                part["shard"] = os.path.relpath(os.path.join(d, part["shard"]), out)
                parts.append(part)
    if not parts:
        raise ValueError(f"no manifest parts found in {', '.join(dirs)}: nothing was prepared yet")
    rerun = "re-run every `prepare --shard I/N` job with the same --input and options (each redoes only what differs)"
    for key in ("tokenizer", "text_field", "text_split", "inputs_total"):
        groups: dict[str, list[int]] = {}
        for p in parts:
            value = p.get(key)
            shown = f"sha256 {value['sha256'][:12]} eos {value['eos_token']!r}" if key == "tokenizer" else repr(value)
            groups.setdefault(shown, []).append(p["index"])
        if len(groups) > 1:
            found = "; ".join(f"{value} (parts {_list(sorted(idx))})" for value, idx in groups.items())
            raise ValueError(f"the parts disagree on {key}: {found}; they come from different prepare runs: {rerun}, "
                             f"then merge again")
    parts.sort(key=lambda p: (p["index"], p["input"]))
    total = parts[0]["inputs_total"]
    counts = Counter(p["index"] for p in parts)
    extra = sorted(k for k, c in counts.items() if not 0 <= k < total or c > 1)
    if extra:
        raise ValueError(f"parts {_list(extra)} lie outside the {total} input files or appear twice (in "
                         f"{', '.join(dirs)}); delete those directories' stale parts or {rerun}, then merge again")
    missing = sorted(set(range(total)) - set(counts))
    if missing:
        raise ValueError(
            f"{len(missing)} of {total} input files are not prepared yet (indices {_list(missing)}); wait for or "
            f"re-run the `prepare --shard I/N` jobs that own them (file k belongs to shard k % N), then merge again"
        )
    skipped: dict[str, int] = {}
    examples: list[dict] = []
    for p in parts:
        for reason, count in p["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        examples += p["skipped_examples"]
    manifest = {
        "format": MANIFEST_FORMAT,
        "documents": sum(p["documents"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "max_document_tokens": max(p["max_document_tokens"] for p in parts),
        "max_token_id": max(p["max_token_id"] for p in parts),
        "tokenizer": {**parts[0]["tokenizer"], "file": "tokenizer.json"},
        "eos_id": parts[0]["tokenizer"]["eos_id"],
        "dtype": parts[0]["tokenizer"]["dtype"],
        "text_field": parts[0]["text_field"],
        "text_split": parts[0].get("text_split"),
        "skipped": {
            "total": sum(skipped.values()),
            "counts": dict(sorted(skipped.items())),
            "reasons": {r: SKIP_REASONS[r] for r in sorted(skipped)},
            "examples": examples,
        },
        "files": [
            {"input": p["input"], "shard": p["shard"], "documents": p["documents"], "tokens": p["tokens"]}
            for p in parts
        ],
    }
    tok_src = os.path.join(dirs[0], "tokenizer.json")
    tok_dst = os.path.join(out, "tokenizer.json")
    if os.path.exists(tok_src) and os.path.abspath(tok_src) != os.path.abspath(tok_dst):
        shutil.copyfile(tok_src, tok_dst)
    _write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


def _list(indices: Sequence[int]) -> str:
    return ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")


class _Progress:
    """tqdm bar over files with documents and tokens/s; fed directly or from the workers' queue by a thread."""

    def __init__(self, *, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.docs = self.tokens = 0
        self.start = time.perf_counter()
        self._thread: threading.Thread | None = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="file", desc="prepare", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.close()

    def update(self, files: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.enabled:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"docs={self.docs:,} tokens={self.tokens:,} tok/s={rate:,.0f}", refresh=False)
            self.bar.update(files)

    def listen(self, queue) -> None:
        def drain():
            while (item := queue.get()) is not None:
                self.update(*item)

        self._thread = threading.Thread(target=drain, daemon=True)
        self._thread.start()

    def stop(self, queue) -> None:
        queue.put(None)
        if self._thread is not None:
            self._thread.join()
