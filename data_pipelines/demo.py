"""The offline demo corpus: Python's own standard library (sources and the pydoc topics), found through `sysconfig`
on any machine with Python, plus a byte-level BPE tokenizer trained on it. `granite-jax quickstart` trains on it.

Deterministic for a given Python installation: files are taken in sorted order up to a byte budget. Every
`eval_every`-th document is held out into `out/eval` (a second prepared directory, same tokenizer) for evaluation
during training; the tokenizer is trained on the training documents only.
"""

from __future__ import annotations

import json
import os
import sysconfig

from data_pipelines.prepare import DEFAULT_EOS_TOKEN, PrepareOptions, prepare

PAD_TOKEN = "<|pad|>"
DEMO_VOCAB_SIZE = 8192
DEMO_BYTES = 4 << 20
DEMO_EVAL_EVERY = 20  # documents 19, 39, 59, ... (5%) form the held-out eval split
_DEMO_RAW_FILES = 4  # the raw corpus is split so that prepare's workers share it
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test", "lib2to3"}


def stdlib_documents(max_bytes: int = DEMO_BYTES) -> list[tuple[str, str]]:
    """(relative path, text) of standard-library sources, sorted by path, until `max_bytes` of text."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        paths += [os.path.join(dirpath, n) for n in filenames if n.endswith(".py")]
    # The pydoc topics are the reference manual's prose: put them first so every demo corpus has English text.
    paths.sort(key=lambda p: (not p.endswith(os.path.join("pydoc_data", "topics.py")), os.path.relpath(p, root)))
    docs, total = [], 0
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        docs.append((os.path.relpath(path, root), text))
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    if not docs:
        raise RuntimeError(f"found no readable .py files under the standard library at {root}")
    return docs


def train_tokenizer(texts: list[str], path: str, vocab_size: int = DEMO_VOCAB_SIZE) -> None:
    """Trains a byte-level BPE tokenizer (special tokens `<|end_of_text|>` = 0, `<|pad|>` = 1) and saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEFAULT_EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tmp = f"{path}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)


def build_demo(out: str, *, max_bytes: int = DEMO_BYTES, vocab_size: int = DEMO_VOCAB_SIZE, workers: int | None = None,
               progress: bool = True, eval_every: int = DEMO_EVAL_EVERY) -> dict:
    """Writes `out/raw/*.jsonl` and `out/tokenizer.json`, then prepares them into `out`; with `eval_every` > 0 every
    `eval_every`-th document goes to `out/eval` instead (prepared the same way). Returns the training manifest."""
    docs = stdlib_documents(max_bytes)
    held_out = (lambda i: eval_every > 0 and i % eval_every == eval_every - 1)  # noqa: E731
    train_docs = [d for i, d in enumerate(docs) if not held_out(i)]
    eval_docs = [d for i, d in enumerate(docs) if held_out(i)]
    tokenizer_path = os.path.join(out, "tokenizer.json")
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(tokenizer_path):
        train_tokenizer([text for _, text in train_docs], tokenizer_path, vocab_size)
    if eval_docs:
        _prepare_docs(eval_docs, os.path.join(out, "eval"), tokenizer_path, workers, progress)
    return _prepare_docs(train_docs, out, tokenizer_path, workers, progress)


def _prepare_docs(docs: list[tuple[str, str]], out: str, tokenizer_path: str, workers: int | None,
                  progress: bool) -> dict:
    """Writes `docs` to `out/raw/*.jsonl` and prepares them into `out`."""
    raw_dir = os.path.join(out, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    for k in range(_DEMO_RAW_FILES):
        path = os.path.join(raw_dir, f"stdlib-{k}.jsonl")
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            for source, text in docs[k::_DEMO_RAW_FILES]:
                f.write(json.dumps({"text": text, "source": source}) + "\n")
        os.replace(f"{path}.tmp", path)
    options = PrepareOptions(tokenizer=tokenizer_path, out=out)
    return prepare([os.path.join(raw_dir, "*.jsonl")], options, workers=workers, progress=progress)
