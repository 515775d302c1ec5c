"""`granite-jax train --config experiments/FILE.py --workdir DIR [--config.KEY=VALUE ...]`: the pretraining job.

The config file defines `get_config()` returning an ml_collections ConfigDict (start from `default_config()`);
`--config.a.b=VALUE` overrides any key (VALUE is a Python literal, else a string). Sections:

    model       preset (a `granite_jax.config` preset name) plus any `ModelConfig` field to override
    data        a `data_pipelines` data config (sources, mixture stages, packing)
    mesh        data / fsdp / tensor / expert / context sizes (-1 fills the devices); mesh.dcn: per-axis slice counts
    optimizer   `granite_jax.optim.default_optimizer_config()` keys
    schedule    `granite_jax.optim.default_schedule_config()` keys
    train       steps, batch_size (global rows per update), seq_len, seed, log_every_steps, grad_accum_steps,
                remat, param_dtype, compute_dtype, logits_chunk_tokens (the loss computes the logits that many
                tokens per sequence shard at a time; 0 = all), nonfinite_max_consecutive, data_feed ("process":
                each process reads its own document shard; "global": every process reads the global batch
                stream and keeps its rows, so the data order and losses do not depend on the number of processes)
    checkpoint  every_steps, keep, async
    profile     start_step, num_steps (a jax.profiler trace to WORKDIR/profile; num_steps 0 = off)

Everything is validated before anything is compiled. A workdir holding checkpoints resumes from the latest one.
SIGTERM/SIGINT save a checkpoint at the current step and exit 0. See docs/training.md.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import logging
import os
import signal
import sys
import time

import ml_collections

from granite_jax import distributed
from granite_jax.config import ModelConfig, preset, preset_names

log = logging.getLogger("granite_jax.train")

_FROM_TRAIN = {"dtype": "compute_dtype", "param_dtype": "param_dtype", "remat": "remat",
               "logits_chunk_tokens": "logits_chunk_tokens"}


def default_config() -> ml_collections.ConfigDict:
    """Every key a run config may set, at its default."""
    from data_pipelines.config import default_data_config
    from granite_jax.evaluate import default_eval_config
    from granite_jax.optim import default_optimizer_config, default_schedule_config
    from granite_jax.sharding import MESH_AXES

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "debug-hybrid-moe"})
    c.data = default_data_config()
    c.mesh = ml_collections.ConfigDict({a: (-1 if a == "fsdp" else 1) for a in MESH_AXES})
    c.mesh.dcn = ml_collections.ConfigDict({a: 1 for a in MESH_AXES})
    c.optimizer = default_optimizer_config()
    c.schedule = default_schedule_config()
    c.train = ml_collections.ConfigDict(dict(
        steps=100_000, batch_size=8, seq_len=256, seed=0, log_every_steps=10, grad_accum_steps=1, remat="none",
        param_dtype="float32", compute_dtype="bfloat16", nonfinite_max_consecutive=10, data_feed="process",
        logits_chunk_tokens=0))
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500, "keep": 3, "async": True})
    c.eval = default_eval_config()
    c.profile = ml_collections.ConfigDict(dict(start_step=5, num_steps=0))
    return c


# Config loading and validation ---------------------------------------------------------------------------------

def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides as `a.b=VALUE`, the other arguments) of a command line: `--config.a.b=VALUE` and
    `--config.a.b VALUE` are overrides of the run config (every CLI that takes a config reads them this way)."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config.") and "=" not in a and i + 1 < len(argv):
            overrides.append(f"{a[len('--config.'):]}={argv[i + 1]}")
            i += 2
            continue
        (overrides.append(a[len("--config."):]) if a.startswith("--config.") else rest.append(a))
        i += 1
    return overrides, rest


def load_config(path: str | None, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the file at `path` (optional `path:ARG`; None: `default_config()`) and applies
    `a.b=VALUE` overrides."""
    if path is None:
        cfg = default_config()
    else:
        path, _, arg = path.partition(":")
        if not os.path.isfile(path):
            raise ValueError(f"--config {path}: no such file")
        spec = importlib.util.spec_from_file_location("granite_jax_run_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--config.{key}: give a value, --config.{key}=VALUE")
        _override(cfg, key, text)
    return cfg


def _override(cfg, key: str, text: str) -> None:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.split(".")
    node = cfg
    for i, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ValueError(f"--config.{key}: unknown key {'.'.join(parents[:i + 1])!r}")
        node = node[name]
    model_field = parents == ["model"] and leaf in {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not model_field):
        raise ValueError(f"--config.{key}: unknown key")
    old = node[leaf] if leaf in node else None
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ValueError(f"--config.{key}={text}: {type(value).__name__} where {type(old).__name__} is expected "
                         f"({e})") from None


def _check_section(cfg, defaults, section: str) -> None:
    for key in cfg[section]:
        if key not in defaults[section]:
            raise ValueError(f"{section}.{key}: unknown key; known keys are {', '.join(sorted(defaults[section]))}")


def _int(section, d, key, lo):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{section}.{key}={v!r}: must be an integer >= {lo}")
    return v


def model_config(cfg) -> ModelConfig:
    """The `ModelConfig` of a run config (model preset + overrides, dtypes/remat from `train`)."""
    fields = dict(cfg.model)
    name = fields.pop("preset", None)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in fields.items():
        if key in _FROM_TRAIN:
            raise ValueError(f"model.{key}: set train.{_FROM_TRAIN[key]} instead")
        if key not in known:
            raise ValueError(f"model.{key}: unknown key; not a ModelConfig field")
        if isinstance(value, list):
            fields[key] = tuple(value)
    fields.update({k: cfg.train[v] for k, v in _FROM_TRAIN.items()})
    try:
        if name is None:
            return ModelConfig(**fields)
        if name not in preset_names():
            raise ValueError(f"model.preset={name!r}: unknown; choose one of {', '.join(preset_names())}")
        return preset(name, **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None


def validate(cfg, n_devices: int, process_count: int = 1) -> ModelConfig:
    """Checks every section; returns the model config. Raises ValueError naming the offending key."""
    from granite_jax.evaluate import validate_eval_config
    from granite_jax.optim import make_optimizer
    from granite_jax.sharding import resolve_dcn_shape, resolve_mesh_shape

    defaults = default_config()
    for section in cfg:
        if section not in defaults:
            raise ValueError(f"{section}: unknown config section; sections are {', '.join(defaults)}")
    for section in ("train", "checkpoint", "profile", "data"):
        _check_section(cfg, defaults, section)
    t = cfg.train
    for key, lo in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("seed", 0), ("log_every_steps", 1),
                    ("grad_accum_steps", 1), ("nonfinite_max_consecutive", 1)):
        _int("train", t, key, lo)
    if t.batch_size % (t.grad_accum_steps * process_count):
        raise ValueError(f"train.batch_size={t.batch_size}: must be a multiple of train.grad_accum_steps="
                         f"{t.grad_accum_steps} x {process_count} processes")
    if t.data_feed not in ("process", "global"):
        raise ValueError(f"train.data_feed={t.data_feed!r}: must be 'process' or 'global'")
    for key in ("every_steps", "keep"):
        _int("checkpoint", cfg.checkpoint, key, 1)
    if not isinstance(cfg.checkpoint["async"], bool):
        raise ValueError(f"checkpoint.async={cfg.checkpoint['async']!r}: must be True or False")
    _int("profile", cfg.profile, "start_step", 0)
    _int("profile", cfg.profile, "num_steps", 0)
    mesh = dict(cfg.mesh)
    dcn = dict(mesh.pop("dcn", {}))
    sizes = resolve_mesh_shape(mesh, n_devices)
    resolve_dcn_shape(sizes, dcn)
    _check_stages(cfg, sizes["context"], process_count)
    make_optimizer(cfg.optimizer, cfg.schedule, total_steps=t.steps,
                   tokens_per_step=tokens_per_step(cfg, process_count))
    validate_eval_config(cfg)
    return model_config(cfg)


def _data_stages(cfg, process_count: int):
    """[(stage, global rows per step)] of the data stream the run reads (one stage without `data.stages`, or without
    data sources, as compile-check's configs have)."""
    from data_pipelines.config import Stage, StageSchedule

    t = cfg.train
    feeds = 1 if t.data_feed == "global" else process_count  # processes that each read a share of the batch
    if not cfg.data.sources:
        return [(Stage(0, 0, None, t.seq_len, t.batch_size // feeds, {}, None), t.batch_size)]
    schedule = StageSchedule(cfg.data, batch_size=t.batch_size // feeds, seq_len=t.seq_len, process_count=feeds)
    return [(stage, stage.batch_size * feeds) for stage in schedule.stages]


def tokens_per_step(cfg, process_count: int) -> list[tuple[int, int]]:
    """[(first step, global tokens per step)] of each data stage, for the token-based schedules (Power)."""
    return [(stage.first_step, rows * stage.seq_len) for stage, rows in _data_stages(cfg, process_count)]


def _check_stages(cfg, context: int, process_count: int) -> None:
    """The rules of train.seq_len and train.batch_size hold for every data stage's own seq_len and batch_size too:
    whole micro-batches per process, and logits chunks that divide each context shard's tokens."""
    t = cfg.train
    feed_global = t.data_feed == "global"
    for stage, rows in _data_stages(cfg, process_count):
        where = f"data.stages[{stage.index}]" if cfg.data.get("stages") else "train"
        if rows % (t.grad_accum_steps * process_count):
            raise ValueError(f"{where}: batch_size={stage.batch_size} per {'step' if feed_global else 'process'} "
                             f"must give whole micro-batches: {rows} rows per step, a multiple of "
                             f"train.grad_accum_steps={t.grad_accum_steps} x {process_count} processes")
        chunk, local = t.logits_chunk_tokens, stage.seq_len // context
        if stage.seq_len % context:
            raise ValueError(f"{where}: seq_len={stage.seq_len} must be a multiple of mesh.context={context} (the "
                             "sequence is split evenly over the context shards)")
        if 0 < chunk < local and local % chunk:
            raise ValueError(f"{where}: seq_len={stage.seq_len} over mesh.context={context} gives {local} tokens per "
                             f"shard, which train.logits_chunk_tokens={chunk} must divide; pick a divisor (or 0)")


# The run ----------------------------------------------------------------------------------------------------------

class _StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can checkpoint at a step boundary and exit cleanly."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name


def run(cfg, workdir: str, *, progress: bool | None = None) -> int:
    """Trains according to `cfg` in `workdir` (resuming from its latest checkpoint). Returns the exit code."""
    import jax
    import numpy as np

    import data_pipelines
    from granite_jax import checkpoint, evaluate, flops, metrics, optim, sharding, train_step

    n_proc, proc = jax.process_count(), jax.process_index()
    model_cfg = validate(cfg, jax.device_count(), n_proc)
    t = cfg.train
    feed_global = t.data_feed == "global"
    data_it = data_pipelines.make_batches(
        cfg.data, batch_size=t.batch_size if feed_global else t.batch_size // n_proc, seq_len=t.seq_len,
        seed=t.seed, process_index=0 if feed_global else proc, process_count=1 if feed_global else n_proc,
        vocab_size=model_cfg.vocab_size)
    tx, schedule = optim.make_optimizer(cfg.optimizer, cfg.schedule, total_steps=t.steps,
                                        tokens_per_step=tokens_per_step(cfg, n_proc))
    mesh_cfg = dict(cfg.mesh)
    mesh = sharding.make_mesh(mesh_cfg, dcn=dict(mesh_cfg.pop("dcn")))
    graphdef, abstract = train_step.abstract_state(model_cfg, tx, seed=t.seed)
    step_fn = train_step.make_train_step(graphdef, mesh, grad_accum_steps=t.grad_accum_steps, schedule=schedule,
                                         abstract_state=abstract)
    evaluator = evaluate.Evaluator.from_config(cfg, model_cfg, graphdef, mesh, abstract_state=abstract)
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep, use_async=cfg.checkpoint["async"])
    meta = checkpoint.run_meta(model_cfg, cfg.to_dict())
    state = ckpt.restore(abstract, train_step.state_shardings(abstract, mesh), data_it, model_cfg)
    if state is None:
        _, state = train_step.init_state(model_cfg, tx, mesh, seed=t.seed)
    start = int(state["step"])
    logger = metrics.MetricsLogger(workdir, total_steps=t.steps, start_step=start, enabled=proc == 0,
                                   progress=progress)
    logger.message(f"{'resuming from step ' + str(start) if start else 'starting'}: {model_cfg.num_hidden_layers} "
                   f"layers, {sum(x.size for x in jax.tree.leaves(state['params'])) / 1e6:.1f}M parameters, mesh "
                   f"{dict(mesh.shape)}, {jax.device_count()} devices, {n_proc} process(es)")
    profiler = metrics.Profiler(os.path.join(workdir, "profile"), cfg.profile.start_step, cfg.profile.num_steps,
                                enabled=proc == 0)
    # Per row length: data stages may change seq_len, and attention's FLOPs per token grow with it.
    flops_per_token = functools.cache(lambda seq_len: flops.model_flops_per_token(model_cfg, seq_len)["training"])
    peak = flops.peak_flops_per_device()
    stop = _StopSignal()
    # (step, metrics on device, data wait, tokens, row length, eval, start time): fetched one step late, to keep the
    # device busy
    pending = None
    code, step = 0, start

    def finish(entry, next_start: float | None) -> int:
        """Logs a finished step. Its time runs from the start of its data fetch to the start of the next step's
        (`next_start`; None for the last step: until its metrics arrive), so each step carries its own data wait."""
        done_step, m, data_wait, n_tokens, seq_len, ev, started = entry
        m = {k: v.item() if v.ndim == 0 else np.round(v.astype(np.float64), 5).tolist()  # per-layer expert load
             for k, v in jax.device_get(m).items()}
        ev = {k: v.item() for k, v in jax.device_get(ev).items()} if ev else {}
        step_time = (time.perf_counter() if next_start is None else next_start) - started
        logger.advance(done_step)
        if m["nonfinite_streak"] >= t.nonfinite_max_consecutive:
            logger.message(f"stopping: {m['nonfinite_streak']} updates in a row had a non-finite loss or gradient "
                           f"(last loss {m['loss']}); the checkpoint before them is kept. Lower the learning rate "
                           "or check the data, then resume.")
            return 1
        if done_step % t.log_every_steps == 0 or done_step == t.steps or done_step == start + 1 or ev:
            tps = n_tokens / step_time
            logger.write(done_step, {
                "loss": m["loss"], "ce_loss": m["ce_loss"], "load_balancing_loss": m["load_balancing_loss"],
                "router_z_loss": m["router_z_loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                "tokens_per_s": tps, "tokens_per_s_per_device": tps / jax.device_count(), "step_time_s": step_time,
                "data_wait_s": data_wait, "mfu": flops.mfu(tps / jax.device_count(), flops_per_token(seq_len), peak),
                "skipped_updates": m["nonfinite_total"], "target_tokens": m["tokens"],
                **{k: v for k, v in m.items() if k.startswith("expert_")}, **ev})
        return 0

    try:
        while step < t.steps and code == 0:
            if any(distributed.every_process_flag(stop.received is not None)):
                logger.message(f"{stop.received or 'stop signal'} received: saving a checkpoint at step {step}")
                break
            t0 = time.perf_counter()
            try:
                local = next(data_it)
            except StopIteration:
                logger.message(f"the data ran out after {step} steps; stopping")
                break
            data_wait = time.perf_counter() - t0
            batch = evaluate.global_batch(local, mesh) if feed_global else sharding.shard_batch(local, mesh)
            profiler.before_step(step)
            state, m = step_fn(state, batch)
            profiler.after_step(step, wait_for=m)
            step += 1
            ev = evaluator(state) if evaluator is not None and evaluator.due(step) else None  # before `state` is donated
            if pending is not None:
                code = finish(pending, t0)
            pending = (step, m, data_wait, local["tokens"].size * (1 if feed_global else n_proc),
                       local["tokens"].shape[1], ev, t0)
            if code == 0 and (step % cfg.checkpoint.every_steps == 0):
                ckpt.save(step, state, data_it, meta)
        if pending is not None and code == 0:
            code = finish(pending, None)
        if code == 0:
            ckpt.save(step, state, data_it, meta)
            ckpt.wait()
            logger.message(f"done: step {step}, checkpoint in {ckpt.directory}/{step}")
    finally:
        profiler.close()
        ckpt.close()
        logger.close()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax train", description=__doc__.split("\n\n")[0],
                                     epilog="Any --config.KEY=VALUE overrides that key of the config file.")
    parser.add_argument("--config", required=True, help="experiments/FILE.py (defines get_config())")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/ go here")
    parser.add_argument("--no_progress", action="store_true", help="plain log lines instead of a progress bar")
    distributed.add_flags(parser)
    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
    try:
        cfg = load_config(args.config, overrides)
        distributed.initialize(distributed.args_from(args))
        import jax
        validate(cfg, jax.device_count(), jax.process_count())
    except ValueError as e:
        print(f"granite-jax train: invalid config: {e}", file=sys.stderr)
        return 2
    from granite_jax.checkpoint import CheckpointMismatch
    try:
        return run(cfg, args.workdir, progress=False if args.no_progress else None)
    except CheckpointMismatch as e:
        print(f"granite-jax train: {e}", file=sys.stderr)
        return 2
