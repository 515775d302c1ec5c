"""Pure-JAX chunked SSD (Mamba-2's state-space duality algorithm): the `impl="xla"` core of `pallas_kernels.ssd.ssd`.

The sequence is cut into chunks of Q tokens. Within a chunk the scan is an attention-like masked matmul; across chunks
a short `lax.scan` carries the [h,p,n] state. All arithmetic is float32 whatever the input dtype.

Shape suffixes: B batch, L (padded) length, C chunks, Q / K query / key position within a chunk, H heads,
G groups, R heads per group (H = G*R), P head dim, N state dim.

Document boundaries (segment ids) are handled through a "run" index: the number of segment changes up to a token.
Two tokens share state only if they have the same run, so an id that reappears after a change (1, 2, 1) still starts
a fresh state, exactly as the token-by-token definition resets on any change between neighbours.
"""

from functools import partial

import jax
import jax.numpy as jnp


def _exp_where(mask, log_decay):
    """exp(log_decay) where mask, else 0; the mask is applied before the exp so that neither the forward pass nor the
    gradient ever sees exp of a masked (possibly huge positive) exponent, i.e. no inf * 0."""
    return jnp.exp(jnp.where(mask, log_decay, -jnp.inf))


def _run_index(segment_ids_BL):
    """[b,l] int32: number of segment changes between token 0 and each token (0 when segment_ids is None)."""
    changed_BL = segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]
    zeros_B1 = jnp.zeros((segment_ids_BL.shape[0], 1), jnp.int32)
    return jnp.concatenate([zeros_B1, jnp.cumsum(changed_BL, axis=1, dtype=jnp.int32)], axis=1)


@partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def ssd_core(x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, interpret=False):
    """Chunked SSD. See `pallas_kernels.ssd.ssd` for the semantics; `dt` is already transformed.

    x [b,l,h,p], dt [b,l,h] float32, A [h], B/C [b,l,g,n], D [h] or None, initial_state [b,h,p,n] or None,
    segment_ids [b,l] int or None. Returns (y [b,l,h,p] in x.dtype, final_state [b,h,p,n] float32).
    `interpret` is accepted for the common core signature and ignored.
    """
    del interpret
    f32 = jnp.float32
    batch, length, n_heads, head_dim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    heads_per_group = n_heads // n_groups
    Q = chunk_size
    n_chunks = -(-length // Q)
    pad = n_chunks * Q - length

    # Padding tokens have dt = 0 (decay 1, no input) and continue the last segment, so they leave the state untouched.
    def pad_time(a):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

    x_BLHP = pad_time(x.astype(f32))
    dt_BLH = pad_time(dt.astype(f32))
    B_BLGN = pad_time(B.astype(f32))
    C_BLGN = pad_time(C.astype(f32))
    if segment_ids is None:
        run_BL = jnp.zeros((batch, n_chunks * Q), jnp.int32)
    else:
        run_BL = jnp.pad(_run_index(segment_ids), [(0, 0), (0, pad)], mode="edge")

    def chunked(a):  # [b, L, ...] -> [b, C, Q, ...]
        return a.reshape(batch, n_chunks, Q, *a.shape[2:])

    x_BCQGRP = chunked(x_BLHP).reshape(batch, n_chunks, Q, n_groups, heads_per_group, head_dim)
    dt_BCQGR = chunked(dt_BLH).reshape(batch, n_chunks, Q, n_groups, heads_per_group)
    B_BCQGN = chunked(B_BLGN)
    C_BCQGN = chunked(C_BLGN)
    run_BCQ = chunked(run_BL)
    A_GR = A.astype(f32).reshape(n_groups, heads_per_group)

    # Log-decay accumulated from the chunk start through each token (inclusive).
    cum_BCQGR = jnp.cumsum(dt_BCQGR * A_GR, axis=2)
    cum_last_BCGR = cum_BCQGR[:, :, -1]
    run_last_BC = run_BCQ[:, :, -1]
    # The run the carried-in state belongs to: that of the previous chunk's last token (the first token for chunk 0,
    # since the initial state is never reset before token 0).
    run_prev_BC = jnp.concatenate([run_BCQ[:, :1, 0], run_BCQ[:, :-1, -1]], axis=1)

    # 1. Intra-chunk, attention-like: y_q += sum_{k<=q, same run} (C_q . B_k) exp(cum_q - cum_k) dt_k x_k.
    causal_QK = jnp.tril(jnp.ones((Q, Q), bool))
    visible_BCQK = causal_QK & (run_BCQ[:, :, :, None] == run_BCQ[:, :, None, :])
    cum_BCGRQ = cum_BCQGR.transpose(0, 1, 3, 4, 2)
    log_decay_BCGRQK = cum_BCGRQ[..., :, None] - cum_BCGRQ[..., None, :]
    decay_BCGRQK = _exp_where(visible_BCQK[:, :, None, None], log_decay_BCGRQK)
    scores_BCGQK = jnp.einsum("bcqgn,bckgn->bcgqk", C_BCQGN, B_BCQGN)
    dt_BCGRK = dt_BCQGR.transpose(0, 1, 3, 4, 2)
    weights_BCGRQK = scores_BCGQK[:, :, :, None] * decay_BCGRQK * dt_BCGRK[..., None, :]
    y_BCQGRP = jnp.einsum("bcgrqk,bckgrp->bcqgrp", weights_BCGRQK, x_BCQGRP)

    # 2. Each chunk's own contribution to the state at its end: only tokens of the chunk's last run.
    to_end_BCQGR = _exp_where(
        (run_BCQ == run_last_BC[:, :, None])[:, :, :, None, None], cum_last_BCGR[:, :, None] - cum_BCQGR
    )
    chunk_state_BCGRPN = jnp.einsum("bcqgn,bcqgrp->bcgrpn", B_BCQGN, x_BCQGRP * (to_end_BCQGR * dt_BCQGR)[..., None])

    # 3. Carry the state across chunks. A chunk passes the carried-in state on (decayed) only if no boundary lies in
    # it or on its leading edge.
    through_BCGR = _exp_where((run_last_BC == run_prev_BC)[:, :, None, None], cum_last_BCGR)

    def step(state_BGRPN, inputs):
        through_BGR, chunk_state_BGRPN = inputs
        return through_BGR[..., None, None] * state_BGRPN + chunk_state_BGRPN, state_BGRPN

    if initial_state is None:
        state0_BGRPN = jnp.zeros((batch, n_groups, heads_per_group, head_dim, d_state), f32)
    else:
        state0_BGRPN = initial_state.astype(f32).reshape(batch, n_groups, heads_per_group, head_dim, d_state)
    final_BGRPN, carried_CBGRPN = jax.lax.scan(
        step, state0_BGRPN, (jnp.moveaxis(through_BCGR, 1, 0), jnp.moveaxis(chunk_state_BCGRPN, 1, 0))
    )
    carried_BCGRPN = jnp.moveaxis(carried_CBGRPN, 0, 1)

    # 4. Carried-in state seen by each token, up to the chunk's first boundary.
    from_start_BCQGR = _exp_where((run_BCQ == run_prev_BC[:, :, None])[:, :, :, None, None], cum_BCQGR)
    y_BCQGRP += jnp.einsum("bcqgn,bcgrpn->bcqgrp", C_BCQGN, carried_BCGRPN) * from_start_BCQGR[..., None]

    y_BLHP = y_BCQGRP.reshape(batch, n_chunks * Q, n_heads, head_dim)[:, :length]
    if D is not None:
        y_BLHP += D.astype(f32)[:, None] * x_BLHP[:, :length]
    final_BHPN = final_BGRPN.reshape(batch, n_heads, head_dim, d_state)
    return y_BLHP.astype(x.dtype), final_BHPN
