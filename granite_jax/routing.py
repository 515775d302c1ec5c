"""Moving the (token, expert) slots of a top-k router into expert order and back, with gathers only.

Slot t*K + k is token t's k-th expert. `route_slots` counts where each slot goes in expert order, `move_rows` moves
rows by such a one-to-one map (its gradient moves them back, again a gather), and `combine_slots` sums each token's
slot outputs with its top-k weights. The MoE grouped matmuls (`granite_jax.moe`) and expert parallelism
(`granite_jax.expert_parallel`) share them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route_slots(top_idx_TK, num_experts: int):
    """(sizes_E, order_S, position_S) of the S = T*K (token, expert) slots, slot t*K + k being token t's k-th expert,
    put in expert order (by slot within an expert): `sizes_E` slots per expert, `order_S` the slot at each sorted
    position and `position_S` each slot's sorted position (the inverse permutation). The positions are counted (a
    one-hot cumulative sum), not sorted: a sort is a large program for TPU compilers. Expert id `num_experts` (no
    expert: expert-parallel padding rows) goes last and is not counted in `sizes_E`."""
    expert_S = top_idx_TK.reshape(-1)
    onehot_SE = jax.nn.one_hot(expert_S, num_experts + 1, dtype=jnp.int32)
    sizes_E = jnp.sum(onehot_SE, axis=0)
    rank_S = jnp.sum(jnp.cumsum(onehot_SE, axis=0) * onehot_SE, axis=1) - 1  # earlier slots of the same expert
    position_S = (jnp.cumsum(sizes_E) - sizes_E)[expert_S] + rank_S
    order_S = jnp.zeros_like(position_S).at[position_S].set(jnp.arange(expert_S.size, dtype=position_S.dtype))
    return sizes_E[:num_experts], order_S, position_S


@jax.custom_vjp
def move_rows(a_ND, src_M, dst_N):
    """out[i] = a[src[i]], zero where src[i] is out of range: a one-to-one move of rows, with `dst` its inverse
    (dst[src[i]] = i; out of range for rows of `a` that go nowhere). The gradient is the same move backwards, a
    gather again, where autodiff of a gather gives a scatter-add (slow on CPU, costly to compile for TPU)."""
    return a_ND.at[src_M].get(mode="fill", fill_value=0)


def _move_rows_fwd(a_ND, src_M, dst_N):
    return a_ND.at[src_M].get(mode="fill", fill_value=0), (src_M, dst_N)


def _move_rows_bwd(maps, g_MD):
    src_M, dst_N = maps
    return move_rows(g_MD, dst_N, src_M), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def slot_rows(x_TD, top_k: int, src, dst):
    """Each token's row once per slot (slot t*K + k), moved by the one-to-one map (src, dst) of `move_rows`: with
    `route_slots`' (order_S, position_S), the [S, D] rows in expert order."""
    return move_rows(jnp.repeat(x_TD, top_k, axis=0), src, dst)


def combine_slots(y_SD, top_w_TK):
    """[T, D]: the slots' outputs (in slot order t*K + k) weighted by their top-k weights and summed per token."""
    T, K = top_w_TK.shape
    return jnp.einsum("tkd,tk->td", y_SD.reshape(T, K, -1), top_w_TK.astype(y_SD.dtype))
