"""The model's own properties: packed documents, aux losses, logical axes, the scanned layer layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from granite_jax import attention
from granite_jax.config import preset
from granite_jax.model import GraniteModel, interleave_plan, layer_pattern, segment_positions
from granite_jax.moe import blocked_experts


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# The tests call models through nnx.jit: one compile of the whole call is faster than eager op-by-op dispatch.
def _call(model, ids, **kwargs):
    return nnx.jit(lambda m, i: m(i, **kwargs))(model, ids)


def _outputs_and_grads(model, ids, **kwargs):
    """(logits, aux, gradient of mean(logits**2) for every parameter), in one compiled call."""
    def loss(m):
        logits, aux = m(ids, return_aux=True, **kwargs)
        return jnp.mean(logits ** 2), (logits, aux)

    (_, (logits, aux)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return logits, aux, jax.tree.leaves(grads)


@pytest.fixture(scope="module")
def moe_model():
    return GraniteModel(preset("debug-hybrid-moe", mamba_chunk_size=8), rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("rope", [False, True])
def test_packed_documents_equal_documents_alone(rope):
    cfg = preset("debug-hybrid-moe", mamba_chunk_size=8, position_embedding_type="rope" if rope else None)
    model = GraniteModel(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    lengths = [5, 8, 1, 13, 9]  # boundaries on, next to and away from chunk edges (chunk 8)
    docs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    ids = jnp.asarray(np.concatenate(docs))[None]
    seg = jnp.asarray(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]))[None]
    packed = jax.jit(lambda i, s: model(i, segment_ids=s))(ids, seg)[0]
    start = 0
    for doc in docs:
        alone = _call(model, jnp.asarray(doc)[None])[0]
        assert _rel_err(packed[start:start + len(doc)], alone) <= 1e-4
        start += len(doc)


def test_segment_positions_restart_per_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_aux_losses_match_definition(moe_model):
    cfg = moe_model.config
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    # Recompute from the router logits of every MoE layer (FACTS.md §2), pooling tokens over layers. The spy hands
    # each layer's logits out of the compiled call (once per layer, also inside layer loops); the pooled
    # definition does not depend on their order.
    captured = []
    orig = jax.lax.top_k

    def spy(x, k):
        jax.debug.callback(lambda v: captured.append(np.asarray(v)), x)
        return orig(x, k)

    jax.lax.top_k = spy
    try:
        _, aux = _call(moe_model, ids, return_aux=True)
        jax.effects_barrier()
    finally:
        jax.lax.top_k = orig
    logits = jnp.concatenate(captured, axis=0)
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    probs = jax.nn.softmax(logits, -1)
    f = jax.nn.one_hot(jax.lax.top_k(probs, k)[1], E).mean(0)
    expected_lb = E * jnp.sum(f * probs.mean(0)[None])
    expected_z = jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)
    assert len(captured) == cfg.num_hidden_layers
    np.testing.assert_allclose(aux["load_balancing_loss"], expected_lb, rtol=1e-5)
    np.testing.assert_allclose(aux["router_z_loss"], expected_z, rtol=1e-5)
    assert aux["expert_load"].shape == (cfg.num_hidden_layers, E)
    np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-6)


def test_padding_tokens_do_not_count_in_aux(moe_model):
    ids = jax.random.randint(jax.random.key(1), (1, 12), 0, moe_model.config.vocab_size)
    seg = jnp.array([[1] * 8 + [0] * 4])
    _, aux_packed = _call(moe_model, ids, segment_ids=seg, return_aux=True)
    _, aux_alone = _call(moe_model, ids[:, :8], return_aux=True)
    np.testing.assert_allclose(aux_packed["load_balancing_loss"], aux_alone["load_balancing_loss"], rtol=1e-5)


@pytest.mark.parametrize("impl", ["ragged_dot", "blocked"])
def test_moe_impls_agree(impl):
    cfg = preset("debug-hybrid-moe")
    ids = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    dense = GraniteModel(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(3))
    other = GraniteModel(cfg.replace(moe_impl=impl), rngs=nnx.Rngs(3))
    (logits_dense, _, g_dense), (logits_other, _, g_other) = (_outputs_and_grads(m, ids) for m in (dense, other))
    assert _rel_err(logits_other, logits_dense) <= 1e-5
    for a, b in zip(g_dense, g_other):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_attention_impls_agree(monkeypatch):
    """The blockwise attention (CPU default) and jax.nn.dot_product_attention give one model the same logits and
    gradients, with packed documents and a length that is not a multiple of the attention block."""
    monkeypatch.setattr(attention, "BLOCK", 16)
    cfg = preset("debug-hybrid-moe", position_embedding_type="rope")
    ids = jax.random.randint(jax.random.key(4), (2, 45), 0, cfg.vocab_size)
    segment_ids = jnp.asarray(np.repeat([[1, 2, 3], [1, 1, 2]], [20, 15, 10], axis=1))
    xla, blockwise = (GraniteModel(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(5)) for impl in ("xla", "blockwise"))
    (logits_b, _, g_b), (logits_x, _, g_x) = (_outputs_and_grads(m, ids, segment_ids=segment_ids)
                                              for m in (blockwise, xla))
    assert _rel_err(logits_b, logits_x) <= 1e-5
    for a, b in zip(g_b, g_x):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_interleave_plan():
    """Granite's m*5, a, m*4 period twice: one scan over the 18 Mamba layers, the attention layers before the
    Mamba layers 5 and 14; none for two attention layers in a row or for one layer type."""
    types = (("mamba",) * 5 + ("attention",) + ("mamba",) * 4) * 2
    plan = interleave_plan(types)
    assert plan.main_type == "mamba" and not plan.trailing
    assert [s for s, n in enumerate(plan.before) if n >= 0] == [5, 14] and len(plan.before) == 18
    assert [plan.order[i] for i in (4, 5, 6, 15)] == [4, 18, 5, 19]
    assert interleave_plan(("mamba", "attention", "attention", "mamba", "mamba")) is None
    assert interleave_plan(("mamba",) * 4) is None


@pytest.mark.slow
@pytest.mark.parametrize("period", [
    ("mamba", "attention", "mamba", "mamba"),  # the attention layer under lax.cond inside the Mamba scan
    ("mamba", "mamba", "attention"),  # an attention layer that ends the model
    ("attention", "mamba", "attention", "mamba", "mamba"),  # one that starts it, and two in a period
])
def test_layer_loops_agree(period):
    """The layers called one by one (CPU default), as scans over runs, and interleaved (one scan over the Mamba
    layers) give the same logits, per-layer router statistics and gradients; two repeats of the period, full remat.
    (A pattern without an interleave plan runs the scans over runs: `test_interleave_plan`.)"""
    cfg = preset("debug-hybrid-moe", num_hidden_layers=2 * len(period), layer_types=period * 2, remat="full")
    ids = jax.random.randint(jax.random.key(6), (2, 24), 0, cfg.vocab_size)
    unroll, *others = (GraniteModel(cfg.replace(layer_loop=loop), rngs=nnx.Rngs(7))
                       for loop in ("unroll", "scan", "interleave"))
    logits, aux, grads = _outputs_and_grads(unroll, ids)
    for other in others:
        other_logits, other_aux, other_grads = _outputs_and_grads(other, ids)
        assert _rel_err(other_logits, logits) <= 1e-6
        np.testing.assert_allclose(other_aux["expert_load"], aux["expert_load"], rtol=1e-6)
        for a, b in zip(other_grads, grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("tokens,experts,top_k", [(40, 4, 2), (300, 6, 1), (7, 16, 3)])
def test_blocked_experts_exact_with_skew_and_padding_rows(tokens, experts, top_k):
    """Every routing the blocks must hold without dropping: all slots on one expert, uneven groups, empty experts,
    and rows with expert id E (expert-parallel padding), which must come out zero. Reference: a per-slot loop."""
    rng = np.random.default_rng(tokens)
    D, F = 8, 6
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    w_in = rng.normal(size=(experts, D, 2, F)).astype(np.float32)
    w_out = rng.normal(size=(experts, F, D)).astype(np.float32)
    w = rng.random((tokens, top_k)).astype(np.float32)
    routings = [np.zeros((tokens, top_k), np.int64) + np.arange(top_k) % experts,  # as skewed as top-k allows
                np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)])]
    padded = routings[1].copy()
    padded[::3, 0] = experts  # no expert
    for idx in (*routings, padded):
        want = np.zeros((tokens, D), np.float64)
        for t in range(tokens):
            for k in range(top_k):
                e = idx[t, k]
                if e < experts:
                    h = x[t].astype(np.float64) @ w_in[e].reshape(D, 2 * F)
                    gate, up = h[:F], h[F:]
                    want[t] += w[t, k] * ((gate / (1 + np.exp(-gate)) * up) @ w_out[e])
        got = blocked_experts(*map(jnp.asarray, (x, w_in, w_out, idx.astype(np.int32), w)))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_every_parameter_has_logical_axes(moe_model):
    state = nnx.state(moe_model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path


def test_layer_pattern_period_and_runs():
    period, runs = layer_pattern(preset("granite-4.0-h-small").layer_types)
    assert period == 10
    assert [(r.layer_type, r.start, r.length) for r in runs] == [("mamba", 0, 5), ("attention", 5, 1),
                                                                  ("mamba", 6, 4)]
    period, runs = layer_pattern(preset("granite-4.0-h-350m").layer_types)
    assert period == 32 and sum(r.length for r in runs) == 32


def test_bfloat16_compute_tracks_float32():
    cfg = preset("debug-hybrid-dense")
    ids = jax.random.randint(jax.random.key(4), (2, 20), 0, cfg.vocab_size)
    f32 = GraniteModel(cfg, rngs=nnx.Rngs(5))
    bf16 = GraniteModel(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(5))
    out = bf16(ids)
    assert out.dtype == jnp.float32
    assert _rel_err(out, f32(ids)) <= 5e-2


def test_moe_without_shared_expert():
    cfg = preset("debug-hybrid-moe", shared_intermediate_size=0)
    model = GraniteModel(cfg, rngs=nnx.Rngs(0))
    assert model(jnp.ones((1, 8), jnp.int32)).shape == (1, 8, cfg.vocab_size)
    with pytest.raises(ValueError, match="shared_intermediate_size=0"):
        preset("debug-hybrid-dense", shared_intermediate_size=0)


def test_cpu_compiler_options_keep_the_numbers():
    """The XLA:CPU options of the framework's steps change how XLA:CPU fuses, not what it computes: loss and
    gradients equal the default compile's (float32 reassociation only). Other platforms get no options."""
    from granite_jax import xla_options

    assert xla_options.compiler_options("tpu") == {} and xla_options.compiler_options("gpu") == {}
    options = xla_options.compiler_options("cpu")
    assert set(options) <= {"xla_cpu_experimental_ynn_fusion_type"}
    cfg = preset("debug-hybrid-moe")
    graphdef, state = nnx.split(GraniteModel(cfg, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(4), (2, 24), 0, cfg.vocab_size)

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state)(ids) ** 2)

    want = jax.jit(jax.value_and_grad(loss))(state)
    got = jax.jit(jax.value_and_grad(loss), compiler_options=options)(state)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
