"""SSD chunk size: speed only (the chunked scan computes the same function for every chunk size, so losses agree to
rounding; compare tokens/s). Short runs of the ablation base at its 256-token rows.

    granite-jax sweep experiments/sweeps/ssd_chunk_size.py --workdir runs/sweeps/ssd_chunk_size
    # on a GPU/TPU, at production length: add --config.train.seq_len=4096 --config.model.ssd_impl=pallas_gpu
"""

BASE = "../ablation_base.py"
COMMON = {"train.steps": 30, "train.log_every_steps": 5, "schedule.warmup_steps": 5, "checkpoint.every_steps": 30,
          "eval.tasks": []}  # speed only: every point scores the same
GRID = {"model.mamba_chunk_size": [16, 32, 64, 128, 256]}
