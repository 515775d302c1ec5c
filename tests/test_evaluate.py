"""Evaluation during training: the eval loss is the token-weighted next-token CE of the fixed eval batches, the same
at every call; the `eval` config section is validated with messages naming the key."""

import jax
import numpy as np
import pytest
from flax import nnx

import data_pipelines as dp
from granite_jax import evaluate, optim, sharding, train, train_step
from granite_jax.config import preset
from granite_jax.train_step import cross_entropy_sum, next_token_targets

from test_train import VOCAB, write_corpus


def _run_config(corpus):
    cfg = train.default_config()
    cfg.model.preset = "debug-hybrid-moe"
    cfg.model.vocab_size = VOCAB
    cfg.train.update(dict(steps=4, batch_size=4, seq_len=32, compute_dtype="float32"))
    cfg.schedule.warmup_steps = 1
    if "eval" not in cfg:
        cfg.eval = evaluate.default_eval_config()
    cfg.eval.update(dict(every_steps=2, num_batches=3))
    cfg.eval.data = dp.single_source_config(corpus, num_epochs=1, shuffle=False)
    return cfg


@pytest.mark.slow
def test_eval_loss_is_the_mean_ce_of_fixed_batches(tmp_path):
    cfg = _run_config(write_corpus(tmp_path / "corpus"))
    model_cfg = preset("debug-hybrid-moe", vocab_size=VOCAB)
    tx, _ = optim.make_optimizer(cfg.optimizer, cfg.schedule, total_steps=4, tokens_per_step=128)
    mesh = sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
    graphdef, abstract = train_step.abstract_state(model_cfg, tx)
    _, state = train_step.init_state(model_cfg, tx, mesh, seed=0)
    evaluator = evaluate.Evaluator.from_config(cfg, model_cfg, graphdef, mesh, abstract_state=abstract)
    assert [evaluator.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    first, second = (jax.device_get(evaluator(state)) for _ in range(2))
    assert first == second

    model, _ = nnx.merge(graphdef, nnx.State({0: state["params"], 1: state["opt"]}))
    model_graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, b: nnx.merge(model_graphdef, p)(b["tokens"], segment_ids=b["segment_ids"],
                                                               positions=b["positions"]))
    ce, n = 0.0, 0.0
    for batch in evaluate.eval_batches(cfg.eval, batch_size=4, seq_len=32, seed=0):
        logits = forward(params, batch)
        targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
        ce, n = ce + float(cross_entropy_sum(logits, targets, weights)), n + float(weights.sum())
    assert float(first["eval_tokens"]) == n and n > 0
    np.testing.assert_allclose(float(first["eval_loss"]), ce / n, rtol=1e-5)
    offline = evaluate.evaluate_model(model, evaluate.eval_batches(cfg.eval, batch_size=4, seq_len=32, seed=0))
    np.testing.assert_allclose(offline["eval_loss"], ce / n, rtol=1e-5)


def test_eval_off_and_config_errors(tmp_path):
    cfg = _run_config(write_corpus(tmp_path / "corpus"))
    cfg.eval.every_steps = 0
    assert evaluate.Evaluator.from_config(cfg, None, None, None, abstract_state={}) is None
    cfg.eval.every_steps = 5
    cfg.eval.data = None
    with pytest.raises(ValueError, match="eval.every_steps=5 but eval.data is None"):
        evaluate.validate_eval_config(cfg)
    cfg.eval.num_batches = 0
    with pytest.raises(ValueError, match=r"eval.num_batches=0: must be an integer >= 1"):
        evaluate.validate_eval_config(cfg)
