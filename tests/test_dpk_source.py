"""Data Prep Kit interop: `prepare --from-dpk` reads the Parquet output of DPK's tokenization transform (run for real
here), and the result mixes, packs, covers an epoch exactly once and resumes exactly like any prepared source."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_stream import _segments
from tokenizers import Tokenizer

import data_pipelines as dp
from data_pipelines.cli import prepare_main
from data_pipelines.demo import train_tokenizer
from data_pipelines.prepare import PrepareOptions, prepare

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, rng.integers(3, 60))) for i in range(n)]


def _run_dpk_tokenization(tok_dir, in_dir, out_dir, tok):
    """DPK's own tokenization transform over in_dir; where data-prep-toolkit-transforms is not installed, a pyarrow
    file of the layout it writes (tokens, document_id, document_length, token_count; empty documents dropped)."""
    try:
        from dpk_tokenization.runtime import Tokenization
    except ImportError as e:
        print(f"data-prep-toolkit-transforms[tokenization] is not installed ({e}): writing its layout with pyarrow")
        os.makedirs(out_dir)
        for name in sorted(os.listdir(in_dir)):
            t = pq.read_table(os.path.join(in_dir, name)).to_pylist()
            rows = [r for r in t if r["contents"]]
            ids = [tok.encode(r["contents"]).ids for r in rows]
            pq.write_table(pa.table({"tokens": ids, "document_id": [r["document_id"] for r in rows],
                                     "document_length": [len(r["contents"]) for r in rows],
                                     "token_count": [len(i) for i in ids]}), os.path.join(out_dir, name))
        return
    assert Tokenization(input_folder=in_dir, output_folder=out_dir, tkn_tokenizer=tok_dir).transform() == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(dpk prepared dir, text prepared dir, {document_id: token ids} of the DPK output, tokenizer.json)."""
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("dpk")
    tok_json = str(root / "tokenizer.json")
    train_tokenizer(_texts(200, 99), tok_json, vocab_size=400)
    PreTrainedTokenizerFast(tokenizer_file=tok_json, eos_token="<|end_of_text|>").save_pretrained(root / "hf")
    tok = Tokenizer.from_file(tok_json)
    (root / "raw").mkdir()
    for k in range(3):
        texts = _texts(40, k) + ([""] if k == 1 else [])  # DPK drops the empty document
        ids = [f"f{k}-{i}" for i in range(len(texts))]
        pq.write_table(pa.table({"document_id": ids, "contents": texts}), root / "raw" / f"part{k}.parquet")
    _run_dpk_tokenization(str(root / "hf"), str(root / "raw"), str(root / "tokenized"), tok)
    dpk_docs = {}
    for name in sorted(os.listdir(root / "tokenized")):
        if name.endswith(".parquet"):
            for r in pq.read_table(root / "tokenized" / name).to_pylist():
                dpk_docs[r["document_id"]] = r["tokens"]
    assert len(dpk_docs) == 120
    raw = {r["document_id"]: r["contents"] for k in range(3) for r in
           pq.read_table(root / "raw" / f"part{k}.parquet").to_pylist()}
    assert all(dpk_docs[d] == tok.encode(raw[d]).ids for d in dpk_docs)  # the transform wrote our tokenizer's ids
    # A planted file of another tokenizer's ids: counted, not trained on.
    pq.write_table(pa.table({"tokens": [[1, 2, 5000], [3, 4]], "document_id": ["x0", "x1"]}),
                   root / "tokenized" / "zz_foreign.parquet")
    assert prepare_main(["--from-dpk", "--input", str(root / "tokenized"), "--tokenizer", tok_json,
                         "--out", str(root / "dpk_out"), "--no-progress"]) == 0
    (root / "text").mkdir()
    (root / "text" / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _texts(60, 7)))
    prepare([str(root / "text")], PrepareOptions(tok_json, str(root / "text_out")), workers=1, progress=False)
    return str(root / "dpk_out"), str(root / "text_out"), dpk_docs, tok_json


def test_from_dpk_keeps_the_transforms_documents_and_counts_foreign_ids(corpus):
    dpk_out, _, dpk_docs, tok_json = corpus
    with open(os.path.join(dpk_out, "manifest.json")) as f:
        manifest = json.load(f)
    eos = Tokenizer.from_file(tok_json).token_to_id("<|end_of_text|>")
    assert manifest["input_kind"] == "dpk-tokens" and manifest["eos_id"] == eos
    assert manifest["documents"] == len(dpk_docs) + 1  # the foreign file's in-range row stays
    assert manifest["skipped"]["counts"] == {"bad_token_id": 1}
    assert manifest["tokens"] == sum(len(t) + 1 for t in dpk_docs.values()) + 3
    assert [os.path.basename(f["input"]) for f in manifest["files"]] == [
        "part0.parquet", "part1.parquet", "part2.parquet", "zz_foreign.parquet"]  # metadata.json is not an input


def test_one_epoch_of_a_dpk_source_is_every_document_once(corpus):
    dpk_out, _, dpk_docs, tok_json = corpus
    eos = Tokenizer.from_file(tok_json).token_to_id("<|end_of_text|>")
    cfg = {"sources": [{"name": "dpk", "path": dpk_out, "weight": 1.0}], "shuffle": True, "num_epochs": 1}
    with open(os.path.join(dpk_out, "manifest.json")) as f:
        assert json.load(f)["max_document_tokens"] <= 256  # so every document is packed whole into one segment
    runs = [toks for toks, _ in _segments(dp.make_batches(cfg, batch_size=2, seq_len=256, seed=5))]
    assert all(run[-1] == eos for run in runs)
    docs = [run[:-1] for run in runs]
    expected = {tuple(t): d for d, t in dpk_docs.items()}
    expected[(3, 4)] = "x1"
    assert sorted(docs) == sorted(expected)
    assert sorted(expected[d] for d in docs) == sorted(expected.values())  # every document id exactly once


def test_dpk_and_text_sources_mix_pack_and_resume_exactly(corpus):
    dpk_out, text_out, _, _ = corpus
    cfg = dp.default_data_config([{"name": "dpk", "path": dpk_out, "weight": 0.7},
                                  {"name": "text", "path": text_out, "weight": 0.3}])
    kw = dict(batch_size=2, seq_len=48, seed=1)
    full = dp.make_batches(cfg, **kw)
    batches = [next(full) for _ in range(12)]
    assert all((b["segment_ids"] > 0).mean() > 0.9 for b in batches[:-1])  # packed, not one document a row
    again = dp.make_batches(cfg, **kw)
    for _ in range(5):
        next(again)
    state = json.loads(json.dumps(again.get_state()))
    resumed = dp.make_batches(cfg, **kw)
    resumed.set_state(state)
    for want in batches[5:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    taken = resumed.get_state()["taken"]
    assert taken[0] > 0 and taken[1] > 0 and 0.6 < taken[0] / sum(taken) < 0.8
