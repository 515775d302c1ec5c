"""Fine-grained mixture of experts: float32 top-k router and a dropless grouped SwiGLU over the routed experts.

The grouped matmul is pluggable (`EXPERT_FFNS`): `ragged_dot` puts the (token, expert) pairs in expert order
(`granite_jax.routing`) and runs `jax.lax.ragged_dot` (the primitive TPUs and GPUs want); `blocked` puts them the same
way into fixed-size row blocks of one expert each and runs one batched matmul over the blocks (the CPU path:
XLA:CPU's ragged_dot is slow, FACTS.md §4); `dense` runs every expert on every token and weights the outputs by the
(mostly zero) combine weights. None drops a token; docs/moe.md has the measurements behind `auto`.

When the mesh set with `jax.set_mesh` shards the experts over the `expert` axis, the routed tokens are dispatched to
the devices holding their experts with all-to-all collectives (`granite_jax.expert_parallel`, docs/moe.md); on a mesh
that does not, each device runs its own tokens through all experts. The router and its statistics stay outside, so
the aux losses do not depend on the parallelism.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax import expert_parallel
from granite_jax.config import resolve_auto
from granite_jax.mlp import swiglu
from granite_jax.params import normal, param
from granite_jax.routing import combine_slots, move_rows, route_slots, slot_rows


def dense_experts(x_TD, w_in_ED2F, w_out_EFD, top_idx_TK, top_w_TK):
    """Every expert on every token, combined with weights that are zero off the top-k: exact and dropless."""
    T, E = x_TD.shape[0], w_in_ED2F.shape[0]
    combine_TE = jnp.zeros((T, E), x_TD.dtype).at[jnp.arange(T)[:, None], top_idx_TK].add(top_w_TK.astype(x_TD.dtype))
    h_TE2F = jnp.einsum("td,edgf->tegf", x_TD, w_in_ED2F)
    return jnp.einsum("tef,efd,te->td", swiglu(h_TE2F), w_out_EFD, combine_TE)


def ragged_dot_experts(x_TD, w_in_ED2F, w_out_EFD, top_idx_TK, top_w_TK):
    """(token, expert) slots in expert order, one `ragged_dot` per projection, moved back and combined: dropless."""
    E, D, _, F = w_in_ED2F.shape
    sizes_E, order_S, position_S = route_slots(top_idx_TK, E)
    x_SD = slot_rows(x_TD, top_idx_TK.shape[1], order_S, position_S)
    h_S2F = jax.lax.ragged_dot(x_SD, w_in_ED2F.reshape(E, D, 2 * F), sizes_E).reshape(-1, 2, F)
    out_SD = jax.lax.ragged_dot(swiglu(h_S2F), w_out_EFD, sizes_E)
    return combine_slots(move_rows(out_SD, position_S, order_S), top_w_TK)


def block_rows(slots: int, num_experts: int) -> int:
    """Rows per block of `blocked_experts`: half the mean rows per expert as a power of two, within [8, 128]. Each
    expert pads its rows to whole blocks, so small blocks waste less and large ones run faster matmuls."""
    mean = max(slots // num_experts, 1)
    return int(min(128, max(8, (1 << (mean - 1).bit_length()) // 2)))


@jax.named_scope("blocked_experts")  # names the grouped matmul in profiles and compiled HLO
def blocked_experts(x_TD, w_in_ED2F, w_out_EFD, top_idx_TK, top_w_TK):
    """(token, expert) slots in expert order in blocks of `block_rows` rows, each block one expert's (zero-padded
    at the end of each expert's rows), one batched matmul per projection over all blocks with each block's expert
    weights: dropless, about the routed FLOPs plus the padding. Slots whose expert id is E (expert-parallel padding
    rows) belong to no block and give zeros."""
    E, D, _, F = w_in_ED2F.shape
    S, K = top_idx_TK.size, top_idx_TK.shape[1]
    bk = block_rows(S, E)
    n_blocks = -(-(S + E * (bk - 1)) // bk)  # the most blocks any routing can need
    R = n_blocks * bk
    rows_E, _, position_S = route_slots(top_idx_TK, E)
    padded_E = (rows_E + bk - 1) // bk * bk
    pad_end_E = jnp.cumsum(padded_E)
    shift_E = jnp.append(pad_end_E - padded_E - (jnp.cumsum(rows_E) - rows_E), R)  # padded minus unpadded start
    row_S = position_S + shift_E[top_idx_TK.reshape(-1)]  # >= R (out of range: no row) for no-expert slots
    slot_R = jnp.full((R,), S, row_S.dtype).at[row_S].set(jnp.arange(S, dtype=row_S.dtype), mode="drop")
    x_NBD = slot_rows(x_TD, K, slot_R, row_S).reshape(n_blocks, bk, D)
    expert_N = jnp.minimum(jnp.searchsorted(pad_end_E, jnp.arange(n_blocks) * bk, side="right"), E - 1)
    h_NB2F = jnp.einsum("nbd,ndf->nbf", x_NBD, w_in_ED2F.reshape(E, D, 2 * F)[expert_N]).reshape(n_blocks, bk, 2, F)
    y_RD = jnp.einsum("nbf,nfd->nbd", swiglu(h_NB2F), w_out_EFD[expert_N]).reshape(R, D)
    return combine_slots(move_rows(y_RD, row_S, slot_R), top_w_TK)


EXPERT_FFNS = {"dense": dense_experts, "ragged_dot": ragged_dot_experts, "blocked": blocked_experts}


class MoE(nnx.Module):
    """Routed experts: logits = x W_router in float32, top-k of the raw logits, softmax over those k.

    `impl` picks the grouped matmul (`EXPERT_FFNS` or "auto"); `dispatch` how tokens reach experts sharded over the
    mesh ("auto": expert-parallel all-to-all when the experts are sharded; "local"; or a transport, see
    `expert_parallel.TRANSPORTS`).
    """

    W_IN_AXES = ("experts", "embed", None, "mlp")
    W_OUT_AXES = ("experts", "mlp", "embed")

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *, init_std: float, impl: str,
                 param_dtype, dtype, rngs: nnx.Rngs, dispatch: str = "auto"):
        self.top_k, self.dtype, self.dispatch = top_k, dtype, dispatch
        self.impl = resolve_auto("moe_impl", impl)
        self.router = param(rngs, normal(init_std), (hidden, num_experts), ("embed", "experts"), param_dtype)
        self.input_linear = param(rngs, normal(init_std), (num_experts, hidden, 2, ffn), self.W_IN_AXES, param_dtype)
        self.output_linear = param(rngs, normal(init_std), (num_experts, ffn, hidden), self.W_OUT_AXES, param_dtype)

    def __call__(self, x_BLD, token_mask_BL):
        """Returns (y [B,L,D], router statistics summed over the tokens where `token_mask_BL` is true)."""
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        logits_TE = jnp.dot(x_TD.astype(jnp.float32), self.router[...].astype(jnp.float32))
        top_logits_TK, top_idx_TK = jax.lax.top_k(logits_TE, self.top_k)
        top_w_TK = jax.nn.softmax(top_logits_TK, axis=-1)
        w_in_ED2F = self.input_linear[...].astype(self.dtype)
        w_out_EFD = self.output_linear[...].astype(self.dtype)
        plan = expert_parallel.make_plan(self.dispatch, x_BLD.shape, self.W_IN_AXES, w_in_ED2F.shape,
                                         self.W_OUT_AXES, w_out_EFD.shape)
        if plan is None:
            y_TD = EXPERT_FFNS[self.impl](x_TD.astype(self.dtype), w_in_ED2F, w_out_EFD, top_idx_TK, top_w_TK)
        else:
            ffn = EXPERT_FFNS[self.impl]
            y_TD = expert_parallel.expert_parallel_ffn(x_TD.astype(self.dtype), top_idx_TK, top_w_TK, w_in_ED2F,
                                                       w_out_EFD, plan=plan, ffn=ffn)
        return y_TD.reshape(B, L, D), router_stats(logits_TE, top_idx_TK, token_mask_BL.reshape(-1))


def router_stats(logits_TE, top_idx_TK, mask_T):
    """Sums that the load-balancing and z losses need, over unmasked tokens: per-(k, expert) selection counts,
    per-expert probability mass, sum of logsumexp(logits)^2 and the token count."""
    E = logits_TE.shape[-1]
    m_T = mask_T.astype(jnp.float32)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    counts_KE = jnp.einsum("tke,t->ke", jax.nn.one_hot(top_idx_TK, E, dtype=jnp.float32), m_T)
    z_T = jax.nn.logsumexp(logits_TE, axis=-1)
    return {"counts": counts_KE, "probs": probs_TE.T @ m_T, "z_sq": jnp.sum(z_T * z_T * m_T), "tokens": jnp.sum(m_T)}


def aux_losses(stats, num_experts: int):
    """FACTS.md §2 load balancing over all MoE layers' tokens (f and P pooled over layers, like the reference's
    concatenation), the router z-loss, and each layer's expert load. `stats` leaves carry a leading layer axis."""
    tokens = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
    f_KE = jnp.sum(stats["counts"], axis=0) / tokens
    P_E = jnp.sum(stats["probs"], axis=0) / tokens
    load_NE = jnp.sum(stats["counts"], axis=1) / jnp.maximum(jnp.sum(stats["counts"], axis=(1, 2))[:, None], 1.0)
    return {
        "load_balancing_loss": num_experts * jnp.sum(f_KE * P_E[None, :]),
        "router_z_loss": jnp.sum(stats["z_sq"]) / tokens,
        "expert_load": load_NE,
    }


def expert_load_metrics(expert_load_NE) -> dict[str, jax.Array]:
    """Logging view of the model's `aux["expert_load"]` ([moe_layers, E] fraction of routed slots per expert):
    `expert_load` itself, per layer `max_over_mean` (hottest expert's load / the uniform 1/E; 1 = balanced,
    E = one expert takes everything), `min_over_mean` and `unused_fraction` (share of experts with no token), and
    their worst layer as scalars `max_over_mean_worst`, `unused_fraction_worst`."""
    E = expert_load_NE.shape[-1]
    max_over_mean_N = jnp.max(expert_load_NE, axis=-1) * E
    unused_N = jnp.mean((expert_load_NE <= 0).astype(jnp.float32), axis=-1)
    return {
        "expert_load": expert_load_NE,
        "max_over_mean": max_over_mean_N,
        "min_over_mean": jnp.min(expert_load_NE, axis=-1) * E,
        "unused_fraction": unused_N,
        "max_over_mean_worst": jnp.max(max_over_mean_N, initial=0.0),
        "unused_fraction_worst": jnp.max(unused_N, initial=0.0),
    }
