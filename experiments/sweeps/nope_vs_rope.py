"""No positional encoding (Granite 4.0's hybrids: the Mamba-2 layers carry position) vs RoPE, in the 9:1 hybrid and
in an all-attention model of equal parameters (where position can only come from RoPE or the causal mask).

    granite-jax sweep experiments/sweeps/nope_vs_rope.py --workdir runs/sweeps/nope_vs_rope
"""

BASE = "../ablation_base.py"
ALL_ATTENTION = {"model.layer_types": ["attention"] * 20, "model.shared_intermediate_size": 624}

POINTS = {
    "hybrid_nope": {"model.position_embedding_type": None},
    "hybrid_rope": {"model.position_embedding_type": "rope", "model.rope_theta": 10000.0},
    "attention_nope": {**ALL_ATTENTION, "model.position_embedding_type": None},
    "attention_rope": {**ALL_ATTENTION, "model.position_embedding_type": "rope", "model.rope_theta": 10000.0},
}
