"""`granite-jax export WORKDIR --out HF_DIR`: a run's Orbax checkpoint as a Hugging Face Granite 4.0 model folder.

Reads the checkpoint without the mesh or devices that wrote it: each parameter is opened directly with tensorstore
(the zarr arrays inside Orbax's OCDBT store, `WORKDIR/checkpoints/<step>/params/<name>`), and each Hugging Face tensor
is assembled from just the slices it needs (one layer of a stacked parameter), so peak host memory is about the
largest Hugging Face tensor, not the model. Writes config.json, generation_config.json, safetensors shards + index
(`hf.save_pretrained`) and the tokenizer of the run's data, into a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from granite_jax.checkpoint import CHECKPOINT_DIR, select_step

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja")


class ExportError(Exception):
    """Bad input to export; the message says what and what to do."""


def checkpoint_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps of a run (Orbax writes commit_success.txt / _CHECKPOINT_METADATA last)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise ExportError(f"{workdir} is not a granite-jax run: it has no {CHECKPOINT_DIR}/ directory "
                          "(pass the --workdir of `granite-jax train`)")
    steps = []
    for name in os.listdir(directory):
        step_dir = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(os.path.join(step_dir, "params")) and (
                os.path.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
                or os.path.exists(os.path.join(step_dir, "commit_success.txt"))):
            steps.append(int(name))
    return sorted(steps)


def read_meta(workdir: str, step: int) -> dict:
    with open(os.path.join(workdir, CHECKPOINT_DIR, str(step), "meta", "metadata")) as f:
        return json.load(f)


class CheckpointReader:
    """Reads slices of the parameters of one checkpoint step from disk (no devices, no mesh).

    `order`: the (path, index) reads to come, in order; each read then starts the next one, so tensorstore decodes
    it while the caller converts and writes this one (one slice ahead: memory stays about two slices)."""

    def __init__(self, params_dir: str, order: list[tuple[tuple, tuple]] = ()):
        import tensorstore as ts

        self._ts, self._base, self._open = ts, "file://" + os.path.abspath(params_dir), {}
        self._order = list(order)
        self._position = {_read_key(*o): i for i, o in enumerate(self._order)}
        self._pending = {}

    def _array(self, name: str):
        if name not in self._open:
            spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": self._base, "path": name}}
            try:
                self._open[name] = self._ts.open(spec, open=True, read=True).result()
            except ValueError as e:
                raise ExportError(f"parameter {name!r} cannot be read from {self._base[7:]}: "
                                  f"{str(e).splitlines()[0][:300]}") from e
        return self._open[name]

    def _read(self, path: tuple, index: tuple):
        return self._array(".".join(map(str, path)))[index].read()

    def __call__(self, path: tuple, index: tuple) -> np.ndarray:
        key = _read_key(path, index)
        future = self._pending.pop(key, None) or self._read(path, index)
        following = self._position.get(key, len(self._order)) + 1
        if following < len(self._order) and _read_key(*self._order[following]) not in self._pending:
            self._pending[_read_key(*self._order[following])] = self._read(*self._order[following])
        return np.asarray(future.result())


def _read_key(path: tuple, index: tuple) -> str:
    return repr((path, index))  # slices are not hashable before Python 3.12


def _count_nonfinite(t: np.ndarray) -> int:
    """NaN/inf count; bfloat16 by its exponent bits (numpy's isfinite is slow on that extension type)."""
    if t.dtype.name == "bfloat16":
        return int(np.count_nonzero((t.view(np.uint16) & 0x7F80) == 0x7F80))
    return int(t.size - np.count_nonzero(np.isfinite(t)))


def _tokenizer_source(meta: dict, override: str | None) -> str | None:
    """A tokenizer.json file or a folder of tokenizer files: --tokenizer, else the first data source that has one."""
    if override:
        if not os.path.exists(override):
            raise ExportError(f"--tokenizer {override}: no such file or folder")
        return override
    for source in (meta.get("config", {}).get("data", {}) or {}).get("sources") or []:
        path = source.get("path") if isinstance(source, dict) else None
        if path and os.path.isfile(os.path.join(path, "tokenizer.json")):
            return path
    return None


def _copy_tokenizer(source: str | None, out: str) -> None:
    if source is None:
        return
    if os.path.isfile(source):
        shutil.copy(source, os.path.join(out, "tokenizer.json"))
        return
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(out, name))


SIGNATURE = "model.sig"


def _hashing(folder: str):
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[os.path.join(folder, SIGNATURE)])


def sign(folder: str, private_key: str) -> None:
    """Writes folder/model.sig over every file of `folder` with an elliptic-curve PEM key (OpenSSF model-signing,
    offline), as released Granite 4.0 checkpoints are signed."""
    from model_signing import signing

    signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(_hashing(folder)).sign(
        folder, os.path.join(folder, SIGNATURE))


def verify(folder: str, public_key: str) -> None:
    """Raises ValueError when a file of `folder` was modified, added or removed since it was signed."""
    from model_signing import verifying

    signature = os.path.join(folder, SIGNATURE)
    if not os.path.isfile(signature):
        raise ValueError(f"{folder} has no {SIGNATURE}; it was not exported with --sign-key")
    verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(_hashing(folder)).verify(
        folder, signature)


def _return_large_buffers_to_the_os() -> None:
    """Buffers of 1 MiB and more get their own mappings, released to the OS when freed (glibc's M_MMAP_THRESHOLD).

    glibc otherwise raises that threshold to 32 MiB after the first large free, so tensors of up to 32 MiB come
    from heap arenas that fragmentation keeps from shrinking: export's memory would grow with the number of such
    tensors instead of staying at about the largest one. No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def generation_config(cfg) -> dict:
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id}


def _check_out_is_apart_from_the_run(workdir: str, out: str) -> None:
    """Refuses an `out` whose writing (or replacing, with --overwrite) could touch the run's checkpoints: the workdir
    itself, a folder that contains it, or a folder inside its checkpoints/. Another folder inside the workdir (such as
    `WORKDIR/hf`, where `granite-jax quickstart` exports) is fine."""
    real_workdir, real_out = os.path.realpath(workdir), os.path.realpath(out)
    checkpoints = os.path.join(real_workdir, CHECKPOINT_DIR)
    if os.path.commonpath([real_workdir, real_out]) == real_out:
        where = "is" if real_out == real_workdir else "contains"
        raise ExportError(f"--out {out} {where} the run directory {workdir}; export to a folder outside the run")
    if os.path.commonpath([checkpoints, real_out]) == checkpoints:
        raise ExportError(f"--out {out} lies inside the checkpoints of the run {workdir} ({checkpoints}); export to "
                          "a folder outside them")


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32", tokenizer: str | None = None,
           overwrite: bool = False, allow_nonfinite: bool = False, sign_key: str | None = None,
           progress: bool = True) -> str:
    """Writes checkpoint `step` (default: the latest) of the run in `workdir` to `out` as a Hugging Face folder.

    Returns `out`. Raises ExportError (nothing written) for a missing run/step, an existing `out` without
    `overwrite` (or one that is not a model folder, even with it), an `out` that is or contains the run or lies inside
    its checkpoints, or a non-finite tensor without `allow_nonfinite`. `sign_key` (an EC private key, PEM) adds
    model.sig over the folder's files.
    """
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from granite_jax import hf
    from granite_jax.checkpoint import model_config_from_meta
    from granite_jax.model import GraniteModel

    workdir, out = os.path.abspath(workdir), os.path.abspath(out)
    if dtype not in ("float32", "bfloat16"):
        raise ExportError(f"--dtype {dtype}: expected float32 or bfloat16")
    if sign_key and not os.path.isfile(sign_key):
        raise ExportError(f"--sign-key {sign_key}: no such file (an elliptic-curve private key in PEM)")
    _check_out_is_apart_from_the_run(workdir, out)
    try:
        hf.check_replaceable(out, overwrite, flag="--overwrite")
    except FileExistsError as e:
        raise ExportError(str(e)) from None
    steps = checkpoint_steps(workdir)
    try:
        step = select_step(steps, step, os.path.join(workdir, CHECKPOINT_DIR))
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    meta = read_meta(workdir, step)
    cfg = model_config_from_meta(meta)
    tok_source = _tokenizer_source(meta, tokenizer)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0)))  # shapes and the table only
    specs = hf.tensor_specs(model)
    reader = CheckpointReader(os.path.join(workdir, CHECKPOINT_DIR, str(step), "params"),
                              order=[(piece.path, piece.index) for spec in specs for piece in spec.pieces])
    _return_large_buffers_to_the_os()
    bar = tqdm(total=len(specs), unit="tensor", desc=f"export step {step}", disable=not progress)

    def check(name: str, t: np.ndarray) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)
        bad = 0 if allow_nonfinite else _count_nonfinite(t)
        if bad:
            raise ExportError(f"tensor {name} of step {step} has {bad} non-finite values ({dtype}); export an "
                              f"earlier step (--step, found {steps}) or pass --allow-nonfinite")

    def extra(tmp: str) -> None:
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation_config(cfg), f, indent=2)
        _copy_tokenizer(tok_source, tmp)
        if sign_key:
            sign(tmp, sign_key)  # paths in the signature are relative, so renaming the folder keeps it valid

    try:
        hf.save_pretrained(model, out, dtype=jnp.dtype(dtype), overwrite=overwrite, read=reader, on_tensor=check,
                           extra_files=extra)
    finally:
        bar.close()
    if tok_source is None:
        print("note: no tokenizer found in the run's data sources; pass --tokenizer to include one", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax export", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the run directory (the --workdir of `granite-jax train`)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="weight dtype on disk (default bfloat16, as released Granite 4.0 checkpoints)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json or a folder of tokenizer files (default: the run's data source's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out model folder (never another folder)")
    parser.add_argument("--allow-nonfinite", action="store_true", help="write NaN/inf weights instead of refusing")
    parser.add_argument("--sign-key", default=None, help="EC private key (PEM): write model.sig over the folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        out = export(args.workdir, args.out, step=args.step, dtype=args.dtype, tokenizer=args.tokenizer,
                     overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, sign_key=args.sign_key,
                     progress=not args.no_progress)
    except ExportError as e:
        print(f"granite-jax export: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax verify",
                                     description="check an exported folder against its model.sig")
    parser.add_argument("folder", help="a folder exported with --sign-key")
    parser.add_argument("--public-key", required=True, help="the EC public key (PEM) of the signing key")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        verify(args.folder, args.public_key)
    except ValueError as e:
        print(f"granite-jax verify: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"{args.folder}: signature valid, no file modified, added or removed")
    return 0
