"""The model with jax_enable_x64 on (users turn it on to debug numerics): forward and backward of a hybrid MoE model
through the Pallas GPU SSD kernel (interpret mode) give the numbers they give with x64 off. (The kernels alone, both of
them, run with x64 on and off in test_ssd_pallas.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from granite_jax.config import preset
from granite_jax.model import GraniteModel


def logits_and_grads(cfg, ids, segment_ids):
    model = GraniteModel(cfg, rngs=nnx.Rngs(0))

    def loss(m):
        logits, aux = m(ids, segment_ids=segment_ids, return_aux=True)
        return jnp.mean(logits.astype(jnp.float32) ** 2) + aux["load_balancing_loss"], logits

    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.mark.slow
@pytest.mark.parametrize("ssd_impl", ["pallas_gpu"])
def test_forward_and_backward_with_x64_equal_x32(ssd_impl):
    cfg = preset("debug-hybrid-moe", mamba_chunk_size=16, ssd_impl=ssd_impl, ssd_interpret=ssd_impl != "xla")
    ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size), np.int32)
    segment_ids = np.repeat(np.array([[1] * 10 + [2] * 14]), 2, axis=0).astype(np.int32)
    want_logits, want_grads = logits_and_grads(cfg, ids, segment_ids)
    with jax.enable_x64(True):
        logits, grads = logits_and_grads(cfg, jnp.asarray(ids), jnp.asarray(segment_ids))
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
