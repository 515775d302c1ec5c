"""Mixture-of-experts vs dense at equal active parameters (13.7M, within 0.3%), and expert granularity.

    granite-jax sweep experiments/sweeps/moe_vs_dense.py --workdir runs/sweeps/moe_vs_dense

moe_16e_top2 is the ablation base (16 experts of width 128, top-2, plus the shared expert of width 384: 34.4M total).
dense_equal_active drops the routed experts and widens the shared MLP to 648 (13.7M total = active).
moe_64e_top8 is Granite's fine-grained direction at the same total and active counts (64 experts of width 32, top-8).
"""

BASE = "../ablation_base.py"

POINTS = {
    "moe_16e_top2": {},
    "dense_equal_active": {"model.num_local_experts": 0, "model.num_experts_per_tok": 0,
                           "model.shared_intermediate_size": 648},
    "moe_64e_top8": {"model.num_local_experts": 64, "model.num_experts_per_tok": 8, "model.intermediate_size": 32},
}
