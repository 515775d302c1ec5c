"""Every experiment config loads and validates (on the device/process counts of the clusters it names); the
released-size configs build exactly the FACTS.md shapes; the shipped sweeps expand into valid points."""

import glob
import os

import pytest

from granite_jax import sweep, train
from granite_jax.config import param_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")

FACTS = {  # FACTS.md §1: total, active
    "granite_4_0_h_350m": (340_332_224, 340_332_224),
    "granite_4_0_h_1b": (1_461_538_368, 1_461_538_368),
    "granite_4_0_h_micro": (3_191_396_096, 3_191_396_096),
    "granite_4_0_micro": (3_402_836_480, 3_402_836_480),
    "granite_4_0_h_tiny": (6_939_037_248, 1_465_470_528),
    "granite_4_0_h_small": (32_207_337_984, 8_803_121_664),
}
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(EXPERIMENTS, "*.py"))
                 if not p.endswith("recipes.py"))
SWEEPS = sorted(glob.glob(os.path.join(EXPERIMENTS, "sweeps", "*.py")))


def _recipes():
    train.load_config(os.path.join(EXPERIMENTS, "ablation_base.py"))  # puts experiments/ on sys.path
    import recipes

    return recipes


def test_every_released_size_and_the_ablation_base_have_a_config():
    assert set(FACTS) | {"ablation_base", "quickstart"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_validates_and_states_its_command(name):
    path = os.path.join(EXPERIMENTS, f"{name}.py")
    with open(path) as f:
        head = f.read(1500)
    assert "granite-jax " in head.split('"""')[1], f"{name}.py: the docstring must state the command that runs it"
    cfg = train.load_config(path)
    if name in FACTS:
        clusters = _recipes().CLUSTERS
        for cluster_name, cluster in clusters.items():
            cfg = train.load_config(f"{path}:{cluster_name}")
            model_cfg = train.validate(cfg, cluster.devices, cluster.processes)
            assert cfg.train.batch_size * cfg.train.seq_len in (2**20, 2**21, 2**22, 2**23)
        assert param_count(model_cfg) == FACTS[name]
        assert cfg.train.steps > 1_000_000 and cfg.schedule.name == "power"
    else:
        model_cfg = train.validate(cfg, 1, 1)
    assert model_cfg.num_hidden_layers == len(model_cfg.layer_types)


def test_ablation_base_is_a_20_to_50m_hybrid_with_the_granite_ratio():
    cfg = train.load_config(os.path.join(EXPERIMENTS, "ablation_base.py"))
    model_cfg = train.model_config(cfg)
    total, active = param_count(model_cfg)
    assert 20e6 <= total <= 50e6 and active < total
    assert model_cfg.layer_types.count("mamba") == 9 * model_cfg.layer_types.count("attention")
    assert cfg.data.sources[0]["path"] == "data/demo"


def test_unknown_cluster_is_a_clear_error():
    with pytest.raises(ValueError, match="cluster 'a100x3': unknown; choose one of h100x64"):
        train.load_config(os.path.join(EXPERIMENTS, "granite_4_0_h_tiny.py:a100x3"))


@pytest.mark.parametrize("path", SWEEPS, ids=[os.path.basename(p) for p in SWEEPS])
def test_shipped_sweep_points_are_valid_configs(path):
    spec = sweep.load_sweep(path)
    assert len(spec.points) >= 2 and len({p.name for p in spec.points}) == len(spec.points)
    counts = {}
    for point in spec.points:
        cfg = train.load_config(spec.base, spec.overrides(point))
        counts[point.name] = param_count(train.validate(cfg, 1, 1))
    name = os.path.basename(path)
    if name == "mamba_attention_ratio.py":  # equal total parameters (within 2%)
        totals = [t for t, _ in counts.values()]
        assert max(totals) / min(totals) < 1.02, counts
    if name == "moe_vs_dense.py":  # equal active parameters (within 2%)
        actives = [a for _, a in counts.values()]
        assert max(actives) / min(actives) < 1.02, counts
