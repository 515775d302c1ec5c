"""The Mamba-2 mixer (FACTS.md §2): in_proj -> causal depthwise conv + SiLU -> SSD scan with D skip -> gated RMSNorm
-> out_proj. The on-disk fused `in_proj` [z | x | B | C | dt] and `conv1d` [x | B | C] are stored split here, each
piece with its own logical axes, so tensor parallelism shards heads without cutting through the fused layout."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax import context_parallel
from granite_jax.norms import GatedRMSNorm
from granite_jax.params import constant, normal, param
from pallas_kernels.ssd import ssd


def _uniform(lo: float, hi: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, jnp.float32, lo, hi).astype(dtype)


def _a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=1e-1):
    """Inverse softplus of dt sampled log-uniformly in [dt_min, dt_max] (mamba_ssm's initialisation)."""
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max)))
    dt = jnp.maximum(dt, 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def causal_conv(x_BLC, segment_ids_BL, w_KC, bias_C, history=None):
    """Depthwise causal conv: out[t] = bias + sum_j w[j] * x[t - (K-1) + j], taps from another segment masked.

    `history` = (x [B,K-1,C], segment ids [B,K-1] or None): the tokens before x (the previous context shard's tail);
    None means zero padding that belongs to no document."""
    K, L = w_KC.shape[0], x_BLC.shape[1]
    if history is None:
        B = x_BLC.shape[0]
        history = (jnp.zeros((B, K - 1, x_BLC.shape[2]), x_BLC.dtype),
                   None if segment_ids_BL is None else jnp.full((B, K - 1), -1, segment_ids_BL.dtype))
    x_pad = jnp.concatenate([history[0].astype(x_BLC.dtype), x_BLC], axis=1)
    out = jnp.zeros_like(x_BLC) if bias_C is None else jnp.broadcast_to(bias_C, x_BLC.shape).astype(x_BLC.dtype)
    seg_pad = None if segment_ids_BL is None else jnp.concatenate([history[1], segment_ids_BL], axis=1)
    for j in range(K):
        tap_BLC = x_pad[:, j:j + L] * w_KC[j]
        if seg_pad is not None and j < K - 1:
            tap_BLC = jnp.where((seg_pad[:, j:j + L] == segment_ids_BL)[..., None], tap_BLC, 0)
        out = out + tap_BLC
    return out


class MambaState(NamedTuple):
    """What a Mamba-2 layer carries from one token to the next in generation: the last K-1 conv inputs (x and B|C,
    before the conv, in the compute dtype) and the SSM state (float32)."""
    conv_x: jax.Array  # [B, K-1, heads, head_dim]
    conv_bc: jax.Array  # [B, K-1, 2, groups, d_state]
    ssm: jax.Array  # [B, heads, head_dim, d_state]


def conv_tail(history, u, segment_ids_BL):
    """The last K-1 conv inputs of [history | u] (history [B,K-1,...], u [B,L,...]), those of another document than
    the last token's zeroed (a left-padded prompt's pads), so the next token's taps read only its own document."""
    full = jnp.concatenate([history.astype(u.dtype), u], axis=1)[:, -history.shape[1]:]
    if segment_ids_BL is None:
        return full
    seg = jnp.concatenate([jnp.broadcast_to(segment_ids_BL[:, :1], history.shape[:2]), segment_ids_BL],
                          axis=1)[:, -history.shape[1]:]
    same = (seg == segment_ids_BL[:, -1:]).reshape(seg.shape + (1,) * (u.ndim - 2))
    return jnp.where(same, full, 0)


class Mamba2Mixer(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        H, nh, p, G, N, K = (cfg.hidden_size, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups,
                             cfg.mamba_d_state, cfg.mamba_d_conv)
        pd, init = cfg.param_dtype, normal(cfg.initializer_range)
        self.dtype = jnp.dtype(cfg.dtype)
        self.chunk_size, self.dt_limit = cfg.mamba_chunk_size, cfg.time_step_limit
        self.ssd_impl, self.ssd_interpret = cfg.ssd_impl, cfg.ssd_interpret
        heads, bc = ("ssm_heads", "head_dim"), (None, "ssm_groups", "ssm_state")
        self.in_proj_z = param(rngs, init, (H, nh, p), ("embed", *heads), pd)
        self.in_proj_x = param(rngs, init, (H, nh, p), ("embed", *heads), pd)
        self.in_proj_bc = param(rngs, init, (H, 2, G, N), ("embed", *bc), pd)
        self.in_proj_dt = param(rngs, init, (H, nh), ("embed", "ssm_heads"), pd)
        zeros = constant(0.0)
        if cfg.mamba_proj_bias:
            self.in_bias_z = param(rngs, zeros, (nh, p), heads, pd)
            self.in_bias_x = param(rngs, zeros, (nh, p), heads, pd)
            self.in_bias_bc = param(rngs, zeros, (2, G, N), bc, pd)
            self.in_bias_dt = param(rngs, zeros, (nh,), ("ssm_heads",), pd)
            self.out_bias = param(rngs, zeros, (H,), ("embed",), pd)
        else:
            self.in_bias_z = self.in_bias_x = self.in_bias_bc = self.in_bias_dt = self.out_bias = None
        conv_init = _uniform(-1.0 / math.sqrt(K), 1.0 / math.sqrt(K))
        self.conv_x = param(rngs, conv_init, (K, nh, p), ("conv_width", *heads), pd)
        self.conv_bc = param(rngs, conv_init, (K, 2, G, N), ("conv_width", *bc), pd)
        if cfg.mamba_conv_bias:
            self.conv_bias_x = param(rngs, conv_init, (nh, p), heads, pd)
            self.conv_bias_bc = param(rngs, conv_init, (2, G, N), bc, pd)
        else:
            self.conv_bias_x = self.conv_bias_bc = None
        self.dt_bias = param(rngs, _dt_bias_init, (nh,), ("ssm_heads",), pd)
        self.A_log = param(rngs, _a_log_init, (nh,), ("ssm_heads",), pd)
        self.D = param(rngs, constant(1.0), (nh,), ("ssm_heads",), pd)
        self.norm = GatedRMSNorm(nh, p, G, eps=cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.out_proj = param(rngs, init, (nh, p, H), (*heads, "embed"), pd)

    def _in(self, x_BLD, kernel, bias, spec):
        y = jnp.einsum(f"bld,d{spec}->bl{spec}", x_BLD, kernel[...].astype(self.dtype))
        return y if bias is None else y + bias[...].astype(self.dtype)

    def _conv(self, u, kernel, bias, segment_ids_BL, history=None):
        """SiLU(causal conv of u); `history` [B,K-1,...] (u's trailing shape): the inputs before u, which continue
        the document of u's first token (generation's carried conv state)."""
        B, L = u.shape[:2]
        w = kernel[...].astype(self.dtype)
        b = None if bias is None else bias[...].astype(self.dtype).reshape(-1)
        args = (u.reshape(B, L, -1), segment_ids_BL, w.reshape(w.shape[0], -1), b)
        if history is not None:
            seg = None if segment_ids_BL is None else jnp.broadcast_to(segment_ids_BL[:, :1], history.shape[:2])
            out = causal_conv(*args, history=(history.reshape(B, history.shape[1], -1), seg))
        elif context_parallel.context_size() > 1:  # the first K-1 taps read the previous shard's tokens
            out = context_parallel.with_previous_tokens(causal_conv, *args, width=w.shape[0] - 1)
        else:
            out = causal_conv(*args)
        return jax.nn.silu(out).reshape(u.shape)

    def __call__(self, x_BLD, segment_ids_BL, state: "MambaState | None" = None):
        """x [B,L,D], segment_ids [B,L] or None -> [B,L,D].

        With `state` (generation: granite_jax.inference) x continues the tokens `state` summarises, in the document
        of x's first token; returns (out [B,L,D], the MambaState after x's last token)."""
        x_BLD = x_BLD.astype(self.dtype)
        z_BLHP = self._in(x_BLD, self.in_proj_z, self.in_bias_z, "hp")
        u_BLHP = self._in(x_BLD, self.in_proj_x, self.in_bias_x, "hp")  # conv inputs: the carried conv state
        u_BL2GN = self._in(x_BLD, self.in_proj_bc, self.in_bias_bc, "cgn")
        xs_BLHP = self._conv(u_BLHP, self.conv_x, self.conv_bias_x, segment_ids_BL,
                             None if state is None else state.conv_x)
        bc_BL2GN = self._conv(u_BL2GN, self.conv_bc, self.conv_bias_bc, segment_ids_BL,
                              None if state is None else state.conv_bc)
        dt_BLH = self._in(x_BLD, self.in_proj_dt, self.in_bias_dt, "h")
        A_H = -jnp.exp(self.A_log[...].astype(jnp.float32))
        # Under a `context` mesh axis the scan runs per shard and the shards exchange their states.
        scan = context_parallel.ssd if context_parallel.context_size() > 1 and state is None else ssd
        kwargs = dict(chunk_size=self.chunk_size, impl=self.ssd_impl)
        if state is not None:  # a decode step (L=1) runs the plain JAX core on one chunk, not padded to chunk_size
            L = x_BLD.shape[1]
            kwargs = dict(chunk_size=min(self.chunk_size, L), impl=self.ssd_impl if L > 1 else "xla",
                          initial_state=state.ssm, return_final_state=True)
        y_BLHP = scan(xs_BLHP, dt_BLH, A_H, bc_BL2GN[:, :, 0], bc_BL2GN[:, :, 1], D=self.D[...].astype(jnp.float32),
                      dt_bias=self.dt_bias[...].astype(jnp.float32), dt_softplus=True, dt_limit=self.dt_limit,
                      segment_ids=segment_ids_BL, interpret=self.ssd_interpret, **kwargs)
        if state is not None:
            y_BLHP, ssm_BHPN = y_BLHP
        y_BLHP = self.norm(y_BLHP, z_BLHP)
        out_BLD = jnp.einsum("blhp,hpd->bld", y_BLHP, self.out_proj[...].astype(self.dtype))
        out_BLD = out_BLD if self.out_bias is None else out_BLD + self.out_bias[...].astype(self.dtype)
        if state is None:
            return out_BLD
        return out_BLD, MambaState(conv_tail(state.conv_x, u_BLHP, segment_ids_BL),
                                   conv_tail(state.conv_bc, u_BL2GN, segment_ids_BL), ssm_BHPN)
