"""The packed training stream: completeness, process sharding, determinism, resumption, mixture shares, stages."""

import json
import re
import tracemalloc
from collections import Counter

import numpy as np
import pytest

import data_pipelines as dp
from data_pipelines.prepare import synthetic_identity, write_token_documents


def _corpus(path, docs, *, shards=3, vocab_size=1000):
    """A prepared dir holding `docs` (id arrays without eos, eos = 0) split round-robin into `shards`."""
    write_token_documents(str(path), [docs[i::shards] for i in range(shards)], synthetic_identity(vocab_size))
    return str(path)


def _random_docs(n, *, max_len, low=1, high=1000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, rng.integers(1, max_len)) for _ in range(n)]


def _with_eos(docs):
    return [tuple(d.tolist()) + (0,) for d in docs]


def _segments(batches):
    """Per-row segment runs as (tokens, positions) tuples."""
    runs = []
    for b in batches:
        for tok, seg, pos in zip(b["tokens"], b["segment_ids"], b["positions"]):
            for s in range(1, seg.max() + 1):
                where = seg == s
                assert np.all(np.diff(np.flatnonzero(where)) == 1), "a segment must be contiguous"
                runs.append((tuple(tok[where].tolist()), tuple(pos[where].tolist())))
            last = np.flatnonzero(seg)[-1] + 1 if seg.any() else 0
            assert not seg[last:].any() and np.all(np.diff(seg[:last]) >= 0), "padding only at the row's end"
    return runs


def _cfg(*sources, **overrides):
    cfg = dp.default_data_config([{"name": n, "path": p, "weight": w} for n, p, w in sources])
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def short_docs():
    return _random_docs(400, max_len=90)


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory, short_docs):
    return _corpus(tmp_path_factory.mktemp("short"), short_docs)


def test_one_epoch_is_the_corpus_exactly(short_corpus, short_docs):
    cfg = _cfg(("a", short_corpus, 1.0), num_epochs=1)
    batches = list(dp.make_batches(cfg, batch_size=4, seq_len=128, seed=3))
    for b in batches:
        assert set(b) == {"tokens", "segment_ids", "positions"}
        assert all(v.shape == (4, 128) and v.dtype == np.int32 for v in b.values())
    runs = _segments(batches)
    assert Counter(t for t, _ in runs) == Counter(_with_eos(short_docs))
    assert all(p == tuple(range(len(t))) for t, p in runs), "positions restart at 0 for every document"
    total = sum(len(d) + 1 for d in short_docs)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == total


def test_two_processes_partition_the_corpus(short_corpus, short_docs):
    cfg = _cfg(("a", short_corpus, 1.0), num_epochs=1)
    per_process = [
        Counter(t for t, _ in _segments(dp.make_batches(cfg, batch_size=2, seq_len=128, seed=5, process_index=p,
                                                        process_count=2)))
        for p in range(2)
    ]
    assert not per_process[0] & per_process[1]
    assert per_process[0] + per_process[1] == Counter(_with_eos(short_docs))


def test_long_documents_continue_across_rows(tmp_path):
    # Document d's body is the constant d + 1, so every run names its document; positions give its offset.
    lengths = np.random.default_rng(1).integers(1, 400, 60)
    path = _corpus(tmp_path / "long", [np.full(n, d + 1) for d, n in enumerate(lengths)])
    covered = [np.zeros(n, int) for n in lengths]
    runs = _segments(dp.make_batches(_cfg(("a", path, 1.0), num_epochs=1), batch_size=3, seq_len=64, seed=0))
    for tokens, positions in runs:
        assert positions == tuple(range(positions[0], positions[0] + len(tokens)))
        body = [t for t in tokens if t != 0]
        if body:
            covered[body[0] - 1][positions[0] : positions[0] + len(body)] += 1
    assert all((c == 1).all() for c in covered), "every token of every document exactly once, at its offset"
    assert sum(t.count(0) for t, _ in runs) == len(lengths)
    restart = _cfg(("a", path, 1.0), num_epochs=1, continue_positions=False)
    runs = _segments(dp.make_batches(restart, batch_size=3, seq_len=64, seed=0))
    assert all(p == tuple(range(len(t))) for t, p in runs)


def test_same_seed_same_batches_and_other_seed_differs(short_corpus):
    cfg = _cfg(("a", short_corpus, 1.0))
    take = lambda seed: [b["tokens"] for _, b in zip(range(6), dp.make_batches(cfg, batch_size=4, seq_len=64,
                                                                                seed=seed))]
    first, again, other = take(0), take(0), take(1)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Sources whose token ids lie in disjoint ranges, so every token tells its source."""
    root = tmp_path_factory.mktemp("mix")
    ranges = {"web": (1, 300), "code": (300, 600), "math": (600, 1000)}
    return {
        name: (_corpus(root / name, _random_docs(300, max_len=700, low=lo, high=hi, seed=i)), (lo, hi))
        for i, (name, (lo, hi)) in enumerate(ranges.items())
    }


def _shares(batches, ranges):
    tokens = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    tokens = tokens[tokens > 0]  # eos belongs to every source; leave it out of the shares
    return {n: np.mean((tokens >= lo) & (tokens < hi)) for n, (lo, hi) in ranges.items()}


def test_mixture_token_shares_within_two_percent(three_sources):
    weights = {"web": 0.5, "code": 0.3, "math": 0.2}
    cfg = _cfg(*[(n, p, weights[n]) for n, (p, _) in three_sources.items()])
    batches = [b for _, b in zip(range(128), dp.make_batches(cfg, batch_size=8, seq_len=1024, seed=0))]  # ~1M tokens
    shares = _shares(batches, {n: r for n, (_, r) in three_sources.items()})
    for name, w in weights.items():
        assert abs(shares[name] - w) / w < 0.02, (name, shares[name], w)


def test_stages_switch_at_token_boundaries(three_sources):
    paths = {n: p for n, (p, _) in three_sources.items()}
    ranges = {n: r for n, (_, r) in three_sources.items()}
    cfg = _cfg(*[(n, p, 1.0) for n, p in paths.items()], pack_open_rows=2)
    cfg.stages = [
        {"tokens": 10 * 4 * 64, "seq_len": 64, "mixture": {"web": 1.0}},
        {"tokens": 5000, "seq_len": 128, "mixture": {"code": 1.0}},  # 5000 / (4 * 128) -> 10 steps (ceil)
        {"tokens": None, "seq_len": 256, "mixture": {"math": 1.0}},
    ]
    it = dp.make_batches(cfg, batch_size=4, seq_len=32, seed=0)
    batches = [next(it) for _ in range(25)]
    assert [b["tokens"].shape[1] for b in batches] == [64] * 10 + [128] * 10 + [256] * 5
    assert [it.schedule.at(s).index for s in range(25)] == [0] * 10 + [1] * 10 + [2] * 5
    assert it.stage.index == 2 and dp.stage_at(cfg, 19, batch_size=4, seq_len=32).index == 1
    assert _shares(batches[:10], ranges)["web"] == 1.0
    # What the packer holds at a switch (2 open rows of the old seq_len and the rest of a long document) is carried
    # into the next stage, not dropped; everything else in a stage comes from its own mixture.
    for old, new, steps, old_seq_len in (("web", "code", range(10, 20), 64), ("code", "math", range(20, 25), 128)):
        stage_tokens = np.concatenate([batches[s]["tokens"][batches[s]["segment_ids"] > 0] for s in steps])
        stage_tokens = stage_tokens[stage_tokens > 0]
        lo, hi = ranges[old]
        carried = int(((stage_tokens >= lo) & (stage_tokens < hi)).sum())
        assert 0 < carried <= 2 * old_seq_len + 700
        lo, hi = ranges[new]
        assert int(((stage_tokens >= lo) & (stage_tokens < hi)).sum()) == len(stage_tokens) - carried


def test_state_restores_the_exact_continuation(three_sources):
    cfg = _cfg(*[(n, p, w) for (n, (p, _)), w in zip(three_sources.items(), (0.6, 0.3, 0.1))])
    cfg.stages = [{"tokens": 6 * 2 * 256, "seq_len": 256}, {"tokens": None, "seq_len": 96}]
    kwargs = dict(batch_size=2, seq_len=128, seed=7)
    it = dp.make_batches(cfg, **kwargs)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as a checkpoint would
    expected = [next(it) for _ in range(6)]  # crosses the stage switch after step 6
    restored = dp.make_batches(cfg, **kwargs)
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(6))):
        assert all(np.array_equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="different stream.*seed: saved 7, now 8"):
        dp.make_batches(cfg, **{**kwargs, "seed": 8}).set_state(state)


def test_a_version_1_state_of_the_same_stream_still_resumes(three_sources):
    cfg = _cfg(*[(n, p, 1.0) for n, (p, _) in three_sources.items()])
    kwargs = dict(batch_size=2, seq_len=64, seed=3)
    it = dp.make_batches(cfg, **kwargs)
    for _ in range(3):
        next(it)
    state = {**it.get_state(), "version": 1, "fingerprint": it._version_1_fingerprint()}  # as older code saved it
    expected = [next(it) for _ in range(3)]
    restored = dp.make_batches(cfg, **kwargs)
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(3))):
        assert all(np.array_equal(want[k], got[k]) for k in want)
    with pytest.raises(dp.stream.StreamMismatch, match="version 1"):
        dp.make_batches(cfg, **{**kwargs, "seed": 4}).set_state(state)


@pytest.mark.parametrize("field, value", [("shuffle", False), ("num_epochs", 3), ("continue_positions", False),
                                          ("pad_id", 5), ("stages[0].mixture", {"web": 1.0})])
def test_state_from_other_settings_is_refused_by_name(three_sources, field, value):
    cfg = _cfg(*[(n, p, 1.0) for n, (p, _) in three_sources.items()])
    cfg.stages = [{"tokens": 4 * 2 * 64}, {"tokens": None}]
    kwargs = dict(batch_size=2, seq_len=64, seed=0)
    it = dp.make_batches(cfg, **kwargs)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    other = cfg.copy_and_resolve_references()
    if field == "stages[0].mixture":
        other.stages = [{"tokens": 4 * 2 * 64, "mixture": value}, {"tokens": None}]
    else:
        setattr(other, field, value)
    named = rf"different stream \({re.escape(field)}: saved .*, now {re.escape(repr(value))}\)"
    with pytest.raises(ValueError, match=named):
        dp.make_batches(other, **kwargs).set_state(state)


def test_packing_at_512k_keeps_memory_to_a_few_rows(tmp_path):
    seq_len = 524_288
    rng = np.random.default_rng(0)
    lengths = [900_000, 300_000, 200_000] + list(rng.integers(1_000, 120_000, 450))  # ~29M tokens
    path = _corpus(tmp_path / "long", [rng.integers(1, 60000, n, dtype=np.uint16) for n in lengths], shards=2,
                   vocab_size=60000)
    cfg = _cfg(("a", path, 1.0), num_epochs=1, read_block_tokens=seq_len)
    make_batches = dp.make_batches  # imports grain now: run alone, the test would otherwise trace ~50 MB of imports
    tracemalloc.start()
    n_tokens = 0
    for b in make_batches(cfg, batch_size=1, seq_len=seq_len, seed=0):
        assert b["tokens"].shape == (1, seq_len)
        n_tokens += int((b["segment_ids"] > 0).sum())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    row_bytes = seq_len * 3 * 4
    assert n_tokens == sum(lengths) + len(lengths)
    assert peak < 6 * row_bytes and peak < 4 * n_tokens / 3, (peak, row_bytes)  # a few rows, well under the corpus


def test_bad_configuration_is_explained(short_corpus, tmp_path):
    kw = dict(batch_size=2, seq_len=64, seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        dp.make_batches(_cfg(("a", str(tmp_path / "nowhere"), 1.0)), **kw)
    with pytest.raises(ValueError, match="sum to 0"):
        dp.make_batches(_cfg(("a", short_corpus, 0.0)), **kw)
    with pytest.raises(ValueError, match="seq_len=1"):
        dp.make_batches(_cfg(("a", short_corpus, 1.0)), batch_size=2, seq_len=1, seed=0)
    with pytest.raises(ValueError, match="vocab_size is 500"):
        dp.make_batches(_cfg(("a", short_corpus, 1.0)), **kw, vocab_size=500)
    with pytest.raises(ValueError, match="unknown sources"):
        dp.make_batches(_cfg(("a", short_corpus, 1.0), stages=[{"tokens": None, "mixture": {"b": 1.0}}]), **kw)
    with pytest.raises(ValueError, match=r"stages\[0\]: unknown keys \['seq_length'\]; the allowed keys are"):
        dp.make_batches(_cfg(("a", short_corpus, 1.0), stages=[{"tokens": 1000, "seq_length": 32}, {"tokens": None}]),
                        **kw)
    with pytest.raises(ValueError, match=r"stages\[0\]: unknown keys \['mixtures'\]"):
        dp.make_batches(_cfg(("a", short_corpus, 1.0), stages=[{"tokens": None, "mixtures": {"a": 1.0}}]), **kw)
    with pytest.raises(ValueError, match=r"sources\[0\]: unknown keys \['weigth'\]"):
        dp.make_batches(dp.default_data_config([{"name": "a", "path": short_corpus, "weigth": 0.5}]), **kw)
    with pytest.raises(ValueError, match=r"weights \{'a': inf\} are not finite"):
        dp.make_batches(_cfg(("a", short_corpus, float("inf")), ("b", short_corpus, 1.0)), **kw)
    with pytest.raises(ValueError, match="no manifest.json"):
        dp.make_batches(_cfg(("a", str(tmp_path), 1.0)), **kw)


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_minimal_data_config_takes_the_documented_defaults(short_corpus, as_dict):
    import ml_collections

    minimal = {"sources": [{"name": "a", "path": short_corpus, "weight": 1.0}], "shuffle": True, "num_epochs": 1}
    cfg = minimal if as_dict else ml_collections.ConfigDict(minimal)
    kw = dict(batch_size=4, seq_len=64, seed=3)
    got = list(dp.make_batches(cfg, **kw))
    want = list(dp.make_batches(_cfg(("a", short_corpus, 1.0), num_epochs=1), **kw))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])
    assert dp.stage_at(cfg, 0, **{k: kw[k] for k in ("batch_size", "seq_len")}).num_steps is None


def test_a_data_config_missing_a_required_key_or_holding_an_unknown_one_names_it(short_corpus):
    import ml_collections

    kw = dict(batch_size=2, seq_len=32, seed=0)
    with pytest.raises(ValueError, match="data config has no 'sources'"):
        dp.make_batches(ml_collections.ConfigDict({"shuffle": True, "num_epochs": 1}), **kw)
    with pytest.raises(ValueError, match=r"data config: unknown keys \['num_epoch'\]"):
        dp.make_batches({"sources": [{"name": "a", "path": short_corpus, "weight": 1.0}], "num_epoch": 1}, **kw)


def test_training_validates_a_minimal_data_config(short_corpus):
    import jax
    import ml_collections

    from granite_jax import train

    cfg = train.default_config()
    cfg.data = ml_collections.ConfigDict({"sources": [{"name": "a", "path": short_corpus, "weight": 1.0}],
                                          "shuffle": True, "num_epochs": 1})
    train.validate(cfg, n_devices=jax.device_count())  # the data stages' checks read optional keys by default
