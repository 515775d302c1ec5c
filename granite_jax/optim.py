"""The optimizer: AdamW with a weight-decay mask, global-norm clipping, LR schedules and per-group LR multipliers.

`make_optimizer(opt_cfg, sched_cfg, total_steps=..., tokens_per_step=...)` returns `(tx, schedule_fn)`. The chain is

    clip_by_global_norm -> scale_by_adam(b1, b2, eps) -> add_decayed_weights(wd, mask=decays)
      -> per-group LR multiplier -> scale by -schedule(step)

so weight decay is decoupled (torch AdamW: p -= lr * mult * (adam + wd * p)) and a group's multiplier scales its
decay too, as muP parameter groups with their own LR do. A "step" is one optimizer update: with gradient
accumulation, `tokens_per_step` is the tokens of all micro-batches of one update (see `accumulate_gradients`).

Float32 master weights: parameters are created and kept in float32 (`ModelConfig.param_dtype`), the model casts
them to the compute dtype (bfloat16) inside its forward pass, so gradients, Adam moments and updates are float32
and small updates are not lost to bfloat16 rounding. Nothing here casts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters never decayed (by the last path component) and modules whose weights are norm scales.
NO_DECAY_NAMES = frozenset({"bias", "A_log", "D", "dt_bias"})
NORM_PARAM_NAMES = frozenset({"weight", "scale"})

SCHEDULES = ("constant", "cosine", "wsd", "power")
WSD_DECAY_SHAPES = ("linear", "cosine", "sqrt")
POWER_DECAY_TYPES = ("exponential", "linear")


def default_optimizer_config() -> ml_collections.ConfigDict:
    """AdamW as IBM's Bamba-9B used it (FACTS.md §5). `lr_multipliers`: [(path regex, multiplier), ...]."""
    return ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0, lr_multipliers=[],
    ))


def default_schedule_config() -> ml_collections.ConfigDict:
    """Schedule fields; which ones a schedule reads is said in `make_schedule`."""
    return ml_collections.ConfigDict(dict(
        name="cosine", lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1,
        decay_fraction=0.1, wsd_decay_shape="linear",
        power_a=4.0, power_b=-0.51, power_decay_type="exponential",
    ))


# Paths and the weight-decay mask ---------------------------------------------------------------------------------

def path_str(path: Sequence[Any]) -> str:
    """'layers/0/mamba/A_log' from a jax key path (nnx State paths; a trailing Variable `value` is dropped)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


def decays(path: str) -> bool:
    """True when the parameter at `path` ('a/b/c') gets weight decay.

    Not decayed: a last component in `NO_DECAY_NAMES` (`bias`, `A_log`, `D`, `dt_bias`) or with `bias` among its
    underscore-separated words (`q_bias`, `conv_bias_x`, `in_bias_z`); and norm scales, i.e. a last component
    `weight`/`scale` inside a module whose name contains "norm" (case-insensitive: `input_layernorm`,
    `post_attention_layernorm`, the final `norm`, Mamba's gated `norm`). Everything else (projections, experts,
    router, embeddings) is decayed.
    """
    parts = path.split("/")
    name = parts[-1]
    if name in NO_DECAY_NAMES or "bias" in name.split("_"):
        return False
    return not (name in NORM_PARAM_NAMES and any("norm" in p.lower() for p in parts[:-1]))


def decay_mask(params) -> Any:
    """A bool tree (same structure as `params`) from `decays`, for `optax.add_decayed_weights(mask=...)`."""
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(path_str(p)), params)


def lr_multiplier_fn(rules: Sequence[tuple[str, float]]) -> Callable[[str], float]:
    """path -> multiplier: the first `(regex, multiplier)` whose regex `re.search`es the path wins; default 1."""
    compiled = [(re.compile(pattern), float(mult)) for pattern, mult in rules]

    def multiplier(path: str) -> float:
        for pattern, mult in compiled:
            if pattern.search(path):
                return mult
        return 1.0

    return multiplier


def scale_by_path(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiplies each update leaf by `multiplier(path_str(path))` (a trace-time constant; stateless)."""

    def update(updates, state, params=None):
        del params

        def one(path, u):
            m = multiplier(path_str(path))
            return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# Schedules (all: step -> lr, jittable; `step` counts optimizer updates from 0) ----------------------------------

def _warmup(step, warmup_steps: int, peak):
    """Linear 0 -> peak over `warmup_steps` (peak reached at step == warmup_steps)."""
    return peak * step / max(warmup_steps, 1)


def warmup_cosine(step, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup to `lr`, then cosine from `lr` (step warmup_steps) to `min_lr_ratio*lr` (step total_steps)."""
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cosine = lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
    return jnp.where(step < warmup_steps, _warmup(step, warmup_steps, lr), cosine)


def decay_start(total_steps: int, decay_fraction: float) -> int:
    """First step of the decay tail of WSD/Power: the last `decay_fraction` of `total_steps`."""
    return total_steps - int(round(decay_fraction * total_steps))


def wsd(step, *, lr: float, warmup_steps: int, total_steps: int, decay_fraction: float, min_lr_ratio: float,
        shape: str = "linear"):
    """Warmup-stable-decay: warmup to `lr`, hold, then over the final `decay_fraction` of steps decay to
    `min_lr_ratio*lr` with factor 1-p (linear), (1+cos(pi p))/2 (cosine) or 1-sqrt(p) (sqrt), p in [0, 1]."""
    step = jnp.asarray(step, jnp.float32)
    start = decay_start(total_steps, decay_fraction)
    p = jnp.clip((step - start) / max(total_steps - start, 1), 0.0, 1.0)
    factor = {"linear": lambda: 1 - p, "cosine": lambda: 0.5 * (1 + jnp.cos(jnp.pi * p)),
              "sqrt": lambda: 1 - jnp.sqrt(p)}[shape]()
    stable = lr * (min_lr_ratio + (1 - min_lr_ratio) * factor)
    return jnp.where(step < warmup_steps, _warmup(step, warmup_steps, lr), stable)


def power_lr(n_tokens, *, lr: float, a: float, b: float):
    """The Power scheduler's stable-phase LR: min(lr, a * n_tokens**b) (arXiv 2408.13359; b < 0)."""
    n = jnp.maximum(jnp.asarray(n_tokens, jnp.float32), 1.0)
    return jnp.minimum(lr, a * n ** b)


def tokens_seen(step, tokens_per_step):
    """The tokens trained on before `step`: step * tokens_per_step, or, for data stages, `tokens_per_step` as
    [(first step, tokens per step), ...] (first steps increasing from 0; the last stage runs on)."""
    stages = _token_stages(tokens_per_step)
    step = jnp.asarray(step, jnp.float32)
    ends = [first for first, _ in stages[1:]] + [None]
    return sum(float(tokens) * jnp.clip(step - first, 0.0, None if end is None else end - first)
               for (first, tokens), end in zip(stages, ends))


def _token_stages(tokens_per_step) -> list[tuple[int, int]]:
    return [(0, tokens_per_step)] if isinstance(tokens_per_step, int) else list(tokens_per_step)


def power(step, *, lr: float, a: float, b: float, tokens_per_step, warmup_steps: int, total_steps: int,
          decay_fraction: float, min_lr_ratio: float, decay_type: str = "exponential"):
    """IBM's Power scheduler as a function of the step, with n_tokens = `tokens_seen(step, tokens_per_step)`.

    Warmup: linear 0 -> power_lr(warmup tokens). Stable: power_lr(n_tokens). Decay tail over the final
    `decay_fraction` of steps, from lr_d = power_lr(tokens at decay start) to `min_lr_ratio*lr_d`:
    exponential lr_d * min_lr_ratio**p, or linear lr_d * (1 - (1-min_lr_ratio) p), p in [0, 1].
    `a` absorbs the paper's batch-size factor (its a*beta); muP makes one (a, b) transfer across model sizes.
    """
    step = jnp.asarray(step, jnp.float32)
    at = lambda s: power_lr(tokens_seen(s, tokens_per_step), lr=lr, a=a, b=b)  # noqa: E731
    start = decay_start(total_steps, decay_fraction)
    p = jnp.clip((step - start) / max(total_steps - start, 1), 0.0, 1.0)
    tail = at(start) * (min_lr_ratio ** p if decay_type == "exponential" else 1 - (1 - min_lr_ratio) * p)
    stable = jnp.where(step < start, at(step), tail)
    return jnp.where(step < warmup_steps, _warmup(step, warmup_steps, at(warmup_steps)), stable)


# Config validation and construction ------------------------------------------------------------------------------

def _check_keys(cfg: Mapping[str, Any], defaults: Mapping[str, Any], section: str) -> dict:
    d = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    for key in d:
        if key not in defaults:
            raise ValueError(f"{section}.{key}: unknown key; known keys are {', '.join(sorted(defaults))}")
    return {**dict(defaults.items()), **d}


def _fail(section: str, key: str, value, rule: str):
    raise ValueError(f"{section}.{key}={value!r}: {rule}")


def _number(section, d, key, lo=None, hi=None, lo_open=False, hi_open=False):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(section, key, v, "must be a finite number")
    if lo is not None and (v <= lo if lo_open else v < lo):
        _fail(section, key, v, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        _fail(section, key, v, f"must be {'<' if hi_open else '<='} {hi}")
    return float(v)


def make_schedule(sched_cfg, *, total_steps: int, tokens_per_step) -> Callable[[Any], jax.Array]:
    """step -> learning rate from a schedule config (`default_schedule_config()` keys). `tokens_per_step` is an int,
    or [(first step, tokens per step), ...] when data stages change the batch (see `tokens_seen`).

    `constant`: lr after warmup. `cosine`: `warmup_cosine` (lr, warmup_steps, min_lr_ratio). `wsd`: `wsd`
    (+ decay_fraction, wsd_decay_shape). `power`: `power` (lr is the cap, power_a, power_b, decay_fraction,
    power_decay_type, min_lr_ratio). Raises ValueError naming the key of any invalid value.
    """
    s = "schedule"
    d = _check_keys(sched_cfg, default_schedule_config(), s)
    if d["name"] not in SCHEDULES:
        _fail(s, "name", d["name"], f"must be one of {', '.join(SCHEDULES)}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: must be a positive integer (train.steps)")
    stages = _token_stages(tokens_per_step)
    firsts = [first for first, _ in stages]
    if (not stages or firsts[0] != 0 or firsts != sorted(set(firsts))
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for _, n in stages)):
        raise ValueError(f"tokens_per_step={tokens_per_step!r}: must be a positive integer (batch_size * seq_len), "
                         "or [(first step, positive tokens per step), ...] from step 0 on, first steps increasing")
    lr = _number(s, d, "lr", 0.0, lo_open=True)
    min_ratio = _number(s, d, "min_lr_ratio", 0.0, 1.0)
    frac = _number(s, d, "decay_fraction", 0.0, 1.0)
    warmup = d["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        _fail(s, "warmup_steps", warmup, "must be a non-negative integer")
    end_of_warmup = decay_start(total_steps, frac) if d["name"] in ("wsd", "power") else total_steps
    if warmup > end_of_warmup:
        _fail(s, "warmup_steps", warmup, f"must be <= {end_of_warmup} (the step where "
              f"{'decay starts' if d['name'] in ('wsd', 'power') else 'training ends'}) for total_steps={total_steps}")
    name = d["name"]
    if name == "constant":
        return lambda step: jnp.where(jnp.asarray(step) < warmup,
                                      _warmup(jnp.asarray(step, jnp.float32), warmup, lr), lr)
    if name == "cosine":
        return lambda step: warmup_cosine(step, lr=lr, warmup_steps=warmup, total_steps=total_steps,
                                          min_lr_ratio=min_ratio)
    if name == "wsd":
        if d["wsd_decay_shape"] not in WSD_DECAY_SHAPES:
            _fail(s, "wsd_decay_shape", d["wsd_decay_shape"], f"must be one of {', '.join(WSD_DECAY_SHAPES)}")
        return lambda step: wsd(step, lr=lr, warmup_steps=warmup, total_steps=total_steps, decay_fraction=frac,
                                min_lr_ratio=min_ratio, shape=d["wsd_decay_shape"])
    a = _number(s, d, "power_a", 0.0, lo_open=True)
    b = _number(s, d, "power_b", hi=0.0, hi_open=True)
    if d["power_decay_type"] not in POWER_DECAY_TYPES:
        _fail(s, "power_decay_type", d["power_decay_type"], f"must be one of {', '.join(POWER_DECAY_TYPES)}")
    if d["power_decay_type"] == "exponential" and min_ratio == 0.0 and frac > 0:
        _fail(s, "min_lr_ratio", min_ratio, "an exponential decay never reaches 0: set it > 0 (e.g. 0.01) or "
              "use power_decay_type='linear'")
    return lambda step: power(step, lr=lr, a=a, b=b, tokens_per_step=tokens_per_step, warmup_steps=warmup,
                              total_steps=total_steps, decay_fraction=frac, min_lr_ratio=min_ratio,
                              decay_type=d["power_decay_type"])


def make_optimizer(opt_cfg, sched_cfg, *, total_steps: int, tokens_per_step
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """`(tx, schedule_fn)`: the AdamW chain of the module docstring and its step -> LR function (for logging)."""
    s = "optimizer"
    d = _check_keys(opt_cfg, default_optimizer_config(), s)
    b1 = _number(s, d, "b1", 0.0, 1.0, hi_open=True)
    b2 = _number(s, d, "b2", 0.0, 1.0, hi_open=True)
    eps = _number(s, d, "eps", 0.0, lo_open=True)
    wd = _number(s, d, "weight_decay", 0.0)
    clip = _number(s, d, "grad_clip_norm", 0.0)
    rules = list(d["lr_multipliers"] or [])
    for i, rule in enumerate(rules):
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        if ok:
            try:
                re.compile(rule[0])
                ok = (isinstance(rule[1], (int, float)) and not isinstance(rule[1], bool)
                      and math.isfinite(rule[1]) and rule[1] >= 0)
            except re.error:
                ok = False
        if not ok:
            _fail(s, f"lr_multipliers[{i}]", rule,
                  "must be (path regex, finite multiplier >= 0), e.g. ('experts', 0.5)")
    schedule = make_schedule(sched_cfg, total_steps=total_steps, tokens_per_step=tokens_per_step)
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    if rules:
        parts.append(scale_by_path(lr_multiplier_fn(rules)))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule


# Gradient accumulation -------------------------------------------------------------------------------------------

def accumulate_gradients(loss_fn: Callable, params, batch: Mapping[str, jax.Array], num_microbatches: int):
    """Sums `jax.value_and_grad(loss_fn, has_aux=True)(params, micro)` over micro-batches with a `lax.scan`.

    `batch` arrays are `[B, ...]`, split into `num_microbatches` row blocks `[B/k, ...]`. Returns
    `(loss_sum, aux_sum, grads_sum)` accumulated in float32. Make `loss_fn` return token *sums* (and its token
    count in `aux`) and divide by the total count afterwards: that is exactly the full-batch gradient however
    the tokens fall into micro-batches. Only one micro-batch's activations are alive at a time.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = int(num_microbatches)
    if k == 1:
        (loss, aux), grads = grad_fn(params, batch)
        return loss, aux, grads
    for key, x in batch.items():
        if x.shape[0] % k:
            raise ValueError(f"batch[{key!r}] has {x.shape[0]} rows, not divisible by grad_accum_steps={k}")
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), dict(batch))
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss0, aux0, grads0))

    def body(carry, mb):
        (loss, aux), grads = grad_fn(params, mb)
        return jax.tree.map(jnp.add, carry, f32((loss, aux, grads))), None

    (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
    return loss, aux, grads
