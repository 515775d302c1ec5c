"""Context parallelism: the sequence axis sharded over the `context` mesh axis (docs/long_context.md).

Three token mixers need tokens of other shards; everything else in the model is per token and is partitioned by XLA.
Each mixer here is a pure function that runs inside `shard_map` on one shard's slice and names the mesh axis it
talks over, plus a wrapper that applies `shard_map` over that axis only (the other mesh axes stay automatic, so
batch/FSDP/tensor sharding compose with it unchanged):

- SSD (`ssd` / `ssd_shard`): every shard scans its slice from a zero state; the shards all-gather their final
  states [b,h,p,n] and "pass-through" decays [b,h] (0 when a document boundary lies in the shard), an exclusive scan
  over shards gives each shard its incoming state, and the local outputs get the incoming state's contribution
  C_t . (exp(cumsum dt*A up to t) * S_in) for the tokens before the shard's first boundary.
- Causal conv (`with_previous_tokens`): the d_conv-1 tokens (and segment ids) before the shard come from the
  previous shard by ppermute.
- Attention (`attention`): queries stay local; keys/values are either all-gathered ("all_gather") or passed round
  the ring ("ring"). Both run the flash-style chunks of `blockwise_attention` (online softmax over KV blocks, a
  custom VJP that saves only the output and its log-sum-exp), so no [L_q, L_k] array ever exists.

Shape suffixes: B batch, L local length, S key length, N query heads, K kv heads, R = N/K, H head dim,
h/p/n/g SSD heads/head dim/state/groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from granite_jax import blockwise_attention as blockwise
from pallas_kernels.ssd import ssd as ssd_op, transform_dt

CONTEXT = "context"
ATTENTION_STRATEGIES = ("all_gather", "ring")
BLOCK_SIZE = 512  # query and key block of the blockwise attention (tokens)


def context_size(axis: str = CONTEXT) -> int:
    """Shards of the sequence under the current mesh: the size of `axis`, or 1 without a mesh, without that axis, or
    inside a `shard_map` that already made it manual (the code there sees one shard's tokens only)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names or axis in mesh.manual_axes:
        return 1
    return mesh.shape[axis]


def _over_context(fn, args, specs, out_specs, axis):
    """shard_map of `fn` over mesh axis `axis` only; None entries of `args` are passed through as None."""
    present = [a is not None for a in args]

    def body(*given):
        it = iter(given)
        return fn(*(next(it) if keep else None for keep in present))

    # check_vma=False: a Pallas SSD kernel may run inside (FACTS.md §4).
    mapped = jax.shard_map(body, in_specs=tuple(s for s, k in zip(specs, present) if k), out_specs=out_specs,
                           axis_names={axis}, check_vma=False)
    return mapped(*(a for a in args if a is not None))


def _from_previous(a, axis):
    """`a` of the previous shard along `axis` (zeros on shard 0)."""
    n = jax.lax.axis_size(axis)
    return jax.lax.ppermute(a, axis, [(j, j + 1) for j in range(n - 1)])


# SSD ---------------------------------------------------------------------------------------------------------------

def ssd_shard(x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, impl, interpret, axis):
    """One context shard of the SSD, inside `shard_map` over `axis`.

    x [b,l,h,p], dt [b,l,h] (transformed, float32), B/C [b,l,g,n]: this shard's tokens. A, D [h] and initial_state
    [b,h,p,n] (state before the first token of the whole sequence; None = zeros) are the same on every shard.
    Returns (y [b,l,h,p], final_state [b,h,p,n] of the whole sequence, the same on every shard).
    """
    f32 = jnp.float32
    n_shards, shard = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    b, l, h, p = x.shape
    g, d_state = B.shape[2], B.shape[3]
    y_BLHP, local_final_BHPN = ssd_op(x, dt, A, B, C, chunk_size=chunk_size, D=D, segment_ids=segment_ids,
                                      return_final_state=True, impl=impl, interpret=interpret)

    # Tokens that the incoming state reaches: those before the shard's first document boundary, a boundary on its
    # leading edge (previous shard's last token in another document) included.
    if segment_ids is None:
        carry_BL = jnp.ones((b, l), bool)
    else:
        prev_B1 = jnp.where(shard == 0, segment_ids[:, :1], _from_previous(segment_ids[:, -1:], axis))
        changed_BL = segment_ids != jnp.concatenate([prev_B1, segment_ids[:, :-1]], axis=1)
        carry_BL = jnp.cumsum(changed_BL, axis=1) == 0
    log_decay_BLH = jnp.cumsum(dt.astype(f32) * A.astype(f32), axis=1)  # <= 0
    from_start_BLH = jnp.exp(jnp.where(carry_BL[..., None], log_decay_BLH, -jnp.inf))
    through_BH = from_start_BLH[:, -1]  # decay of the state across the whole shard; 0 if a boundary stops it

    # Exclusive scan over shards of S -> through_j * S + local_final_j. The summaries are small ([b,h,p,n] per shard,
    # independent of the length), so every shard gathers all of them and picks its own incoming state.
    finals_SBHPN = jax.lax.all_gather(local_final_BHPN, axis)
    throughs_SBH = jax.lax.all_gather(through_BH, axis)
    state_BHPN = jnp.zeros((b, h, p, d_state), f32) if initial_state is None else initial_state.astype(f32)
    incoming = []
    for j in range(n_shards):
        incoming.append(state_BHPN)
        state_BHPN = throughs_SBH[j][..., None, None] * state_BHPN + finals_SBHPN[j]
    incoming_BHPN = jnp.stack(incoming)[shard]

    incoming_BGRPN = incoming_BHPN.reshape(b, g, h // g, p, d_state)
    y_in_BLHP = jnp.einsum("blgn,bgrpn->blgrp", C.astype(f32), incoming_BGRPN).reshape(b, l, h, p)
    y_BLHP = (y_BLHP.astype(f32) + y_in_BLHP * from_start_BLH[..., None]).astype(x.dtype)
    return y_BLHP, state_BHPN


def ssd(x, dt, A, B, C, *, chunk_size: int = 256, D=None, dt_bias=None, dt_softplus: bool = False,
        dt_limit=(0.0, float("inf")), initial_state=None, segment_ids=None, return_final_state: bool = False,
        impl: str = "auto", interpret: bool = False, axis: str = CONTEXT):
    """`pallas_kernels.ssd.ssd` (same arguments and result) for a sequence sharded over mesh axis `axis`: each shard
    runs the `impl` core on its own tokens; see `ssd_shard`. Call it under a mesh (`jax.set_mesh`) with that axis."""
    dt_BLH = transform_dt(dt, dt_bias, dt_softplus, dt_limit)
    seq = P(None, axis)
    fn = functools.partial(ssd_shard, chunk_size=chunk_size, impl=impl, interpret=interpret, axis=axis)
    y, final = _over_context(fn, (x, dt_BLH, A, B, C, D, initial_state, segment_ids),
                             (seq, seq, P(), seq, seq, P(), P(), seq), (seq, P()), axis)
    return (y, final) if return_final_state else y


# Causal conv halo --------------------------------------------------------------------------------------------------

def previous_tokens(x_BLC, segment_ids_BL, width: int, axis: str):
    """(x [B,width,C], segment ids [B,width] or None): the last `width` tokens of the previous shard, inside
    `shard_map` over `axis`. Shard 0 gets zeros with segment id -1 (no document), like zero padding."""
    if x_BLC.shape[1] < width:
        raise ValueError(f"each context shard needs at least {width} tokens for the causal conv, got "
                         f"{x_BLC.shape[1]}; use a shorter context axis or longer sequences")
    x_hist = _from_previous(x_BLC[:, x_BLC.shape[1] - width:], axis)
    if segment_ids_BL is None:
        return x_hist, None
    seg_hist = _from_previous(segment_ids_BL[:, segment_ids_BL.shape[1] - width:], axis)
    return x_hist, jnp.where(jax.lax.axis_index(axis) == 0, -1, seg_hist)


def with_previous_tokens(fn, x_BLC, segment_ids_BL, *params, width: int, axis: str = CONTEXT):
    """`fn(x, segment_ids, *params, history=(x_prev, seg_prev))` on each shard of a sequence sharded over `axis`,
    where the history is `previous_tokens(..., width)`. `params` (weights; None allowed) are not split over `axis`.
    Returns fn's [B,L,...] result, sharded like x."""
    seq = P(None, axis)

    def body(x, seg, *weights):
        return fn(x, seg, *weights, history=previous_tokens(x, seg, width, axis))

    return _over_context(body, (x_BLC, segment_ids_BL, *params), (seq, seq) + (P(),) * len(params), seq, axis)


# Attention ---------------------------------------------------------------------------------------------------------

def _positions(L, axis):
    return jax.lax.axis_index(axis) * L + jnp.arange(L)


def all_gather_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, *, scale, axis, block=BLOCK_SIZE):
    """Inside `shard_map` over `axis`: local queries against all-gathered keys/values (and segment ids). The gathered
    K/V ([B, L*shards, K, H]) must fit on a device; the scores never exist whole. Returns [B,L,N,H]."""
    L, K = q_BLNH.shape[1], k_BLKH.shape[2]
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
    k_all, v_all, seg_all = gather(k_BLKH), gather(v_BLKH), gather(segment_ids_BL)
    out = blockwise.blockwise_attention(blockwise.grouped(q_BLNH, K), k_all, v_all, segment_ids_BL, seg_all,
                                        _positions(L, axis), jnp.arange(k_all.shape[1]), scale, block)
    return out.reshape(q_BLNH.shape)


def _ring_next(tree, axis):
    n = jax.lax.axis_size(axis)
    return jax.lax.ppermute(tree, axis, [(j, (j + 1) % n) for j in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring(q, k, v, seg, scale, axis, block):
    return _ring_fwd(q, k, v, seg, scale, axis, block)[0]


def _ring_fwd(q, k, v, seg, scale, axis, block):
    n, L = jax.lax.axis_size(axis), q.shape[1]
    qpos = _positions(L, axis)
    carry, kv = blockwise.init_carry(q), (k, v, seg)
    for step in range(n):  # at step s this shard holds the keys of shard (i - s) mod n
        kpos = ((jax.lax.axis_index(axis) - step) % n) * L + jnp.arange(L)
        carry = blockwise.forward_chunk(q, *kv[:2], seg, kv[2], qpos, kpos, carry, scale, block)
        if step < n - 1:
            kv = _ring_next(kv, axis)
    out, lse = blockwise.finish(q, carry)
    return out, (q, k, v, seg, out, lse)


def _ring_bwd(scale, axis, block, res, do):
    q, k, v, seg, out, lse = res
    n, L = jax.lax.axis_size(axis), q.shape[1]
    qpos, delta = _positions(L, axis), blockwise.row_delta(out, do)
    dq = jnp.zeros(q.shape, jnp.float32)
    kv, dkv = (k, v, seg), (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for step in range(n):  # each key block's gradient travels with it and arrives home after n hops
        kpos = ((jax.lax.axis_index(axis) - step) % n) * L + jnp.arange(L)
        ddq, ddk, ddv = blockwise.backward_chunk(q, *kv[:2], seg, kv[2], qpos, kpos, do, lse, delta, scale, block)
        dq, dkv = dq + ddq, (dkv[0] + ddk, dkv[1] + ddv)
        if step < n - 1:
            kv = _ring_next(kv, axis)
        dkv = _ring_next(dkv, axis)
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, *, scale, axis, block=BLOCK_SIZE):
    """Inside `shard_map` over `axis`: local queries while key/value blocks travel round the ring (ppermute), with an
    online softmax across ring steps; memory per device is one K/V block, not the whole sequence. Returns [B,L,N,H]."""
    out = _ring(blockwise.grouped(q_BLNH, k_BLKH.shape[2]), k_BLKH, v_BLKH, segment_ids_BL, scale, axis, block)
    return out.reshape(q_BLNH.shape)


def attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, *, scale: float, strategy: str = "all_gather",
              axis: str = CONTEXT, block: int | None = None):
    """Document-causal grouped-query attention of a sequence sharded over mesh axis `axis` (under `jax.set_mesh`).
    q [B,L,N,H], k/v [B,L,K,H], segment_ids [B,L] int; `strategy` "all_gather" or "ring". Returns [B,L,N,H]."""
    if strategy not in ATTENTION_STRATEGIES:
        raise ValueError(f"context attention strategy {strategy!r}: choose one of {ATTENTION_STRATEGIES}")
    fn = all_gather_attention if strategy == "all_gather" else ring_attention
    seq = P(None, axis)
    body = functools.partial(fn, scale=float(scale), axis=axis, block=block or BLOCK_SIZE)
    return _over_context(body, (q_BLNH, k_BLKH, v_BLKH, segment_ids_BL), (seq,) * 4, seq, axis)
