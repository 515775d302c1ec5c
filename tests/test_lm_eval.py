"""The lm-eval model `granite_jax` scores the shipped tasks as lm-eval's own `hf` model does on the exported folder;
packed batches score as unpacked ones."""

import json
import os

import numpy as np
import pytest
from inference_helpers import CONFIGS, perturbed_model

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
from lm_eval.api.instance import Instance  # noqa: E402

from granite_jax import hf  # noqa: E402
from granite_jax.inference import tasks  # noqa: E402
from granite_jax.inference.lm_eval_model import GraniteJaxLM, pack_rows, row_length  # noqa: E402

MAX_LENGTH = 48  # the longer snippets take two rolling windows


def _jsonl(name):
    with open(os.path.join(tasks.TASK_DIR, name)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_pipelines.demo import train_tokenizer
    from tokenizers import Tokenizer

    tmp = tmp_path_factory.mktemp("lm_eval")
    choice, text = _jsonl("tiny_stdlib_choice.jsonl"), _jsonl("tiny_stdlib_text.jsonl")
    corpus = [d["context"] + c for d in choice for c in d["choices"]] + [d["text"] for d in text]
    train_tokenizer(corpus * 4, str(tmp / "tokenizer.json"), vocab_size=400)
    tokenizer = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    # a Mamba and an attention layer: packing must reset the SSD state and conv window, and mask attention
    model = perturbed_model(CONFIGS["hybrid_moe"].replace(num_hidden_layers=2, layer_types=("mamba", "attention"),
                                                          num_local_experts=0, num_experts_per_tok=0), seed=4,
                            scale=0.1)
    hf.save_pretrained(model, tmp / "hf")
    requests = [Instance("loglikelihood", {}, (d["context"], c), idx) for d in choice[:8]
                for idx, c in enumerate(d["choices"])]
    requests += [Instance("loglikelihood", {}, ("", choice[0]["choices"][0]), 0)]  # empty context: the prefix
    rolling = [Instance("loglikelihood_rolling", {}, (d["text"],), 0) for d in text]
    return dict(model=model, tokenizer=tokenizer, folder=tmp / "hf", tok_file=tmp / "tokenizer.json",
                requests=requests, rolling=rolling)


@pytest.mark.slow
def test_loglikelihoods_equal_lm_eval_hf_model(setup):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs the extra lm-eval[hf]")
    from lm_eval.models.huggingface import HFLM

    ours = GraniteJaxLM(setup["model"], setup["tokenizer"], batch_size=4, max_length=MAX_LENGTH,
                        prefix_token_id=0)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(setup["tok_file"]))
    ref = HFLM(pretrained=str(setup["folder"]), tokenizer=tok, batch_size=4, max_length=MAX_LENGTH,
               device="cpu", dtype="float32", prefix_token_id=0)
    assert [ours.tok_encode(r.args[0] + r.args[1]) for r in setup["requests"]] == \
        [ref.tok_encode(r.args[0] + r.args[1]) for r in setup["requests"]]
    got, want = ours.loglikelihood(setup["requests"]), ref.loglikelihood(setup["requests"])
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    rolling_got, rolling_want = ours.loglikelihood_rolling(setup["rolling"]), ref.loglikelihood_rolling(
        setup["rolling"])
    np.testing.assert_allclose(rolling_got, rolling_want, rtol=1e-4, atol=1e-4)

    # the same requests one per row: packing changes nothing
    unpacked = GraniteJaxLM(setup["model"], setup["tokenizer"], batch_size=4, max_length=MAX_LENGTH, pack=False,
                            prefix_token_id=0)
    np.testing.assert_allclose([g[0] for g in unpacked.loglikelihood(setup["requests"])], [g[0] for g in got],
                               rtol=1e-5, atol=1e-5)
    assert len(pack_rows([len(ours.tok_encode(r.args[0] + r.args[1])) for r in setup["requests"]],
                         MAX_LENGTH)) < len(setup["requests"]) / 3  # several requests share each row


def test_generate_until(setup):
    lm = GraniteJaxLM(setup["model"], setup["tokenizer"], batch_size=4, max_length=MAX_LENGTH,
                        prefix_token_id=0)
    request = Instance("generate_until", {}, ("def main(", {"until": ["\n"], "max_gen_toks": 6}), 0)
    out = lm.generate_until([request])[0]
    assert "\n" not in out
    setup["generated"] = out


def test_cli_eval_and_generate_on_a_run(setup, tmp_path, capsys):
    from granite_jax import checkpoint, cli

    checkpoint.save_model(setup["model"], str(tmp_path / "run"), step=3)
    common = ["--tokenizer", str(setup["tok_file"])]
    assert cli.main(["eval", str(tmp_path / "run"), "--tasks", "tiny_stdlib_choice", "--limit", "4",
                     "--batch-size", "4", "--max-length", str(MAX_LENGTH), "--output", str(tmp_path / "r.json"),
                     *common]) == 0
    assert 0.0 <= json.loads((tmp_path / "r.json").read_text())["tiny_stdlib_choice"]["acc"] <= 1.0
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path / "run"), "--prompt", "def main(", "--max-new-tokens", "6",
                     *common]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("def main(")
    if "generated" in setup:  # greedy, as generate_until: the same continuation up to its stop string
        assert printed[len("def main("):].startswith(setup["generated"])
    assert cli.main(["generate", str(tmp_path / "run"), "--step", "9", "--prompt", "x", *common]) == 2
    assert "no checkpoint for step 9" in capsys.readouterr().err


def test_pack_rows_fits_and_covers():
    lengths = [5, 17, 30, 2, 9, 31, 1, 16]
    rows = pack_rows(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
    assert len(rows) == 4  # 111 tokens in rows of 32


def test_row_length_shrinks_rows_for_few_requests_and_keeps_the_longest():
    assert row_length([5, 9, 3], batch_size=8, max_length=2048) == 16  # the floor
    assert row_length([40] * 80, batch_size=8, max_length=2048) == 512  # 400 tokens per row of one batch
    assert row_length([300, 2], batch_size=8, max_length=2048) == 512  # the longest request fits
    assert row_length([1500] * 64, batch_size=8, max_length=2048) == 2048  # never past max_length
    assert row_length([100] * 8, batch_size=8, max_length=100) == 100


def test_in_training_task_scores(setup):
    from granite_jax.evaluate import TaskEvaluator

    tasks = TaskEvaluator(lambda state: state["model"], ["tiny_stdlib_choice", "tiny_stdlib_text"],
                          str(setup["tok_file"]), limit=4, batch_size=4, max_length=MAX_LENGTH)
    scores = tasks({"model": setup["model"]})
    assert {"eval_tiny_stdlib_choice_acc", "eval_tiny_stdlib_choice_acc_norm",
            "eval_tiny_stdlib_text_bits_per_byte"} <= set(scores)
    assert 0.0 <= float(scores["eval_tiny_stdlib_choice_acc"]) <= 1.0
    assert float(scores["eval_tiny_stdlib_text_bits_per_byte"]) > 0
    with pytest.raises(FileNotFoundError, match="--tokenizer|tokenizer.json"):
        TaskEvaluator(lambda state: state, ["tiny_stdlib_choice"], None)
