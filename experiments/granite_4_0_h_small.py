"""Pretraining granite-4.0-h-small: 32B (8.8B active) hybrid MoE, 72 experts top-10.

    granite-jax launch --target tpu-vm --nodes 32 --tpu my-v5p-256 \
        --config experiments/granite_4_0_h_small.py:v5p-256 --workdir /ckpt/granite-4.0-h-small
    granite-jax compile-check --config experiments/granite_4_0_h_small.py:v5p-256 --topology v5p:4x4x8  # HBM, on CPU
    python experiments/recipes.py                  # the plan of every size on every cluster

The argument after the colon names the cluster (default v5p-256). Recipe (data stages, schedule,
optimizer) and clusters: experiments/recipes.py. Parameters: FACTS.md §1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipes import pretraining_config  # noqa: E402


def get_config(cluster: str | None = None):
    return pretraining_config("h-small", cluster)
