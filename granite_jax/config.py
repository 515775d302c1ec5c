"""Model configuration: every field of transformers' `GraniteMoeHybridConfig`, plus framework fields.

`ModelConfig.from_hf` reads a Hugging Face `config.json` (dict or path), `to_hf` writes one that transformers loads.
`preset(name)` gives the released Granite 4.0 shapes and small debug models; `param_count` counts parameters.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from typing import Any

# Transformers 5.x spells the layer types "linear_attention" / "full_attention"; released checkpoints use
# "mamba" / "attention". We normalise to the latter.
_LAYER_TYPE_ALIASES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
}
_DTYPES = ("float32", "bfloat16", "float16")
SSD_IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu")
MOE_IMPLS = ("auto", "ragged_dot", "blocked", "dense")
CONTEXT_ATTENTION = ("all_gather", "ring")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blockwise")
LAYER_LOOPS = ("auto", "scan", "unroll", "interleave")
# How routed tokens reach their experts (docs/moe.md): "auto" = all-to-all expert parallelism when the mesh shards the
# experts (ragged on TPU/GPU, padded on CPU), else each device's own tokens through all experts; "local" = one grouped
# matmul over the global token array, partitioned by GSPMD.
MOE_DISPATCHES = ("auto", "local", "all_to_all", "ragged_all_to_all")

# Keys of a Hugging Face config that carry no model semantics for us (bookkeeping written by transformers).
_HF_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map", "_name_or_path",
    "output_router_logits", "use_cache", "return_dict", "output_hidden_states", "output_attentions",
    "is_encoder_decoder", "tie_encoder_decoder", "id2label", "label2id", "problem_type",
    "normalization_function", "init_method", "chunk_size_feed_forward", "tokenizer_class",
}

# What transformers' `GraniteMoeHybridConfig` assumes for a key missing from config.json (its defaults, which are
# placeholders unlike ModelConfig's, e.g. tie_word_embeddings=False): `from_hf` reads a file the way transformers
# does. tests/test_config.py compares this table with transformers' so it cannot drift.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0,
    "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0,
    "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, "shared_intermediate_size": 1024,
    "position_embedding_type": None, "layer_types": None, "mamba_n_heads": 128, "mamba_n_groups": 1,
    "mamba_d_state": 256, "mamba_d_head": "auto", "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "time_step_limit": (0.0, float("inf")),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and semantics of a Granite 4.0 hybrid model.

    The first block mirrors `GraniteMoeHybridConfig` field for field (same names, same defaults as the released
    models where transformers' defaults are placeholders). The second block is ours: dtypes and kernel choices,
    never written to a Hugging Face config.
    """

    vocab_size: int = 100352
    hidden_size: int = 768
    intermediate_size: int = 2048  # unused by the model (kept for round-trips); experts use `intermediate_size`
    num_hidden_layers: int = 4
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 100256
    bos_token_id: int | None = 100257
    eos_token_id: int | None = 100257
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    embedding_multiplier: float = 12.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 0.22
    attention_multiplier: float = 1.0
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    router_aux_loss_coef: float = 0.01
    shared_intermediate_size: int = 2048
    position_embedding_type: str | None = None
    layer_types: tuple[str, ...] | None = None
    mamba_n_heads: int = 48
    mamba_n_groups: int = 1
    mamba_d_state: int = 128
    mamba_d_head: int | None = None  # None = "auto": mamba_expand * hidden_size // mamba_n_heads
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, float("inf"))

    # Framework fields (not part of the Hugging Face config).
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    ssd_impl: str = "auto"
    ssd_interpret: bool = False  # run a Pallas SSD kernel in interpret mode (CPU tests)
    moe_impl: str = "auto"  # grouped matmul of the routed experts
    # One device's attention: "xla" is jax.nn.dot_product_attention as XLA writes it, "cudnn" the same call through
    # cuDNN's fused flash attention (GPU; bfloat16/float16 with head_dim <= 128, else "xla"), "blockwise" the
    # flash-style loop of granite_jax.blockwise_attention; "auto" is blockwise on CPU, cudnn on GPU, xla on TPU.
    attention_impl: str = "auto"
    # The layer loop (granite_jax.model). "scan": within the period of the layer pattern each run of equal layer
    # types is a `lax.scan`. "unroll": the period's layers are called one by one (autodiff keeps each layer's
    # residuals as they are instead of stacking them; the HLO grows with the period, not the depth). "interleave"
    # (needs remat="full"): one scan over all layers of the main type with each other layer under `lax.cond`, so one
    # loop body per layer type is compiled (faster compiles, one more saved [B, L, D] per layer; docs/benchmarks.md);
    # a pattern with two layers of the other type in a row falls back to "scan". "auto" is unroll on CPU, scan
    # elsewhere.
    layer_loop: str = "auto"
    moe_dispatch: str = "auto"  # token dispatch to experts sharded over the `expert` mesh axis
    router_z_loss_coef: float = 0.0
    remat: str = "none"  # activation rematerialisation per layer: "none" | "full" | "dots"
    # Attention with the sequence sharded over the `context` mesh axis (docs/long_context.md): "all_gather" gathers
    # keys/values on every shard; "ring" passes them round the shards (when the gathered K/V would not fit).
    context_attention: str = "all_gather"
    # Training loss: the [tokens, vocab] logits are computed this many tokens per sequence shard at a time (a remat'd
    # scan), never for the whole sequence at once; 0 = all at once. The long-context lever (docs/long_context.md).
    logits_chunk_tokens: int = 0

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("mamba",) * self.num_hidden_layers)
        else:
            object.__setattr__(self, "layer_types", tuple(_normalise_layer_type(t) for t in self.layer_types))
        if self.mamba_d_head is None and self.mamba_n_heads:
            object.__setattr__(self, "mamba_d_head", self.mamba_intermediate_size // self.mamba_n_heads)
        object.__setattr__(self, "time_step_limit", tuple(float(v) for v in self.time_step_limit))
        self.validate()

    # Derived sizes -------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def mamba_in_proj_dim(self) -> int:
        return self.mamba_intermediate_size + self.mamba_conv_dim + self.mamba_n_heads

    @property
    def use_rope(self) -> bool:
        return self.position_embedding_type == "rope"

    @property
    def has_experts(self) -> bool:
        return self.num_local_experts > 0

    @property
    def attention_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "attention")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def for_platform(self, platform: str) -> "ModelConfig":
        """This config with each "auto" kernel and loop choice replaced by what the model picks on `platform`
        ("cpu", "gpu", "tpu"). An ahead-of-time compile for another platform than this process's needs it."""
        return self.replace(**{field: resolve_auto(field, getattr(self, field), platform) for field in AUTO_CHOICES})

    # Validation ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(field, value, rule):
            raise ValueError(f"ModelConfig.{field}={value!r}: {rule}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "mamba_n_groups", "mamba_d_state",
                     "mamba_n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                fail(name, value, "must be a positive integer")
        for name in ("shared_intermediate_size", "intermediate_size", "num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                fail(name, value, "must be a non-negative integer")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", self.layer_types,
                 f"needs one entry per layer: num_hidden_layers={self.num_hidden_layers}, got {len(self.layer_types)}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", self.num_key_value_heads,
                 f"must divide num_attention_heads={self.num_attention_heads} (grouped-query attention)")
        if "attention" in self.layer_types and self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", self.num_attention_heads,
                 f"must divide hidden_size={self.hidden_size} (head_dim = hidden_size / num_attention_heads)")
        if self.mamba_intermediate_size % self.mamba_n_heads:
            fail("mamba_n_heads", self.mamba_n_heads,
                 f"must divide mamba_expand*hidden_size={self.mamba_intermediate_size}")
        if self.mamba_d_head * self.mamba_n_heads != self.mamba_intermediate_size:
            fail("mamba_d_head", self.mamba_d_head,
                 f"mamba_d_head*mamba_n_heads must equal mamba_expand*hidden_size={self.mamba_intermediate_size}")
        if self.mamba_n_heads % self.mamba_n_groups:
            fail("mamba_n_groups", self.mamba_n_groups, f"must divide mamba_n_heads={self.mamba_n_heads}")
        if self.num_local_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                fail("num_experts_per_tok", self.num_experts_per_tok,
                     f"must be between 1 and num_local_experts={self.num_local_experts}")
            if self.intermediate_size <= 0:
                fail("intermediate_size", self.intermediate_size, "experts need a positive intermediate_size")
        if self.shared_intermediate_size == 0 and self.num_local_experts == 0:
            fail("shared_intermediate_size", self.shared_intermediate_size,
                 "a dense model (num_local_experts=0) needs a positive shared MLP width; 0 (no shared expert) is "
                 "for MoE ablations only")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                fail(name, value, f"must be a token id below vocab_size={self.vocab_size} (or None)")
        if self.hidden_act != "silu":
            fail("hidden_act", self.hidden_act, "only 'silu' (SwiGLU) is used by Granite 4.0")
        if self.position_embedding_type not in (None, "nope", "rope"):
            fail("position_embedding_type", self.position_embedding_type, "must be None/'nope' or 'rope'")
        lo, hi = self.time_step_limit
        if not 0.0 <= lo < hi:
            fail("time_step_limit", self.time_step_limit, "must be (low, high) with 0 <= low < high")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                fail(name, getattr(self, name), f"must be one of {_DTYPES}")
        if self.ssd_impl not in SSD_IMPLS:
            fail("ssd_impl", self.ssd_impl, f"must be one of {SSD_IMPLS}")
        if self.moe_impl not in MOE_IMPLS:
            fail("moe_impl", self.moe_impl, f"must be one of {MOE_IMPLS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", self.attention_impl, f"must be one of {ATTENTION_IMPLS}")
        if self.layer_loop not in LAYER_LOOPS:
            fail("layer_loop", self.layer_loop, f"must be one of {LAYER_LOOPS}")
        if self.layer_loop == "interleave" and self.remat != "full":
            fail("layer_loop", self.layer_loop, f"needs remat='full' (remat={self.remat!r}): otherwise every step "
                 "saves the other layer's residuals, zeros where it does not run")
        if self.moe_dispatch not in MOE_DISPATCHES:
            fail("moe_dispatch", self.moe_dispatch, f"must be one of {MOE_DISPATCHES}")
        if self.remat not in ("none", "full", "dots"):
            fail("remat", self.remat, "must be 'none', 'full' or 'dots'")
        if self.context_attention not in CONTEXT_ATTENTION:
            fail("context_attention", self.context_attention, f"must be one of {CONTEXT_ATTENTION}")
        if not (isinstance(self.logits_chunk_tokens, int) and self.logits_chunk_tokens >= 0):
            fail("logits_chunk_tokens", self.logits_chunk_tokens, "must be an integer >= 0 (0 = no chunking)")
        for name in ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier",
                     "rms_norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(name, value, "must be a positive finite number")

    # Hugging Face round trip ---------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike, **overrides) -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` (a dict, a file path, or a model folder), read as
        transformers reads it: a missing key takes transformers' default (`_HF_DEFAULTS`), not ModelConfig's;
        `layers_block_type` is another name for `layer_types`. RoPE scaling (`rope_scaling`, or `rope_parameters`
        other than the default type and `rope_theta`) is not implemented: a config that uses RoPE with it is refused.
        `overrides` replace fields after reading."""
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                source = json.load(f)
        d = dict(source)
        model_type = d.get("model_type", "granitemoehybrid")
        if model_type != "granitemoehybrid":
            raise ValueError(f"config model_type={model_type!r}: granite-jax reads 'granitemoehybrid' configs only")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        rope_scaling = {}  # RoPE settings beyond the default type and theta, by the key that holds them
        for key, value in d.items():
            if key in _HF_IGNORED_KEYS or key == "layers_block_type":
                continue
            if key == "rope_scaling":
                if value is not None:
                    rope_scaling[key] = value
                continue
            if key == "rope_parameters":
                if value and "rope_theta" in value:
                    kwargs.setdefault("rope_theta", float(value["rope_theta"]))
                if value and (value.get("rope_type", "default") != "default"
                              or set(value) - {"rope_type", "rope_theta"}):
                    rope_scaling[key] = value
                continue
            if key not in fields:
                raise ValueError(f"config key {key!r} (value {value!r}) is not a GraniteMoeHybridConfig field "
                                 "known to granite-jax; remove it or update granite_jax.config")
            kwargs[key] = value
        kwargs["layer_types"] = _hf_layer_types(d)
        for key, default in _HF_DEFAULTS.items():
            kwargs.setdefault(key, default)
        if kwargs["mamba_d_head"] == "auto":
            kwargs["mamba_d_head"] = None
        if isinstance(kwargs["eos_token_id"], list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if kwargs["time_step_limit"] is None:
            kwargs["time_step_limit"] = _HF_DEFAULTS["time_step_limit"]
        kwargs["time_step_limit"] = tuple(_json_float(v) for v in kwargs["time_step_limit"])
        if kwargs["num_key_value_heads"] is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        kwargs.update(overrides)
        if kwargs["position_embedding_type"] == "rope" and rope_scaling:
            key, value = next(iter(rope_scaling.items()))
            raise ValueError(f"config {key}={value!r}: RoPE scaling is not implemented in granite-jax (only "
                             "rope_type 'default' with rope_theta); transformers would apply it, so the model would "
                             "not be the same")
        return cls(**kwargs)

    def to_hf_json(self, **extra) -> str:
        """`to_hf()` as config.json text. Non-finite floats are written the way transformers writes them
        ({"__float__": "Infinity"}), which keeps the file valid JSON."""
        def encode(v):
            if isinstance(v, float) and not math.isfinite(v):
                return {"__float__": str(v).replace("inf", "Infinity")}
            if isinstance(v, (list, tuple)):
                return [encode(x) for x in v]
            if isinstance(v, dict):
                return {k: encode(x) for k, x in v.items()}
            return v
        return json.dumps(encode({**self.to_hf(), **extra}), indent=2)

    def to_hf(self) -> dict:
        """The Hugging Face config dict (layer types written as "mamba"/"attention"); accepted as keyword arguments
        by transformers' `GraniteMoeHybridConfig`."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _FRAMEWORK_FIELDS}
        d["layer_types"] = list(self.layer_types)
        d["time_step_limit"] = list(self.time_step_limit)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["model_type"] = "granitemoehybrid"
        d["architectures"] = ["GraniteMoeHybridForCausalLM"]
        return d


# What "auto" means for each kernel and loop choice, per platform; the measurements behind each are in
# docs/benchmarks.md. For the SSD on GPU "auto" stays: `pallas_kernels.ssd` takes its Pallas kernel when it imports.
AUTO_CHOICES = {
    "attention_impl": {"cpu": "blockwise", "gpu": "cudnn", "tpu": "xla"},
    "moe_impl": {"cpu": "blocked", "gpu": "blocked", "tpu": "ragged_dot"},
    "layer_loop": {"cpu": "unroll", "gpu": "scan", "tpu": "scan"},
    "ssd_impl": {"cpu": "xla", "gpu": "pallas_gpu", "tpu": "pallas_tpu"},
}


def resolve_auto(field: str, value: str, platform: str | None = None) -> str:
    """`value` of the choice `field` (a key of AUTO_CHOICES), with "auto" resolved for `platform` (default: JAX's
    default backend; a backend not in the table gets the GPU choice)."""
    if value != "auto":
        return value
    if platform is None:
        import jax
        platform = jax.default_backend()
    choices = AUTO_CHOICES[field]
    return choices.get(platform, choices["gpu"])


_FRAMEWORK_FIELDS = {"param_dtype", "dtype", "ssd_impl", "ssd_interpret", "moe_impl", "attention_impl",
                     "layer_loop", "moe_dispatch", "router_z_loss_coef", "remat", "context_attention",
                     "logits_chunk_tokens"}


def _json_float(v) -> float:
    if isinstance(v, dict) and "__float__" in v:  # transformers' encoding of non-finite floats
        return float(v["__float__"].replace("Infinity", "inf"))
    return float(v)


def _hf_layer_types(d: dict) -> list[str] | None:
    """`layer_types` of a Hugging Face config dict, or its alias `layers_block_type` (transformers maps the one onto
    the other); both given must agree. None (all Mamba) when neither is."""
    layer_types, block_types = d.get("layer_types"), d.get("layers_block_type")
    if layer_types is not None and block_types is not None and (
            [_normalise_layer_type(t) for t in layer_types] != [_normalise_layer_type(t) for t in block_types]):
        raise ValueError(f"config layer_types={layer_types!r} and layers_block_type={block_types!r} disagree; they "
                         "are two names for the same list: keep one")
    return block_types if block_types is not None else layer_types


def _normalise_layer_type(t: str) -> str:
    if t not in _LAYER_TYPE_ALIASES:
        raise ValueError(f"ModelConfig.layer_types entry {t!r}: unknown layer type; use 'mamba' or 'attention' "
                         "('linear_attention'/'full_attention' are accepted too)")
    return _LAYER_TYPE_ALIASES[t]


# Presets ---------------------------------------------------------------------------------------------------------

def _layer_types(n_layers: int, attention: tuple[int, ...] | str) -> tuple[str, ...]:
    if attention == "all":
        return ("attention",) * n_layers
    return tuple("attention" if i in attention else "mamba" for i in range(n_layers))


_GRANITE_ATTN = (5, 15, 25, 35)

_PRESETS: dict[str, dict[str, Any]] = {
    "granite-4.0-h-small": dict(
        hidden_size=4096, num_hidden_layers=40, layer_types=_layer_types(40, _GRANITE_ATTN), num_attention_heads=32,
        num_key_value_heads=8, mamba_n_heads=128, mamba_d_head=64, num_local_experts=72, num_experts_per_tok=10,
        intermediate_size=768, shared_intermediate_size=1536, logits_scaling=16.0, attention_multiplier=0.0078125),
    "granite-4.0-h-tiny": dict(
        hidden_size=1536, num_hidden_layers=40, layer_types=_layer_types(40, _GRANITE_ATTN), num_attention_heads=12,
        num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=64, num_local_experts=64, num_experts_per_tok=6,
        intermediate_size=512, shared_intermediate_size=1024, logits_scaling=6.0, attention_multiplier=0.0078125),
    "granite-4.0-h-micro": dict(
        hidden_size=2048, num_hidden_layers=40, layer_types=_layer_types(40, _GRANITE_ATTN), num_attention_heads=32,
        num_key_value_heads=8, mamba_n_heads=64, mamba_d_head=64, num_local_experts=0, num_experts_per_tok=0,
        intermediate_size=8192, shared_intermediate_size=8192, logits_scaling=8.0, attention_multiplier=0.015625),
    "granite-4.0-micro": dict(
        hidden_size=2560, num_hidden_layers=40, layer_types=_layer_types(40, "all"), num_attention_heads=40,
        num_key_value_heads=8, mamba_n_heads=80, num_local_experts=0, num_experts_per_tok=0,
        intermediate_size=8192, shared_intermediate_size=8192, logits_scaling=10.0, attention_multiplier=0.015625,
        position_embedding_type="rope", rope_theta=1e7),
    "granite-4.0-h-1b": dict(
        hidden_size=1536, num_hidden_layers=40, layer_types=_layer_types(40, _GRANITE_ATTN), num_attention_heads=12,
        num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=64, num_local_experts=0, num_experts_per_tok=0,
        intermediate_size=4096, shared_intermediate_size=4096, logits_scaling=6.0, attention_multiplier=0.0078125),
    "granite-4.0-h-350m": dict(
        hidden_size=768, num_hidden_layers=32, layer_types=_layer_types(32, (10, 13, 17, 27)), num_attention_heads=12,
        num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=32, num_local_experts=0, num_experts_per_tok=0,
        intermediate_size=2048, shared_intermediate_size=2048, logits_scaling=3.0, attention_multiplier=0.015625,
        residual_multiplier=0.246, max_position_embeddings=32768),
    # Small models for tests, smoke runs and CPU experiments: Granite's shapes scaled down, same layer pattern idea.
# Their special-token ids sit at the bottom of the small vocabularies.
    "debug-hybrid-moe": dict(
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
        vocab_size=512, hidden_size=64, num_hidden_layers=4, layer_types=_layer_types(4, (1,)),
        num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=16,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=64,
        logits_scaling=0.25, attention_multiplier=0.0625, max_position_embeddings=4096),
    "debug-hybrid-dense": dict(
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
        vocab_size=512, hidden_size=64, num_hidden_layers=4, layer_types=_layer_types(4, (1,)),
        num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=16,
        num_local_experts=0, num_experts_per_tok=0, intermediate_size=128, shared_intermediate_size=128,
        logits_scaling=0.25, attention_multiplier=0.0625, max_position_embeddings=4096),
    # ~20M parameters: the hybrid the CPU benchmarks and the smoke run use (4 layers, one attention layer).
    "bench-hybrid-20m": dict(
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
        vocab_size=8192, hidden_size=512, num_hidden_layers=4, layer_types=_layer_types(4, (2,)),
        num_attention_heads=8, num_key_value_heads=4, mamba_n_heads=16, mamba_d_head=64, mamba_d_state=64,
        mamba_chunk_size=128, num_local_experts=8, num_experts_per_tok=2, intermediate_size=256,
        shared_intermediate_size=512, logits_scaling=2.0, attention_multiplier=0.015625,
        max_position_embeddings=8192),
}


def preset_names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def preset(name: str, **overrides) -> ModelConfig:
    """The config of a released Granite 4.0 model (FACTS table) or a debug model, with optional field overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


def parse_field_overrides(items) -> dict[str, Any]:
    """ModelConfig field values from "FIELD=VALUE" strings (the benchmark scripts' `--set`): VALUE is read as a
    Python literal (0, 0.5, None, 'scan', (2, 5)), and as the plain string where it is not one (layer_loop=scan)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD a ModelConfig field "
                             f"(e.g. num_local_experts=0)")
        try:
            fields[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            fields[name] = text
    return fields


# Parameter counting ----------------------------------------------------------------------------------------------

def param_count(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameter counts; "active" counts the top-k routed experts only (FACTS.md §1)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    embed = V * H * (1 if cfg.tie_word_embeddings else 2) + H  # + final norm
    I_m, GN, nh, K = cfg.mamba_intermediate_size, cfg.mamba_n_groups * cfg.mamba_d_state, cfg.mamba_n_heads, cfg.mamba_d_conv
    mamba = (H * cfg.mamba_in_proj_dim + (cfg.mamba_in_proj_dim + H if cfg.mamba_proj_bias else 0)
             + cfg.mamba_conv_dim * K + (cfg.mamba_conv_dim if cfg.mamba_conv_bias else 0)
             + 3 * nh + I_m + I_m * H)
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = H * (q_dim + 2 * kv_dim) + q_dim * H
    if cfg.attention_bias:
        attention += q_dim + 2 * kv_dim + H
    shared = 3 * H * cfg.shared_intermediate_size
    E, k, I = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size
    per_expert = 3 * H * I
    router = E * H if E else 0
    n_attn = len(cfg.attention_layer_indices)
    n_mamba = cfg.num_hidden_layers - n_attn
    common = embed + n_mamba * mamba + n_attn * attention + cfg.num_hidden_layers * (2 * H + shared + router)
    total = common + cfg.num_hidden_layers * E * per_expert
    active = common + cfg.num_hidden_layers * k * per_expert
    return total, active
