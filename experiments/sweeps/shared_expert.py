"""The always-on shared expert or not, at equal total and active parameters.

    granite-jax sweep experiments/sweeps/shared_expert.py --workdir runs/sweeps/shared_expert

shared: the ablation base (16 routed experts of width 128, top-2, + a shared SwiGLU of width 384).
no_shared: the shared expert's 384 units move into 3 more routed experts (19, top-5): the same total and active counts
(`shared_intermediate_size=0` removes the shared MLP).
"""

BASE = "../ablation_base.py"

POINTS = {
    "shared": {},
    "no_shared": {"model.shared_intermediate_size": 0, "model.num_local_experts": 19, "model.num_experts_per_tok": 5},
}
