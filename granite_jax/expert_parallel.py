"""Expert parallelism: routed tokens travel to the devices that hold their experts and back, inside `shard_map`.

(When the mesh does not shard the experts, the same `shard_map` runs each device's tokens through all experts with
no exchange: `make_plan` gives `ep == 1`.)

Routed expert weights are sharded over the `expert` mesh axis on their expert dimension (`experts` -> `expert` in
`sharding.LOGICAL_AXIS_RULES`); tokens are sharded over every non-tensor mesh axis. Per device, within its group of
`ep` devices along the expert axis:

  1. put its T*K (token, expert) slots in expert order and count them per expert: `counts [ep, X]` (X = E/ep local
     experts);
  2. exchange the counts (all_to_all), so every device knows how many rows each peer sends to each of its experts;
  3. send the token copies to the expert owners: a padded all_to_all of `[ep, cap, D]` (works everywhere) or a ragged
     all_to_all of exactly the routed rows (`jax.lax.ragged_all_to_all`: TPU/GPU; XLA:CPU does not implement it);
  4. run the grouped SwiGLU over its X local experts (`moe.EXPERT_FFNS`), padding rows mapped to no expert;
  5. send the results back the same way and combine them with the top-k weights.

Dropless for any routing: a device can receive at most `cap = T * min(K, X)` rows from each peer (every token picks K
distinct experts, at most X of them local to one device), and every buffer is sized for that worst case. The counts
are exact, so nothing is dropped and padding rows never reach a token.

Weights are all-gathered over the mesh axes that shard their hidden dimension (FSDP, as the rest of the model does),
and the partial outputs of an FFN width sharded over `tensor` are summed with a psum. The router, its statistics (and
so the aux losses) and the shared expert stay outside, partitioned by GSPMD like the rest of the model. Gradients are
the transposes: all_to_all back, all_gather -> reduce-scatter, psum over data-parallel axes (docs/moe.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from granite_jax import sharding
from granite_jax.routing import combine_slots, move_rows, route_slots, slot_rows

TRANSPORTS = ("all_to_all", "ragged_all_to_all")


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one MoE layer is laid out on the mesh (all static)."""
    ep_axes: tuple[str, ...]       # mesh axes sharding the expert dimension: the all-to-all group
    ep: int                        # devices in that group
    token_axes: tuple[str, ...]    # mesh axes sharding the flattened tokens T = B*L
    w_in_spec: P                   # [E, D, 2, F]
    w_out_spec: P                  # [E, F, D]
    gather_in: tuple[str, ...]     # mesh axes sharding D of w_in / w_out: all-gathered inside (FSDP)
    gather_out: tuple[str, ...]
    reduce_axes: tuple[str, ...]   # mesh axes sharding F: partial outputs are psum'ed
    transport: str


def _active_rules():
    return sharding._ACTIVE_RULES[-1]  # the table `sharding.constrain` uses (`sharding.use_rules`)


def resolve_transport(dispatch: str, mesh) -> str:
    if dispatch != "auto":
        return dispatch
    device = getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "all_to_all" if platform == "cpu" else "ragged_all_to_all"


def make_plan(dispatch: str, x_shape, w_in_names, w_in_shape, w_out_names, w_out_shape, mesh=None) -> Plan | None:
    """The per-device layout under the current mesh (`jax.set_mesh`), or None for the global path (one grouped matmul
    over all tokens, partitioned by GSPMD): no mesh or a one-device mesh, `dispatch="local"`, or a call already
    inside a shard_map. When the mesh does not shard the expert dimension, `ep` is 1: each device runs every expert
    on its own batch rows, nothing is exchanged (the global path when the sequence is sharded over `context`).

    `x_shape` is the MoE input [B, L, D]; the names are the weights' logical axis names.
    """
    if dispatch not in ("auto", "local") + TRANSPORTS:
        raise ValueError(f"moe dispatch {dispatch!r}: must be one of auto, local, {', '.join(TRANSPORTS)}")
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if dispatch == "local" or mesh.empty or mesh.manual_axes:
        return None
    rules = _active_rules()
    w_in_spec = sharding.logical_to_spec(w_in_names, mesh, rules, w_in_shape, what="moe input_linear")
    w_out_spec = sharding.logical_to_spec(w_out_names, mesh, rules, w_out_shape, what="moe output_linear")
    w_in = [_axes(e) for e in tuple(w_in_spec) + (None,) * (4 - len(w_in_spec))]
    w_out = [_axes(e) for e in tuple(w_out_spec) + (None,) * (3 - len(w_out_spec))]
    ep_axes, reduce_axes = w_in[0], w_in[3]
    if w_out[0] != ep_axes or w_out[1] != reduce_axes or w_in[2]:
        raise ValueError(f"expert-parallel MoE: input_linear {w_in_spec} and output_linear {w_out_spec} must shard "
                         "their expert and FFN-width dimensions over the same mesh axes (check the `experts` and "
                         "`mlp` rules in LOGICAL_AXIS_RULES)")
    B, L, _ = x_shape
    sizes = dict(mesh.shape)
    act = sharding.logical_to_spec(("batch", "length"), mesh, rules)  # only the order: T = B*L splits as a whole
    act = [_axes(e) for e in tuple(act) + (None,) * (2 - len(act))]
    gathers = dict(w_in_spec=w_in_spec, w_out_spec=w_out_spec, gather_in=w_in[1], gather_out=w_out[2],
                   reduce_axes=reduce_axes, transport=resolve_transport(dispatch, mesh))
    if not ep_axes:
        # Each device's own tokens, where they flatten to whole rows of T (the sequence unsharded) and split evenly;
        # otherwise (context parallelism, one device) the global path.
        token_axes = tuple(a for a in act[0] if a not in reduce_axes)
        if mesh.size == 1 or act[1] or B % math.prod(sizes[a] for a in token_axes):
            return None
        return Plan(ep_axes=(), ep=1, token_axes=token_axes, **gathers)
    token_axes = act[0] + act[1]
    # Tokens are split over every other axis too (not over the FFN-width axes, whose shards need the same tokens):
    # the expert axis above all, so that each device of an all-to-all group brings different tokens.
    token_axes += tuple(a for a in mesh.axis_names if sizes[a] > 1 and a not in token_axes + reduce_axes)
    if set(token_axes) & set(reduce_axes):
        raise ValueError(f"expert-parallel MoE: tokens are sharded over {token_axes} but the expert FFN width over "
                         f"{reduce_axes}; a mesh axis cannot do both (check the `batch` and `mlp` rules)")
    n_shards = math.prod(sizes[a] for a in token_axes)
    if (B * L) % n_shards:
        desc = " x ".join(f"{a}={sizes[a]}" for a in token_axes)
        raise ValueError(f"expert-parallel MoE: {B * L} tokens (batch {B} x length {L}) do not split over mesh "
                         f"{desc} (= {n_shards} shards); make batch x length a multiple of {n_shards}")
    return Plan(ep_axes=ep_axes, ep=math.prod(sizes[a] for a in ep_axes), token_axes=token_axes, **gathers)


def capacity(tokens_per_device: int, top_k: int, local_experts: int) -> int:
    """Rows one device may send to one peer, worst case: each token's K experts are distinct, so at most
    min(K, X) of them live on one device. Buffers sized by this never drop a token."""
    return tokens_per_device * min(top_k, local_experts)


def expert_parallel_ffn(x_TD, top_idx_TK, top_w_TK, w_in_ED2F, w_out_EFD, *, plan: Plan, ffn):
    """Routed-expert output [T, D] for global tokens `x_TD` (any sharding), computed per device: expert-parallel when
    `plan.ep > 1`, each device's own tokens through all experts when it is 1.

    `ffn` is a grouped SwiGLU with the `moe.EXPERT_FFNS` signature, run per device over its local experts.
    """
    tokens = P(_spec_entry(plan.token_axes))
    body = functools.partial(_per_device, plan=plan, ffn=ffn)
    return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(tokens, tokens, tokens, plan.w_in_spec, plan.w_out_spec),
                         out_specs=tokens)(x_TD, top_idx_TK, top_w_TK, w_in_ED2F, w_out_EFD)


def _per_device(x_TD, top_idx_TK, top_w_TK, w_in_XD2F, w_out_XFD, *, plan: Plan, ffn):
    if plan.gather_in:
        w_in_XD2F = jax.lax.all_gather(w_in_XD2F, plan.gather_in, axis=1, tiled=True)
    if plan.gather_out:
        w_out_XFD = jax.lax.all_gather(w_out_XFD, plan.gather_out, axis=2, tiled=True)

    if plan.ep == 1:  # the experts are not sharded: this device's tokens through all of them
        y_TD = ffn(x_TD, w_in_XD2F, w_out_XFD, top_idx_TK, top_w_TK)
        return jax.lax.psum(y_TD, plan.reduce_axes) if plan.reduce_axes else y_TD
    T, K = top_idx_TK.shape
    ep, X = plan.ep, w_in_XD2F.shape[0]
    cap = capacity(T, K, X)

    # 1. slots (token, k) in expert order, hence by destination device, then by its local expert
    sizes_E, order_S, position_S = route_slots(top_idx_TK, ep * X)
    dest_S = top_idx_TK.reshape(-1)[order_S] // X
    counts_PX = sizes_E.reshape(ep, X)  # P = peer device
    send_P = jnp.sum(counts_PX, axis=1)
    send_off_P = jnp.cumsum(send_P) - send_P
    # 2. counts[i, x]: rows peer i sends to my local expert x
    recv_counts_PX = jax.lax.all_to_all(counts_PX, plan.ep_axes, 0, 0, tiled=True)
    recv_P = jnp.sum(recv_counts_PX, axis=1)

    # 3-5.
    x_SD = slot_rows(x_TD, K, order_S, position_S)
    if plan.transport == "all_to_all":
        recv_RD, recv_off_P, send_back = _padded(x_SD, dest_S, send_P, send_off_P, cap, plan.ep_axes)
    else:
        recv_RD, recv_off_P, send_back = _ragged(x_SD, send_P, send_off_P, recv_P, ep * cap, plan.ep_axes)
    local_R = local_expert_ids(recv_counts_PX, recv_off_P, recv_RD.shape[0])
    ones_R1 = jnp.ones((recv_RD.shape[0], 1), jnp.float32)
    y_RD = ffn(recv_RD, w_in_XD2F, w_out_XFD, local_R[:, None], ones_R1)
    y_TD = combine_slots(move_rows(send_back(y_RD), position_S, order_S), top_w_TK)
    if plan.reduce_axes:
        y_TD = jax.lax.psum(y_TD, plan.reduce_axes)
    return y_TD


def local_expert_ids(recv_counts_PX, recv_off_P, rows: int):
    """Local expert of each row of a receive buffer in which peer i's rows start at `recv_off_P[i]`, sorted by local
    expert, `recv_counts_PX[i, x]` of them for expert x. Rows holding no token (padding) get id X: no expert."""
    ep, X = recv_counts_PX.shape
    start_PX = recv_off_P[:, None] + jnp.cumsum(recv_counts_PX, axis=1) - recv_counts_PX
    end_P = recv_off_P + jnp.sum(recv_counts_PX, axis=1)
    r_R = jnp.arange(rows, dtype=jnp.int32)
    chunk_R = jnp.searchsorted(start_PX.reshape(-1), r_R, side="right") - 1  # last (peer, expert) run starting <= r
    peer_R, expert_R = chunk_R // X, chunk_R % X
    return jnp.where(r_R < end_P[peer_R], expert_R, X).astype(jnp.int32)


def _padded(x_SD, dest_S, send_P, send_off_P, cap: int, axes):
    """all_to_all of fixed [ep, cap, D] blocks; peer j's rows are block j's first send_P[j] rows."""
    ep = send_P.shape[0]
    S, D = x_SD.shape
    c_C = jnp.arange(cap, dtype=jnp.int32)
    src_PC = jnp.where(c_C < send_P[:, None], send_off_P[:, None] + c_C, S).reshape(-1)  # S: an empty row
    dst_S = dest_S * cap + jnp.arange(S, dtype=jnp.int32) - send_off_P[dest_S]
    send_PCD = move_rows(x_SD, src_PC, dst_S).reshape(ep, cap, D)
    recv_PCD = jax.lax.all_to_all(send_PCD, axes, 0, 0, tiled=True)

    def send_back(y_RD):
        back_PCD = jax.lax.all_to_all(y_RD.reshape(ep, cap, D), axes, 0, 0, tiled=True)
        return move_rows(back_PCD.reshape(ep * cap, D), dst_S, src_PC)

    return recv_PCD.reshape(ep * cap, D), jnp.arange(ep, dtype=jnp.int32) * cap, send_back


def _ragged(x_SD, send_P, send_off_P, recv_P, rows: int, axes):
    """ragged_all_to_all of exactly the routed rows into a worst-case-sized receive buffer of `rows` rows."""
    ep = send_P.shape[0]
    S, D = x_SD.shape
    sizes_PP = jax.lax.all_gather(send_P, axes)  # [sender, receiver]
    earlier_P = jnp.arange(ep) < jax.lax.axis_index(axes)
    # where my rows land in each receiver's buffer: after those of the senders before me
    out_off_P = jnp.sum(jnp.where(earlier_P[:, None], sizes_PP, 0), axis=0).astype(jnp.int32)
    recv_off_P = jnp.cumsum(recv_P) - recv_P
    recv_RD = jax.lax.ragged_all_to_all(x_SD, _zeros_like_rows(x_SD, rows), send_off_P, send_P, out_off_P,
                                        recv_P, axis_name=axes)
    # on the way back, peer i's rows return to where i took them from: its send offset for me
    back_off_P = jnp.sum(jnp.where(earlier_P[None, :], sizes_PP, 0), axis=1).astype(jnp.int32)

    def send_back(y_RD):
        return jax.lax.ragged_all_to_all(y_RD, _zeros_like_rows(y_RD, S), recv_off_P, recv_P, back_off_P,
                                         send_P, axis_name=axes)

    return recv_RD, recv_off_P, send_back


def _zeros_like_rows(x_ND, rows: int):
    """A zero [rows, D] buffer that varies over the same mesh axes as `x_ND`, as a ragged all-to-all's output does
    (a plain constant would be typed as equal on every device, and so would the received rows)."""
    zeros = jnp.zeros((rows, x_ND.shape[1]), x_ND.dtype)
    return jax.lax.pcast(zeros, tuple(jax.typeof(x_ND).manual_axis_type.varying), to="varying")


def all_to_all_bytes(cfg, mesh_shape, *, tokens_per_device: int) -> dict[str, float]:
    """Bytes one device sends per MoE layer and forward pass of `cfg` (a `ModelConfig`) on a mesh of `mesh_shape`
    ({axis: size}), with `tokens_per_device` tokens each; the backward sends as much again, and remat adds another
    forward. Keys: `padded_all_to_all` (dispatch + return, fixed), `ragged_all_to_all_balanced` (uniform routing),
    `ragged_all_to_all_worst` (no slot stays local), `receive_buffer` (the dropless receive buffer, bytes),
    `weight_all_gather` (this device's experts' weights gathered over the FSDP-like axes)."""
    sizes = {a: 1 for a in sharding.MESH_AXES} | dict(mesh_shape)
    ep, tensor, gather = sizes["expert"], sizes["tensor"], sizes["fsdp"] * sizes["context"]
    E, K, D, F = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size
    if E % ep:
        raise ValueError(f"{E} experts do not split over mesh expert={ep}")
    X = E // ep
    itemsize = jnp.dtype(cfg.dtype).itemsize
    cap = capacity(tokens_per_device, K, X)
    slots = tokens_per_device * K
    row = D * itemsize
    return {
        "padded_all_to_all": 2 * (ep - 1) * cap * row,  # every block but the device's own leaves it
        "ragged_all_to_all_balanced": 2 * slots * (ep - 1) / ep * row,
        "ragged_all_to_all_worst": 2 * slots * row,
        "receive_buffer": ep * cap * row,
        "weight_all_gather": X * 3 * D * F // tensor * itemsize * (gather - 1) / gather,
    }
