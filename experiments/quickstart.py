"""Quickstart: a ~9M-parameter Granite-4.0-style hybrid MoE trained on the demo corpus, on CPU, in a few minutes.

    granite-jax quickstart                      # prepares data/demo if missing, trains, exports runs/quickstart/hf,
                                                # samples a continuation, prints the shipped task's score
    # or by hand:
    granite-jax prepare --demo --out data/demo
    granite-jax train --config experiments/quickstart.py --workdir runs/quickstart

Granite's pattern scaled down: 8 layers, Mamba-2 everywhere except one attention layer at index 5 (as layers 5, 15,
25, 35 of the released 40-layer models), routed experts (8, top-2) plus the always-on shared SwiGLU expert, muP-style
multipliers as the released models (embedding x12, residual x0.22, logits / (hidden/256)). The demo tokenizer has
8192 tokens. Every 100 steps the run scores the shipped 20-question multiple-choice task `tiny_stdlib_choice`
(lm-evaluation-harness, offline; logged as `eval_tiny_stdlib_choice_acc`, chance 0.25).
"""

from granite_jax.train import default_config


def get_config():
    c = default_config()
    c.model.preset = "granite-4.0-h-tiny"  # shapes below replace the tiny model's; multipliers/eps/init stay
    c.model.update(dict(
        vocab_size=8192, hidden_size=192, num_hidden_layers=8,
        layer_types=["attention" if i == 5 else "mamba" for i in range(8)],
        num_attention_heads=3, num_key_value_heads=1, attention_multiplier=1 / 64,
        mamba_n_heads=6, mamba_d_head=64, mamba_d_state=32, mamba_chunk_size=64,
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=96, shared_intermediate_size=384,
        logits_scaling=1.0, max_position_embeddings=4096,
        pad_token_id=1, bos_token_id=0, eos_token_id=0,
    ))
    c.data.sources = [{"name": "demo", "path": "data/demo", "weight": 1.0}]
    c.data.pad_id = 1
    c.mesh.fsdp = -1
    c.train.update(dict(steps=300, batch_size=8, seq_len=64, seed=0, log_every_steps=10,
                        compute_dtype="float32", param_dtype="float32"))
    c.optimizer.weight_decay = 0.1
    c.schedule.update(dict(name="cosine", lr=3e-3, warmup_steps=30, min_lr_ratio=0.1))
    c.eval.update(dict(every_steps=100, tasks=["tiny_stdlib_choice"]))  # needs `.[eval]`
    c.checkpoint.update({"every_steps": 100, "keep": 2})
    return c
