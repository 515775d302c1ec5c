"""Context parallelism (granite_jax/context_parallel.py) on 8 CPU devices: each mixer and the whole model with the
sequence sharded over `context` equal the unsharded run, values and gradients, with packed documents whose
boundaries fall inside shards and exactly on shard edges."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from granite_jax import context_parallel as cp
from granite_jax import sharding as sh
from granite_jax.attention import document_causal_mask
from granite_jax.config import preset
from granite_jax.mamba2 import causal_conv
from granite_jax.model import GraniteModel
from pallas_kernels.ssd import ssd

pytestmark = pytest.mark.filterwarnings("ignore:'sharding_names' is deprecated:DeprecationWarning")

L = 64
# Row 0: boundaries at 5, 32 (a shard edge for context 2/4/8), 48 (edge for 4/8) and 57; row 1 ends in padding (0).
SEGMENTS = np.stack([np.repeat([1, 2, 3, 4, 5], [5, 27, 16, 9, 7]), np.repeat([1, 2, 3, 0], [8, 3, 40, 13])])


def context_mesh(n, **axes):
    axes = {"context": n, **axes}
    return sh.make_mesh(axes, devices=jax.devices()[:int(np.prod(list(axes.values())))])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_close(got, want, tol=1e-4, what=""):
    flat_got, flat_want = jax.tree.leaves_with_path(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    for (path, g), w in zip(flat_got, flat_want):
        err = rel_err(g, w)
        assert err <= tol, f"{what}{jax.tree_util.keystr(path)}: relative error {err:.2e} > {tol}"


def normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def sharded_grad(fn, mesh, args):
    """value_and_grad of fn over all args, jitted under `mesh`."""
    with jax.set_mesh(mesh):
        return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


# The mixers ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4, 8])
def test_ssd_matches_unsharded(n):
    """Outputs, final state and the gradients of x, dt, A, B, C, D, dt_bias and the initial state."""
    rng = np.random.default_rng(n)
    b, h, p, g, d_state = 2, 4, 8, 2, 16
    args = (normal(rng, b, L, h, p), normal(rng, b, L, h), -jnp.exp(normal(rng, h)), normal(rng, b, L, g, d_state),
            normal(rng, b, L, g, d_state), normal(rng, h), normal(rng, h), normal(rng, b, h, p, d_state))
    w_y, w_s = normal(rng, b, L, h, p), normal(rng, b, h, p, d_state)

    def loss(op):
        def fn(x, dt, A, B, C, D, dt_bias, init):
            y, final = op(x, dt, A, B, C, chunk_size=8, D=D, dt_bias=dt_bias, dt_softplus=True, initial_state=init,
                          segment_ids=jnp.asarray(SEGMENTS), return_final_state=True, impl="xla")
            return jnp.sum(y * w_y) + jnp.sum(final * w_s)
        return fn

    want = jax.value_and_grad(loss(ssd), argnums=tuple(range(8)))(*args)
    assert_close(sharded_grad(loss(cp.ssd), context_mesh(n), args), want)


def test_conv_halo_matches_unsharded():
    rng = np.random.default_rng(0)
    x, w, bias = normal(rng, 2, L, 6), normal(rng, 4, 6), normal(rng, 6)
    seg = jnp.asarray(SEGMENTS)
    ref = lambda x, w, b: jnp.sum(jnp.sin(causal_conv(x, seg, w, b)))  # noqa: E731
    got = lambda x, w, b: jnp.sum(jnp.sin(cp.with_previous_tokens(causal_conv, x, seg, w, b, width=3)))  # noqa: E731
    want = jax.value_and_grad(ref, argnums=(0, 1, 2))(x, w, bias)
    for n in (2, 8):
        assert_close(sharded_grad(got, context_mesh(n), (x, w, bias)), want)


@pytest.mark.parametrize("strategy", cp.ATTENTION_STRATEGIES)
def test_attention_matches_unsharded(strategy):
    rng = np.random.default_rng(2)
    q, k, v = normal(rng, 2, L, 4, 8), normal(rng, 2, L, 2, 8), normal(rng, 2, L, 2, 8)
    seg, w = jnp.asarray(SEGMENTS), normal(rng, 2, L, 4, 8)
    ref = lambda q, k, v: jnp.sum(w * jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=document_causal_mask(seg), scale=0.3))
    got = lambda q, k, v: jnp.sum(w * cp.attention(q, k, v, seg, scale=0.3, strategy=strategy, block=4))  # noqa: E731
    want = jax.value_and_grad(ref, argnums=(0, 1, 2))(q, k, v)
    for n in (2, 8):
        assert_close(sharded_grad(got, context_mesh(n), (q, k, v)), want, tol=1e-5)


def test_fully_masked_rows_give_no_nan():
    """A query block that sees no key in a ring step (segment or causality) must not poison the running softmax."""
    rng = np.random.default_rng(3)
    q, k, v = normal(rng, 1, 16, 2, 4), normal(rng, 1, 16, 2, 4), normal(rng, 1, 16, 2, 4)
    seg = jnp.asarray(np.repeat([1, 2], [8, 8])[None])  # shard 1's queries see nothing of shard 0's keys
    out = sharded_grad(lambda q, k, v: jnp.sum(cp.attention(q, k, v, seg, scale=0.5, strategy="ring")),
                       context_mesh(2), (q, k, v))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(out))


def test_context_size_and_bad_strategy():
    assert cp.context_size() == 1
    with jax.set_mesh(context_mesh(4)):
        assert cp.context_size() == 4
    with pytest.raises(ValueError, match="context_attention='tree'"):
        preset("debug-hybrid-dense", context_attention="tree")


# The chunked training loss ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, chunk", [(1, 8), (1, 64), (4, 4), (8, 2)])
def test_chunked_cross_entropy_matches_full_logits(n, chunk):
    """The loss computed a chunk of tokens per shard at a time (the [B,L,V] logits never whole) equals the loss of
    the full logits, and so do the gradients of the hidden states and the head, with the sequence over `context`."""
    from granite_jax.model import project_logits
    from granite_jax.train_step import chunked_cross_entropy_sum, cross_entropy_sum, next_token_targets

    rng = np.random.default_rng(n)
    h, head = normal(rng, 2, L, 16), normal(rng, 96, 16)
    tokens, seg = batch(96, seed=n)
    targets, weights = next_token_targets(tokens, seg)
    want = jax.value_and_grad(lambda h, w: cross_entropy_sum(project_logits(h, w), targets, weights),
                              argnums=(0, 1))(h, head)
    mesh = context_mesh(n)
    h, tokens, seg = (jax.device_put(x, NamedSharding(mesh, P(None, "context"))) for x in (h, tokens, seg))

    def chunked(h, w, tokens, seg):
        targets, weights = next_token_targets(tokens, seg)
        return chunked_cross_entropy_sum(h, w, targets, weights, chunk)

    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(h, head, tokens, seg))
        got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, head, tokens, seg)
    assert_close(got, want, tol=1e-5)
    full_logits = f"[2,{L},96]"
    assert (full_logits in jaxpr) == (chunk * n >= L)  # chunked: no [B, L, V] array anywhere, backward included
    with pytest.raises(ValueError, match="logits_chunk_tokens=5 must divide"):
        with jax.set_mesh(mesh):
            chunked_cross_entropy_sum(h, head, targets, weights, 5)


def test_trainer_loss_with_logits_chunks_matches_unchunked():
    """`train_step.loss_terms` honours `logits_chunk_tokens` (context=2: two 16-token chunks per shard)."""
    from granite_jax.train_step import loss_terms

    cfg, graphdef, params, _ = reference("debug-hybrid-moe")
    tokens, seg = batch(cfg.vocab_size)
    micro = {"tokens": tokens, "segment_ids": seg, "positions": None}
    ce = lambda g, p, b: loss_terms(nnx.merge(g, p), b)["ce_sum"]  # noqa: E731
    want = jax.jit(jax.value_and_grad(ce, argnums=1), static_argnums=0)(graphdef, params, micro)
    mesh = context_mesh(2)
    micro = {**jax.device_put(micro, NamedSharding(mesh, P(None, "context"))), "positions": None}
    params = jax.device_put(params, NamedSharding(mesh, P()))
    chunked = graphdef_of(cfg.replace(logits_chunk_tokens=16))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(ce, argnums=1), static_argnums=0)(chunked, params, micro)
    assert_close(got, want)


# The whole model -------------------------------------------------------------------------------------------------

def batch(vocab, seed=0):
    tokens = np.random.default_rng(seed).integers(0, vocab, size=SEGMENTS.shape)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(SEGMENTS, jnp.int32)


def next_token_loss(model, tokens, segment_ids):
    """Mean next-token cross entropy over targets in the same (non-padding) document, and the logits."""
    logits = model(tokens, segment_ids=segment_ids)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * same) / jnp.sum(same), logits


def loss_logits_grads(graphdef, params, tokens, segment_ids):
    def fn(p):
        return next_token_loss(nnx.merge(graphdef, p), tokens, segment_ids)
    (loss, logits), grads = jax.value_and_grad(fn, has_aux=True)(params)
    return loss, logits, grads


def graphdef_of(cfg):
    with nnx.use_eager_sharding(False):
        return nnx.split(nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0))))[0]


@functools.lru_cache(maxsize=None)
def reference(preset_name):
    cfg = preset(preset_name)
    graphdef = graphdef_of(cfg)
    # Jitted, with the cheaper-to-compile "rbg" PRNG: eager initialisation is slow on CPU.
    params = jax.jit(lambda: nnx.state(GraniteModel(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))))()
    tokens, seg = batch(cfg.vocab_size)
    return cfg, graphdef, params, jax.jit(loss_logits_grads, static_argnums=0)(graphdef, params, tokens, seg)


def check_model(n, strategy, preset_name="debug-hybrid-moe"):
    cfg, _, params, (want_loss, want_logits, want_grads) = reference(preset_name)
    graphdef = graphdef_of(cfg.replace(context_attention=strategy))
    mesh = context_mesh(n)
    tokens, seg = jax.device_put(batch(cfg.vocab_size), NamedSharding(mesh, P(None, "context")))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        loss, logits, grads = jax.jit(loss_logits_grads, static_argnums=0)(graphdef, params, tokens, seg)
    assert logits.sharding.spec[1] == "context"
    assert_close(loss, want_loss, what="loss")
    assert_close(logits, want_logits, what="logits")
    assert_close(grads, want_grads, what="grad ")


@pytest.mark.parametrize("strategy", cp.ATTENTION_STRATEGIES)
def test_no_quadratic_residuals(strategy, monkeypatch):
    """What the backward keeps of the attention forward is O(L): no stacked [query block, key block] tiles, also
    inside the model's layer scan (where JAX would otherwise save every probability tile)."""
    monkeypatch.setattr(cp, "BLOCK_SIZE", 8)
    cfg = preset("debug-hybrid-dense", context_attention=strategy, num_hidden_layers=2,
                 layer_types=("mamba", "attention"))
    graphdef = graphdef_of(cfg)
    with nnx.use_eager_sharding(False):
        params = nnx.state(nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((1, L), jnp.int32)
    loss = lambda p, t: jnp.sum(nnx.merge(graphdef, p)(t, segment_ids=t))  # noqa: E731
    with jax.set_mesh(context_mesh(2)):
        text = str(jax.make_jaxpr(jax.grad(loss))(params, tokens))
    tiles = re.findall(r"\[(?:\d+,)*\d+,8,8\]", text)
    assert tiles and all(t.count(",") <= 5 for t in tiles), sorted(set(tiles))  # [B,K,R,8,8]-sized at most


@pytest.mark.parametrize("n, strategy", [(2, "ring"), (4, "all_gather"), (8, "ring")])
def test_model_matches_unsharded(n, strategy):
    """Logits, loss and every parameter gradient of the hybrid MoE model (Mamba, attention, MoE layers)."""
    check_model(n, strategy)


@pytest.mark.slow
@pytest.mark.parametrize("n, strategy", [(2, "all_gather"), (4, "ring"), (8, "all_gather")])
def test_model_matches_unsharded_more(n, strategy):
    check_model(n, strategy)


def test_train_step_context_fsdp_tensor():
    """context=2 x fsdp=2 x tensor=2: a jitted value_and_grad + AdamW step compiles and the loss falls."""
    cfg = preset("debug-hybrid-dense", context_attention="ring", remat="full", num_hidden_layers=2,
                 layer_types=("mamba", "attention"))
    mesh = context_mesh(2, fsdp=2, tensor=2)
    tx = optax.adamw(3e-3, b2=0.95, weight_decay=0.1)
    model = sh.create_sharded(lambda: GraniteModel(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))), mesh)
    graphdef, params = nnx.split(model)
    opt_state = jax.jit(tx.init)(params)
    batch_sharding = NamedSharding(mesh, sh.logical_to_spec(sh.batch_names(2), mesh))
    tokens, seg = jax.device_put(batch(cfg.vocab_size), batch_sharding)

    @jax.jit
    def step(params, opt_state, tokens, seg):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), tokens, seg)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    with jax.set_mesh(mesh):
        for _ in range(6):
            params, opt_state, loss = step(params, opt_state, tokens, seg)
            losses.append(float(loss))
    assert params["embed_tokens"][...].sharding.spec == sh.logical_to_spec(("vocab", "embed"), mesh)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses
