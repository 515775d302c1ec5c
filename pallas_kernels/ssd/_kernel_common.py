"""What the Pallas SSD kernels share: input preparation, per-chunk math, custom_vjp wiring, the shard_map wrapper.

A backend (`pallas_tpu`, `pallas_gpu`) only decides how chunks are walked and how tiles are loaded; the arithmetic of
one chunk, forward and backward, lives here in `chunk_forward` / `chunk_backward` and is traced into both kernels.

Kernel layout (head-major, chunk-padded; Q = the backend's chunk, Lp = l rounded up to Q, nc = Lp / Q):
  x_BHLP [b,h,Lp,p]     B_BGLN, C_BGLN [b,g,Lp,n]     init_BHPN [b,h,p,n] float32
  per-token float32 scalars [b,h,Lp]:
    cs   within-chunk inclusive cumsum of dt*A          (<= 0 and non-increasing when A <= 0, dt >= 0)
    dt   the transformed step
    doc  document index: cumsum of segment changes, so equal doc <=> no reset in between (float32: exact < 2**24)
    r    carry_t * exp(cs_t): weight of the state entering the chunk in y_t; carry_t = (doc_t == doc of the token
         before the chunk); r at the chunk's last token is also the decay of the whole chunk's carried state
    w    tail_t * exp(cs_last - cs_t) * dt_t: weight of token t in the state leaving the chunk;
         tail_t = (doc_t == doc_last)
Every exponent above is a non-positive difference (clamped with min(., 0)), so nothing overflows.

Gradients: the kernels' custom_vjp returns gradients for x, B, C, init and the four per-token scalars (cs, dt, r, w);
everything before them (padding, dt*A, the chunk cumsum, exp/masks giving r and w) and after them (D*x, un-padding) is
elementwise/cumsum plain JAX, differentiated by JAX. That is how dt, A and D get their gradients.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# ----------------------------------------------------------------------------------------------------------------------
# Shapes.


def round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def next_power_of_2(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(v, 1))))


def index_div(i, k: int):
    """i // k for a non-negative grid index in a BlockSpec index map, as lax.div with k in i's dtype (a bare Python
    int would become int64 under jax_enable_x64 and lax.div refuses mixed dtypes). lax.div, not //: floor division
    lowers through sign(), for which Mosaic asks the TPU generation of the current backend."""
    return jax.lax.div(i, np.asarray(k, dtype=i.dtype))


def check_shapes(x, dt, A, B, C, D, initial_state, segment_ids):
    """Raise a ValueError that names the offending argument when shapes disagree with the SSD contract."""
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, length, heads, head_dim], got shape {x.shape}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be [batch, length, heads] = {(b, l, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"A must be [heads] = {(h,)}, got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"B and C must both be [batch, length, groups, d_state] with batch, length = {(b, l)}; "
                         f"got B {B.shape}, C {C.shape}")
    g = B.shape[2]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of n_groups ({g})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be [heads] = {(h,)}, got {D.shape}")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"initial_state must be [b,h,p,n] = {(b, h, p, B.shape[3])}, got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, l):
        raise ValueError(f"segment_ids must be [batch, length] = {(b, l)}, got {segment_ids.shape}")


# ----------------------------------------------------------------------------------------------------------------------
# Preparation outside the kernels (plain JAX, differentiated by JAX).


def document_index(segment_ids, b, l):
    """[b,l] float32: number of segment changes up to and including t (0 for the first document)."""
    if segment_ids is None:
        return jnp.zeros((b, l), jnp.float32)
    changed = jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jnp.cumsum(changed.astype(jnp.int32), axis=1).astype(jnp.float32)


def token_scalars(dt_BLH, A_H, doc_BL, chunk: int, padded_len: int):
    """Per-token float32 scalars in kernel layout [b,h,Lp]: dict with cs, dt, doc, r, w (see module docstring).

    Padding tokens get dt = 0 and the last real token's document, so they neither decay nor feed the state."""
    b, l, h = dt_BLH.shape
    pad = padded_len - l
    dt_BHL = jnp.pad(jnp.transpose(dt_BLH.astype(jnp.float32), (0, 2, 1)), ((0, 0), (0, 0), (0, pad)))
    doc_BL = jnp.pad(doc_BL, ((0, 0), (0, pad)), mode="edge")
    nc = padded_len // chunk
    dA_BHCQ = (dt_BHL * A_H.astype(jnp.float32)[None, :, None]).reshape(b, h, nc, chunk)
    cs_BHCQ = jnp.cumsum(dA_BHCQ, axis=-1)
    doc_BCQ = doc_BL.reshape(b, nc, chunk)
    # Document of the token just before each chunk; the initial state belongs to the first document.
    doc_prev_BC = jnp.concatenate([doc_BCQ[:, :1, 0], doc_BCQ[:, :-1, -1]], axis=1)
    carry_BCQ = doc_BCQ == doc_prev_BC[:, :, None]
    tail_BCQ = doc_BCQ == doc_BCQ[:, :, -1:]
    r_BHCQ = jnp.where(carry_BCQ[:, None], jnp.exp(jnp.minimum(cs_BHCQ, 0.0)), 0.0)
    decay_to_end = jnp.exp(jnp.minimum(cs_BHCQ[..., -1:] - cs_BHCQ, 0.0))
    w_BHCQ = jnp.where(tail_BCQ[:, None], decay_to_end, 0.0) * dt_BHL.reshape(b, h, nc, chunk)
    flat = lambda a: a.reshape(b, h, padded_len)
    doc_BHL = jnp.broadcast_to(doc_BL[:, None], (b, h, padded_len))
    return dict(cs=flat(cs_BHCQ), dt=dt_BHL, doc=doc_BHL, r=flat(r_BHCQ), w=flat(w_BHCQ))


def to_kernel_layout(a_BLXY, padded_len: int, last_dim: int):
    """[b,l,X,Y] -> [b,X,Lp,last_dim], zero padded along length and the last dim."""
    a = jnp.transpose(a_BLXY, (0, 2, 1, 3))
    return jnp.pad(a, ((0, 0), (0, 0), (0, padded_len - a.shape[2]), (0, last_dim - a.shape[3])))


# ----------------------------------------------------------------------------------------------------------------------
# The math of one chunk, traced into every backend's kernel. Vectors come as columns `_c` [Q,1] and rows `_r` [1,Q].


def _dot(a, b, a_dim, b_dim):
    """Matmul contracting a's dim `a_dim` with b's dim `b_dim`, float32 accumulation. Float32 operands ask for full
    precision (TF32 on GPU / one bf16 pass on TPU would break the float32 tolerances)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def mm(a, b):  # a @ b
    return _dot(a, b, 1, 0)


def mm_nt(a, b):  # a @ b.T
    return _dot(a, b, 1, 1)


def mm_tn(a, b):  # a.T @ b
    return _dot(a, b, 0, 0)


def _intra_weights(cs_c, cs_r, doc_c, doc_r):
    """L[i,j] = exp(cs_i - cs_j) for j <= i in the same document, else 0. [Q,Q] float32."""
    q = cs_c.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    keep = (row >= col) & (doc_c == doc_r)
    return jnp.where(keep, jnp.exp(jnp.minimum(cs_c - cs_r, 0.0)), 0.0)


def _last_of(v_c):
    """[Q,1] -> [1,1]: the chunk's last entry, as a reduction (no dynamic slicing, lowers on every backend)."""
    q = v_c.shape[0]
    is_last = jax.lax.broadcasted_iota(jnp.int32, (q, 1), 0) == q - 1
    return jnp.sum(jnp.where(is_last, v_c, 0.0), axis=0, keepdims=True)


def chunk_forward(x, B, C, cs_c, cs_r, dt_r, doc_c, doc_r, r_c, w_c, S_in):
    """One chunk: x [Q,P], B/C [Q,N] (input dtype), S_in [P,N] float32 -> (y [Q,P] float32, S_out [P,N] float32)."""
    cdt = x.dtype
    L = _intra_weights(cs_c, cs_r, doc_c, doc_r)
    M = mm_nt(C, B) * L * dt_r
    y = mm(M.astype(cdt), x) + r_c * mm_nt(C, S_in.astype(cdt))
    S_out = _last_of(r_c) * S_in + mm_tn((w_c * x).astype(cdt), B)
    return y, S_out


def chunk_backward(x, B, C, cs_c, cs_r, dt_r, doc_c, doc_r, r_c, w_c, S_in, dy, dS_out):
    """Gradients of one chunk given dy [Q,P] and dS_out [P,N] (float32).

    Returns dx [Q,P], dB [Q,N], dC [Q,N], dS_in [P,N] (all float32) and the per-token gradients
    dcs_c (a [Q,1] part) + dcs_r (a [1,Q] part) of cs, ddt_r [1,Q], dr_c [Q,1], dw_c [Q,1]."""
    cdt = x.dtype
    dy = dy.astype(cdt)
    L = _intra_weights(cs_c, cs_r, doc_c, doc_r)
    G = mm_nt(C, B)
    dM = mm_nt(dy, x)  # dL/dM[i,j] = dy_i . x_j
    F = dM * G * L  # d/d(dt_j) of the intra term, before summing over i
    E = F * dt_r  # = dM * M: d/d(cs) through L, (+ at row i, - at column j)
    dG = dM * L * dt_r
    M = G * L * dt_r
    S_in_c = S_in.astype(cdt)
    ry = (r_c * dy).astype(cdt)
    x_dS = mm(x, dS_out.astype(cdt))  # [Q,N]
    dx = mm_tn(M.astype(cdt), dy) + w_c * mm_nt(B, dS_out.astype(cdt))
    dB = mm_tn(dG.astype(cdt), C) + w_c * x_dS
    dC = mm(dG.astype(cdt), B) + mm(ry, S_in_c)
    dS_in = _last_of(r_c) * dS_out + mm_tn(ry, C)
    dcs_c = jnp.sum(E, axis=1, keepdims=True)
    dcs_r = -jnp.sum(E, axis=0, keepdims=True)
    ddt_r = jnp.sum(F, axis=0, keepdims=True)
    q = x.shape[0]
    is_last = jax.lax.broadcasted_iota(jnp.int32, (q, 1), 0) == q - 1
    chunk_decay_grad = jnp.sum(jnp.sum(dS_out * S_in, axis=1, keepdims=True), axis=0, keepdims=True)
    dr_c = (jnp.sum(dy.astype(jnp.float32) * mm_nt(C, S_in_c), axis=1, keepdims=True)
            + jnp.where(is_last, chunk_decay_grad, 0.0))
    dw_c = jnp.sum(B.astype(jnp.float32) * x_dS, axis=1, keepdims=True)
    return dx, dB, dC, dS_in, dcs_c, dcs_r, ddt_r, dr_c, dw_c


# ----------------------------------------------------------------------------------------------------------------------
# custom_vjp wiring, shared by the backends.


def make_chunked_core(forward, states, backward):
    """The differentiable kernel-layout core from a backend's three pallas_calls.

    forward(x, B, C, tok, init, chunk, interpret) -> (y [b,h,Lp,P] x.dtype, final [b,h,P,N] f32)
    states(x, B, C, tok, init, chunk, interpret) -> S_in per chunk [b,h,nc,P,N] f32 (recomputed in the backward)
    backward(x, B, C, tok, states, dy, dfinal, chunk, interpret) ->
        (dx, dB per head [b,h,Lp,N] (or per part of a head [b,h*k,Lp,N], head-major), dC likewise, dinit,
         dtok dict with cs, dt, r, w)
    where tok is the dict from `token_scalars`."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
    def core(x, B, C, cs, dt, r, w, doc, init, chunk, interpret):
        tok = dict(cs=cs, dt=dt, doc=doc, r=r, w=w)
        return forward(x, B, C, tok, init, chunk, interpret)

    def core_fwd(x, B, C, cs, dt, r, w, doc, init, chunk, interpret):
        out = core(x, B, C, cs, dt, r, w, doc, init, chunk, interpret)
        return out, (x, B, C, cs, dt, r, w, doc, init)  # inputs only: chunk states are recomputed in the backward

    def core_bwd(chunk, interpret, res, cotangents):
        x, B, C, cs, dt, r, w, doc, init = res
        dy, dfinal = cotangents
        tok = dict(cs=cs, dt=dt, doc=doc, r=r, w=w)
        S_in = states(x, B, C, tok, init, chunk, interpret)
        dx, dB_BHLN, dC_BHLN, dinit, dtok = backward(x, B, C, tok, S_in, dy.astype(x.dtype),
                                                      dfinal.astype(jnp.float32), chunk, interpret)
        b, g = B.shape[:2]
        # dB, dC come per head, or per finer part of a head (group-major): summed per group in one reduction.
        per_group = lambda d: d.reshape(b, g, -1, *d.shape[2:]).sum(axis=2).astype(B.dtype)
        return (dx.astype(x.dtype), per_group(dB_BHLN), per_group(dC_BHLN), dtok["cs"], dtok["dt"], dtok["r"],
                dtok["w"], jnp.zeros_like(doc), dinit)

    core.defvjp(core_fwd, core_bwd)
    return core


def ssd_core_from(chunked_core, x, dt, A, B, C, D, initial_state, segment_ids, *, chunk, p_pad, n_pad, interpret):
    """The `ssd_core` contract on top of a backend's `chunked_core` (see `make_chunked_core`).

    chunk: the backend's chunk length; p_pad/n_pad: head_dim/d_state after the backend's padding; interpret: passed
    to the backend's pallas_calls (hashable: False, True or a `pltpu.InterpretParams`)."""
    check_shapes(x, dt, A, B, C, D, initial_state, segment_ids)
    b, l, h, p = x.shape
    n = B.shape[3]
    Lp = round_up(l, chunk)
    tok = token_scalars(dt, A, document_index(segment_ids, b, l), chunk, Lp)
    x_k = to_kernel_layout(x, Lp, p_pad)
    B_k = to_kernel_layout(B, Lp, n_pad)
    C_k = to_kernel_layout(C.astype(B.dtype), Lp, n_pad)
    if initial_state is None:
        init_k = jnp.zeros((b, h, p_pad, n_pad), jnp.float32)
    else:
        init_k = jnp.pad(initial_state.astype(jnp.float32), ((0, 0), (0, 0), (0, p_pad - p), (0, n_pad - n)))
    y_k, final_k = chunked_core(x_k, B_k, C_k, tok["cs"], tok["dt"], tok["r"], tok["w"], tok["doc"], init_k, chunk,
                                 interpret)
    y = jnp.transpose(y_k[:, :, :l, :p], (0, 2, 1, 3))
    if D is not None:
        y = y + (D.astype(jnp.float32)[None, None, :, None] * x.astype(jnp.float32))
    return y.astype(x.dtype), final_k[:, :, :p, :n]


# ----------------------------------------------------------------------------------------------------------------------
# Sharding.


def shard_ssd_core(core_fn, mesh, *, batch_axes=("data", "fsdp"), head_axes=("tensor",)):
    """Wrap an `ssd_core(x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, interpret)` so that inside a
    sharded `jax.jit` each device runs the kernel on its own batch rows and heads (Pallas kernels are not partitioned by
    XLA). Mesh axes named here but absent from `mesh` are ignored. Groups are sharded with the heads when the head
    shard count divides n_groups, else replicated (then n_groups must be 1, so every head uses group 0)."""
    batch = tuple(a for a in batch_axes if a in mesh.axis_names) or None
    heads = tuple(a for a in head_axes if a in mesh.axis_names) or None
    head_shards = int(np.prod([mesh.shape[a] for a in heads])) if heads else 1

    def wrapped(x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, interpret=False):
        g = B.shape[2]
        if g % head_shards == 0:
            groups = heads
        elif g == 1:
            groups = None
        else:
            raise ValueError(f"n_groups={g} cannot follow heads split {head_shards} ways over mesh axes {heads}: "
                             "use n_groups 1 or a multiple of the head shard count")
        args = (x, dt, A, B, C, D, initial_state, segment_ids)
        specs = (P(batch, None, heads, None), P(batch, None, heads), P(heads), P(batch, None, groups, None),
                 P(batch, None, groups, None), P(heads), P(batch, heads, None, None), P(batch, None))
        present = [a is not None for a in args]

        def body(*given):
            it = iter(given)
            full = [next(it) if keep else None for keep in present]
            return core_fn(*full, chunk_size=chunk_size, interpret=interpret)

        return jax.shard_map(body, mesh=mesh, in_specs=tuple(s for s, k in zip(specs, present) if k),
                             out_specs=(P(batch, None, heads, None), P(batch, heads, None, None)),
                             check_vma=False)(*(a for a in args if a is not None))

    return wrapped
