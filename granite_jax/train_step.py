"""The loss and the jitted train step.

The train state is a plain dict of arrays, so it jits, shards and checkpoints as one pytree:

    params           nnx.State of the model (float32 master weights, `ModelConfig.param_dtype`)
    opt              nnx.State of the `nnx.Optimizer` (Adam moments, schedule counter)
    step             int32: train steps run, skipped ones included
    rng              uint32 key data: the run's PRNG key (folded with `step` for anything stochastic)
    nonfinite_total  int32: updates skipped because the loss or a gradient was not finite
    nonfinite_streak int32: of those, how many in a row up to now

`make_train_step` returns `step_fn(state, batch) -> (state, metrics)`, a `jax.jit` with explicit in/out shardings
(`sharding.param_shardings` for the model and optimizer, replicated scalars) that donates the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from granite_jax import moe, optim, sharding, xla_options
from granite_jax.context_parallel import context_size
from granite_jax.model import GraniteModel, project_logits

COUNTERS = ("step", "nonfinite_total", "nonfinite_streak")


def next_token_targets(tokens_BL, segment_ids_BL):
    """(targets [B,L], weights [B,L] float32): the next token, counted only when it lies in the same non-padding
    document as its input token (packing-aware; the last position has no target)."""
    targets_BL = jnp.concatenate([tokens_BL[:, 1:], jnp.zeros_like(tokens_BL[:, :1])], axis=1)
    next_seg_BL = jnp.concatenate([segment_ids_BL[:, 1:], jnp.zeros_like(segment_ids_BL[:, :1])], axis=1)
    weights_BL = (segment_ids_BL != 0) & (next_seg_BL == segment_ids_BL)
    return targets_BL, weights_BL.astype(jnp.float32)


def cross_entropy_sum(logits_BLV, targets_BL, weights_BL):
    """Sum over counted tokens of -log softmax(logits)[target], in float32."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return jnp.sum((lse_BL - target_logit_BL) * weights_BL)


def chunked_cross_entropy_sum(h_BLD, head_VD, targets_BL, weights_BL, chunk: int):
    """`cross_entropy_sum` of `project_logits(h, head)` without materialising the [B,L,V] logits:
    a rematerialised scan computes them `chunk` tokens per sequence shard at a time (the backward recomputes each
    chunk's logits), so the loss holds [B, chunk * shards, V] floats instead of [B, L, V].

    With the sequence sharded over `context` (n shards), step s takes tokens s*chunk ... (s+1)*chunk-1 of every
    shard, so each device works on its own tokens. chunk <= 0, or at least a shard's tokens, is the plain loss.
    """
    B, L, D = h_BLD.shape
    shards = context_size()
    local = L // shards
    if chunk <= 0 or chunk >= local:
        return cross_entropy_sum(project_logits(h_BLD, head_VD), targets_BL, weights_BL)
    if local % chunk:
        raise ValueError(f"logits_chunk_tokens={chunk} must divide the {local} tokens of each sequence shard "
                         f"(length {L} over {shards} context shards); pick a divisor of {local}")
    steps = local // chunk

    def split(x_BL_):  # [B, L, ...] -> [steps, B, shards * chunk, ...]
        x = x_BL_.reshape(B, shards, steps, chunk, *x_BL_.shape[2:])
        return jnp.moveaxis(x, 2, 0).reshape(steps, B, shards * chunk, *x_BL_.shape[2:])

    @jax.checkpoint
    def body(total, xs):
        h_BCD, targets_BC, weights_BC = xs
        ce = cross_entropy_sum(project_logits(h_BCD, head_VD), targets_BC, weights_BC)
        return total + ce, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(h_BLD), split(targets_BL), split(weights_BL)))
    return total


def loss_terms(model: GraniteModel, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The unscaled terms of one (micro-)batch: `ce_sum`, `tokens`, `load_balancing_loss`, `router_z_loss`, and
    `expert_load` ([moe_layers, E] share of the routed slots per expert; [0, 0] without experts).

    The logits are computed `model.config.logits_chunk_tokens` tokens at a time (`chunked_cross_entropy_sum`)."""
    tokens_BL, segment_ids_BL = batch["tokens"], batch["segment_ids"]
    h_BLD, aux = model(tokens_BL, segment_ids=segment_ids_BL, positions=batch["positions"], return_aux=True,
                       return_hidden=True)
    targets_BL, weights_BL = next_token_targets(tokens_BL, segment_ids_BL)
    ce_sum = chunked_cross_entropy_sum(h_BLD, model.head(), targets_BL, weights_BL, model.config.logits_chunk_tokens)
    return {"ce_sum": ce_sum, "tokens": jnp.sum(weights_BL), "load_balancing_loss": aux["load_balancing_loss"],
            "router_z_loss": aux["router_z_loss"], "expert_load": aux["expert_load"]}


def _replicated(mesh, tree):
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def state_shardings(abstract_state: dict, mesh) -> dict:
    """Shardings of a train state (abstract or concrete): logical-axis rules for params/opt, scalars replicated."""
    out = {k: _replicated(mesh, v) for k, v in abstract_state.items() if k not in ("params", "opt")}
    out["params"] = sharding.param_shardings(abstract_state["params"], mesh)
    out["opt"] = sharding.param_shardings(abstract_state["opt"], mesh)
    return out


def make_train_step(graphdef, mesh, *, grad_accum_steps: int = 1, schedule: Callable | None = None,
                    donate: bool = True, abstract_state: dict) -> Callable:
    """The jitted train step for the model/optimizer `graphdef` (from `nnx.split((model, optimizer))`).

    Loss = (sum of next-token CE over counted tokens) / (counted tokens of the whole batch)
           + router_aux_loss_coef * load_balancing_loss + router_z_loss_coef * router_z_loss,
    with the aux losses averaged over micro-batches. A step whose loss or gradient norm is not finite leaves
    params and optimizer untouched (the step counter still advances) and is counted.

    metrics (replicated float32/int32 scalars): loss, ce_loss, load_balancing_loss, router_z_loss, grad_norm, lr,
    tokens (counted targets), finite, nonfinite_total, nonfinite_streak; with experts also expert_load
    [moe_layers, E], expert_max_over_mean [moe_layers] and their worst layer, expert_max_over_mean_worst and
    expert_unused_fraction_worst (`moe.expert_load_metrics`).
    """
    k = int(grad_accum_steps)

    def step_fn(state, batch):
        # merge() hands the state's Variables to the modules, and update() mutates them: keep the old values.
        old = jax.tree.map(lambda x: x, {"params": state["params"], "opt": state["opt"]})
        lr = schedule(state["opt"]["step"][...]) if schedule is not None else jnp.zeros(())
        model, optimizer = nnx.merge(graphdef, nnx.State({0: state["params"], 1: state["opt"]}))
        cfg = model.config
        model_graphdef, params = nnx.split(model, nnx.Param)
        _, weights_BL = next_token_targets(batch["tokens"], batch["segment_ids"])
        n_tokens = jnp.maximum(jnp.sum(weights_BL), 1.0)

        def loss_fn(p, micro):
            terms = loss_terms(nnx.merge(model_graphdef, p), micro)
            loss = (terms["ce_sum"] / n_tokens + (cfg.router_aux_loss_coef * terms["load_balancing_loss"]
                                                  + cfg.router_z_loss_coef * terms["router_z_loss"]) / k)
            return loss, terms

        loss, terms, grads = optim.accumulate_gradients(loss_fn, params, batch, k)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        optimizer.update(model, grads)
        new_params, new_opt = nnx.state(model), nnx.state(optimizer)
        keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        streak = jnp.where(finite, 0, state["nonfinite_streak"] + 1)
        new_state = {
            "params": keep_new(new_params, old["params"]),
            "opt": keep_new(new_opt, old["opt"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
            "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
            "nonfinite_streak": streak.astype(jnp.int32),
        }
        metrics = {
            "loss": loss.astype(jnp.float32),
            "ce_loss": (terms["ce_sum"] / n_tokens).astype(jnp.float32),
            "load_balancing_loss": terms["load_balancing_loss"] / k,
            "router_z_loss": terms["router_z_loss"] / k,
            "grad_norm": grad_norm.astype(jnp.float32),
            "lr": jnp.asarray(lr, jnp.float32),
            "tokens": terms["tokens"].astype(jnp.float32),
            "finite": finite,
            "nonfinite_total": new_state["nonfinite_total"],
            "nonfinite_streak": new_state["nonfinite_streak"],
        }
        if cfg.has_experts:  # per-layer expert load (averaged over micro-batches) and its worst layer
            load = moe.expert_load_metrics(terms["expert_load"] / k)
            metrics.update({"expert_load": load["expert_load"], "expert_max_over_mean": load["max_over_mean"],
                            "expert_max_over_mean_worst": load["max_over_mean_worst"],
                            "expert_unused_fraction_worst": load["unused_fraction_worst"]})
        return new_state, metrics

    shardings = state_shardings(abstract_state, mesh)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(sharding.batch_names(2), mesh))
    batch_shardings = {key: batch_sharding for key in ("tokens", "segment_ids", "positions")}
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_shardings),
                     out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,) if donate else (),
                     compiler_options=xla_options.for_mesh(mesh))

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    run.jitted = jitted  # for `.lower(...)` (compile-check, benchmarks)
    return run


def init_state(model_cfg, tx, mesh, *, seed: int) -> tuple[Any, dict]:
    """(graphdef, state): model and optimizer created directly sharded on `mesh` from `seed`."""

    def build():
        model = GraniteModel(model_cfg, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = sharding.create_sharded(build, mesh)
    graphdef, state = nnx.split((model, optimizer))
    replicated = NamedSharding(mesh, P())
    scalar = lambda v, dt=jnp.int32: jax.device_put(jnp.asarray(v, dt), replicated)  # noqa: E731
    train_state = {"params": state[0], "opt": state[1], "step": scalar(0),
                   "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
                   "nonfinite_total": scalar(0), "nonfinite_streak": scalar(0)}
    return graphdef, train_state


def abstract_state(model_cfg, tx, *, seed: int = 0) -> tuple[Any, dict]:
    """(graphdef, train state of ShapeDtypeStructs) without allocating anything (compile-check, restore)."""

    def build():
        model = GraniteModel(model_cfg, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with nnx.use_eager_sharding(False):
        model, optimizer = nnx.eval_shape(build)
    graphdef, state = nnx.split((model, optimizer))
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    return graphdef, {"params": state[0], "opt": state[1], "step": i32,
                      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32), "nonfinite_total": i32, "nonfinite_streak": i32}
