"""Chunked SSD on GPU: Pallas kernels on the Triton lowering, forward and hand-written backward (`impl="pallas_gpu"`).

Why Triton: it is the Pallas GPU lowering that runs on every jax this project supports (0.10-0.11) and on any CUDA GPU
from Ampere on; Mosaic GPU (the default from 0.11) targets Hopper/Blackwell only and its API is still moving. The
lowering is confined to this file: the chunk math is shared (`_kernel_common.chunk_forward/backward`), so a Mosaic GPU
port replaces `_pallas_call` and the three kernels' load/store lines below, nothing else. See docs/kernels.md.

Triton grid axes are parallel, so one program per (batch row, head, block of P_BLOCK head_dim rows) runs the
sequential pass over chunks as a loop, carrying its [P_BLOCK, n] float32 slice of the state in registers (the rows of
the state evolve independently; the B, C and per-token gradients, which sum over head_dim, come out per block and
are summed outside the kernel). Pallas picks Mosaic GPU by default on jax >= 0.10: the Triton compiler params below
are what select the Triton lowering. Triton needs power-of-two tiles: the chunk is a power of two (capped at
`MAX_CHUNK` to bound register pressure; the result does not depend on it), p and n are zero-padded to powers of two
(>= 16, the smallest tensor-core tile).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ssd import _kernel_common as kc

# Tile sizes, from ptxas's register report for sm_90a at Granite's shapes (head_dim 64, d_state 128; docs/kernels.md):
# the backward holds about a dozen [chunk, d_state], [P_BLOCK, d_state] and [chunk, chunk] float32 tiles at once.
# 8 warps, chunk 16, P_BLOCK 32: 255 registers, no spills. Chunk 32 spills 11 KB per thread; a whole 64-row head_dim
# per program spills 3 KB even at chunk 16; 4 warps spill 1 KB.
MAX_CHUNK = 16
P_BLOCK = 32  # head_dim rows of the state per program (a grid axis): the state's rows evolve independently
MIN_TILE = 16
NUM_WARPS = 8
NUM_STAGES = 1  # the chunk loop is a fori_loop over refs, which Triton does not software-pipeline
_TOKENS = ("cs", "dt", "doc", "r", "w")
_D_TOKENS = ("cs", "dt", "r", "w")


def _pallas_call(kernel, *, grid, in_specs, out_specs, out_shape, interpret, name):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
                          interpret=interpret, name=name)


def _specs(h, g, Lp, p_blk, n, nc, n_pblk):
    """Blocks of one program (batch row bi, head hi, head_dim block pi). The state's head_dim rows evolve
    independently, so a program owns rows [pi * p_blk, (pi + 1) * p_blk) of x, y and the state; what sums over the
    head_dim (the B, C and per-token gradients) comes out per (head, head_dim block) and is summed outside."""
    hpg = h // g
    sq = pl.squeezed
    part = lambda hi, pi: hi * n_pblk + pi
    return dict(
        x=pl.BlockSpec((sq, sq, Lp, p_blk), lambda bi, hi, pi: (bi, hi, 0, pi)),
        bc=pl.BlockSpec((sq, sq, Lp, n), lambda bi, hi, pi: (bi, kc.index_div(hi, hpg), 0, 0)),
        bc_part=pl.BlockSpec((sq, sq, Lp, n), lambda bi, hi, pi: (bi, part(hi, pi), 0, 0)),
        tok=pl.BlockSpec((sq, sq, Lp), lambda bi, hi, pi: (bi, hi, 0)),
        tok_part=pl.BlockSpec((sq, sq, Lp), lambda bi, hi, pi: (bi, part(hi, pi), 0)),
        state=pl.BlockSpec((sq, sq, p_blk, n), lambda bi, hi, pi: (bi, hi, pi, 0)),
        chunk_state=pl.BlockSpec((sq, sq, nc, p_blk, n), lambda bi, hi, pi: (bi, hi, 0, pi, 0)),
    )


def _grid_and_specs(x, B, chunk):
    b, h, Lp, p = x.shape
    g, n = B.shape[1], B.shape[3]
    p_blk = min(p, P_BLOCK)
    nc, n_pblk = Lp // chunk, p // p_blk
    return (b, h, n_pblk), _specs(h, g, Lp, p_blk, n, nc, n_pblk)


def _load_chunk(c, chunk, x_ref, b_ref, c_ref, tok_refs):
    rows = pl.ds(c * chunk, chunk)
    cs, dt, doc, r, w = (ref[rows] for ref in tok_refs)
    v = dict(cs_c=cs[:, None], cs_r=cs[None, :], dt_r=dt[None, :], doc_c=doc[:, None], doc_r=doc[None, :],
             r_c=r[:, None], w_c=w[:, None])
    return rows, x_ref[rows, :], b_ref[rows, :], c_ref[rows, :], v


def _forward_kernel(x_ref, b_ref, c_ref, *refs, chunk, nc, emit_states):
    tok_refs, (init_ref, *outs) = refs[:5], refs[5:]

    def body(c, S_in):
        rows, x, B, C, v = _load_chunk(c, chunk, x_ref, b_ref, c_ref, tok_refs)
        y, S_out = kc.chunk_forward(x, B, C, v["cs_c"], v["cs_r"], v["dt_r"], v["doc_c"], v["doc_r"], v["r_c"],
                                    v["w_c"], S_in)
        if emit_states:
            outs[0][c] = S_in
        else:
            outs[0][rows, :] = y.astype(outs[0].dtype)
        return S_out

    S = jax.lax.fori_loop(0, nc, body, init_ref[...])
    if not emit_states:
        outs[1][...] = S


def _forward_call(x, B, C, tok, init, chunk, interpret, emit_states):
    b, h, Lp, p = x.shape
    n = B.shape[3]
    grid, s = _grid_and_specs(x, B, chunk)
    if emit_states:
        out_shape, out_specs = jax.ShapeDtypeStruct((b, h, Lp // chunk, p, n), jnp.float32), s["chunk_state"]
    else:
        out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, p, n), jnp.float32))
        out_specs = (s["x"], s["state"])
    kernel = functools.partial(_forward_kernel, chunk=chunk, nc=Lp // chunk, emit_states=emit_states)
    return _pallas_call(kernel, grid=grid, in_specs=[s["x"], s["bc"], s["bc"]] + [s["tok"]] * 5 + [s["state"]],
                        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                        name="ssd_states_gpu" if emit_states else "ssd_forward_gpu",
                        )(x, B, C, *(tok[k] for k in _TOKENS), init)


def _forward(x, B, C, tok, init, chunk, interpret):
    return _forward_call(x, B, C, tok, init, chunk, interpret, emit_states=False)


def _states(x, B, C, tok, init, chunk, interpret):
    return _forward_call(x, B, C, tok, init, chunk, interpret, emit_states=True)


def _backward_kernel(x_ref, b_ref, c_ref, *refs, chunk, nc):
    tok_refs = refs[:5]
    s_ref, dy_ref, dfinal_ref, dx_ref, db_ref, dc_ref, dcs_ref, ddt_ref, dr_ref, dw_ref, dinit_ref = refs[5:]

    def body(i, dS_out):
        c = nc - 1 - i
        rows, x, B, C, v = _load_chunk(c, chunk, x_ref, b_ref, c_ref, tok_refs)
        dx, dB, dC, dS_in, dcs_c, dcs_r, ddt_r, dr_c, dw_c = kc.chunk_backward(
            x, B, C, v["cs_c"], v["cs_r"], v["dt_r"], v["doc_c"], v["doc_r"], v["r_c"], v["w_c"], s_ref[c],
            dy_ref[rows, :], dS_out)
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        db_ref[rows, :] = dB
        dc_ref[rows, :] = dC
        dcs_ref[rows] = dcs_c[:, 0] + dcs_r[0, :]
        ddt_ref[rows] = ddt_r[0, :]
        dr_ref[rows] = dr_c[:, 0]
        dw_ref[rows] = dw_c[:, 0]
        return dS_in

    dinit_ref[...] = jax.lax.fori_loop(0, nc, body, dfinal_ref[...])


def _backward(x, B, C, tok, S_in, dy, dfinal, chunk, interpret):
    b, h, Lp, p = x.shape
    n = B.shape[3]
    grid, s = _grid_and_specs(x, B, chunk)
    parts = h * grid[2]
    f32 = jnp.float32
    tok_shape = jax.ShapeDtypeStruct((b, parts, Lp), f32)
    outs = _pallas_call(
        functools.partial(_backward_kernel, chunk=chunk, nc=Lp // chunk), grid=grid,
        in_specs=[s["x"], s["bc"], s["bc"]] + [s["tok"]] * 5 + [s["chunk_state"], s["x"], s["state"]],
        out_specs=[s["x"], s["bc_part"], s["bc_part"]] + [s["tok_part"]] * 4 + [s["state"]],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, parts, Lp, n), f32),
                   jax.ShapeDtypeStruct((b, parts, Lp, n), f32)] + [tok_shape] * 4
                  + [jax.ShapeDtypeStruct((b, h, p, n), f32)],
        interpret=interpret, name="ssd_backward_gpu",
    )(x, B, C, *(tok[k] for k in _TOKENS), S_in, dy, dfinal)
    dx, dB, dC, *dtok, dinit = outs
    # dB and dC stay per (head, head_dim block): the custom_vjp sums them per group in one pass.
    per_head = lambda d: d.reshape(b, h, grid[2], Lp).sum(axis=2)
    return dx, dB, dC, dinit, {k: per_head(d) for k, d in zip(_D_TOKENS, dtok)}


_chunked_core = kc.make_chunked_core(_forward, _states, _backward)


def kernel_chunk(chunk_size: int) -> int:
    """The chunk the GPU kernel runs: a power of two, at most MAX_CHUNK, at least MIN_TILE."""
    return max(MIN_TILE, min(kc.next_power_of_2(int(chunk_size)), MAX_CHUNK))


def ssd_core(x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, interpret=False):
    """Chunked SSD with Pallas Triton GPU kernels (the core contract of `pallas_kernels.ssd.ssd`).

    x [b,l,h,p], dt [b,l,h] (transformed, float32), A [h], B/C [b,l,g,n], D [h] | None, initial_state [b,h,p,n] | None,
    segment_ids [b,l] | None. Returns y [b,l,h,p] in x's dtype and final_state [b,h,p,n] float32.
    interpret=True runs the same kernels in the Pallas interpreter on CPU."""
    p, n = x.shape[3], B.shape[3]
    pad = lambda d: max(MIN_TILE, kc.next_power_of_2(d))
    return kc.ssd_core_from(_chunked_core, x, dt, A, B, C, D, initial_state, segment_ids,
                            chunk=kernel_chunk(chunk_size), p_pad=pad(p), n_pad=pad(n), interpret=bool(interpret))
