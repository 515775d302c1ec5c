"""What the experiment configs share: the Granite 4.0 pretraining recipe per released size, the named clusters it
is laid out for, and the CPU ablation base. Each `experiments/*.py` is a short `get_config()` over these.

A released-size config takes the cluster as its argument (`--config experiments/granite_4_0_h_tiny.py:v5p-256`);
the cluster fixes the mesh (and `mesh.dcn`: which axes cross the slow network) and the processes the data recipe
splits each batch over. `python experiments/recipes.py` prints every size's plan on every cluster.

The recipe: the four Granite 4.0 data stages of 10T / 2T / 2T / 0.5T tokens at 4K
(experiments/data/granite4_mixture.py; point $GRANITE_DATA at the prepared sources), the Power scheduler decaying
over the anneal stage, AdamW, bfloat16 compute with float32 master weights, full remat. The long-context extension
(32K-512K, mesh.context) is a separate run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))


def _load(relpath: str):
    spec = importlib.util.spec_from_file_location(relpath.replace("/", "_")[:-3], os.path.join(EXPERIMENTS, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mixture = _load("data/granite4_mixture.py")


@dataclasses.dataclass(frozen=True)
class Cluster:
    platform: str  # "gpu" | "tpu"
    devices: int
    processes: int  # jax processes: one per GPU (JAX's SLURM default) / one per TPU VM host (4 chips each)
    devices_per_host: int
    slices: int  # TPU slices joined over DCN (multi-slice); 1 on GPU
    about: str


CLUSTERS = {
    "h100x64": Cluster("gpu", 64, 64, 8, 1, "8 nodes x 8 H100 80GB, one process per GPU "
                       "(launch --target slurm --nodes 8)"),
    "v5p-256": Cluster("tpu", 128, 32, 4, 1, "one v5p-256 slice: 128 chips (4x4x8), 32 hosts (launch --target tpu-vm)"),
    "v5p-256x2": Cluster("tpu", 256, 64, 4, 2, "two v5p-256 slices over DCN (launch --target tpu-vm --slices 2)"),
}


@dataclasses.dataclass(frozen=True)
class Size:
    preset: str
    batch_tokens: int  # global tokens per step
    lr: float  # the power scheduler's cap
    cluster: str  # the default cluster


_M = 2**20
SIZES = {
    "h-350m": Size("granite-4.0-h-350m", 1 * _M, 0.02, "h100x64"),
    "h-1b": Size("granite-4.0-h-1b", 2 * _M, 0.02, "h100x64"),
    "h-micro": Size("granite-4.0-h-micro", 4 * _M, 0.02, "h100x64"),
    "micro": Size("granite-4.0-micro", 4 * _M, 0.02, "h100x64"),
    "h-tiny": Size("granite-4.0-h-tiny", 4 * _M, 0.02, "v5p-256"),
    "h-small": Size("granite-4.0-h-small", 8 * _M, 0.01, "v5p-256"),
}
SEQ_LEN = 4096  # of the four main stages; the long-context extension (32K-512K) is a separate run with mesh.context
STATE_BYTES_PER_PARAM = 16  # float32 master weights, Adam moments and the gradient


def suggested_mesh(model_cfg, cluster: Cluster) -> tuple[dict, dict]:
    """(mesh, mesh.dcn) for `model_cfg` on `cluster`.

    Inside a node/slice: experts over `expert` (8 ways: MoE all-to-alls stay on NVLink/ICI), the rest FSDP. Across
    nodes (GPU) or slices (TPU): data parallel when the train state fits one node's/slice's devices, FSDP when it
    does not (h-small: 32B parameters x 16 bytes = 64 GB per GPU over 8 GPUs). On GPU the cross-node axis is the
    outer one in device order (process i drives GPU i; SLURM ranks fill node by node); on TPU `mesh.dcn` says which
    axis spans the slices."""
    from granite_jax.config import param_count

    inner = cluster.devices_per_host if cluster.platform == "gpu" else cluster.devices // cluster.slices
    groups = cluster.devices // inner
    mesh = {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1, "context": 1}
    if model_cfg.num_local_experts and model_cfg.num_local_experts % 8 == 0 and inner % 8 == 0:
        mesh["expert"] = 8
    fits = param_count(model_cfg)[0] * STATE_BYTES_PER_PARAM / inner < 40e9
    if groups > 1 and fits:
        mesh["data"] = groups
    dcn = {("data" if fits else "fsdp"): groups} if cluster.platform == "tpu" and groups > 1 else {}
    return mesh, dcn


def pretraining_config(size: str, cluster_name: str | None = None) -> ml_collections.ConfigDict:
    """The Granite 4.0 pretraining run of a released size on a named cluster: the four data stages (10T/2T/2T/0.5T
    tokens at 4K, `experiments/data/granite4_mixture.py`), the Power scheduler decaying over the anneal stage,
    AdamW (0.9, 0.95, wd 0.1), bfloat16 compute with float32 master weights, full remat."""
    import data_pipelines as dp
    from granite_jax.train import default_config, model_config

    s = SIZES[size]
    cluster_name = cluster_name or s.cluster
    if cluster_name not in CLUSTERS:
        raise ValueError(f"cluster {cluster_name!r}: unknown; choose one of {', '.join(CLUSTERS)}")
    cluster = CLUSTERS[cluster_name]
    c = default_config()
    c.model.preset = s.preset
    c.data = mixture.get_config(global_batch_tokens=s.batch_tokens)
    # The four 4K stages share train.batch_size, so they leave the per-process rows to the trainer: the config then
    # holds for any process layout (one process per GPU or per node, GKE pods).
    c.data.stages = [{k: v for k, v in stage.items() if k != "batch_size"}
                     for stage in c.data.stages[:len(mixture.STAGES)]]
    rows = s.batch_tokens // SEQ_LEN
    schedule = dp.StageSchedule(c.data, batch_size=rows, seq_len=SEQ_LEN)
    steps = schedule.total_steps
    anneal = schedule.stages[-1].num_steps
    c.train.update(dict(steps=steps, batch_size=rows, seq_len=SEQ_LEN, log_every_steps=10, remat="full",
                        compute_dtype="bfloat16", param_dtype="float32"))
    c.schedule.update(dict(name="power", lr=s.lr, warmup_steps=2000, decay_fraction=anneal / steps,
                           min_lr_ratio=0.1, power_decay_type="exponential"))
    c.checkpoint.update({"every_steps": 1000, "keep": 3})
    mesh, dcn = suggested_mesh(model_config(c), cluster)
    c.mesh.update(mesh)
    c.mesh.dcn.update(dcn)
    return c


# The CPU ablation base ---------------------------------------------------------------------------------------------

DEMO_DATA = "data/demo"  # granite-jax prepare --demo --out data/demo (also writes data/demo/eval)


def layer_types(n_layers: int, attention: tuple[int, ...] | str) -> list[str]:
    """['mamba', ..., 'attention', ...]: attention at the given indices ('all': everywhere)."""
    return ["attention" if attention == "all" or i in attention else "mamba" for i in range(n_layers)]


def ablation_config(data: str = DEMO_DATA) -> ml_collections.ConfigDict:
    """A ~34M-parameter (14M active) Granite-4.0-style hybrid MoE that trains on the demo corpus on CPU: the released
    pattern at half depth (20 layers, attention at 5 and 15: 9:1), 16 routed experts (top-2) + the shared expert,
    NoPE, muP-style multipliers (logits / (hidden/256)). Held-out loss on `data/eval` every 50 steps, and with lm-eval
    installed (`.[eval]`) the shipped task `tiny_stdlib_choice` too (on a 2-core CPU under 1 CPU-second per
    evaluation after the first, which compiles for ~30 s; `--config.eval.tasks=[]` turns it off)."""
    import data_pipelines as dp
    from granite_jax.train import default_config

    c = default_config()
    c.model.preset = "granite-4.0-h-tiny"  # the flagship's fields; the shapes below replace its shapes
    c.model.update(dict(
        vocab_size=8192, hidden_size=192, num_hidden_layers=20, layer_types=layer_types(20, (5, 15)),
        num_attention_heads=3, num_key_value_heads=1, attention_multiplier=1 / 64,
        mamba_n_heads=6, mamba_d_head=64, mamba_d_state=64, mamba_chunk_size=64,
        num_local_experts=16, num_experts_per_tok=2, intermediate_size=128, shared_intermediate_size=384,
        logits_scaling=192 / 256, max_position_embeddings=4096,
        pad_token_id=1, bos_token_id=0, eos_token_id=0,  # the demo tokenizer's special tokens
    ))
    c.data.sources = [{"name": "demo", "path": data, "weight": 1.0}]
    c.data.pad_id = 1
    c.mesh.fsdp = -1
    c.train.update(dict(steps=300, batch_size=8, seq_len=256, seed=0, log_every_steps=10,
                        compute_dtype="float32", param_dtype="float32"))
    c.schedule.update(dict(name="cosine", lr=3e-3, warmup_steps=30, min_lr_ratio=0.1))
    c.checkpoint.update({"every_steps": 50, "keep": 2})
    c.eval.update(dict(every_steps=50, num_batches=8))
    c.eval.data = dp.single_source_config(os.path.join(data, "eval"), num_epochs=1, shuffle=False, pad_id=1)
    if importlib.util.find_spec("lm_eval") is not None:  # an optional extra: without it, held-out loss only
        c.eval.tasks = ["tiny_stdlib_choice"]  # 20 questions on Python code like the demo corpus; chance 0.25
    return c


def main() -> None:
    from granite_jax.config import param_count
    from granite_jax.train import model_config

    for size in SIZES:
        for name, cluster in CLUSTERS.items():
            c = pretraining_config(size, name)
            total, active = param_count(model_config(c))
            mesh = {k: v for k, v in c.mesh.items() if k != "dcn" and v != 1}
            dcn = {k: v for k, v in c.mesh.dcn.items() if v != 1}
            print(f"{size:>8} on {name:<10} {total / 1e9:6.2f}B/{active / 1e9:5.2f}B params  {c.train.steps:>9,} steps "
                  f"x {c.train.batch_size} rows  mesh {mesh} dcn {dcn}")


if __name__ == "__main__":
    main()
