"""The Granite 4.0 hybrid language model (FACTS.md §2) in Flax NNX.

Layers are stored stacked and run under `lax.scan`, so compile time does not grow with depth: the layer pattern is cut
into its shortest repeating period (10 layers for the released models) and each run of equal layer types inside the
period is one module whose parameters carry a leading `layers` axis of size repeats * run_length. Inside the period
the runs are scans too, or their layers are called one by one (`ModelConfig.layer_loop`, unrolled on CPU), or the
whole stack is one scan over the main layer type with the other layers under `lax.cond` ("interleave").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.attention import Attention
from granite_jax.config import ModelConfig, resolve_auto
from granite_jax.mamba2 import Mamba2Mixer
from granite_jax.mlp import SharedMLP
from granite_jax.moe import MoE, aux_losses
from granite_jax.norms import RMSNorm
from granite_jax.params import normal, param


class DecoderLayer(nnx.Module):
    """h += r * mixer(norm1(h)); h += r * (moe(norm2(h)) + shared_mlp(norm2(h)))."""

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        H, pd, dt = cfg.hidden_size, cfg.param_dtype, jnp.dtype(cfg.dtype)
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = RMSNorm(H, eps=cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.mixer = Mamba2Mixer(cfg, rngs=rngs) if layer_type == "mamba" else Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(H, eps=cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.moe = (MoE(H, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                        init_std=cfg.initializer_range, impl=cfg.moe_impl, dispatch=cfg.moe_dispatch,
                        param_dtype=pd, dtype=dt, rngs=rngs)
                    if cfg.has_experts else None)
        # Granite 4.0 always has the shared expert; width 0 removes it (an ablation of MoE models).
        self.shared_mlp = (SharedMLP(H, cfg.shared_intermediate_size, init_std=cfg.initializer_range,
                                     param_dtype=pd, dtype=dt, rngs=rngs) if cfg.shared_intermediate_size else None)

    def __call__(self, h_BLD, segment_ids_BL, positions_BL, token_mask_BL):
        x_BLD = self.input_layernorm(h_BLD)
        if isinstance(self.mixer, Mamba2Mixer):
            mixed_BLD = self.mixer(x_BLD, segment_ids_BL)
        else:
            mixed_BLD = self.mixer(x_BLD, _or_ones(segment_ids_BL, h_BLD), positions_BL)
        return self.feed_forward(h_BLD + self.residual_multiplier * mixed_BLD.astype(h_BLD.dtype), token_mask_BL)

    def feed_forward(self, h_BLD, token_mask_BL):
        """The layer's second half, h += r * ffn(norm2(h)): (h [B,L,D], router stats or None)."""
        x_BLD = self.post_attention_layernorm(h_BLD)
        ffn_BLD, stats = 0, None
        if self.shared_mlp is not None:
            ffn_BLD = self.shared_mlp(x_BLD)
        if self.moe is not None:
            routed_BLD, stats = self.moe(x_BLD, token_mask_BL)
            ffn_BLD = routed_BLD + ffn_BLD
        return h_BLD + self.residual_multiplier * ffn_BLD.astype(h_BLD.dtype), stats


@dataclasses.dataclass(frozen=True)
class Run:
    layer_type: str
    start: int  # offset inside the period
    length: int


def layer_pattern(layer_types: tuple[str, ...]) -> tuple[int, tuple[Run, ...]]:
    """(period, runs): the shortest period p with layer_types[i] == layer_types[i % p], and its runs of equal types."""
    n = len(layer_types)
    period = next(p for p in range(1, n + 1) if n % p == 0 and all(layer_types[i] == layer_types[i % p]
                                                                    for i in range(n)))
    runs, start = [], 0
    for i in range(1, period + 1):
        if i == period or layer_types[i] != layer_types[start]:
            runs.append(Run(layer_types[start], start, i - start))
            start = i
    return period, tuple(runs)


@dataclasses.dataclass(frozen=True)
class Interleave:
    """The whole stack as one scan over the layers of its main (most frequent) type, each layer of the other type
    applied under `lax.cond` before the main layer it precedes (after the scan if it is the model's last layer). The
    stack then compiles one loop body per layer type, whatever the depth: Granite's period m*5, a, m*4 otherwise
    compiles the Mamba layer twice, once per run."""
    main_type: str
    before: tuple[int, ...]  # per main layer: the other layer just before it (its index among the others) or -1
    trailing: bool  # the model's last layer is of the other type
    # Layer i is main layer order[i] if that is below len(before), else other layer order[i] - len(before).
    order: tuple[int, ...]


def interleave_plan(layer_types: tuple[str, ...]) -> Interleave | None:
    """The Interleave of a stack, or None where it has one layer type or two layers of the other type in a row."""
    types = sorted(set(layer_types))
    if len(types) != 2:
        return None
    main = max(types, key=layer_types.count)
    mains = [i for i, t in enumerate(layer_types) if t == main]
    others = [i for i, t in enumerate(layer_types) if t != main]
    if any(b == a + 1 for a, b in zip(others, others[1:])):
        return None
    before = [-1] * len(mains)
    for n, i in enumerate(others):
        if i != len(layer_types) - 1:
            before[i - n] = n  # i - n main layers come before layer i
    order = [mains.index(i) if t == main else len(mains) + others.index(i) for i, t in enumerate(layer_types)]
    return Interleave(main, tuple(before), layer_types[-1] != main, tuple(order))


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat(fn, policy_name: str):
    """`fn` under `jax.checkpoint` with the remat policy `policy_name`, or `fn` itself for "none"."""
    if policy_name not in _REMAT_POLICIES:
        return fn
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy_name])


def _stacked_layers(cfg: ModelConfig, layer_type: str, count: int, rngs: nnx.Rngs) -> DecoderLayer:
    """`count` layers of one type as a single module whose parameters have a leading `layers` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs):
        return DecoderLayer(cfg, layer_type, rngs=layer_rngs)

    return make(rngs)


class LayerStack(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.period, self.runs = layer_pattern(cfg.layer_types)
        # "auto" never picks "interleave", so the plan is known here; None where the pattern has none (scans run).
        self.interleave = interleave_plan(cfg.layer_types) if cfg.layer_loop == "interleave" else None
        self.repeats = cfg.num_hidden_layers // self.period
        self.remat = cfg.remat
        self.layer_loop = cfg.layer_loop
        with nnx.use_eager_sharding(False):
            self.blocks = nnx.List([_stacked_layers(cfg, run.layer_type, self.repeats * run.length, rngs)
                                    for run in self.runs])

    def locate(self, layer: int) -> tuple[int, int]:
        """(run index, index along the run's stacked axis) of model layer `layer`."""
        repeat, offset = divmod(layer, self.period)
        for j, run in enumerate(self.runs):
            if run.start <= offset < run.start + run.length:
                return j, repeat * run.length + offset - run.start
        raise IndexError(layer)

    def __call__(self, h_BLD, segment_ids_BL, positions_BL, token_mask_BL):
        graphdefs, states = [], []
        for run, block in zip(self.runs, self.blocks):
            graphdef, state = nnx.split(block)
            graphdefs.append(graphdef)
            states.append(jax.tree.map(lambda a, n=run.length: a.reshape(self.repeats, n, *a.shape[1:]), state))

        def run_layers(graphdef):
            def body(h, layer_state):
                return nnx.merge(graphdef, layer_state)(h, segment_ids_BL, positions_BL, token_mask_BL)
            return _remat(body, self.remat)

        if self.interleave is not None:
            return self._interleaved(self.interleave, [run_layers(g) for g in graphdefs], states, h_BLD)
        unroll = resolve_auto("layer_loop", self.layer_loop) == "unroll"

        def one_period(h, period_states):
            stats = []
            for graphdef, state in zip(graphdefs, period_states):
                h, run_stats = _scan(run_layers(graphdef), h, state, unroll=unroll)
                stats.append(run_stats)
            # Concatenating the runs restores layer order within the period.
            return h, jax.tree.map(lambda *s: jnp.concatenate(s, axis=0), *stats)

        h_BLD, stats = _scan(one_period, h_BLD, states)
        return h_BLD, jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), stats)  # [layers, ...]

    def _interleaved(self, plan: Interleave, bodies, states, h_BLD):
        """The layer stack as `plan` says; `bodies[j]`(h, one layer's state) runs a layer of run j, `states[j]` are
        run j's parameters as [repeats, run length, ...]. Each step saves two [B, L, D] inputs for the backward pass
        (the other layer's under the cond, and the main layer's) where per-run scans save one."""
        def in_layer_order(is_main):  # one type's layers as [their count, ...], in model order
            runs = [j for j, run in enumerate(self.runs) if (run.layer_type == plan.main_type) == is_main]
            joined = jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *[states[j] for j in runs])
            return runs[0], jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), joined)

        (main_run, main_states), (other_run, other_states) = in_layer_order(True), in_layer_order(False)
        main_body, other_body = bodies[main_run], bodies[other_run]

        def other_layer(h, n):
            return other_body(h, jax.tree.map(lambda a: a[n], other_states))

        no_stats = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(other_layer, h_BLD, 0)[1])

        def step(h, xs):
            main_state, n = xs
            h, other_stats = jax.lax.cond(n >= 0, other_layer, lambda h, n: (h, no_stats), h, n)
            h, main_stats = main_body(h, main_state)
            return h, (main_stats, other_stats)

        h_BLD, (main_stats, other_stats) = jax.lax.scan(step, h_BLD, (main_states, jnp.asarray(plan.before)))
        last_stats = []
        if plan.trailing:
            h_BLD, stats = other_layer(h_BLD, jax.tree.leaves(other_states)[0].shape[0] - 1)
            last_stats.append(jax.tree.map(lambda s: s[None], stats))
        # other_stats holds each other layer at the step it precedes; model order picks main and other rows.
        at_step = [s for s, n in enumerate(plan.before) if n >= 0]
        stats = jax.tree.map(lambda m, o, *t: jnp.concatenate([m, o[jnp.asarray(at_step, jnp.int32)], *t])
                             [jnp.asarray(plan.order)], main_stats, other_stats, *last_stats)
        return h_BLD, stats


def _scan(body, carry, xs, *, unroll: bool = False):
    """`jax.lax.scan(body, carry, xs)`, or its steps called one by one when `unroll` or when there is one step. A
    loop of one step still stacks what autodiff saves for the backward pass (a copy per layer on CPU) and is one more
    loop for TPU compilers."""
    steps = jax.tree.leaves(xs)[0].shape[0]
    if steps > 1 and not unroll:
        return jax.lax.scan(body, carry, xs)
    ys = []
    for i in range(steps):
        carry, y = body(carry, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def segment_positions(segment_ids_BL):
    """Position of each token within its document: restarts at 0 wherever the segment id changes."""
    L = segment_ids_BL.shape[1]
    t_L = jnp.arange(L)
    starts_BL = jnp.concatenate([jnp.ones_like(segment_ids_BL[:, :1], bool),
                                 segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
    return t_L - jax.lax.cummax(jnp.where(starts_BL, t_L, 0), axis=1)


def _or_ones(segment_ids_BL, h_BLD):
    return jnp.ones(h_BLD.shape[:2], jnp.int32) if segment_ids_BL is None else segment_ids_BL


def project_logits(h_BLD, head_VD):
    """float32 logits [B,L,V] of final hidden states: h @ head.T, with `head_VD` from `GraniteModel.head()`."""
    return jnp.einsum("bld,vd->blv", h_BLD, head_VD, preferred_element_type=jnp.float32)


class GraniteModel(nnx.Module):
    """Granite 4.0 hybrid causal LM. `model.config` is its `ModelConfig`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        V, H, pd = cfg.vocab_size, cfg.hidden_size, cfg.param_dtype
        self.embed_tokens = param(rngs, normal(cfg.initializer_range), (V, H), ("vocab", "embed"), pd)
        self.layers = LayerStack(cfg, rngs=rngs)
        self.norm = RMSNorm(H, eps=cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else param(rngs, normal(cfg.initializer_range), (V, H), ("vocab", "embed"), pd))

    def __call__(self, input_ids, *, segment_ids=None, positions=None, return_aux=False, return_hidden=False):
        """input_ids [B,L] int; segment_ids [B,L] int (packed documents; 0 = padding) or None; positions [B,L] or
        None (derived per document). Returns float32 logits [B,L,V], or (logits, aux) with `return_aux=True`:
        aux holds `load_balancing_loss`, `router_z_loss` (unscaled scalars) and `expert_load` [moe_layers, E].
        `return_hidden=True` returns the final normalised hidden states [B,L,D] (compute dtype) in place of the
        logits: `project_logits(hidden, model.head())` gives them, a slice of tokens at a time if wished."""
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        dtype = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = segment_positions(_or_ones(segment_ids, input_ids[..., None]))
        token_mask_BL = jnp.ones(input_ids.shape, bool) if segment_ids is None else segment_ids > 0
        h_BLD = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dtype) * cfg.embedding_multiplier
        h_BLD, stats = self.layers(h_BLD, segment_ids, positions, token_mask_BL)
        h_BLD = self.norm(h_BLD)
        logits_BLV = h_BLD if return_hidden else project_logits(h_BLD, self.head())
        if not return_aux:
            return logits_BLV
        if stats is None:
            zero = jnp.zeros((), jnp.float32)
            return logits_BLV, {"load_balancing_loss": zero, "router_z_loss": zero,
                                "expert_load": jnp.zeros((0, 0), jnp.float32)}
        return logits_BLV, aux_losses(stats, cfg.num_local_experts)

    def head(self):
        """The output projection [V, D] (the embedding when tied) divided by `logits_scaling`, in the compute dtype.
        The division happens on the parameter before the cast (one rounding, as the cast alone), not on the [B,L,V]
        logits: on CPU the logits' division fused into a transposed copy in the backward pass."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return (head[...] / self.config.logits_scaling).astype(jnp.dtype(self.config.dtype))
