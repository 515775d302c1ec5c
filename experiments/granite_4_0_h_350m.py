"""Pretraining granite-4.0-h-350m: 340M dense hybrid, 32 layers, attention at 10, 13, 17, 27.

    granite-jax launch --target slurm --nodes 8 \
        --config experiments/granite_4_0_h_350m.py:h100x64 --workdir /ckpt/granite-4.0-h-350m
    granite-jax compile-check --config experiments/granite_4_0_h_350m.py:v5p-256 --topology v5p:4x4x8  # HBM, on CPU
    python experiments/recipes.py                  # the plan of every size on every cluster

The argument after the colon names the cluster (default h100x64). Recipe (data stages, schedule,
optimizer) and clusters: experiments/recipes.py. Parameters: FACTS.md §1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipes import pretraining_config  # noqa: E402


def get_config(cluster: str | None = None):
    return pretraining_config("h-350m", cluster)
