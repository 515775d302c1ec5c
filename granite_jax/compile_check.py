"""`granite-jax compile-check [--config FILE] --topology v5p:8x8x4 | h100:8x8 | h200:2x8 [--config.KEY=VALUE ...]`

Compiles a run config's real train step (the one `granite-jax train` jits: same shardings, loss, optimizer,
gradient accumulation, remat) ahead of time for a TPU slice (libtpu's compiler) or a cluster of NVIDIA H100/H200 GPUs
(XLA's GPU compiler, ptxas for sm_90a), on a CPU-only machine, and prints the per-device memory the executable needs
and how long compiling took. Check a config here before booking a pod or a GPU cluster.

Nothing is allocated: parameters, optimizer state and the batch are `ShapeDtypeStruct`s sharded over a mesh of the
topology's devices (`granite_jax.aot_targets`). Kernels set to "auto" are resolved for the target (Pallas SSD, cuDNN
attention on GPU, the grouped expert matmul), since "auto" on this CPU host would pick the CPU ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from granite_jax import aot_targets


def compile_train_step(cfg, topology: str, *, compiler_options: dict | None = None) -> dict:
    """AOT-compiles the train step of run config `cfg` for `topology` (see `granite_jax.aot_targets`); returns the
    figures as a dict. `compiler_options` go to XLA (e.g. {"xla_dump_to": DIR})."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from granite_jax import optim, sharding, train, train_step

    tgt = aot_targets.target(topology)
    devices = tgt.devices
    model_cfg = train.validate(cfg, len(devices))
    model_cfg = model_cfg.for_platform(tgt.platform)  # "auto" kernels as on the cluster, not as on this machine
    t = cfg.train
    tx, schedule = optim.make_optimizer(cfg.optimizer, cfg.schedule, total_steps=t.steps,
                                        tokens_per_step=t.batch_size * t.seq_len)
    mesh_cfg = dict(cfg.mesh)
    mesh = sharding.make_mesh(mesh_cfg, devices, dcn=dict(mesh_cfg.pop("dcn")))
    graphdef, abstract = train_step.abstract_state(model_cfg, tx, seed=t.seed)
    shardings = train_step.state_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(sharding.batch_names(2), mesh,
                                                                  shape=(t.batch_size, t.seq_len), what="batch"))
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=batch_sharding)
             for k in ("tokens", "segment_ids", "positions")}
    step_fn = train_step.make_train_step(graphdef, mesh, grad_accum_steps=t.grad_accum_steps, schedule=schedule,
                                         abstract_state=abstract)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step_fn.jitted.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    figures = {f: int(getattr(mem, f, 0) or 0) for f in fields}
    # Donated state aliases the outputs: peak = arguments + outputs - aliased + temporaries (+ code).
    peak = (figures["argument_size_in_bytes"] + figures["output_size_in_bytes"] - figures["alias_size_in_bytes"]
            + figures["temp_size_in_bytes"] + figures["generated_code_size_in_bytes"])
    hbm = tgt.memory_bytes
    return {"topology": topology, "platform": tgt.platform, "devices": len(devices), "mesh": dict(mesh.shape),
            "notes": list(tgt.notes), "model": {
        "layers": model_cfg.num_hidden_layers, "hidden_size": model_cfg.hidden_size,
        "experts": model_cfg.num_local_experts, "ssd_impl": model_cfg.ssd_impl, "moe_impl": model_cfg.moe_impl,
        "attention_impl": model_cfg.attention_impl, "layer_loop": model_cfg.layer_loop, "dtype": model_cfg.dtype,
        "remat": model_cfg.remat},
        "batch_size": t.batch_size, "seq_len": t.seq_len, "lower_s": t1 - t0, "compile_s": t2 - t1,
        "peak_bytes_per_device": peak, "hbm_bytes_per_device": hbm, "fits": None if hbm is None else peak <= hbm,
        **figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax compile-check", description=__doc__.split("\n\n")[0],
                                     epilog="Any --config.KEY=VALUE overrides that key of the config.")
    parser.add_argument("--config", default=None, help="experiments/FILE.py (default: train.default_config())")
    parser.add_argument("--topology", required=True,
                        help="TPU slice (v5p:8x8x4, v5e:16x16, v6e:8x8) or GPUs as HOSTSxGPUS (h100:8x8, h200:2x8)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    from granite_jax import train

    overrides, rest = train.split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    aot_targets.prepare_gpu_compile()
    # libtpu takes a machine-wide lock even when it only compiles; allow several checks (and tests) at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        cfg = train.load_config(args.config, overrides)
        result = compile_train_step(cfg, args.topology)
    except ValueError as e:
        print(f"granite-jax compile-check: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    gb = 1e9
    print(f"{args.topology}: {result['devices']} {'GPUs' if result['platform'] == 'gpu' else 'chips'}, "
          f"mesh {result['mesh']}")
    print(f"model {result['model']}, global batch {result['batch_size']} x {result['seq_len']}")
    print(f"lower {result['lower_s']:.1f} s, compile {result['compile_s']:.1f} s")
    print(f"per device: arguments {result['argument_size_in_bytes'] / gb:.2f} GB, outputs "
          f"{result['output_size_in_bytes'] / gb:.2f} GB (aliased {result['alias_size_in_bytes'] / gb:.2f} GB), "
          f"temporaries {result['temp_size_in_bytes'] / gb:.2f} GB -> peak {result['peak_bytes_per_device'] / gb:.2f} GB"
          + (f" of {result['hbm_bytes_per_device'] / gb:.0f} GB: {'fits' if result['fits'] else 'DOES NOT FIT'}"
             if result["hbm_bytes_per_device"] else ""))
    for note in result["notes"]:
        print(f"note: {note}")
    return 0 if result["fits"] is not False else 1
