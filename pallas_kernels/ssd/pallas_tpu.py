"""Chunked SSD on TPU: Pallas Mosaic kernels, forward and hand-written backward (`impl="pallas_tpu"`).

Grid (batch, heads, chunks) with ("parallel", "parallel", "arbitrary") semantics: each (batch row, head) walks its
chunks in order and carries the [p, n] float32 state in VMEM scratch. One grid step loads one chunk's tiles:
x/y [Q, p], B/C [Q, n] (the head's group), and the per-token scalars packed as rows [3, Q] (cs, dt, doc) and columns
[Q, 4] (cs, doc, r, w), so no in-kernel transpose or cumsum is needed (cumsums are taken outside; see _kernel_common).

Block shapes: Q is a multiple of 128 (lanes) and of 8 (sublanes); p and n are full-extent blocks, which Mosaic accepts
at any size (pads them in vregs), so Granite's p=64 is not padded in HBM. The backward is two kernels: a forward pass
that writes the state entering each chunk (recomputed, not kept from the forward), then a reverse pass over chunks
carrying dS in scratch.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd import _kernel_common as kc

LANES = 128
# Per-token scalars travel lane-dense, one row per quantity ([b,h,k,L]: L on the 128 lanes). A [b,h,L,k] column
# layout would be padded from k to 128 lanes in HBM (32x-128x its size: gigabytes per layer at 128K tokens); the
# kernel turns the rows it needs into columns in VMEM instead.
_ROWS = ("cs", "dt", "doc", "r", "w")
_DROWS = ("cs", "dt", "r", "w")
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _interpret_arg(interpret):
    """True means the TPU interpreter (TPU semantics simulated on CPU); InterpretParams pass through."""
    return pltpu.InterpretParams() if interpret is True else (interpret or False)


def _pack(tok):
    return jnp.stack([tok[k] for k in _ROWS], axis=2)  # [b,h,5,Lp]


def _diagonal(q):
    return jax.lax.broadcasted_iota(jnp.int32, (q, q), 0) == jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)


def _column(row, diagonal):
    """[1,Q] -> [Q,1] through the diagonal (a masked lane reduction: no relayout for Mosaic to support)."""
    return jnp.sum(jnp.where(diagonal, row, 0.0), axis=1, keepdims=True)


def _row(column, diagonal):
    """[Q,1] -> [1,Q], the inverse of `_column`."""
    return jnp.sum(jnp.where(diagonal, column, 0.0), axis=0, keepdims=True)


def _chunk_vectors(rows_ref):
    rows = rows_ref[...]
    cs_r, dt_r, doc_r, r_r, w_r = (rows[i:i + 1, :] for i in range(len(_ROWS)))
    diagonal = _diagonal(rows.shape[1])
    return dict(cs_c=_column(cs_r, diagonal), cs_r=cs_r, dt_r=dt_r, doc_c=_column(doc_r, diagonal), doc_r=doc_r,
                r_c=_column(r_r, diagonal), w_c=_column(w_r, diagonal)), diagonal


def _specs(b, h, g, Lp, p, n, chunk, reverse=False):
    """BlockSpecs for one chunk of each kernel-layout array; `reverse` walks chunks last to first."""
    nc = Lp // chunk
    hpg = h // g
    c_of = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
    sq = pl.squeezed
    # kc.index_div: floor division lowers through sign(), for which Mosaic asks the TPU generation of the current
    # device and so fails to lower off-TPU (jax.export for "tpu" from a CPU host).
    return dict(
        x=pl.BlockSpec((sq, sq, chunk, p), lambda bi, hi, ci: (bi, hi, c_of(ci), 0)),
        bc=pl.BlockSpec((sq, sq, chunk, n), lambda bi, hi, ci: (bi, kc.index_div(hi, hpg), c_of(ci), 0)),
        bc_h=pl.BlockSpec((sq, sq, chunk, n), lambda bi, hi, ci: (bi, hi, c_of(ci), 0)),
        rows=pl.BlockSpec((sq, sq, len(_ROWS), chunk), lambda bi, hi, ci: (bi, hi, 0, c_of(ci))),
        drows=pl.BlockSpec((sq, sq, len(_DROWS), chunk), lambda bi, hi, ci: (bi, hi, 0, c_of(ci))),
        state=pl.BlockSpec((sq, sq, p, n), lambda bi, hi, ci: (bi, hi, 0, 0)),
        chunk_state=pl.BlockSpec((sq, sq, sq, p, n), lambda bi, hi, ci: (bi, hi, c_of(ci), 0, 0)),
    )


def _forward_kernel(x_ref, b_ref, c_ref, rows_ref, init_ref, *refs, emit_states):
    if emit_states:
        states_ref, S_scr = refs
    else:
        y_ref, final_ref, S_scr = refs
    ci = pl.program_id(2)

    @pl.when(ci == 0)
    def _():
        S_scr[...] = init_ref[...]

    S_in = S_scr[...]
    v, _ = _chunk_vectors(rows_ref)
    y, S_out = kc.chunk_forward(x_ref[...], b_ref[...], c_ref[...], v["cs_c"], v["cs_r"], v["dt_r"], v["doc_c"],
                                v["doc_r"], v["r_c"], v["w_c"], S_in)
    S_scr[...] = S_out
    if emit_states:
        states_ref[...] = S_in
    else:
        y_ref[...] = y.astype(y_ref.dtype)

        @pl.when(ci == pl.num_programs(2) - 1)
        def _():
            final_ref[...] = S_out


def _forward_call(x, B, C, tok, init, chunk, interpret, emit_states):
    b, h, Lp, p = x.shape
    g, n = B.shape[1], B.shape[3]
    nc = Lp // chunk
    s = _specs(b, h, g, Lp, p, n, chunk)
    rows = _pack(tok)
    if emit_states:
        out_shape = jax.ShapeDtypeStruct((b, h, nc, p, n), jnp.float32)
        out_specs = s["chunk_state"]
    else:
        out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, p, n), jnp.float32))
        out_specs = (s["x"], s["state"])
    return pl.pallas_call(
        functools.partial(_forward_kernel, emit_states=emit_states),
        grid=(b, h, nc),
        in_specs=[s["x"], s["bc"], s["bc"], s["rows"], s["state"]],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((p, n), jnp.float32)],
        compiler_params=_SEMANTICS,
        interpret=_interpret_arg(interpret),
        name="ssd_states_tpu" if emit_states else "ssd_forward_tpu",
    )(x, B, C, rows, init)


def _forward(x, B, C, tok, init, chunk, interpret):
    return _forward_call(x, B, C, tok, init, chunk, interpret, emit_states=False)


def _states(x, B, C, tok, init, chunk, interpret):
    return _forward_call(x, B, C, tok, init, chunk, interpret, emit_states=True)


def _backward_kernel(x_ref, b_ref, c_ref, rows_ref, s_ref, dy_ref, dfinal_ref,
                     dx_ref, db_ref, dc_ref, drows_ref, dinit_ref, dS_scr):
    ci = pl.program_id(2)  # ci = 0 is the last chunk

    @pl.when(ci == 0)
    def _():
        dS_scr[...] = dfinal_ref[...]

    v, diagonal = _chunk_vectors(rows_ref)
    dx, dB, dC, dS_in, dcs_c, dcs_r, ddt_r, dr_c, dw_c = kc.chunk_backward(
        x_ref[...], b_ref[...], c_ref[...], v["cs_c"], v["cs_r"], v["dt_r"], v["doc_c"], v["doc_r"], v["r_c"],
        v["w_c"], s_ref[...], dy_ref[...], dS_scr[...])
    dx_ref[...] = dx.astype(dx_ref.dtype)
    db_ref[...] = dB
    dc_ref[...] = dC
    drows_ref[0:1, :] = dcs_r + _row(dcs_c, diagonal)
    drows_ref[1:2, :] = ddt_r
    drows_ref[2:3, :] = _row(dr_c, diagonal)
    drows_ref[3:4, :] = _row(dw_c, diagonal)
    dS_scr[...] = dS_in

    @pl.when(ci == pl.num_programs(2) - 1)
    def _():
        dinit_ref[...] = dS_in


def _backward(x, B, C, tok, S_in, dy, dfinal, chunk, interpret):
    b, h, Lp, p = x.shape
    g, n = B.shape[1], B.shape[3]
    nc = Lp // chunk
    s = _specs(b, h, g, Lp, p, n, chunk, reverse=True)
    rows = _pack(tok)
    f32 = jnp.float32
    dx, dB, dC, drows, dinit = pl.pallas_call(
        _backward_kernel,
        grid=(b, h, nc),
        in_specs=[s["x"], s["bc"], s["bc"], s["rows"], s["chunk_state"], s["x"], s["state"]],
        out_specs=(s["x"], s["bc_h"], s["bc_h"], s["drows"], s["state"]),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, Lp, n), f32),
                   jax.ShapeDtypeStruct((b, h, Lp, n), f32), jax.ShapeDtypeStruct((b, h, len(_DROWS), Lp), f32),
                   jax.ShapeDtypeStruct((b, h, p, n), f32)),
        scratch_shapes=[pltpu.VMEM((p, n), f32)],
        compiler_params=_SEMANTICS,
        interpret=_interpret_arg(interpret),
        name="ssd_backward_tpu",
    )(x, B, C, rows, S_in, dy, dfinal)
    dtok = {k: drows[:, :, i] for i, k in enumerate(_DROWS)}
    return dx, dB, dC, dinit, dtok


_chunked_core = kc.make_chunked_core(_forward, _states, _backward)


def kernel_chunk(chunk_size: int) -> int:
    """The chunk the TPU kernel runs: the requested one rounded up to a multiple of 128 lanes (the SSD result does not
    depend on the chunk length; only speed does)."""
    return kc.round_up(max(int(chunk_size), 1), LANES)


def ssd_core(x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, interpret=False):
    """Chunked SSD with Pallas Mosaic TPU kernels (the core contract of `pallas_kernels.ssd.ssd`).

    x [b,l,h,p], dt [b,l,h] (transformed, float32), A [h], B/C [b,l,g,n], D [h] | None, initial_state [b,h,p,n] | None,
    segment_ids [b,l] | None. Returns y [b,l,h,p] in x's dtype and final_state [b,h,p,n] float32.
    interpret=True runs the kernels in the TPU interpreter on CPU."""
    p, n = x.shape[3], B.shape[3]
    return kc.ssd_core_from(_chunked_core, x, dt, A, B, C, D, initial_state, segment_ids,
                            chunk=kernel_chunk(chunk_size), p_pad=p, n_pad=n, interpret=interpret)
