"""Prepare: malformed records are counted per reason, shards round-trip, re-runs skip, split runs merge; demo corpus."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from tokenizers import Tokenizer

from data_pipelines.cli import merge_main, prepare_main
from data_pipelines.demo import build_demo, train_tokenizer
from data_pipelines.prepare import PrepareOptions, prepare

GOOD = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(GOOD * 5, path, vocab_size=300)
    return path


def _write_corpus(root):
    """Good documents plus planted malformed records; returns the planted count per reason."""
    root.mkdir(exist_ok=True)
    lines = [json.dumps({"text": t}).encode() for t in GOOD[:20]]
    lines[3:3] = [b'{"text": "unterminated', b"not json at all"]  # bad_json x2
    lines.insert(8, json.dumps({"body": "no text field"}).encode())  # missing_field
    lines.insert(9, json.dumps({"text": None}).encode())  # missing_field
    lines.insert(10, json.dumps({"text": 42}).encode())  # not_string
    lines.insert(11, json.dumps({"text": "  \n "}).encode())  # empty_text
    lines.insert(12, b'{"text": "caf\xe9"}')  # invalid_utf8 (latin-1 byte)
    lines.insert(13, json.dumps(["a", "list"]).encode())  # not_object
    lines.insert(14, json.dumps({"text": "lone \ud800 surrogate"}).encode())  # invalid_utf8 (in JSON escapes)
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")
    with gzip.open(root / "b.jsonl.gz", "wb") as f:
        f.write(b"\n".join(json.dumps({"text": t}).encode() for t in GOOD[20:30]) + b"\n{bad\n")  # bad_json
    texts = GOOD[30:38] + [None, ""]  # missing_field, empty_text
    pq.write_table(pa.table({"text": texts}), root / "c.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "d.parquet")  # not_string x3
    (root / "e.txt").write_text("\n\n".join(GOOD[38:]))  # one document per file
    (root / "f.txt").write_bytes(b"\xff\xfe broken")  # invalid_utf8
    return {"bad_json": 3, "missing_field": 3, "not_string": 4, "empty_text": 2, "invalid_utf8": 3, "not_object": 1}


def _documents(out, manifest):
    docs = []
    for f in manifest["files"]:
        reader = ArrayRecordReader(os.path.join(out, f["shard"]))
        docs += [np.frombuffer(r, manifest["dtype"]).tolist() for r in reader.read_all()]
        reader.close()
    return docs


def test_malformed_records_are_counted_per_reason(tmp_path, tokenizer_path):
    planted = _write_corpus(tmp_path / "raw")
    out = str(tmp_path / "out")
    manifest = prepare([str(tmp_path / "raw")], PrepareOptions(tokenizer_path, out), workers=1, progress=False)
    assert manifest["skipped"]["counts"] == planted
    assert manifest["skipped"]["total"] == sum(planted.values())
    examples = {(os.path.basename(e["file"]), e["line"], e["reason"]) for e in manifest["skipped"]["examples"]}
    assert {("a.jsonl", 4, "bad_json"), ("a.jsonl", 14, "not_object"), ("b.jsonl.gz", 11, "bad_json"),
            ("c.parquet", 9, "missing_field"), ("f.txt", 1, "invalid_utf8")} <= examples
    # Every good document is there exactly once as encode(text) + [eos], eos recorded in the manifest.
    tok = Tokenizer.from_file(tokenizer_path)
    eos = manifest["eos_id"]
    assert eos == tok.token_to_id("<|end_of_text|>")
    expected = [tok.encode(t, add_special_tokens=False).ids + [eos] for t in GOOD[:38]]
    expected.append(tok.encode("\n\n".join(GOOD[38:]), add_special_tokens=False).ids + [eos])
    assert sorted(_documents(out, manifest)) == sorted(expected)
    assert manifest["documents"] == len(expected) and manifest["tokens"] == sum(map(len, expected))
    assert len(manifest["files"]) == 6 and manifest["tokenizer"]["sha256"]


def test_rerun_skips_finished_shards_and_redoes_changed_inputs(tmp_path, tokenizer_path):
    _write_corpus(tmp_path / "raw")
    out = tmp_path / "out"
    options = PrepareOptions(tokenizer_path, str(out))
    first = prepare([str(tmp_path / "raw")], options, workers=1, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    (tmp_path / "raw" / "e.txt").write_text("A changed document.")
    second = prepare([str(tmp_path / "raw")], options, workers=1, progress=False)
    changed = {p.name for p in (out / "shards").iterdir() if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {"000004.arrayrecord"}  # e.txt is input 4 of the sorted list
    assert second["documents"] == first["documents"] and second["skipped"] == first["skipped"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("change", [{"text_field": "body"}, {"text_split": "line"}, {"eos_token": "<|pad|>"}])
def test_rerun_with_a_changed_option_redoes_the_parts(tmp_path, tokenizer_path, change):
    _write_corpus(tmp_path / "raw")
    raw, out = [str(tmp_path / "raw")], str(tmp_path / "out")
    before = sorted(_documents(out, prepare(raw, PrepareOptions(tokenizer_path, out), workers=1, progress=False)))
    options = PrepareOptions(tokenizer_path, out, **change)
    after = prepare(raw, options, workers=1, progress=False)
    fresh = prepare(raw, PrepareOptions(tokenizer_path, str(tmp_path / "fresh"), **change), workers=1, progress=False)
    assert sorted(_documents(out, after)) == sorted(_documents(str(tmp_path / "fresh"), fresh)) != before
    assert (after["text_field"], after["text_split"], after["tokenizer"]["eos_token"]) == (
        options.text_field, options.text_split, options.eos_token)


def test_rerun_over_fewer_inputs_drops_the_others(tmp_path, tokenizer_path):
    _write_corpus(tmp_path / "raw")
    out = tmp_path / "out"
    prepare([str(tmp_path / "raw")], PrepareOptions(tokenizer_path, str(out)), workers=1, progress=False)
    kept = [str(tmp_path / "raw" / "a.jsonl"), str(tmp_path / "raw" / "c.parquet")]
    manifest = prepare(kept, PrepareOptions(tokenizer_path, str(out)), workers=1, progress=False)
    assert [f["input"] for f in manifest["files"]] == kept
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["000000.json", "000001.json"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.arrayrecord", "000001.arrayrecord"]


def test_rerun_after_a_kill_between_shard_and_part_keeps_no_wrong_data(tmp_path, tokenizer_path, monkeypatch):
    import data_pipelines.shards as shards_module

    _write_corpus(tmp_path / "raw")
    raw, out = [str(tmp_path / "raw")], str(tmp_path / "out")
    first = prepare(raw, PrepareOptions(tokenizer_path, out), workers=1, progress=False)
    first_docs = sorted(_documents(out, first))
    write_json = shards_module.write_json

    def killed_before_parts(path, obj):
        if os.sep + "parts" + os.sep in path:
            raise KeyboardInterrupt("killed after the shard's rename, before its part")
        write_json(path, obj)

    monkeypatch.setattr(shards_module, "write_json", killed_before_parts)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw, PrepareOptions(tokenizer_path, out, text_field="body"), workers=1, progress=False)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # the old one no longer matches the shards
    again = prepare(raw, PrepareOptions(tokenizer_path, out), workers=1, progress=False)
    assert sorted(_documents(out, again)) == first_docs
    assert again["skipped"] == first["skipped"]


def test_split_run_merges_to_the_whole(tmp_path, tokenizer_path):
    _write_corpus(tmp_path / "raw")
    whole = prepare([str(tmp_path / "raw")], PrepareOptions(tokenizer_path, str(tmp_path / "whole")), workers=1,
                    progress=False)
    out = str(tmp_path / "split")
    args = ["--input", str(tmp_path / "raw"), "--tokenizer", tokenizer_path, "--out", out, "--no-progress",
            "--workers", "1"]
    assert prepare_main(args + ["--shard", "1/2"]) == 0
    with pytest.raises(ValueError, match="not prepared yet"):
        from data_pipelines.prepare import merge_manifests

        merge_manifests([out], out)
    assert prepare_main(args + ["--shard", "0/2"]) == 0
    assert merge_main([out]) == 0
    merged = json.load(open(os.path.join(out, "manifest.json")))
    for key in ("documents", "tokens", "skipped", "eos_id", "tokenizer"):
        assert merged[key] == whole[key], key
    assert sorted(_documents(out, merged)) == sorted(_documents(str(tmp_path / "whole"), whole))


def test_merge_refuses_parts_of_different_input_lists(tmp_path, tokenizer_path):
    from data_pipelines.prepare import merge_manifests

    _write_corpus(tmp_path / "raw")
    files = [str(tmp_path / "raw" / name) for name in ("a.jsonl", "b.jsonl.gz", "c.parquet")]
    out = str(tmp_path / "out")
    prepare(files[::2], PrepareOptions(tokenizer_path, out), workers=1, progress=False)  # a, c: 2 inputs
    prepare(files, PrepareOptions(tokenizer_path, out), workers=1, shard=(1, 2), progress=False)  # b is input 1 of 3
    with pytest.raises(ValueError, match=r"disagree on inputs_total: 2 \(parts 0\); 3 \(parts 1\)"):
        merge_manifests([out], out)
    prepare(files, PrepareOptions(tokenizer_path, out), workers=1, shard=(0, 2), progress=False)
    assert [f["input"] for f in merge_manifests([out], out)["files"]] == files
    twice = str(tmp_path / "twice")
    prepare(files, PrepareOptions(tokenizer_path, twice), workers=1, shard=(1, 2), progress=False)
    with pytest.raises(ValueError, match=r"parts 1 lie outside the 3 input files or appear twice"):
        merge_manifests([out, twice], out)


def test_missing_eos_token_or_tokenizer_is_a_clear_error(tmp_path, tokenizer_path, capsys):
    _write_corpus(tmp_path / "raw")
    with pytest.raises(ValueError, match="--eos-token"):
        prepare([str(tmp_path / "raw")], PrepareOptions(tokenizer_path, str(tmp_path / "o"), eos_token="</s>"),
                workers=1, progress=False)
    assert prepare_main(["--input", str(tmp_path / "nothing*.jsonl"), "--tokenizer", tokenizer_path,
                         "--out", str(tmp_path / "o")]) == 2
    nope = str(tmp_path / "nope.json")
    assert prepare_main(["--input", str(tmp_path / "raw"), "--tokenizer", nope, "--out", str(tmp_path / "o")]) == 2
    assert f"--tokenizer {nope!r} does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        prepare([str(tmp_path / "raw")], PrepareOptions(str(tmp_path / "bad.json"), str(tmp_path / "o")), workers=1,
                progress=False)


def test_two_workers_give_the_same_shards(tmp_path, tokenizer_path):
    _write_corpus(tmp_path / "raw")
    one = prepare([str(tmp_path / "raw")], PrepareOptions(tokenizer_path, str(tmp_path / "one")), workers=1,
                  progress=False)
    two = prepare([str(tmp_path / "raw")], PrepareOptions(tokenizer_path, str(tmp_path / "two")), workers=2,
                  progress=False)
    assert _documents(str(tmp_path / "one"), one) == _documents(str(tmp_path / "two"), two)


def test_demo_corpus_builds_and_streams(tmp_path):
    import data_pipelines as dp

    out = str(tmp_path / "demo")
    manifest = build_demo(out, max_bytes=1 << 20, workers=1, progress=False)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert tok.token_to_id("<|end_of_text|>") == manifest["eos_id"] and tok.token_to_id("<|pad|>") is not None
    assert manifest["documents"] > 10 and manifest["tokens"] > 100_000 and manifest["skipped"]["total"] == 0
    batch = next(dp.make_batches(dp.single_source_config(out), batch_size=2, seq_len=256, seed=0,
                                 vocab_size=tok.get_vocab_size()))
    assert batch["tokens"].shape == (2, 256) and (batch["segment_ids"] > 0).all()


def test_demo_corpus_holds_out_an_eval_split(tmp_path):
    import data_pipelines as dp

    def sources(directory):
        names = []
        for k in range(4):
            with open(os.path.join(directory, "raw", f"stdlib-{k}.jsonl")) as f:
                names += [json.loads(line)["source"] for line in f]
        return names

    out = str(tmp_path / "demo")
    train_manifest = build_demo(out, max_bytes=1 << 20, workers=1, progress=False, eval_every=4)
    with open(os.path.join(out, "eval", "manifest.json")) as f:
        eval_manifest = json.load(f)
    train_docs, eval_docs = sources(out), sources(os.path.join(out, "eval"))
    assert not set(train_docs) & set(eval_docs) and len(eval_docs) == (len(train_docs) + len(eval_docs)) // 4
    assert eval_manifest["documents"] == len(eval_docs) and train_manifest["documents"] == len(train_docs)
    assert eval_manifest["tokenizer"]["sha256"] == train_manifest["tokenizer"]["sha256"]
    batch = next(dp.make_batches(dp.single_source_config(os.path.join(out, "eval"), num_epochs=1), batch_size=2,
                                 seq_len=64, seed=0))
    assert batch["tokens"].shape == (2, 64)
    assert prepare_main(["--demo", "--out", str(tmp_path / "plain"), "--demo-eval-every", "0", "--workers", "1",
                         "--no-progress"]) == 0
    assert not os.path.exists(tmp_path / "plain" / "eval")


def test_an_unknown_engine_or_a_bad_worker_count_is_a_clear_error(tmp_path, tokenizer_path, capsys):
    _write_corpus(tmp_path / "raw")
    options = PrepareOptions(tokenizer_path, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--engine 'spark': expected one of local, ray"):
        prepare([str(tmp_path / "raw")], options, engine="spark")
    with pytest.raises(ValueError, match="--workers 0: expected a positive count"):
        prepare([str(tmp_path / "raw")], options, workers=0)
    with pytest.raises(SystemExit):
        prepare_main(["--input", str(tmp_path / "raw"), "--tokenizer", tokenizer_path, "--out", str(tmp_path / "o"),
                      "--ray-address", "auto"])
    assert "--ray-address needs --engine ray" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--from-dpk reads the Parquet files"):
        prepare([str(tmp_path / "raw" / "a.jsonl")], PrepareOptions(tokenizer_path, str(tmp_path / "o"), from_dpk=True))
