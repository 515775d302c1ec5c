"""An lm-evaluation-harness model backed by the framework's JAX model (no export): `granite_jax`.

Loglikelihood requests are scored in fixed-shape batches [batch_size, T] of rows PACKED with several requests each,
told apart by segment ids (documents in one row never see each other: the attention mask and the SSD/conv resets of
the training path), so one compiled forward serves every batch. T is max_length, or the smallest power of two that
holds the longest request and an even share of all tokens per row when the requests are fewer (a small task does not
pay for rows of 2048 tokens; at most log2(max_length) shapes are ever compiled). Tokenisation, empty contexts,
left truncation and the rolling windows follow lm-eval's own `hf` model, so the numbers compare with it.
`generate_until` runs through granite_jax.inference.generate.

    lm_eval --model granite_jax --model_args pretrained=RUN_OR_HF_DIR,batch_size=8 --tasks hellaswag
    granite-jax eval RUN_DIR --tasks tiny_stdlib_choice      (the shipped offline tasks: granite_jax.inference.tasks)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from granite_jax.inference.generate import Generator


def row_length(lengths: list[int], batch_size: int, max_length: int) -> int:
    """The packed row length for these requests: a power of two (at least 16) or max_length, whichever is less,
    holding the longest request and the mean tokens per row of one batch."""
    need = max(max(lengths), -(-sum(lengths) // batch_size), 16)
    return min(max_length, 1 << (need - 1).bit_length())


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of sequences per row, first-fit over decreasing lengths (each length <= max_length)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(graphdef, params, tokens_BT, targets_BT, segment_ids_BT):
    """(log p(target) [B,T] float32, target is the argmax [B,T]) of packed rows."""
    logits_BTV = nnx.merge(graphdef, params)(tokens_BT, segment_ids=segment_ids_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    target_logp = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_logp, jnp.argmax(logits_BTV, axis=-1) == targets_BT


@register_model("granite_jax")
class GraniteJaxLM(TemplateLM):
    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, step: int | None = None,
                 tokenizer_path: str | None = None, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, prefix_token_id: int | None = None, pack: bool = True, **unused):
        """`model` (a GraniteModel) and `tokenizer` (a `tokenizers.Tokenizer`), or `pretrained`: a run directory
        or a Hugging Face folder. `prefix_token_id` conditions empty contexts (default: the model's eos id)."""
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("granite_jax needs model_args pretrained=RUN_DIR_OR_HF_FOLDER")
            from granite_jax.inference.load import load_model, load_tokenizer
            model, source = load_model(pretrained, None if step is None else int(step))
            tokenizer = load_tokenizer(source, tokenizer_path)
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self._max_length = int(max_length or min(2048, cfg.max_position_embeddings))
        self.batch_size, self.max_gen_toks, self.pack = int(batch_size), int(max_gen_toks), pack in (True, "True")
        self._prefix = cfg.eos_token_id if prefix_token_id is None else int(prefix_token_id)
        self._graphdef, self._params = nnx.split(model)
        self._generator = None

    @property
    def eot_token_id(self) -> int:
        return self.model.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "granite_jax"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False).ids

    def score_tokens(self, sequences: list[tuple[list[int], int]], disable_tqdm: bool = True
                     ) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of the last `n` tokens of each token list, given the tokens before them.
        Each list is at most max_length + 1 tokens (its first token is context only)."""
        T, V = self.max_length, self.model.config.vocab_size
        lengths = [len(tokens) - 1 for tokens, _ in sequences]
        for length, (tokens, n) in zip(lengths, sequences):
            if not 1 <= n <= length <= T:
                raise ValueError(f"a request of {length + 1} tokens scoring {n} does not fit max_length={T}")
            if max(tokens) >= V or min(tokens) < 0:
                raise ValueError(f"token id {max(tokens)} is outside the model's vocabulary of {V}: the "
                                 "tokenizer does not belong to this model")
        T = row_length(lengths, self.batch_size, T)
        rows = pack_rows(lengths, T) if self.pack else [[i] for i in range(len(sequences))]
        results: list[tuple[float, bool] | None] = [None] * len(sequences)
        batches = range(0, len(rows), self.batch_size)
        for start in tqdm(batches, desc="loglikelihood", unit="batch", disable=disable_tqdm):
            batch_rows = rows[start:start + self.batch_size]
            shape = (self.batch_size, T)
            tokens, targets, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            where = []
            for r, row in enumerate(batch_rows):
                offset = 0
                for seg, i in enumerate(row, start=1):
                    seq, n, length = sequences[i][0], sequences[i][1], lengths[i]
                    tokens[r, offset:offset + length] = seq[:-1]
                    targets[r, offset:offset + length] = seq[1:]
                    segments[r, offset:offset + length] = seg
                    where.append((i, r, offset + length - n, offset + length))
                    offset += length
            logp, greedy = jax.device_get(_token_scores(self._graphdef, self._params, tokens, targets, segments))
            for i, r, lo, hi in where:
                results[i] = (float(logp[r, lo:hi].sum()), bool(greedy[r, lo:hi].all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        sequences = []
        for _, context_enc, continuation_enc in requests:
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1):]
            sequences.append((tokens, len(continuation_enc)))
        results = self.score_tokens(sequences, disable_tqdm=disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._generator is None:
            self._generator = Generator(self.model)
        outputs: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for indices in by_kwargs.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            top_p = float(kwargs.pop("top_p", 1.0))
            for start in tqdm(range(0, len(indices), self.batch_size), desc="generate_until", disable=disable_tqdm):
                chunk = indices[start:start + self.batch_size]
                keep = max(self.max_length - max_new, 1)
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in chunk]
                for i, tokens in zip(chunk, self._generator.generate(prompts, max_new_tokens=max_new,
                                                                     temperature=temperature, top_p=top_p)):
                    text = self.tokenizer.decode(tokens)
                    for stop in until:
                        text = text.split(stop)[0]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


def evaluate_tasks(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                   max_length: int | None = None, include_path: str | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval tasks (names; the shipped offline tasks by their names too)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from granite_jax.inference.tasks import task_config

    lm = GraniteJaxLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    from granite_jax.inference.tasks import shipped_tasks

    # Indexing the harness's own thousands of task files takes most of a small evaluation: only when needed.
    manager = TaskManager(include_path=include_path,
                          include_defaults=not all(t in shipped_tasks() for t in tasks) or include_path is not None)
    results = lm_eval.simple_evaluate(model=lm, tasks=[task_config(t) for t in tasks], limit=limit,
                                      task_manager=manager, log_samples=False, verbosity="WARNING")
    return {task: {k.split(",")[0]: float(v) for k, v in metrics.items()
                   if "," in k and "_stderr," not in k and isinstance(v, (int, float))}  # "metric,filter" keys
            for task, metrics in results["results"].items()}
