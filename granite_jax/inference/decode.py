"""The model's forward pass with the generation cache: `prefill` runs the prompt (the chunked SSD and attention
over all its tokens at once) and returns the cache; `forward_with_cache` on one token per row is a decode step.

Both walk the layers one by one (the stacked parameters sliced per layer), so every layer reads and writes its own
cache entry; a decode step's shapes are fixed by the batch and the cache's maximum length, so it compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.inference.cache import Cache, cached_attention, init_cache
from granite_jax.mamba2 import Mamba2Mixer
from granite_jax.model import GraniteModel, project_logits


def layers_in_order(model: GraniteModel) -> list:
    """The model's DecoderLayers in model order, each with its own (unstacked) parameters."""
    stack = model.layers
    split = [nnx.split(block) for block in stack.blocks]
    layers = []
    for i in range(model.config.num_hidden_layers):
        j, k = stack.locate(i)
        graphdef, state = split[j]
        layers.append(nnx.merge(graphdef, jax.tree.map(lambda a, k=k: a[k], state)))
    return layers


def forward_with_cache(model: GraniteModel, tokens_BL, cache: Cache, *, all_logits: bool = False):
    """tokens [B,L] at slots cache.length.. -> (float32 logits [B,V] of the last token, or [B,L,V] with
    `all_logits`; the cache after them). Slots before a row's `start_B` are left padding (segment 0)."""
    cfg = model.config
    L = tokens_BL.shape[1]
    slots_L = cache.length + jnp.arange(L, dtype=jnp.int32)
    segment_ids_BL = (slots_L[None] >= cache.start_B[:, None]).astype(jnp.int32)
    h_BLD = jnp.take(model.embed_tokens[...], tokens_BL, axis=0).astype(cfg.dtype) * cfg.embedding_multiplier
    new_layers = []
    for layer, entry in zip(layers_in_order(model), cache.layers):
        x_BLD = layer.input_layernorm(h_BLD)
        if isinstance(layer.mixer, Mamba2Mixer):
            mixed_BLD, entry = layer.mixer(x_BLD, segment_ids_BL, state=entry)
        else:
            mixed_BLD, entry = cached_attention(layer.mixer, x_BLD, entry, cache.length, cache.start_B)
        h_BLD, _ = layer.feed_forward(h_BLD + layer.residual_multiplier * mixed_BLD.astype(h_BLD.dtype),
                                      segment_ids_BL > 0)
        new_layers.append(entry)
    h_BLD = model.norm(h_BLD if all_logits else h_BLD[:, -1:])
    logits = project_logits(h_BLD, model.head())
    return (logits if all_logits else logits[:, 0]), Cache(tuple(new_layers), cache.start_B, cache.length + L)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, longest] int32 with each prompt right-aligned, start [B] int32: the padding slots per row)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = p
    return tokens, np.asarray([width - len(p) for p in prompts], np.int32)


def prefill(model: GraniteModel, tokens_BL, start_B, max_len: int, *, all_logits: bool = False):
    """The left-padded prompts tokens [B,L] (start [B] from `left_pad`) through the model into a fresh cache of
    `max_len` slots: (logits as `forward_with_cache` gives them, the cache)."""
    if tokens_BL.shape[1] > max_len:
        raise ValueError(f"the prompt has {tokens_BL.shape[1]} tokens but max_len={max_len}")
    cache = init_cache(model.config, tokens_BL.shape[0], max_len, start_B)
    return forward_with_cache(model, tokens_BL, cache, all_logits=all_logits)
