"""The flash-style blockwise attention (granite_jax/blockwise_attention.py) against XLA's
`jax.nn.dot_product_attention` with a document-causal mask: values and the gradients of q, k and v through the
custom VJP, with packed documents, grouped queries, several blocks skipped, and lengths that are not a multiple of
the block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from granite_jax import blockwise_attention
from granite_jax.attention import document_causal_mask


def _inputs(L, seed=1):
    rng = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(rng.standard_normal((2, L, n, 8)), jnp.float32) for n in (4, 2, 2, 4))
    # Row 0: documents of uneven lengths; row 1: two documents, then padding (id 0).
    seg = np.stack([np.arange(L) * 5 // L + 1, np.where(np.arange(L) < L * 3 // 4, np.arange(L) * 2 // L + 1, 0)])
    return q, k, v, w, jnp.asarray(seg)


def _reference(q, k, v, w, seg):
    return jnp.sum(w * jax.nn.dot_product_attention(q, k, v, mask=document_causal_mask(seg), scale=0.3))


def _assert_grads_close(got_fn, want_fn, args, tol=1e-5):
    got = jax.value_and_grad(got_fn, argnums=(0, 1, 2))(*args)
    want = jax.value_and_grad(want_fn, argnums=(0, 1, 2))(*args)
    for name, g, r in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        err = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def test_blockwise_chunks_match_dense():
    """The core op with grouped queries [B,L,K,R,H]: four query and four key blocks."""
    L = 64
    q, k, v, w, seg = _inputs(L)

    def got(q, k, v):
        pos = jnp.arange(L)
        out = blockwise_attention.blockwise_attention(q.reshape(2, L, 2, 2, 8), k, v, seg, seg, pos, pos, 0.3, 16)
        return jnp.sum(w * out.reshape(q.shape))

    _assert_grads_close(got, lambda q, k, v: _reference(q, k, v, w, seg), (q, k, v))


@pytest.mark.parametrize("L,block", [(64, 16), (61, 16), (10, 16), (50, 7)])
def test_one_device_attention_matches_dense(L, block):
    """`attention` pads a length that is not a multiple of the block (61, 50) and takes one block when the sequence is
    shorter than the block (10)."""
    q, k, v, w, seg = _inputs(L, seed=L)
    got = lambda q, k, v: jnp.sum(w * blockwise_attention.attention(q, k, v, seg, scale=0.3, block=block))  # noqa: E731
    _assert_grads_close(got, lambda q, k, v: _reference(q, k, v, w, seg), (q, k, v))
