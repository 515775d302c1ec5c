"""The generation cache: cached decode logits equal a full forward over the same tokens, at every step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from inference_helpers import CONFIGS, perturbed_model, prompts

from granite_jax.inference.cache import cache_bytes, init_cache
from granite_jax.inference.decode import forward_with_cache, left_pad, prefill
from granite_jax.inference.generate import sample

STEPS = 6


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decode_equals_full_forward_every_step(name):
    cfg = CONFIGS[name]
    model = perturbed_model(cfg, seed=1)
    graphdef, params = nnx.split(model)
    # 21 crosses the SSD's 16-token chunk; 1 is a prompt shorter than the conv window (pads in the conv state)
    tokens_BL, start_B = left_pad(prompts((7, 21, 1), cfg.vocab_size), cfg.pad_token_id)
    max_len = tokens_BL.shape[1] + STEPS

    merge = functools.partial(nnx.merge, graphdef)
    prefill_fn = jax.jit(lambda p, t, s: prefill(merge(p), t, s, max_len, all_logits=True))
    step_fn = jax.jit(lambda p, c, t: forward_with_cache(merge(p), t[:, None], c))
    full_fn = jax.jit(lambda p, t, seg: merge(p)(t, segment_ids=seg))

    prefill_BLV, cache = prefill_fn(params, tokens_BL, start_B)
    token_B = jnp.argmax(prefill_BLV[:, -1], -1).astype(jnp.int32)
    generated, step_logits = [], []
    for _ in range(STEPS):
        generated.append(token_B)
        logits_BV, cache = step_fn(params, cache, token_B)
        step_logits.append(np.asarray(logits_BV))
        token_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
    seq_BT = jnp.concatenate([tokens_BL, jnp.stack(generated, 1)], axis=1)
    segment_ids_BT = (jnp.arange(seq_BT.shape[1])[None] >= start_B[:, None]).astype(jnp.int32)
    full_BTV = np.asarray(full_fn(params, seq_BT, segment_ids_BT))  # causal: position t sees tokens <= t
    steps_BSV, prefill_BLV, length = np.stack(step_logits, 1), np.asarray(prefill_BLV), int(cache.length)
    L = tokens_BL.shape[1]
    assert length == max_len
    for b, s in enumerate(start_B):  # the prompt's real tokens
        assert _rel_err(prefill_BLV[b, s:], full_BTV[b, s:L]) <= 1e-4
    for t in range(STEPS):
        assert _rel_err(steps_BSV[:, t], full_BTV[:, L + t]) <= 1e-4, f"decode step {t}"


def test_cache_is_constant_in_context_for_mamba_layers():
    cfg = CONFIGS["hybrid_moe"]
    n_attn = len(cfg.attention_layer_indices)
    kv_per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4 * n_attn
    assert cache_bytes(cfg, 1, 2048) - cache_bytes(cfg, 1, 1024) == 1024 * kv_per_token
    shapes = jax.eval_shape(lambda: init_cache(cfg, 2, 64))
    assert cache_bytes(cfg, 2, 64) == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes.layers))
    mamba = shapes.layers[0]
    assert mamba.ssm.shape == (2, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state)
    assert mamba.ssm.dtype == jnp.float32 and mamba.conv_x.shape[1] == cfg.mamba_d_conv - 1


def test_sampling_top_p_and_temperature():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    draws = np.asarray(sample(logits, keys, temperature=1.0, top_p=0.75))
    assert set(np.unique(draws)) == {0, 1}  # the nucleus of 0.75 is {0.5, 0.3}
    assert abs(np.mean(draws == 0) - 0.5 / 0.8) < 0.03
    assert np.all(np.asarray(sample(logits, keys, temperature=1.0, top_p=1e-6)) == 0)
    assert np.all(np.asarray(sample(logits, keys, temperature=0.0, top_p=1.0)) == 0)
    cold = np.asarray(sample(logits, keys, temperature=0.05, top_p=1.0))
    assert np.mean(cold == 0) > 0.99


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[3, 4], []], 0)
    from granite_jax.inference.generate import Generator
    gen = Generator(perturbed_model(CONFIGS["dense_attention"]))
    with pytest.raises(ValueError, match="top_p=0"):
        gen.generate([[3]], max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gen.generate([[3]], max_new_tokens=5000)
