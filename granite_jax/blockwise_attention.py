"""Document-causal grouped-query attention block by block (flash-style): an online softmax over key blocks with query
blocks mapped, key blocks wholly in the queries' future skipped, and a custom VJP that saves only the output and its
log-sum-exp, so no [L_q, L_k] array ever exists.

Two users: the model's attention on CPU, where XLA's `jax.nn.dot_product_attention` materialises and transposes the
whole score tensor (docs/benchmarks.md: this is 2.6x faster there at 1K tokens, 3.9x at 4K), and context parallelism
(`context_parallel`), which runs the same forward and backward chunks over gathered or ring-passed keys.

Shape suffixes: B batch, L query length, S key length, N query heads, K kv heads, R = N/K, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _block(n: int, target: int) -> int:
    """The largest divisor of n that is <= target."""
    return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _blocks(a, size, axis=1):
    """Split `axis` into [n_blocks, size] and move the block index to the front."""
    shape = a.shape[:axis] + (a.shape[axis] // size, size) + a.shape[axis + 1:]
    return jnp.moveaxis(a.reshape(shape), axis, 0)


def _unblocks(a, axis=1):
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2:])


def _masked_scores(q_BQKRH, k_BSKH, qseg_BQ, kseg_BS, qpos_Q, kpos_S, scale):
    """[B,K,R,Q,S] float32 scores, -inf where key s is not visible to query q (later, or another document)."""
    s = jnp.einsum("bqkrh,bskh->bkrqs", q_BQKRH, k_BSKH, preferred_element_type=jnp.float32) * scale
    visible_BQS = (qpos_Q[:, None] >= kpos_S[None, :])[None] & (qseg_BQ[:, :, None] == kseg_BS[:, None, :])
    return jnp.where(visible_BQS[:, None, None], s, -jnp.inf)


def _any_visible(qpos_Q, kpos_S):
    return jnp.min(kpos_S) <= jnp.max(qpos_Q)


def forward_chunk(q, k, v, qseg, kseg, qpos, kpos, carry, scale, block):
    """Online-softmax accumulation of one chunk of keys into the running (o [B,K,R,L,H], m, l [B,K,R,L]) of all local
    queries; q blocks are mapped, key blocks scanned, key blocks wholly in the queries' future skipped."""
    b, L, K, R, H = q.shape
    bq, bk = _block(L, block), _block(k.shape[1], block)
    kv_blocks = (_blocks(k, bk), _blocks(v, bk), _blocks(kseg, bk), _blocks(kpos, bk, 0))

    def one_q_block(args):
        q_b, qseg_b, qpos_b, o_b, m_b, l_b = args

        def step(c, kv):
            k_b, v_b, kseg_b, kpos_b = kv

            def update(c):
                o, m, l = c
                s = _masked_scores(q_b, k_b, qseg_b, kseg_b, qpos_b, kpos_b, scale)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet: no NaN
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(m - m_safe)
                o = o * corr[..., None] + jnp.einsum("bkrqs,bskh->bkrqh", p.astype(v_b.dtype), v_b,
                                                     preferred_element_type=jnp.float32)
                return o, m_new, l * corr + p.sum(-1)

            return jax.lax.cond(_any_visible(qpos_b, kpos_b), update, lambda c: c, c), None

        return jax.lax.scan(step, (o_b, m_b, l_b), kv_blocks)[0]

    o, m, l = carry
    q_blocks = (_blocks(q, bq), _blocks(qseg, bq), _blocks(qpos, bq, 0), _blocks(o, bq, 3), _blocks(m, bq, 3),
                _blocks(l, bq, 3))
    # The checkpoint keeps what a differentiated caller may save per query block to that block's inputs: under the
    # model's layer scan, JAX otherwise keeps every [q block, key block] probability tile of the forward (O(L^2)).
    o, m, l = jax.lax.map(jax.checkpoint(one_q_block), q_blocks)
    return _unblocks(o, 3), _unblocks(m, 3), _unblocks(l, 3)


def backward_chunk(q, k, v, qseg, kseg, qpos, kpos, do, lse, delta, scale, block):
    """Flash-attention backward for one chunk of keys: (dq [B,L,K,R,H], dk, dv [B,S,K,H]) float32, recomputing the
    probabilities block by block from the saved log-sum-exp (lse [B,K,R,L]; delta = rowsum(do * o) [B,K,R,L])."""
    L, S = q.shape[1], k.shape[1]
    bq, bk = _block(L, block), _block(S, block)
    q_blocks = (_blocks(q, bq), _blocks(qseg, bq), _blocks(qpos, bq, 0), _blocks(do, bq), _blocks(lse, bq, 3),
                _blocks(delta, bq, 3))

    def one_k_block(dq_nBQKRH, kv):
        k_b, v_b, kseg_b, kpos_b = kv

        def step(dkv, args):
            (q_b, qseg_b, qpos_b, do_b, lse_b, delta_b), dq_b = args

            def grads(dkv):
                dk, dv = dkv
                s = _masked_scores(q_b, k_b, qseg_b, kseg_b, qpos_b, kpos_b, scale)
                p = jnp.exp(s - lse_b[..., None])
                dv = dv + jnp.einsum("bkrqs,bqkrh->bskh", p, do_b)
                dp = jnp.einsum("bqkrh,bskh->bkrqs", do_b, v_b.astype(jnp.float32))
                ds = p * (dp - delta_b[..., None]) * scale
                dk = dk + jnp.einsum("bkrqs,bqkrh->bskh", ds, q_b.astype(jnp.float32))
                return (dk, dv), jnp.einsum("bkrqs,bskh->bqkrh", ds, k_b.astype(jnp.float32))

            visible = _any_visible(qpos_b, kpos_b)
            dkv, ddq = jax.lax.cond(visible, grads, lambda d: (d, jnp.zeros_like(dq_b)), dkv)
            return dkv, dq_b + ddq

        zeros = jnp.zeros(k_b.shape, jnp.float32)
        (dk_b, dv_b), dq_nBQKRH = jax.lax.scan(step, (zeros, zeros), (q_blocks, dq_nBQKRH))
        return dq_nBQKRH, (dk_b, dv_b)

    dq0 = jnp.zeros((L // bq, q.shape[0], bq) + q.shape[2:], jnp.float32)
    kv_blocks = (_blocks(k, bk), _blocks(v, bk), _blocks(kseg, bk), _blocks(kpos, bk, 0))
    dq_nBQKRH, (dk, dv) = jax.lax.scan(one_k_block, dq0, kv_blocks)
    return _unblocks(dq_nBQKRH), _unblocks(dk), _unblocks(dv)


def init_carry(q):
    b, L, K, R, H = q.shape
    return (jnp.zeros((b, K, R, L, H), jnp.float32), jnp.full((b, K, R, L), -jnp.inf, jnp.float32),
            jnp.zeros((b, K, R, L), jnp.float32))


def finish(q, carry):
    """(out [B,L,K,R,H] in q's dtype, lse [B,K,R,L]) from the accumulated (o, m, l)."""
    o, m, l = carry
    seen = l > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    out = o / jnp.where(seen, l, 1.0)[..., None]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q.dtype), lse


def row_delta(out, do):
    return jnp.einsum("blkrh,blkrh->bkrl", out.astype(jnp.float32), do.astype(jnp.float32))


def grouped(q_BLNH, kv_heads):
    b, L, N, H = q_BLNH.shape
    return q_BLNH.reshape(b, L, kv_heads, N // kv_heads, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def blockwise_attention(q, k, v, qseg, kseg, qpos, kpos, scale, block):
    """Document-causal attention of queries q [B,L,K,R,H] (global positions qpos [L]) over keys/values k, v [B,S,K,H]
    (positions kpos [S]) without materialising [L,S]: query t sees key s iff kpos_s <= qpos_t and
    kseg_s == qseg_t. Returns [B,L,K,R,H]."""
    return _blockwise_fwd(q, k, v, qseg, kseg, qpos, kpos, scale, block)[0]


def _blockwise_fwd(q, k, v, qseg, kseg, qpos, kpos, scale, block):
    out, lse = finish(q, forward_chunk(q, k, v, qseg, kseg, qpos, kpos, init_carry(q), scale, block))
    return out, (q, k, v, qseg, kseg, qpos, kpos, out, lse)


def _blockwise_bwd(scale, block, res, do):
    q, k, v, qseg, kseg, qpos, kpos, out, lse = res
    dq, dk, dv = backward_chunk(q, k, v, qseg, kseg, qpos, kpos, do, lse, row_delta(out, do), scale, block)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, *, scale: float, block: int):
    """Document-causal attention of one device's whole sequence: q [B,L,N,H], k/v [B,L,K,H], segment_ids [B,L] int.
    Returns [B,L,N,H]. A length that is not a multiple of `block` is padded at the end: the padded keys lie in the
    future of every real query, so causality alone hides them, and the padded queries are dropped."""
    L = q_BLNH.shape[1]
    block = min(block, L)
    pad = -L % block
    if pad:
        q_BLNH, k_BLKH, v_BLKH, segment_ids_BL = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
                                                  for a in (q_BLNH, k_BLKH, v_BLKH, segment_ids_BL))
    pos = jnp.arange(L + pad)
    out = blockwise_attention(grouped(q_BLNH, k_BLKH.shape[2]), k_BLKH, v_BLKH, segment_ids_BL, segment_ids_BL, pos,
                              pos, float(scale), block)
    return out.reshape(q_BLNH.shape)[:, :L]
