"""Tiny models shared by the inference tests (generation, lm-eval adapter)."""

import jax
import numpy as np
from flax import nnx

from granite_jax.config import preset
from granite_jax.model import GraniteModel

CONFIGS = {
    # hybrid MoE with every Mamba/attention bias (the left-padding pads must not leak through the biases)
    "hybrid_moe": preset("debug-hybrid-moe", num_hidden_layers=3, layer_types=("mamba", "attention", "mamba"),
                         mamba_proj_bias=True, attention_bias=True, mamba_n_groups=2,
                         tie_word_embeddings=False, time_step_limit=(0.01, 0.5)),
    # all attention with RoPE (granite-4.0-micro's kind), dense shared MLP
    "dense_attention": preset("debug-hybrid-dense", num_hidden_layers=2, layer_types=("attention", "attention"),
                              position_embedding_type="rope", rope_theta=1000.0),
}


def perturbed_model(cfg, seed: int = 0, scale: float = 0.2) -> GraniteModel:
    """A model of random weights well away from any initialisation (peaked logits, distinct greedy choices), drawn
    with numpy onto the abstract model: building a MoE model eagerly traces its vmapped initialisers for a minute
    on a 2-core CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(a.shape).astype(a.dtype)
        if "A_log" in name:
            return np.log(rng.uniform(1.0, 16.0, a.shape)).astype(a.dtype)
        if "dt_bias" in name:
            return rng.uniform(-5.0, -2.0, a.shape).astype(a.dtype)  # softplus: dt in about [0.007, 0.13]
        if "'D'" in name or "norm" in name:
            return 1.0 + scale * noise
        return scale * noise

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of the given lengths, avoiding the special ids at the bottom of the debug vocabularies."""
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, n).tolist() for n in lengths]
