"""`granite-jax import HF_DIR --workdir WORKDIR --config experiments/FILE.py`: a Hugging Face Granite 4.0 folder as
the step-0 checkpoint of a run, so `granite-jax train` with the same config continues pretraining from it.

The run config's model must be the folder's model (same `ModelConfig` fields as its config.json); the optimizer
state starts fresh (zero moments), the data iterator at its start.
"""

from __future__ import annotations

import argparse
import os
import sys

from granite_jax.export import ExportError as ImportFailed  # the same kind of user-facing error


def import_hf(hf_dir: str, workdir: str, config: str, overrides: list[str] = ()) -> str:
    """Writes WORKDIR/checkpoints/0 from `hf_dir`. Returns the checkpoint directory."""
    import jax
    from flax import nnx

    import data_pipelines
    from granite_jax import checkpoint, hf, optim, sharding, train, train_step
    from granite_jax.config import ModelConfig

    if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
        raise ImportFailed(f"{workdir} already has checkpoints; import into a new workdir")
    cfg = train.load_config(config, list(overrides))
    model_cfg = train.model_config(cfg)
    hf_cfg = ModelConfig.from_hf(hf_dir, param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype)
    ours, theirs = model_cfg.to_hf(), hf_cfg.to_hf()  # the model's fields, not framework choices (remat, kernels)
    diff = {k: (ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)}
    if diff:
        raise ImportFailed(f"{config} describes another model than {hf_dir}/config.json: " + ", ".join(
            f"model.{k}={a!r} (the folder has {b!r})" for k, (a, b) in sorted(diff.items())))
    loaded = hf.from_pretrained(hf_dir, dtype=model_cfg.param_dtype)
    t = cfg.train
    tx, _ = optim.make_optimizer(cfg.optimizer, cfg.schedule, total_steps=t.steps,
                                 tokens_per_step=t.batch_size * t.seq_len)
    mesh = sharding.make_mesh({k: 1 for k in dict(cfg.mesh) if k != "dcn"}, devices=jax.devices()[:1])
    _, state = train_step.init_state(model_cfg, tx, mesh, seed=t.seed)
    ours = checkpoint._flat(nnx.state(loaded, nnx.Param))
    state["params"] = checkpoint._unflat(state["params"], {k: jax.device_put(v[...] if hasattr(v, "get_value")
                                                                             else v) for k, v in ours.items()})
    data_it = data_pipelines.make_batches(cfg.data, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed,
                                          process_index=0, process_count=1, vocab_size=model_cfg.vocab_size)
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep, use_async=False)
    ckpt.save(0, state, data_it, checkpoint.run_meta(model_cfg, cfg.to_dict()))
    ckpt.close()
    return os.path.join(workdir, checkpoint.CHECKPOINT_DIR, "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax import", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="a Hugging Face Granite 4.0 folder (config.json + safetensors)")
    parser.add_argument("--workdir", required=True, help="the new run directory")
    parser.add_argument("--config", required=True, help="the run config (experiments/*.py) training will use")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        out = import_hf(args.hf_dir, args.workdir, args.config)
    except (ImportFailed, ValueError, FileNotFoundError) as e:
        print(f"granite-jax import: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}; continue with: granite-jax train --config {args.config} --workdir {args.workdir}")
    return 0
