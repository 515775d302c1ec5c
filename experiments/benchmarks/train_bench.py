"""Training throughput on CPU: granite-jax's train step vs transformers' PyTorch `GraniteMoeHybridForCausalLM`,
same config, same batch, forward + backward + AdamW, side by side in one run.

    python experiments/benchmarks/train_bench.py                      # bench-hybrid-20m, batch 4 x 256
    python experiments/benchmarks/train_bench.py --preset debug-hybrid-moe --batch 8 --seq-len 128 --steps 5
    python experiments/benchmarks/train_bench.py --config experiments/quickstart.py   # its model, batch and length

Ours is the real `granite-jax train` step (`train_step.make_train_step`: loss with the MoE aux losses, global-norm
clipping, AdamW) on one CPU device in float32; PyTorch runs `loss.backward()` and `torch.optim.AdamW.step()` with
the router aux loss on (`output_router_logits=True`). Both use all the cores they see. Prints tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def one_device_train_step(cfg, tokens: np.ndarray):
    """(step_fn, state, batch): the real train step (`train_step.make_train_step`: loss with the MoE aux losses,
    global-norm clipping, AdamW) of a model of `cfg` on the first device, and `tokens` [B, L] as one document per
    row."""
    import jax

    from granite_jax import optim, sharding, train_step

    tx, schedule = optim.make_optimizer({"weight_decay": 0.1}, {"warmup_steps": 0, "lr": 1e-4}, total_steps=1000,
                                        tokens_per_step=tokens.size)
    mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    graphdef, state = train_step.init_state(cfg, tx, mesh, seed=0)
    _, abstract = train_step.abstract_state(cfg, tx)
    step_fn = train_step.make_train_step(graphdef, mesh, schedule=schedule, abstract_state=abstract)
    B, L = tokens.shape
    batch = sharding.shard_batch({"tokens": tokens, "segment_ids": np.ones((B, L), np.int32),
                                  "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1))}, mesh)
    return step_fn, state, batch


def bench_jax(cfg, tokens: np.ndarray, steps: int) -> float:
    import jax

    step_fn, state, batch = one_device_train_step(cfg, tokens)
    t = time.perf_counter()
    state, m = step_fn(state, batch)  # compile
    jax.block_until_ready(m)
    print(f"  jax: compiled in {time.perf_counter() - t:.1f} s, first loss {float(m['loss']):.4f}", flush=True)
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    return tokens.size * steps / (time.perf_counter() - t)


def bench_torch(cfg, tokens: np.ndarray, steps: int) -> float:
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(0)
    hf_cfg = GraniteMoeHybridConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",
                                                                                         "model_type")})
    hf_cfg.output_router_logits = True
    model = GraniteMoeHybridForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(tokens.astype(np.int64))

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    print(f"  torch: first loss {step():.4f} ({torch.get_num_threads()} threads)", flush=True)
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return tokens.size * steps / (time.perf_counter() - t)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-hybrid-20m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--config", default=None,
                        help="a run config (experiments/*.py): its model, train.batch_size and train.seq_len")
    args = parser.parse_args()

    from granite_jax.config import param_count, preset

    cfg = preset(args.preset, dtype="float32", param_dtype="float32")
    if args.config:
        from granite_jax import train

        run = train.load_config(args.config)
        cfg = train.model_config(run).replace(dtype="float32", param_dtype="float32")
        args.preset, args.batch, args.seq_len = os.path.basename(args.config), run.train.batch_size, run.train.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    total, active = param_count(cfg)
    print(f"{args.preset}: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active), batch {args.batch} x "
          f"{args.seq_len}, {args.steps} timed steps, {os.cpu_count()} CPUs", flush=True)
    ours = bench_jax(cfg, tokens, args.steps)
    print(f"granite-jax: {ours:,.0f} tokens/s", flush=True)
    theirs = bench_torch(cfg, tokens, args.steps)
    print(f"transformers (PyTorch): {theirs:,.0f} tokens/s")
    print(f"ratio granite-jax / PyTorch: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
