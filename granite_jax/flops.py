"""Model FLOPs per token from a `ModelConfig`, device peak FLOP/s, and MFU.

Conventions (MaxText/PaLM style "model FLOPs", no rematerialisation counted):
  * A matmul [m,k] x [k,n] is 2*m*k*n FLOPs. Elementwise work (norms, activations, gating, softmax, the D skip,
    dt/decay exponentials) is not counted; the depthwise conv and the SSD state passing are, being the
    contractions of the Mamba-2 mixer.
  * Training = 3 x forward (backward = 2 x forward).
  * Causal attention scores count HALF of the L x L products (flash kernels skip masked blocks), as MaxText does.
  * SSD counts the chunked algorithm with chunk Q = min(mamba_chunk_size, seq_len) as the kernels run it: the
    full Q x Q intra-chunk blocks (masked, not skipped).
  * Embedding lookup is a gather: 0 FLOPs; the LM head is a [H, V] matmul.
"""

from __future__ import annotations

from typing import Any

from granite_jax.config import ModelConfig

# bf16 dense peak FLOP/s per chip, matched against `device.device_kind` (lower-case substrings, first match wins).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),    # SXM
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)


def attention_layer_flops(cfg: ModelConfig, seq_len: int, causal_half: bool = True) -> dict[str, float]:
    """Forward FLOPs per token of one attention mixer: q/k/v/o projections and the scores (QK^T and AV)."""
    H, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    projections = 2 * H * (q + 2 * kv) + 2 * q * H
    # QK^T and (softmax)V: each 2 * n_heads * head_dim per (query, key) pair; a query sees seq_len keys (or half).
    scores = 2 * (2 * q * seq_len) * (0.5 if causal_half else 1.0)
    return {"attention_projections": float(projections), "attention_scores": float(scores)}


def mamba_layer_flops(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one Mamba-2 mixer.

    With Q the chunk, nh heads of dim P, N = d_state, G groups, per token:
      in_proj 2*H*(2*I_m + 2*G*N + nh), out_proj 2*I_m*H, depthwise conv 2*K*(I_m + 2*G*N);
      SSD: intra-chunk C.B^T 2*Q*N*G (one Q x Q score block per group and chunk),
           intra-chunk (scores . x) 2*Q*P*nh, chunk-end states B^T.x 2*N*P*nh,
           carried-state outputs C.state 2*N*P*nh, state passing between chunks 2*nh*P*N/Q.
    """
    H, I_m, G, N = cfg.hidden_size, cfg.mamba_intermediate_size, cfg.mamba_n_groups, cfg.mamba_d_state
    nh, P, K = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_conv
    Q = min(cfg.mamba_chunk_size, seq_len)
    return {
        "mamba_in_proj": float(2 * H * cfg.mamba_in_proj_dim),
        "mamba_out_proj": float(2 * I_m * H),
        "mamba_conv": float(2 * K * cfg.mamba_conv_dim),
        "ssd_intra_scores": float(2 * Q * N * G),
        "ssd_intra_output": float(2 * Q * P * nh),
        "ssd_chunk_states": float(2 * N * P * nh),
        "ssd_state_output": float(2 * N * P * nh),
        "ssd_state_passing": float(2 * nh * P * N / Q),
    }


def ffn_layer_flops(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token of one layer's FFN: router, the top-k routed SwiGLU experts, the shared SwiGLU."""
    H = cfg.hidden_size
    swiglu = lambda width: 2 * H * 2 * width + 2 * width * H  # fused gate/up, then down  # noqa: E731
    out = {"shared_mlp": float(swiglu(cfg.shared_intermediate_size))}
    if cfg.has_experts:
        out["router"] = float(2 * H * cfg.num_local_experts)
        out["experts"] = float(cfg.num_experts_per_tok * swiglu(cfg.intermediate_size))
    return out


def model_flops_per_token(cfg: ModelConfig, seq_len: int, causal_half: bool = True) -> dict[str, Any]:
    """FLOPs per token of the whole model for sequences of `seq_len` tokens.

    Returns `{"forward": {component: FLOPs summed over layers}, "forward_total": F, "training": 3*F}`; components
    are those of `attention_layer_flops`, `mamba_layer_flops`, `ffn_layer_flops`, plus `lm_head`.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: must be a positive integer")
    forward: dict[str, float] = {"lm_head": float(2 * cfg.hidden_size * cfg.vocab_size)}

    def add(parts: dict[str, float], times: int):
        for k, v in parts.items():
            forward[k] = forward.get(k, 0.0) + v * times

    n_attn = len(cfg.attention_layer_indices)
    n_mamba = cfg.num_hidden_layers - n_attn
    if n_attn:
        add(attention_layer_flops(cfg, seq_len, causal_half), n_attn)
    if n_mamba:
        add(mamba_layer_flops(cfg, seq_len), n_mamba)
    add(ffn_layer_flops(cfg), cfg.num_hidden_layers)
    total = sum(forward.values())
    return {"forward": forward, "forward_total": total, "training": 3 * total}


def peak_flops_per_device(device=None, cpu_estimate: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (default `jax.devices()[0]`) from `PEAK_BF16_FLOPS`.

    CPU and unknown devices give `cpu_estimate` (None by default: MFU is then not reported).
    """
    if device is None:
        import jax
        device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device)).lower()
    if getattr(device, "platform", "") == "cpu" or "cpu" in kind:
        return cpu_estimate
    for key, peak in PEAK_BF16_FLOPS:
        if key in kind:
            return peak
    return cpu_estimate


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved training FLOP/s per device over its peak (None if unknown)."""
    if not peak:
        return None
    return tokens_per_s_per_device * flops_per_token / peak
