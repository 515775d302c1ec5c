"""The ablation base: a ~34M-parameter (14M active) Granite-4.0-style hybrid MoE that trains on CPU on the demo corpus.

    granite-jax prepare --demo --out data/demo          # once: the corpus and its held-out split data/demo/eval
    granite-jax train --config experiments/ablation_base.py --workdir runs/ablation_base
    granite-jax sweep experiments/sweeps/mamba_attention_ratio.py --workdir runs/sweeps/ratio   # sweeps start here

Granite's released pattern at half depth: 20 layers, attention at 5 and 15 (9:1 Mamba-2 : attention), 16 routed
experts (top-2) plus the always-on shared expert, NoPE, muP-style multipliers; 300 steps of 8 x 256 tokens, eval loss
on data/demo/eval every 50 steps and, with lm-eval installed (`.[eval]`), the shipped task tiny_stdlib_choice
(`eval_tiny_stdlib_choice_acc`; off: `--config.eval.tasks=[]`). Every sweep in experiments/sweeps/ overrides this
file's keys (`--config.model.hidden_size=256`, ...). Details in recipes.ablation_config.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipes import ablation_config  # noqa: E402


def get_config(data: str | None = None):
    """`experiments/ablation_base.py:DIR` reads the demo corpus from DIR (default data/demo)."""
    return ablation_config(data) if data else ablation_config()
