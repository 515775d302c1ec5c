"""The full model on each Pallas SSD kernel (interpret mode on CPU) against the pure-JAX SSD: logits and every
parameter gradient, with packed documents, unsharded and sharded over a data x tensor mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from granite_jax import sharding
from granite_jax.config import preset
from granite_jax.model import GraniteModel

CFG = preset("debug-hybrid-dense", num_hidden_layers=2, layer_types=("mamba", "attention"), mamba_chunk_size=8)


def _loss_and_grads(cfg, ids, seg):
    model = GraniteModel(cfg, rngs=nnx.Rngs(0))

    def loss(m):
        logits = m(ids, segment_ids=seg)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]), logits

    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, grads


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module")
def batch():
    ids = jax.random.randint(jax.random.key(0), (2, 21), 0, CFG.vocab_size)
    seg = jnp.array([[1] * 8 + [2] * 5 + [3] * 8, [1] * 3 + [2] * 18])
    return ids, seg


@pytest.fixture(scope="module")
def reference(batch):
    return _loss_and_grads(CFG.replace(ssd_impl="xla"), *batch)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_model_on_pallas_kernel_matches_xla(impl, batch, reference):
    logits, grads = _loss_and_grads(CFG.replace(ssd_impl=impl, ssd_interpret=True), *batch)
    ref_logits, ref_grads = reference
    assert _rel_err(logits, ref_logits) <= 2e-4
    for (path, g), (_, g_ref) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
        assert _rel_err(g[...], g_ref[...]) <= 1e-3, path


@pytest.mark.slow
def test_sharded_model_calls_pallas_kernel_per_shard(batch, reference):
    mesh = sharding.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    cfg = CFG.replace(ssd_impl="pallas_gpu", ssd_interpret=True)
    model = sharding.create_sharded(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0)), mesh)
    ids, seg = batch
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, i, s: m(i, segment_ids=s))(model, ids, seg)
    assert _rel_err(logits, reference[0]) <= 2e-4
    np.testing.assert_array_equal(np.asarray(model(ids[:1], segment_ids=seg[:1]).shape), [1, 21, CFG.vocab_size])
