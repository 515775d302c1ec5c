"""Held-out loss during training: the mean next-token cross entropy over a fixed set of eval batches.

The eval batches are read once, from `eval.data` (a `data_pipelines` data config, e.g. the demo corpus's `eval/`
split), and kept on the host: every evaluation of a run sees exactly the same tokens, so eval losses of one run
and of the points of a sweep compare fairly. Every process reads the same global eval batches (like
`train.data_feed="global"`), so the loss does not depend on the number of processes either.

Config section (`eval`):

    every_steps   evaluate after every N-th train step and after the last one; 0 = off
    num_batches   eval batches (fewer if the eval data ends first; num_epochs=1 in `data` reads it at most once)
    batch_size    global rows per eval batch; None = train.batch_size
    seq_len       None = train.seq_len
    data          the eval data config (sources, ...); None = no eval loss
    tasks         lm-evaluation-harness task names scored at every evaluation (e.g. ["tiny_stdlib_choice"], the
                  offline tasks shipped in experiments/data/eval_tasks/, or hellaswag,... online); needs `.[eval]`;
                  one-process runs only (a run of several processes logs a warning and scores no task)
    tasks_limit   at most this many examples per task; None = all
    tokenizer     the tokenizer.json (or folder) of the tasks; None = the first data source that has one

The loss is token-weighted over all eval batches (sum of CE / counted targets), cross entropy only (no router
losses), as `eval_loss`; `eval_tokens` is the number of counted targets. Task scores are logged as
`eval_TASK_METRIC` (e.g. `eval_tiny_stdlib_choice_acc`), computed by granite_jax.inference.lm_eval_model on the
train state's parameters as they are (no checkpoint, no export).
"""

from __future__ import annotations

import logging
from typing import Callable

import ml_collections
import numpy as np

log = logging.getLogger(__name__)


def default_eval_config() -> ml_collections.ConfigDict:
    """The `eval` section of a run config, evaluation off."""
    c = ml_collections.ConfigDict()
    c.every_steps = 0
    c.num_batches = 8
    c.batch_size = ml_collections.FieldReference(None, field_type=int)
    c.seq_len = ml_collections.FieldReference(None, field_type=int)
    c.data = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
    c.tasks = ()
    c.tasks_limit = ml_collections.FieldReference(None, field_type=int)
    c.tokenizer = ml_collections.FieldReference(None, field_type=str)
    return c


def enabled(cfg) -> bool:
    """True when the run config asks for evaluation (an `eval` section with every_steps > 0 and data or tasks)."""
    e = cfg.get("eval")
    return bool(e is not None and e.every_steps and (e.data is not None or e.get("tasks")))


def validate_eval_config(cfg) -> None:
    """Raises ValueError naming the offending `eval.*` key."""
    e = cfg.get("eval")
    if e is None:
        return
    for key in e:
        if key not in default_eval_config():
            raise ValueError(f"eval.{key}: unknown key; known keys are {', '.join(sorted(default_eval_config()))}")
    for key, lo in (("every_steps", 0), ("num_batches", 1)):
        v = e[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"eval.{key}={v!r}: must be an integer >= {lo}")
    for key, lo in (("batch_size", 1), ("seq_len", 2)):
        v = e.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"eval.{key}={v!r}: must be None (the train value) or an integer >= {lo}")
    tasks = e.get("tasks") or ()
    if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"eval.tasks={tasks!r}: must be a list of lm-eval task names, e.g. ['tiny_stdlib_choice']")
    if e.every_steps and e.data is None and not tasks:
        raise ValueError(f"eval.every_steps={e.every_steps} but eval.data is None: give an eval data config "
                         "(e.g. data_pipelines.single_source_config('data/demo/eval', num_epochs=1)), eval.tasks "
                         "(lm-eval task names), or set eval.every_steps=0")
    if e.data is not None and not e.data.get("sources"):
        raise ValueError("eval.data.sources is empty: add {name, path, weight} entries of prepared eval data")


def eval_batches(eval_cfg, *, batch_size: int, seq_len: int, seed: int, vocab_size: int | None = None
                 ) -> list[dict[str, np.ndarray]]:
    """The first `eval_cfg.num_batches` global batches of `eval_cfg.data` (int32 numpy arrays [B, L]), identical on
    every process and every call."""
    import data_pipelines

    it = data_pipelines.make_batches(eval_cfg.data, batch_size=eval_cfg.get("batch_size") or batch_size,
                                     seq_len=eval_cfg.get("seq_len") or seq_len, seed=seed, vocab_size=vocab_size)
    batches = []
    for batch in it:
        batches.append({k: np.asarray(v) for k, v in batch.items()})
        if len(batches) == eval_cfg.num_batches:
            break
    if not batches:
        raise ValueError("eval.data yielded no batch: check its sources")
    if len(batches) < eval_cfg.num_batches:
        log.warning("eval data ended after %d of eval.num_batches=%d batches; evaluating on those", len(batches),
                    eval_cfg.num_batches)
    return batches


def make_eval_step(graphdef, mesh, *, abstract_state: dict) -> Callable:
    """`eval_step(state, batch) -> (ce_sum, tokens)`: jitted like the train step (same shardings), not donating.

    `graphdef` is the train state's (`nnx.split((model, optimizer))`); only `state["params"]` is read."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from granite_jax import sharding, train_step, xla_options

    def step(params, opt, batch):
        model, _ = nnx.merge(graphdef, nnx.State({0: params, 1: opt}))
        terms = train_step.loss_terms(model, batch)
        return terms["ce_sum"], terms["tokens"]

    shardings = train_step.state_shardings(abstract_state, mesh)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(sharding.batch_names(2), mesh))
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(shardings["params"], shardings["opt"],
                                         {k: batch_sharding for k in ("tokens", "segment_ids", "positions")}),
                     out_shardings=(replicated, replicated), compiler_options=xla_options.for_mesh(mesh))

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state["params"], state["opt"], batch)

    return run


class Evaluator:
    """Evaluates a train state on the run's fixed eval batches. Build with `Evaluator.from_config`."""

    def __init__(self, eval_step: Callable, batches: list[dict[str, np.ndarray]], mesh, every_steps: int,
                 total_steps: int, tasks: "TaskEvaluator | None" = None):
        self.eval_step, self.mesh, self.tasks = eval_step, mesh, tasks
        self.every_steps, self.total_steps = every_steps, total_steps
        self._host_batches = batches
        self._device_batches = None

    @classmethod
    def from_config(cls, cfg, model_cfg, graphdef, mesh, *, abstract_state: dict) -> "Evaluator | None":
        """The evaluator of run config `cfg`, or None when evaluation is off."""
        validate_eval_config(cfg)
        if not enabled(cfg):
            return None
        t, e = cfg.train, cfg.eval
        batches = [] if e.data is None else eval_batches(e, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed,
                                                         vocab_size=model_cfg.vocab_size)
        import jax

        tasks = None
        if e.get("tasks") and jax.process_count() > 1:
            # The lm-eval model scores on one host; a run of several processes keeps its eval loss and leaves task
            # scores to `granite-jax eval` on its checkpoints.
            log.warning("eval.tasks=%s is skipped in a run of %d processes (task scores need one process): score "
                        "the checkpoints with `granite-jax eval WORKDIR --tasks %s`", list(e.tasks),
                        jax.process_count(), ",".join(e.tasks))
        elif e.get("tasks"):
            from flax import nnx

            from granite_jax.export import _tokenizer_source
            tokenizer = _tokenizer_source({"config": cfg.to_dict()}, e.get("tokenizer"))
            tasks = TaskEvaluator(lambda state: nnx.merge(graphdef, nnx.State({0: state["params"],
                                                                                1: state["opt"]}))[0],
                                  list(e.tasks), tokenizer, limit=e.get("tasks_limit"))
        return cls(make_eval_step(graphdef, mesh, abstract_state=abstract_state), batches, mesh,
                   e.every_steps, t.steps, tasks)

    def due(self, step: int) -> bool:
        """Whether to evaluate after train step `step` (1-based count of steps done)."""
        return step % self.every_steps == 0 or step == self.total_steps

    def __call__(self, state) -> dict:
        """{"eval_loss", "eval_tokens"} as device scalars (fetch them when convenient: nothing blocks here)."""
        import jax.numpy as jnp

        out = {} if self.tasks is None else self.tasks(state)
        if not self._host_batches:
            return out
        if self._device_batches is None:
            self._device_batches = [global_batch(b, self.mesh) for b in self._host_batches]
        ce_sum, tokens = 0.0, 0.0
        for batch in self._device_batches:
            c, n = self.eval_step(state, batch)
            ce_sum, tokens = ce_sum + c, tokens + n
        return {"eval_loss": ce_sum / jnp.maximum(tokens, 1.0), "eval_tokens": tokens, **out}


class TaskEvaluator:
    """lm-eval task scores of a train state: {"eval_TASK_METRIC": float32 array} (granite_jax.inference)."""

    def __init__(self, model_of: Callable, tasks: list[str], tokenizer: str | None, *, limit: int | None = None,
                 batch_size: int = 8, max_length: int | None = None):
        try:
            import lm_eval  # noqa: F401
        except ImportError as e:
            raise ImportError(f"eval.tasks={tasks} needs lm-evaluation-harness: pip install -e '.[eval]'") from e
        from granite_jax.inference.load import load_tokenizer

        self.model_of, self.task_names, self.limit = model_of, tasks, limit
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = load_tokenizer(tokenizer)

    def __call__(self, state) -> dict:
        from granite_jax.inference.lm_eval_model import evaluate_tasks

        scores = evaluate_tasks(self.model_of(state), self.tokenizer, self.task_names, limit=self.limit,
                                batch_size=self.batch_size, max_length=self.max_length)
        return {f"eval_{task}_{metric}": np.float32(value) for task, metrics in scores.items()
                for metric, value in metrics.items()}


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict:
    """Global arrays from a batch every process holds whole: each device takes its slice."""
    import jax
    from jax.sharding import NamedSharding

    from granite_jax.sharding import batch_names, logical_to_spec

    out = {}
    for key, value in batch.items():
        spec = logical_to_spec(batch_names(value.ndim), mesh, shape=value.shape, what=f"eval batch[{key!r}]")
        out[key] = jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda i, v=value: v[i])
    return out


def evaluate_model(model, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """{"eval_loss", "eval_tokens"} of a `GraniteModel` on host batches, outside a train run (e.g. the model of
    `checkpoint.restore_model(workdir)`): the same token-weighted CE the Evaluator computes."""
    import jax
    from flax import nnx

    from granite_jax import train_step

    graphdef, params = nnx.split(model)
    terms = jax.jit(lambda p, b: train_step.loss_terms(nnx.merge(graphdef, p), b))
    ce_sum, tokens = 0.0, 0.0
    for batch in batches:
        t = jax.device_get(terms(params, batch))
        ce_sum, tokens = ce_sum + float(t["ce_sum"]), tokens + float(t["tokens"])
    return {"eval_loss": ce_sum / max(tokens, 1.0), "eval_tokens": tokens}
