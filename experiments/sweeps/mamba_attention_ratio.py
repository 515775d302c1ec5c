"""How many attention layers among the Mamba-2 layers? All-attention vs 3:1 vs 9:1 (Granite 4.0) vs all-Mamba, at
equal total parameters (within 0.4%: the shared-MLP width absorbs the difference between a Mamba-2 and an attention
layer, ~250K vs ~98K parameters at hidden 192).

    granite-jax sweep experiments/sweeps/mamba_attention_ratio.py --workdir runs/sweeps/mamba_attention_ratio
    granite-jax sweep-report runs/sweeps/mamba_attention_ratio

20 layers (the ablation base) make every ratio exact: 3:1 puts attention at 3, 7, 11, 15, 19; 9:1 at 5 and 15 like
layers 5, 15, 25, 35 of the released 40-layer models. Measured results: docs/sweeps.md.
"""

BASE = "../ablation_base.py"
N = 20


def _layers(attention):
    return ["attention" if i in attention else "mamba" for i in range(N)]


POINTS = {
    "all_attention": {"model.layer_types": _layers(range(N)), "model.shared_intermediate_size": 624},
    "3to1": {"model.layer_types": _layers((3, 7, 11, 15, 19)), "model.shared_intermediate_size": 424},
    "9to1": {"model.layer_types": _layers((5, 15)), "model.shared_intermediate_size": 384},
    "all_mamba": {"model.layer_types": _layers(()), "model.shared_intermediate_size": 368},
}
