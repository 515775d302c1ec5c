"""`prepare --engine ray`: the same bytes as the local engine, bad records counted alike, a killed worker retried."""

import os

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")

from test_data_prepare import _write_corpus, tokenizer_path  # noqa: E402,F401  (the corpus and fixture)

from data_pipelines.cli import prepare_main  # noqa: E402
from data_pipelines.engines.part import prepare_part  # noqa: E402
from data_pipelines.prepare import PrepareOptions, prepare  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One embedded 2-CPU Ray for the module (start-up costs seconds); prepare uses it rather than starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
    yield
    ray.shutdown()


def _tree(out):
    """{relative path: bytes} of every file in a prepared directory."""
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, out)] = f.read()
    return files


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tokenizer_path):  # noqa: F811
    root = tmp_path_factory.mktemp("ray")
    planted = _write_corpus(root / "raw")
    out = str(root / "local")
    manifest = prepare([str(root / "raw")], PrepareOptions(tokenizer_path, out), workers=1, progress=False)
    return root / "raw", out, manifest, planted


def test_ray_gives_the_local_bytes_and_counts_bad_records_alike(local_run, tokenizer_path, tmp_path,  # noqa: F811
                                                                capsys):
    raw, local_out, local_manifest, planted = local_run
    out = str(tmp_path / "ray")
    assert prepare_main(["--input", str(raw), "--tokenizer", tokenizer_path, "--out", out, "--engine", "ray",
                         "--workers", "2", "--no-progress"]) == 0
    assert '"skipped"' in capsys.readouterr().out
    ray_tree, local_tree = _tree(out), _tree(local_out)
    assert sorted(ray_tree) == sorted(local_tree) and len([p for p in ray_tree if p.startswith("shards")]) == 6
    assert ray_tree == local_tree  # shards, parts, manifest.json and tokenizer.json byte for byte
    assert local_manifest["skipped"]["counts"] == planted


def test_a_worker_killed_mid_task_is_retried_and_nothing_is_lost_or_doubled(local_run, tokenizer_path,  # noqa: F811
                                                                           tmp_path):
    raw, local_out, _, _ = local_run
    marker = str(tmp_path / "killed-once")

    def killed_on_first_attempt(task):
        if task.index == 0 and not os.path.exists(marker):  # a.jsonl: dies after its first batch of documents
            open(marker, "w").close()
            prepare_part(task, report=lambda files, docs, tokens: docs and os._exit(1))
        return prepare_part(task)

    out = str(tmp_path / "ray")
    prepare([str(raw)], PrepareOptions(tokenizer_path, out), workers=2, progress=False, engine="ray",
            task_fn=killed_on_first_attempt)
    assert os.path.exists(marker)  # the first attempt did run and die
    assert _tree(out) == _tree(local_out)  # the retry's shard replaced nothing twice, and no temporary is left


def test_a_task_out_of_retries_names_its_input_and_keeps_the_others(local_run, tokenizer_path, tmp_path):  # noqa: F811
    raw, _, _, _ = local_run

    def always_killed(task):
        if task.path.endswith("c.parquet"):
            os._exit(1)
        return prepare_part(task)

    out = str(tmp_path / "ray")
    with pytest.raises(RuntimeError, match=r"input 2 \(.*c\.parquet\) failed on Ray after up to 0 retries"):
        prepare([str(raw)], PrepareOptions(tokenizer_path, out), workers=1, progress=False, engine="ray",
                max_retries=0, task_fn=always_killed)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert sorted(os.listdir(os.path.join(out, "parts"))) == ["000000.json", "000001.json"]  # done before it
