"""Batched generation: greedy or sampled (temperature, top-p), prompts of different lengths left-padded.

One compiled prefill per prompt width and one compiled decode step per (batch, maximum length): the step takes the
cache and the last tokens, returns the next tokens and the cache (donated, so it is updated in place).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.inference.decode import forward_with_cache, left_pad, prefill
from granite_jax.model import GraniteModel


def sample(logits_BV, key, *, temperature: float, top_p: float):
    """Next tokens [B] int32: argmax when temperature == 0, else drawn from softmax(logits / temperature) restricted
    to the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep a token while the probability of the tokens before it is below top_p (the first is always kept)
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: must be in (0, 1] (1 = no nucleus cut)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be >= 1")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "temperature", "top_p"))
def _prefill(graphdef, params, tokens_BL, start_B, key, *, max_len, temperature, top_p):
    logits_BV, cache = prefill(nnx.merge(graphdef, params), tokens_BL, start_B, max_len)
    return sample(logits_BV, key, temperature=temperature, top_p=top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_p"), donate_argnames=("cache",))
def _step(graphdef, params, cache, tokens_B, key, *, temperature, top_p):
    logits_BV, cache = forward_with_cache(nnx.merge(graphdef, params), tokens_B[:, None], cache)
    return sample(logits_BV, key, temperature=temperature, top_p=top_p), cache


class Generator:
    """Generation from one model. The compiled prefill and decode steps are cached by the model's structure
    (its graphdef), so every Generator of one model shape shares them."""

    def __init__(self, model: GraniteModel):
        self.config = model.config
        self.graphdef, self.params = nnx.split(model)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = -1, progress: bool = False
                 ) -> list[list[int]]:
        """The continuation of each prompt (token ids): `max_new_tokens` tokens, or fewer ending with `eos_id`
        (default: the config's eos_token_id; None never stops early)."""
        _check_sampling(temperature, top_p, max_new_tokens)
        eos_id = self.config.eos_token_id if eos_id == -1 else eos_id
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        tokens_BL, start_B = left_pad(prompts, pad_id)
        max_len = tokens_BL.shape[1] + max_new_tokens
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({tokens_BL.shape[1]} tokens) + max_new_tokens={max_new_tokens} exceeds the "
                             f"model's max_position_embeddings={self.config.max_position_embeddings}")
        keys = jax.random.split(jax.random.key(seed), max_new_tokens)
        kw = dict(temperature=float(temperature), top_p=float(top_p))
        token_B, cache = _prefill(self.graphdef, self.params, tokens_BL, start_B, keys[0], max_len=max_len, **kw)
        out, done = [np.asarray(token_B)], np.zeros(len(prompts), bool)
        steps = range(1, max_new_tokens)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="decode", unit="tok")
        for i in steps:
            if eos_id is not None:
                done |= out[-1] == eos_id
                if done.all():
                    break
            token_B, cache = _step(self.graphdef, self.params, cache, token_B, keys[i], **kw)
            out.append(np.asarray(token_B))
        generated = np.stack(out, axis=1)
        results = []
        for row in generated.tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            results.append(row)
        return results


def generate(model: GraniteModel, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    """`Generator(model).generate(prompts, **kwargs)` (compiles anew; keep a Generator to generate repeatedly)."""
    return Generator(model).generate(prompts, **kwargs)
