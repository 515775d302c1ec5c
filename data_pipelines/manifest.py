"""The bookkeeping files of a prepared directory: manifest parts (`DIR/parts/000042.json`, one per shard, its done
marker) and their merge into `DIR/manifest.json`. Every file is written to a temporary name and renamed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections import Counter
from collections.abc import Sequence

from data_pipelines.formats import SKIP_REASONS

MANIFEST_FORMAT = "granite-jax/tokens-v1"


def temporary_name(path: str) -> str:
    """A name beside `path` that no other process writes, on any node sharing the filesystem (a Ray retry may run
    while the attempt it replaces still lives on another node)."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def write_json(path: str, obj) -> None:
    """Writes `obj` to `path` atomically (temporary name, then rename)."""
    tmp = temporary_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def part_path(out: str, index: int) -> str:
    return os.path.join(out, "parts", f"{index:06d}.json")


def shard_rel(index: int) -> str:
    return f"shards/{index:06d}.arrayrecord"


def load_part(out: str, index: int) -> dict:
    with open(part_path(out, index)) as f:
        return json.load(f)


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # another --shard job sharing the directory may be faster
        os.remove(path)


def part_is_current(out: str, index: int, path: str, identity: dict, settings: dict) -> bool:
    """Whether part `index` was made from input `path` as it is now, with this tokenizer and these settings."""
    try:
        part = load_part(out, index)
        stat = os.stat(path)
    except (OSError, ValueError):
        return False
    expected = {"input": path, "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns, "tokenizer": identity,
                **settings}
    return all(part.get(k) == v for k, v in expected.items()) and os.path.exists(os.path.join(out, part["shard"]))


def stale_parts(out: str, inputs: Sequence[str], owns) -> list[int]:
    """Indices of the parts this run `owns(index)` that belong to no current input: left from a run over other files."""
    stale = []
    for name in sorted(os.listdir(os.path.join(out, "parts"))):
        stem = name.removesuffix(".json")
        if name == stem or not stem.isdigit() or not owns(int(stem)):
            continue
        index = int(stem)
        try:
            current = index < len(inputs) and load_part(out, index).get("input") == inputs[index]
        except (OSError, ValueError):
            current = False
        if not current:
            stale.append(index)
    return stale


def invalidate(out: str, stale: Sequence[int]) -> None:
    """Before a run changes anything: deletes manifest.json (a run killed midway leaves none rather than a wrong one),
    then each stale part before its shard."""
    remove(os.path.join(out, "manifest.json"))
    for index in stale:
        remove(part_path(out, index))
        remove(os.path.join(out, shard_rel(index)))


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
    for key in ("tokenizer", "text_field", "text_split", "input_kind", "inputs_total"):
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
        **({"input_kind": parts[0]["input_kind"]} if parts[0].get("input_kind") else {}),
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
    write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


def _list(indices: Sequence[int]) -> str:
    return ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")
