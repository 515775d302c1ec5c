"""Schedules against hand formulas, the weight-decay mask, LR multipliers, clipping, config errors, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from granite_jax import optim


def sched(**kw):
    cfg = optim.default_schedule_config()
    cfg.update(kw)
    return cfg


def lr_at(schedule, step):
    return float(schedule(step))


# Schedules -------------------------------------------------------------------------------------------------------

def test_warmup_cosine():
    f = optim.make_schedule(sched(name="cosine", lr=1e-3, warmup_steps=10, min_lr_ratio=0.1),
                            total_steps=110, tokens_per_step=1)
    assert lr_at(f, 0) == 0.0
    assert lr_at(f, 5) == pytest.approx(5e-4)
    assert lr_at(f, 10) == pytest.approx(1e-3)                       # warmup end = peak
    assert lr_at(f, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))   # half way through the cosine
    assert lr_at(f, 110) == pytest.approx(1e-4)                      # end = min_lr_ratio * lr
    assert lr_at(f, 500) == pytest.approx(1e-4)


@pytest.mark.parametrize("shape, factor", [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))])
def test_wsd(shape, factor):
    f = optim.make_schedule(sched(name="wsd", lr=2e-3, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1,
                                  wsd_decay_shape=shape), total_steps=100, tokens_per_step=1)
    assert lr_at(f, 5) == pytest.approx(1e-3)
    assert lr_at(f, 10) == pytest.approx(2e-3)
    assert lr_at(f, 50) == pytest.approx(2e-3)                       # stable
    assert lr_at(f, 80) == pytest.approx(2e-3)                       # decay start: 100 - 0.2 * 100
    assert lr_at(f, 90) == pytest.approx(2e-3 * (0.1 + 0.9 * factor))
    assert lr_at(f, 100) == pytest.approx(2e-4)


@pytest.mark.parametrize("decay_type", ["exponential", "linear"])
def test_power(decay_type):
    a, b, tps = 4.0, -0.51, 1000
    f = optim.make_schedule(sched(name="power", lr=0.02, power_a=a, power_b=b, warmup_steps=10, decay_fraction=0.1,
                                  min_lr_ratio=0.05, power_decay_type=decay_type),
                            total_steps=1000, tokens_per_step=tps)
    power = lambda step: min(0.02, a * (step * tps) ** b)  # noqa: E731
    assert power(10) == 0.02 and power(100) < 0.02                   # capped early, power law later
    assert lr_at(f, 5) == pytest.approx(0.02 * 5 / 10)               # warmup towards power(10)
    assert lr_at(f, 10) == pytest.approx(0.02)
    assert lr_at(f, 100) == pytest.approx(power(100), rel=1e-5)
    assert lr_at(f, 500) == pytest.approx(power(500), rel=1e-5)
    assert lr_at(f, 900) == pytest.approx(power(900), rel=1e-5)      # decay start: 1000 - 0.1 * 1000
    mid = 0.05 ** 0.5 if decay_type == "exponential" else 1 - 0.95 * 0.5
    assert lr_at(f, 950) == pytest.approx(power(900) * mid, rel=1e-5)
    assert lr_at(f, 1000) == pytest.approx(power(900) * 0.05, rel=1e-5)
    jax.jit(f)(jnp.int32(3))  # traceable


def test_power_counts_the_tokens_of_each_data_stage():
    a, b = 4.0, -0.51
    stages = [(0, 1000), (200, 4000), (600, 500)]  # (first step, tokens per step): a longer-context stage between
    f = optim.make_schedule(sched(name="power", lr=0.02, power_a=a, power_b=b, warmup_steps=10, decay_fraction=0.1,
                                  min_lr_ratio=0.05), total_steps=1000, tokens_per_step=stages)
    for step, tokens in [(100, 100 * 1000), (300, 200 * 1000 + 100 * 4000), (800, 200_000 + 1_600_000 + 200 * 500)]:
        assert lr_at(f, step) == pytest.approx(a * tokens ** b, rel=1e-5), step
    jax.jit(f)(jnp.int32(3))
    with pytest.raises(ValueError, match="tokens_per_step"):
        optim.make_schedule(sched(name="power"), total_steps=1000, tokens_per_step=[(5, 1000)])


@pytest.mark.parametrize("key, value, message", [
    ("name", "step", "schedule.name='step': must be one of"),
    ("lr", 0.0, r"schedule.lr=0.0: must be > 0"),
    ("warmup_steps", 95, r"schedule.warmup_steps=95: must be <= 90 \(the step where decay starts\)"),
    ("min_lr_ratio", 0.0, "an exponential decay never reaches 0"),
    ("power_b", 0.5, r"schedule.power_b=0.5: must be < 0"),
    ("warmup", 5, "schedule.warmup: unknown key"),
])
def test_schedule_config_errors(key, value, message):
    cfg = dict(sched(name="power", warmup_steps=10).items())
    cfg[key] = value
    with pytest.raises(ValueError, match=message):
        optim.make_schedule(cfg, total_steps=100, tokens_per_step=8)


def test_optimizer_config_errors():
    for key, value, message in [("b2", 1.0, r"optimizer.b2=1.0: must be < 1"),
                                ("weight_decay", -1, "optimizer.weight_decay=-1: must be >= 0"),
                                ("lr_multipliers", [("(", 2.0)], r"optimizer.lr_multipliers\[0\]"),
                                ("lr_multipliers", [("x", float("inf"))], r"optimizer.lr_multipliers\[0\]"),
                                ("momentum", 0.9, "optimizer.momentum: unknown key")]:
        cfg = dict(optim.default_optimizer_config().items())
        cfg[key] = value
        with pytest.raises(ValueError, match=message):
            optim.make_optimizer(cfg, sched(), total_steps=10000, tokens_per_step=8)


# Weight decay, multipliers, clipping -----------------------------------------------------------------------------

def toy_params():
    v = lambda *shape: jnp.full(shape, 2.0)  # noqa: E731
    return {
        "embed_tokens": {"embedding": v(8, 4)},
        "layers": {0: {
            "input_layernorm": {"weight": v(4)},
            "mamba": {"in_proj": {"kernel": v(4, 6), "bias": v(6)}, "conv1d": {"kernel": v(4, 6), "bias": v(6)},
                      "A_log": v(2), "D": v(2), "dt_bias": v(2), "norm": {"weight": v(4)},
                      "out_proj": {"kernel": v(4, 4)}},
            "moe": {"experts": {"input_linear": v(2, 4, 8)}, "router": {"kernel": v(4, 2)}},
        }},
        "norm": {"scale": v(4)},
    }


NO_DECAY = {"layers/0/input_layernorm/weight", "layers/0/mamba/in_proj/bias", "layers/0/mamba/conv1d/bias",
            "layers/0/mamba/A_log", "layers/0/mamba/D", "layers/0/mamba/dt_bias", "layers/0/mamba/norm/weight",
            "norm/scale"}


def flat(tree):
    return {optim.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_decay_mask_on_toy_tree():
    mask = flat(optim.decay_mask(toy_params()))
    assert {k for k, v in mask.items() if not v} == NO_DECAY
    assert len(mask) == 14
    assert optim.decays("layers/3/block_sparse_moe/router/layer/weight")
    assert not optim.decays("model/layers/0/post_attention_layernorm/weight")


def test_decay_mask_on_nnx_state():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.input_layernorm = nnx.RMSNorm(4, rngs=rngs)
            self.proj = nnx.Linear(4, 4, rngs=rngs)
            self.dt_bias = nnx.Param(jnp.zeros(3))

    mask = flat(optim.decay_mask(nnx.state(Block(nnx.Rngs(0)), nnx.Param)))
    assert mask == {"dt_bias": False, "input_layernorm/scale": False, "proj/bias": False, "proj/kernel": True}


def test_decay_mask_on_the_model_with_every_bias():
    from granite_jax.config import preset
    from granite_jax.model import GraniteModel

    cfg = preset("debug-hybrid-moe", mamba_proj_bias=True, mamba_conv_bias=True, attention_bias=True)
    mask = flat(optim.decay_mask(nnx.state(GraniteModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    no_decay = {path.split("/", 3)[-1] for path, decayed in mask.items() if not decayed}
    assert no_decay == {
        "input_layernorm/weight", "post_attention_layernorm/weight", "weight",  # the final norm: "norm/weight"
        "mixer/A_log", "mixer/D", "mixer/dt_bias", "mixer/norm/weight", "mixer/out_bias", "mixer/conv_bias_x",
        "mixer/conv_bias_bc", "mixer/in_bias_z", "mixer/in_bias_x", "mixer/in_bias_bc", "mixer/in_bias_dt",
        "mixer/q_bias", "mixer/k_bias", "mixer/v_bias", "mixer/o_bias"}
    assert all(mask[path] for path in mask if path.endswith(("_proj", "_proj_z", "input_linear", "router",
                                                             "embed_tokens", "conv_x", "conv_bc")))


def make_tx(**opt):
    cfg = optim.default_optimizer_config()
    cfg.update(opt)
    return optim.make_optimizer(cfg, sched(name="constant", lr=0.1, warmup_steps=0), total_steps=10,
                                tokens_per_step=1)


def test_weight_decay_only_where_masked_in():
    tx, _ = make_tx(weight_decay=0.5, grad_clip_norm=0.0)
    params = toy_params()
    grads = jax.tree.map(jnp.zeros_like, params)  # Adam's direction is 0: the update is pure decay
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in flat(updates).items():
        expected = 0.0 if path in NO_DECAY else -0.1 * 0.5 * 2.0
        np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=path)


def test_lr_multipliers():
    tx, _ = make_tx(weight_decay=0.0, grad_clip_norm=0.0, lr_multipliers=[("experts", 0.5), ("^embed", 0.0)])
    params = toy_params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)  # first Adam step: m_hat / sqrt(v_hat) = 1
    for path, u in flat(updates).items():
        mult = 0.5 if "experts" in path else 0.0 if path.startswith("embed") else 1.0
        np.testing.assert_allclose(u, -0.1 * mult, rtol=1e-6, err_msg=path)


def test_global_norm_clipping():
    tx, _ = make_tx(weight_decay=0.0, grad_clip_norm=1.0, eps=1.0)  # a large eps makes Adam's step scale-aware
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([6.0, 8.0])}  # norm 10 -> clipped to [0.6, 0.8]
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * np.array([0.6 / 1.6, 0.8 / 1.8]), rtol=1e-6)
    tx, _ = make_tx(weight_decay=0.0, grad_clip_norm=0.0, eps=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * np.array([6 / 7, 8 / 9]), rtol=1e-6)


# Gradient accumulation -------------------------------------------------------------------------------------------

def test_accumulate_gradients_matches_full_batch():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "mask": jnp.asarray(rng.integers(0, 2, size=(8,)), jnp.float32)}

    def loss_fn(p, b):  # token sums and counts: exact under any split
        per_row = jnp.sum((b["x"] @ p["w"]) ** 2, axis=-1) * b["mask"]
        return per_row.sum(), {"n_tokens": b["mask"].sum()}

    full = optim.accumulate_gradients(loss_fn, params, batch, 1)
    acc = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))(loss_fn, params, batch, 4)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(acc)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert float(acc[1]["n_tokens"]) == float(batch["mask"].sum())
    with pytest.raises(ValueError, match="8 rows, not divisible by grad_accum_steps=3"):
        optim.accumulate_gradients(loss_fn, params, batch, 3)
