"""ModelConfig: Hugging Face round trips, presets, parameter counts, and the errors bad values give."""

import dataclasses
import json
import re

import pytest

from granite_jax.config import ModelConfig, param_count, parse_field_overrides, preset, preset_names

# FACTS.md §1: computed by instantiating the reference implementation with these shapes.
RELEASED_COUNTS = {
    "granite-4.0-h-small": (32_207_337_984, 8_803_121_664),
    "granite-4.0-h-tiny": (6_939_037_248, 1_465_470_528),
    "granite-4.0-h-micro": (3_191_396_096, 3_191_396_096),
    "granite-4.0-micro": (3_402_836_480, 3_402_836_480),
    "granite-4.0-h-1b": (1_461_538_368, 1_461_538_368),
    "granite-4.0-h-350m": (340_332_224, 340_332_224),
}


@pytest.mark.parametrize("name", sorted(RELEASED_COUNTS))
def test_released_parameter_counts(name):
    assert param_count(preset(name)) == RELEASED_COUNTS[name]


def test_all_presets_valid_and_listed():
    assert set(RELEASED_COUNTS) <= set(preset_names())
    for name in preset_names():
        cfg = preset(name)
        assert len(cfg.layer_types) == cfg.num_hidden_layers


def test_param_count_matches_the_reference_module():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = preset("debug-hybrid-moe", tie_word_embeddings=False, mamba_proj_bias=True, attention_bias=True)
    with torch.device("meta"):
        ref = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**cfg.to_hf()))
    assert param_count(cfg)[0] == sum(p.numel() for p in ref.parameters())


def test_hf_round_trip_and_layer_type_spellings(tmp_path):
    cfg = preset("granite-4.0-h-tiny")
    d = cfg.to_hf()
    assert d["model_type"] == "granitemoehybrid" and d["layer_types"][5] == "attention"
    (tmp_path / "config.json").write_text(cfg.to_hf_json())
    assert json.loads((tmp_path / "config.json").read_text())["time_step_limit"][1] == {"__float__": "Infinity"}
    for source in (tmp_path, tmp_path / "config.json", d):
        assert ModelConfig.from_hf(source) == cfg
    hf5 = {**d, "layer_types": ["full_attention" if t == "attention" else "linear_attention"
                                for t in d["layer_types"]]}
    assert ModelConfig.from_hf(hf5) == cfg
    missing = {k: v for k, v in d.items() if k != "layer_types"}
    assert ModelConfig.from_hf(missing).layer_types == ("mamba",) * cfg.num_hidden_layers


def test_legacy_rope_theta_and_auto_head_dim():
    d = preset("granite-4.0-micro").to_hf()
    d.pop("rope_parameters")
    d["rope_theta"] = 1e7
    d["mamba_d_head"] = "auto"
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 1e7 and cfg.mamba_d_head == 2 * 2560 // 80


@pytest.mark.parametrize("changes, match", [
    (dict(hidden_size=100, mamba_n_heads=3), r"mamba_n_heads=3: must divide mamba_expand\*hidden_size=200"),
    (dict(num_key_value_heads=5), r"num_key_value_heads=5: must divide num_attention_heads=12"),
    (dict(layer_types=("mamba", "mlp", "mamba", "mamba")), r"'mlp': unknown layer type"),
    (dict(num_local_experts=4, num_experts_per_tok=5), r"num_experts_per_tok=5: must be between 1 and "
                                                         r"num_local_experts=4"),
    (dict(layer_types=("mamba",) * 3), r"layer_types=.*needs one entry per layer"),
    (dict(mamba_n_groups=5), r"mamba_n_groups=5: must divide mamba_n_heads=48"),
    (dict(dtype="float64"), r"dtype='float64'"),
    (dict(ssd_impl="cuda"), r"ssd_impl='cuda'"),
    (dict(attention_impl="flash"), r"attention_impl='flash': must be one of \('auto', 'xla', 'cudnn', 'blockwise'\)"),
    (dict(layer_loop="while"), r"layer_loop='while': must be one of \('auto', 'scan', 'unroll', 'interleave'\)"),
    (dict(layer_loop="interleave"), r"layer_loop='interleave': needs remat='full' \(remat='none'\)"),
    (dict(pad_token_id=100256, vocab_size=1000), r"pad_token_id=100256: must be a token id below vocab_size"),
    (dict(time_step_limit=(0.5, 0.1)), r"time_step_limit"),
])
def test_bad_values_name_field_value_and_rule(changes, match):
    with pytest.raises(ValueError, match=match):
        preset("granite-4.0-h-350m", **{"num_hidden_layers": 4, "layer_types": ("mamba",) * 4, **changes})


def test_for_platform_resolves_only_auto_choices():
    cfg = preset("debug-hybrid-moe", moe_impl="dense")
    tpu, cpu = cfg.for_platform("tpu"), cfg.for_platform("cpu")
    assert (tpu.attention_impl, tpu.moe_impl, tpu.layer_loop, tpu.ssd_impl) == ("xla", "dense", "scan", "pallas_tpu")
    assert (cpu.attention_impl, cpu.moe_impl, cpu.layer_loop, cpu.ssd_impl) == ("blockwise", "dense", "unroll", "xla")
    gpu = cfg.for_platform("gpu")
    assert (gpu.attention_impl, gpu.moe_impl, gpu.layer_loop, gpu.ssd_impl) == ("cudnn", "dense", "scan", "pallas_gpu")
    assert preset("debug-hybrid-moe").for_platform("gpu").moe_impl == "blocked"  # docs/moe.md: GPU


def test_field_overrides_read_literals_and_plain_strings():
    fields = parse_field_overrides(["num_local_experts=0", "layer_loop=scan", "ssd_impl='xla'",
                                    "mamba_chunk_size=64", "rope_theta=1e4", "layer_types=('mamba', 'attention')"])
    assert fields == {"num_local_experts": 0, "layer_loop": "scan", "ssd_impl": "xla", "mamba_chunk_size": 64,
                      "rope_theta": 1e4, "layer_types": ("mamba", "attention")}
    for bad in ("mamba_frobnicate=1", "num_local_experts"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_field_overrides([bad])


def test_unknown_hf_key_is_an_error():
    with pytest.raises(ValueError, match="'mamba_frobnicate'"):
        ModelConfig.from_hf({**preset("debug-hybrid-moe").to_hf(), "mamba_frobnicate": 1})


def test_to_hf_writes_only_reference_fields():
    transformers = pytest.importorskip("transformers")

    known = {f.name for f in dataclasses.fields(transformers.GraniteMoeHybridConfig)}
    # rope_theta is the transformers 4.x spelling of rope_parameters, kept for older readers
    written = set(preset("debug-hybrid-moe").to_hf()) - {"model_type", "architectures", "rope_theta"}
    assert written <= known, written - known


# Reading config.json as transformers does --------------------------------------------------------------------------

def _assert_reads_like_transformers(d):
    """ModelConfig.from_hf(d) has the model fields transformers' GraniteMoeHybridConfig(**d) has."""
    transformers = pytest.importorskip("transformers")
    ours = ModelConfig.from_hf(d).to_hf()
    theirs = transformers.GraniteMoeHybridConfig(**d).to_dict()
    theirs["layer_types"] = [{"linear_attention": "mamba", "full_attention": "attention"}.get(t, t)
                             for t in theirs["layer_types"]]
    theirs["time_step_limit"] = list(theirs["time_step_limit"])
    mismatched = {k: (v, theirs[k]) for k, v in ours.items()
                  if k in theirs and k != "architectures" and v != theirs[k]}
    assert not mismatched, mismatched  # field: (ours, transformers')


def test_hf_defaults_table_is_transformers():
    transformers = pytest.importorskip("transformers")
    from granite_jax.config import _FRAMEWORK_FIELDS, _HF_DEFAULTS

    reference = {f.name: f.default for f in dataclasses.fields(transformers.GraniteMoeHybridConfig)}
    reference["rope_theta"] = transformers.GraniteMoeHybridConfig().rope_parameters["rope_theta"]
    assert set(_HF_DEFAULTS) == {f.name for f in dataclasses.fields(ModelConfig)} - _FRAMEWORK_FIELDS
    assert {k: reference[k] for k in _HF_DEFAULTS} == _HF_DEFAULTS
    _assert_reads_like_transformers({})


def test_missing_keys_take_transformers_defaults():
    d = preset("granite-4.0-h-350m").to_hf()
    for key in ("tie_word_embeddings", "embedding_multiplier", "residual_multiplier", "rms_norm_eps",
                "mamba_d_state", "bos_token_id", "pad_token_id"):
        d.pop(key)
    d.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)
    cfg = ModelConfig.from_hf(d)
    assert (cfg.tie_word_embeddings, cfg.embedding_multiplier, cfg.rms_norm_eps, cfg.mamba_d_state) == \
        (False, 1.0, 1e-6, 256)
    _assert_reads_like_transformers(d)
    d.pop("num_local_experts")
    assert ModelConfig.from_hf(d).num_local_experts == 8
    _assert_reads_like_transformers(d)


def test_layers_block_type_is_another_name_for_layer_types():
    d = preset("debug-hybrid-moe").to_hf()
    layer_types = d.pop("layer_types")
    d["layers_block_type"] = layer_types
    assert ModelConfig.from_hf(d) == preset("debug-hybrid-moe")
    _assert_reads_like_transformers(d)
    spelled = ["full_attention" if t == "attention" else "linear_attention" for t in layer_types]
    assert ModelConfig.from_hf({**d, "layer_types": spelled}) == preset("debug-hybrid-moe")  # both, agreeing
    with pytest.raises(ValueError, match="layer_types=.* and layers_block_type=.* disagree"):
        ModelConfig.from_hf({**d, "layer_types": ["mamba"] * len(layer_types)})


@pytest.mark.parametrize("key, value", [
    ("rope_scaling", {"type": "linear", "factor": 4.0}),
    ("rope_parameters", {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e7}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5}),
])
def test_rope_scaling_is_refused_naming_key_and_value(key, value):
    d = preset("granite-4.0-micro").to_hf()
    with pytest.raises(ValueError, match=re.escape(f"config {key}={value!r}: RoPE scaling is not implemented")):
        ModelConfig.from_hf({**d, key: value})
    # without RoPE transformers ignores the setting as well; a null rope_scaling is no scaling
    nope = preset("granite-4.0-h-350m")
    assert ModelConfig.from_hf({**nope.to_hf(), key: value}) == nope
    assert ModelConfig.from_hf({**d, "rope_scaling": None}) == preset("granite-4.0-micro")
