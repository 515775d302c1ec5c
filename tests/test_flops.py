"""Model FLOPs against 6 * parameters, a hand-counted Mamba-2 layer, the peak table and MFU."""

import types

import jax
import pytest

from granite_jax import flops
from granite_jax.config import ModelConfig, param_count, preset


def test_dense_attention_model_is_six_times_matmul_params():
    cfg = preset("granite-4.0-micro")  # all attention, dense, tied embeddings
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    total, _ = param_count(cfg)
    matmul_params = total - V * H - (2 * L + 1) * H  # no embedding table, no norm weights
    out = flops.model_flops_per_token(cfg, seq_len=128)
    approx = 6 * matmul_params + 6 * H * V  # lm_head: the tied table used as a matmul
    assert out["training"] == pytest.approx(approx, rel=0.01)
    # Exactly: the remainder is the attention scores, causal half: 3 x (QK^T + AV) x L/2 per layer.
    q = cfg.num_attention_heads * cfg.head_dim
    assert out["training"] - approx == pytest.approx(3 * L * 2 * q * 128)
    assert out["training"] == 3 * out["forward_total"] == 3 * sum(out["forward"].values())


def test_hybrid_moe_projections_match_active_params():
    cfg = preset("debug-hybrid-moe")
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    _, active = param_count(cfg)
    n_mamba = L - len(cfg.attention_layer_indices)
    mamba_non_matmul = (cfg.mamba_conv_dim * (cfg.mamba_d_conv + 1) + 3 * cfg.mamba_n_heads
                        + cfg.mamba_intermediate_size)  # conv weight + bias, dt_bias/A_log/D, gated-norm weight
    matmul_params = active - V * H - (2 * L + 1) * H - n_mamba * mamba_non_matmul
    fwd = flops.model_flops_per_token(cfg, seq_len=64)["forward"]
    non_param = {"attention_scores", "mamba_conv"} | {k for k in fwd if k.startswith("ssd_")}
    assert sum(v for k, v in fwd.items() if k not in non_param) == 2 * matmul_params + 2 * H * V
    assert fwd["experts"] == L * cfg.num_experts_per_tok * 6 * H * cfg.intermediate_size  # top-k only


def test_mamba_layer_hand_count():
    # H=8, I_m=16, nh=2 heads of P=8, N=4, G=1, K=4, chunk Q=4.
    cfg = ModelConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, mamba_n_heads=2, mamba_d_state=4,
                      mamba_chunk_size=4, shared_intermediate_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    out = flops.mamba_layer_flops(cfg, seq_len=64)
    assert out == {
        "mamba_in_proj": 2 * 8 * 42,    # in_proj width: z 16 + xBC (16 + 2*4) + dt 2 = 42
        "mamba_out_proj": 2 * 16 * 8,
        "mamba_conv": 2 * 4 * 24,       # depthwise over the 24 xBC channels
        "ssd_intra_scores": 2 * 4 * 4,  # C.B^T: a 4x4 block with contraction 4, per chunk of 4 tokens -> 32/token
        "ssd_intra_output": 2 * 4 * 8 * 2,
        "ssd_chunk_states": 2 * 4 * 8 * 2,
        "ssd_state_output": 2 * 4 * 8 * 2,
        "ssd_state_passing": 2 * 2 * 8 * 4 / 4,
    }
    assert sum(out.values()) == 1568
    assert flops.mamba_layer_flops(cfg, seq_len=2)["ssd_intra_output"] == 2 * 2 * 8 * 2  # chunk capped at seq_len
    whole = flops.model_flops_per_token(cfg, seq_len=64)
    assert whole["forward_total"] == 1568 + 6 * 8 * 8 + 2 * 8 * 16  # + shared SwiGLU + lm_head


def test_full_causal_scores_are_double():
    cfg = preset("debug-hybrid-dense")
    half = flops.model_flops_per_token(cfg, 256)["forward"]["attention_scores"]
    full = flops.model_flops_per_token(cfg, 256, causal_half=False)["forward"]["attention_scores"]
    assert full == 2 * half
    with pytest.raises(ValueError, match="seq_len=0"):
        flops.model_flops_per_token(cfg, 0)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("Some future chip", None),
])
def test_peak_flops_table(kind, peak):
    assert flops.peak_flops_per_device(types.SimpleNamespace(device_kind=kind, platform="gpu")) == peak


def test_cpu_peak_and_mfu():
    assert flops.peak_flops_per_device(jax.devices()[0]) is None
    assert flops.peak_flops_per_device(jax.devices()[0], cpu_estimate=1e12) == 1e12
    assert flops.mfu(1000.0, 6e9, 989e12) == pytest.approx(1000 * 6e9 / 989e12)
    assert flops.mfu(1000.0, 6e9, None) is None
