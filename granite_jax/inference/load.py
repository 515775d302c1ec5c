"""The model and tokenizer behind `granite-jax generate` / `eval`: a run directory (a checkpoint, the latest by
default, and the tokenizer of its data) or a Hugging Face folder (config.json, safetensors, tokenizer.json)."""

from __future__ import annotations

import os


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_model(source: str, step: int | None = None):
    """(GraniteModel, the tokenizer source: a tokenizer.json path or folder, or None) of a run dir or HF folder."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: no such directory (give a run directory or a Hugging Face model folder)")
    if is_hf_folder(source):
        if step is not None:
            raise ValueError(f"--step {step} applies to a run directory; {source} is a Hugging Face folder")
        from granite_jax import hf
        return hf.from_pretrained(source), source
    from granite_jax import checkpoint, export

    step = checkpoint.select_step(export.checkpoint_steps(source), step, source)
    return checkpoint.restore_model(source, step), export._tokenizer_source(export.read_meta(source, step), None)


def load_tokenizer(source: str | None, override: str | None = None):
    """A `tokenizers.Tokenizer` from --tokenizer (a tokenizer.json or a folder holding one), else from `source`."""
    from tokenizers import Tokenizer

    path = override or source
    if path is not None and os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json found ({path or 'the run names no data source with one'}): "
                                "pass --tokenizer PATH (a tokenizer.json file or a folder holding one)")
    return Tokenizer.from_file(path)
