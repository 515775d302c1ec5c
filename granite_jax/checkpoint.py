"""Orbax checkpoints of a training run, and `restore_model` for users.

Layout (one directory per saved step, written atomically by Orbax: a step directory appears only once complete):

    WORKDIR/checkpoints/<step>/
        params/      the model's parameters (float32 master weights), one entry per parameter path 'layers.blocks.0...'
        train/       optimizer state ('opt.*') and the counters step, rng, nonfinite_total, nonfinite_streak
        data/        the data iterator's state, one JSON file per process (grain's checkpoint handler)
        meta/        JSON: the ModelConfig fields and the run's full config

Saves are asynchronous (the train loop goes on while Orbax writes) and keep the last K steps.

Resuming on another layout: parameters and optimizer state are resharded by Orbax onto the new mesh, whatever the
number of processes and devices. The data position follows `train.data_feed`: with "global" every process saved the
same state of one global stream, so any number of processes resumes it; with "process" each process saved its own
document shard's position, which only the same number of processes can continue (a `CheckpointMismatch` names the
two counts).

Nothing here deletes a checkpoint (beyond Orbax's keep-the-last-K). A step that cannot be restored (truncated or
corrupt files) is reported, left in place, and the previous one is tried; it is kept past keep-the-last-K, and only
when the run reaches that step again is it moved, whole, to WORKDIR/checkpoints_damaged/<step>-<time>/ so that the
new state can take its number. With several processes, a step counts as restored only when
every process restored its part. A checkpoint written by a different model architecture, with a data stream of
other settings, or on a process layout its data feed cannot follow is not corrupt: the run stops with
`CheckpointMismatch`. When checkpoints exist but none can be restored, the run stops too rather than start again
from step 0.
"""

from __future__ import annotations

import dataclasses
import logging
import json
import math
import os
import re
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from data_pipelines.stream import StreamMismatch
from granite_jax.config import ModelConfig
from granite_jax.distributed import every_process_flag
from granite_jax.optim import path_str

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
_STATE_ITEMS = ("params", "train")


def _flat(tree) -> dict[str, Any]:
    """{'a.b.c': leaf} from any pytree (nnx.State, dicts)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p).replace("/", "."): leaf for p, leaf in leaves}


def _unflat(tree, flat: dict[str, Any]):
    """The inverse of `_flat` for a `tree` of the same structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p).replace("/", ".")] for p, _ in paths])


def _params_save_args(flat: dict[str, Any]) -> dict[str, ocp.SaveArgs]:
    """Storage chunks of one layer for the stacked per-layer parameters (`layers.blocks.*`, layer axis first) of a
    MiB or more per layer, so that reading one layer of a checkpoint (export, tensor by tensor) reads only that
    layer's bytes."""
    out = {}
    for name, a in flat.items():
        shape = a.sharding.shard_shape(a.shape) if isinstance(a, jax.Array) else np.shape(a)
        layer_bytes = math.prod(shape[1:]) * np.dtype(a.dtype).itemsize
        if name.startswith("layers.blocks.") and len(shape) > 1 and shape[0] > 1 and layer_bytes >= 2 ** 20:
            out[name] = ocp.SaveArgs(chunk_byte_size=layer_bytes, shard_axes=(0,))
        else:
            out[name] = ocp.SaveArgs()
    return out


def _split(state: dict) -> tuple[dict, dict]:
    """(params, rest) of a train state, each flat."""
    return _flat(state["params"]), _flat({k: v for k, v in state.items() if k != "params"})


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


class CheckpointMismatch(ValueError):
    """The workdir's checkpoints belong to a different model or data stream than the run's config describes."""


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler (one `process_<i>-of-<n>.json` per process), restoring across process counts where the
    stream allows it: a state saved by another number of processes is taken from process 0's file when every
    process saved the same state (one global stream, `train.data_feed="global"`); per-process shards of a
    different count are a `StreamMismatch` naming both counts."""

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        count = jax.process_count()
        saved = sorted((int(m[2]), int(m[1]), f.name) for f in directory.iterdir()
                       if (m := _DATA_FILE.fullmatch(f.name)))
        counts = {c for c, _, _ in saved}
        if count in counts or not saved:  # the same layout (or nothing saved: grain reports the missing file)
            return super().restore(directory, item=item, args=args)
        if len(counts) > 1:
            raise ValueError(f"{directory} holds data states of several process counts {sorted(counts)}")
        (saved_count,) = counts
        if len(saved) != saved_count:
            raise ValueError(f"{directory} holds {len(saved)} of the data states of {saved_count} processes")
        states = {name: json.loads((directory / name).read_text()) for _, _, name in saved}
        if len({json.dumps(s, sort_keys=True) for s in states.values()}) > 1:
            raise StreamMismatch(
                f"the data position was saved by {saved_count} processes each reading its own document shard "
                f"(train.data_feed='process'); {count} process(es) cannot continue those shards. Resume with "
                f"{saved_count} processes, or start a new --workdir (train.data_feed='global' runs can change "
                "their number of processes)")
        log.info("data iterator state saved by %d process(es), restored on %d (one global stream)", saved_count,
                 count)
        item.set_state(states[saved[0][2]])
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


@dataclasses.dataclass
class _KeepSteps:
    """An Orbax preservation policy: keeps the steps of a set that may grow while the manager runs."""
    steps: set[int]

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    """Saves and restores train states (`train_step` layout) with the data iterator and run metadata."""

    def __init__(self, workdir: str, *, keep: int, use_async: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self._damaged: set[int] = set()  # steps found unrestorable: kept, never written over
        self._manager = self._open(keep, use_async)
        self._last_saved: int | None = None

    def _open(self, keep: int, use_async: bool) -> ocp.CheckpointManager:
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": DataHandler(), "meta": ocp.JsonCheckpointHandler()}
        policies = ocp.checkpoint_managers
        keep_damaged = _KeepSteps(self._damaged)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=use_async, create=True,
            preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(keep), keep_damaged]))
        return ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, data_iterator, meta: dict) -> None:
        """Starts saving `state` (and the iterator's state, read now) as step `step`; returns before writing ends."""
        if step in self._damaged:
            self._set_aside(step)
        if step == self._last_saved or step in self._manager.all_steps():
            return
        self._last_saved = step
        params, rest = _split(state)
        args = ocp.args.Composite(params=ocp.args.StandardSave(params, save_args=_params_save_args(params)),
                                  train=ocp.args.StandardSave(rest),
                                  data=DataSave(data_iterator), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def restore(self, abstract_state: dict, shardings: dict, data_iterator,
                model_cfg: ModelConfig | None = None) -> dict | None:
        """The latest restorable train state (placed with `shardings`) and the iterator set to its state; None when
        there is no checkpoint. Unrestorable steps are reported and left in place, and the previous one is tried.

        Raises CheckpointMismatch when a step was saved by a model whose architecture differs from `model_cfg` or
        with a data stream (settings, process layout) this run cannot continue, and RuntimeError when there were
        checkpoints but none could be restored."""
        steps = self.all_steps()
        for step in reversed(steps):
            self._check_architecture(step, model_cfg)
            error = None
            try:
                state = self._restore_step(step, abstract_state, shardings, data_iterator)
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means: try the previous one
                error = e
            if all(every_process_flag(error is None)):  # all processes take the same decision
                return state
            mismatch = _cause(error, StreamMismatch)
            if mismatch is not None:
                raise CheckpointMismatch(f"checkpoint {os.path.join(self.directory, str(step))}: {mismatch}. "
                                         "Nothing was moved or deleted.") from error
            self._report_damaged(step, error or RuntimeError("another process could not restore its part"))
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} under {self.directory} could be restored (errors "
                               "above); nothing was moved or deleted. Inspect them, then move them away to start "
                               "this workdir from step 0, or use a new --workdir")
        return None

    def _check_architecture(self, step: int, model_cfg: ModelConfig | None) -> None:
        """Raises CheckpointMismatch when step `step`'s stored model config differs from `model_cfg` in a field of
        the architecture (the Hugging Face fields). An unreadable config is left to the restore to report."""
        if model_cfg is None:
            return
        try:
            stored = stored_model_config(self._manager, step).to_hf()
        except Exception:  # noqa: BLE001 - a damaged meta/ is corruption, which the restore reports
            return
        wanted = model_cfg.to_hf()
        differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        if differ:
            changes = ", ".join(f"{k}: checkpoint {stored.get(k)!r}, config {wanted.get(k)!r}" for k in differ[:5])
            raise CheckpointMismatch(f"checkpoint {os.path.join(self.directory, str(step))} was saved by a different "
                                     f"model ({changes}); resume with the run's original model config, or start "
                                     "the new model in a new --workdir. Nothing was moved or deleted.")

    def _restore_step(self, step: int, abstract_state: dict, shardings: dict, data_iterator) -> dict:
        params_abs, rest_abs = _split(_abstract(abstract_state, shardings))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_abs), train=ocp.args.StandardRestore(rest_abs),
            data=DataRestore(data_iterator)))
        state = _unflat(abstract_state, {**{f"params.{k}": v for k, v in restored["params"].items()},
                                         **restored["train"]})
        if int(state["step"]) != step:
            raise ValueError(f"checkpoint {step} holds train step {int(state['step'])}")
        return state

    def _set_aside(self, step: int) -> None:
        """Moves the damaged step `step` to WORKDIR/checkpoints_damaged/ so that the run can save that step anew."""
        path = os.path.join(self.directory, str(step))
        target = os.path.join(self.workdir, DAMAGED_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("saving step %d anew: its unrestorable checkpoint is kept in %s", step, target)
        self._manager.wait_until_finished()
        if jax.process_index() == 0 and os.path.isdir(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(path, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"granite_jax_set_aside_{step}")
        self._damaged.discard(step)
        self._manager.reload()

    def _report_damaged(self, step: int, error: Exception) -> None:
        self._damaged.add(step)
        log.error("checkpoint %s cannot be restored (%s: %s); it is kept as it is, trying the previous one",
                  os.path.join(self.directory, str(step)), type(error).__name__,
                  str(error).splitlines()[0][:300] if str(error) else "")

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _cause(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`error` or the first exception of type `kind` in its chain of causes (Orbax may wrap what a handler raised)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


def run_meta(model_cfg: ModelConfig, config_dict: dict) -> dict:
    """The JSON metadata stored with every checkpoint."""
    model = dataclasses.asdict(model_cfg)
    model["time_step_limit"] = [v if np.isfinite(v) else str(v) for v in model["time_step_limit"]]
    return {"model_config": model, "config": config_dict}


def model_config_from_meta(meta: dict) -> ModelConfig:
    fields = dict(meta["model_config"])
    fields["time_step_limit"] = tuple(float(v) for v in fields["time_step_limit"])
    fields["layer_types"] = tuple(fields["layer_types"])
    return ModelConfig(**fields)


def stored_model_config(manager: ocp.CheckpointManager, step: int) -> ModelConfig:
    """The ModelConfig saved with checkpoint `step` (its meta/ item)."""
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return model_config_from_meta(meta)


def select_step(steps: list[int], step: int | None, directory: str) -> int:
    """`step` if it is among the complete `steps` (default: the latest), else FileNotFoundError naming them."""
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint under {directory}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} under {directory}; found steps {steps}")
    return step


def restore_model(workdir: str, step: int | None = None):
    """The `GraniteModel` of checkpoint `step` (default: the latest) of a run in `workdir`, on the host CPU.

    Reads only the parameters (not the optimizer state). Raises FileNotFoundError when there is no checkpoint.
    """
    from granite_jax.model import GraniteModel

    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False)) as manager:
        step = select_step(sorted(manager.all_steps()), step, directory)
        cfg = stored_model_config(manager, step)
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract)
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu) for k, v in _flat(abstract_params).items()}
        params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return nnx.merge(graphdef, _unflat(abstract_params, params))


def save_model(model, workdir: str, step: int = 0, config_dict: dict | None = None) -> str:
    """Writes the parameters of `model` (a `GraniteModel`) as checkpoint `step` of a run in `workdir`, in the layout
    `granite-jax train` writes, so `restore_model` and `granite-jax export` read it (a model built or edited in
    Python, handed to the export path). Parameters and metadata only: training cannot resume from it (use
    `granite-jax import` for that). Returns the step directory."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if os.path.exists(os.path.join(directory, str(step))):
        raise FileExistsError(f"{directory} already has checkpoint {step}")
    params = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(
            params, save_args=_params_save_args(params)), meta=ocp.args.JsonSave(
            run_meta(model.config, config_dict or {}))))
    return os.path.join(directory, str(step))
