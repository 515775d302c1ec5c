"""Hugging Face interop: read and write the exact on-disk layout of released Granite 4.0 checkpoints (FACTS.md §2).

One table (`tensor_specs`) says how every Hugging Face tensor is assembled from this model's parameters: a
concatenation of pieces, each piece a parameter (or one slice of a stacked parameter) laid out as a PyTorch Linear
weight `[out, in]` (or flattened, for vectors). Saving and loading both read that table, so they cannot drift apart.
Writing streams tensor by tensor; reading uses safetensors only (never pickle).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from granite_jax.config import ModelConfig
from granite_jax.model import GraniteModel

MAX_SHARD_BYTES = 5 * 1000**3
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

Path = tuple  # a parameter's path in the model's state, e.g. ("layers", "blocks", 0, "mixer", "in_proj_z")


@dataclasses.dataclass(frozen=True)
class Piece:
    path: Path
    index: tuple[int, ...] = ()  # selects a slice of the parameter (stacked layer, B/C half)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """A Hugging Face tensor built from pieces concatenated along the first non-batch axis.

    Each piece (parameter slice of shape [*batch, *in, *out]) becomes [*batch, prod(out), prod(in)] (a PyTorch
    Linear weight) when `n_in` is set, or is flattened when `n_in` is None; the concatenation is then reshaped to
    `shape`.
    """
    name: str
    pieces: tuple[Piece, ...]
    shape: tuple[int, ...]
    n_in: int | None = None
    n_batch: int = 0


def _layer_specs(cfg: ModelConfig, locate: Callable[[int], tuple[int, int]], i: int) -> list[HFTensor]:
    run, s = locate(i)
    prefix, ours = f"model.layers.{i}.", ("layers", "blocks", run)

    def p(*names, index=()):
        return Piece((*ours, *names), (s, *index))

    H, V = cfg.hidden_size, cfg.vocab_size
    specs = [HFTensor(prefix + "input_layernorm.weight", (p("input_layernorm", "weight"),), (H,)),
             HFTensor(prefix + "post_attention_layernorm.weight", (p("post_attention_layernorm", "weight"),), (H,))]
    if cfg.layer_types[i] == "mamba":
        m, I, GN, nh, K = prefix + "mamba.", cfg.mamba_intermediate_size, cfg.mamba_n_groups * cfg.mamba_d_state, \
            cfg.mamba_n_heads, cfg.mamba_d_conv
        in_dim, conv_dim = cfg.mamba_in_proj_dim, cfg.mamba_conv_dim
        mix = lambda name, index=(): p("mixer", name, index=index)  # noqa: E731
        specs += [
            HFTensor(m + "in_proj.weight", (mix("in_proj_z"), mix("in_proj_x"), mix("in_proj_bc", (slice(None), 0)),
                                            mix("in_proj_bc", (slice(None), 1)), mix("in_proj_dt")), (in_dim, H), 1),
            HFTensor(m + "conv1d.weight", (mix("conv_x"), mix("conv_bc", (slice(None), 0)),
                                           mix("conv_bc", (slice(None), 1))), (conv_dim, 1, K), 1),
            HFTensor(m + "dt_bias", (mix("dt_bias"),), (nh,)),
            HFTensor(m + "A_log", (mix("A_log"),), (nh,)),
            HFTensor(m + "D", (mix("D"),), (nh,)),
            HFTensor(m + "norm.weight", (p("mixer", "norm", "weight"),), (I,)),
            HFTensor(m + "out_proj.weight", (mix("out_proj"),), (H, I), 2),
        ]
        if cfg.mamba_conv_bias:
            specs.append(HFTensor(m + "conv1d.bias", (mix("conv_bias_x"), mix("conv_bias_bc", (0,)),
                                                      mix("conv_bias_bc", (1,))), (conv_dim,)))
        if cfg.mamba_proj_bias:
            specs += [HFTensor(m + "in_proj.bias", (mix("in_bias_z"), mix("in_bias_x"), mix("in_bias_bc", (0,)),
                                                    mix("in_bias_bc", (1,)), mix("in_bias_dt")), (in_dim,)),
                      HFTensor(m + "out_proj.bias", (mix("out_bias"),), (H,))]
    else:
        a, N, KV, hd = prefix + "self_attn.", cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for name, heads in (("q_proj", N), ("k_proj", KV), ("v_proj", KV)):
            specs.append(HFTensor(a + name + ".weight", (p("mixer", name),), (heads * hd, H), 1))
            if cfg.attention_bias:
                specs.append(HFTensor(a + name + ".bias", (p("mixer", name[0] + "_bias"),), (heads * hd,)))
        specs.append(HFTensor(a + "o_proj.weight", (p("mixer", "o_proj"),), (H, N * hd), 2))
        if cfg.attention_bias:
            specs.append(HFTensor(a + "o_proj.bias", (p("mixer", "o_bias"),), (H,)))
    if cfg.has_experts:
        e, E, I = prefix + "block_sparse_moe.", cfg.num_local_experts, cfg.intermediate_size
        specs += [HFTensor(e + "router.layer.weight", (p("moe", "router"),), (E, H), 1),
                  HFTensor(e + "input_linear.weight", (p("moe", "input_linear"),), (E, 2 * I, H), 1, n_batch=1),
                  HFTensor(e + "output_linear.weight", (p("moe", "output_linear"),), (E, H, I), 1, n_batch=1)]
    # transformers always builds the shared MLP, so a width of 0 still has its two (empty) tensors on disk: they
    # are written and checked for shape, and no parameter is read from or into them.
    Is = cfg.shared_intermediate_size
    for name, shape in (("input_linear", (2 * Is, H)), ("output_linear", (H, Is))):
        specs.append(HFTensor(prefix + f"shared_mlp.{name}.weight", (p("shared_mlp", name),) if Is else (), shape, 1))
    return specs


def tensor_specs(model: GraniteModel) -> list[HFTensor]:
    """Every tensor of the Hugging Face checkpoint, in the released files' order."""
    cfg = model.config
    H, V = cfg.hidden_size, cfg.vocab_size
    specs = [HFTensor("model.embed_tokens.weight", (Piece(("embed_tokens",)),), (V, H))]
    for i in range(cfg.num_hidden_layers):
        specs += _layer_specs(cfg, model.layers.locate, i)
    specs.append(HFTensor("model.norm.weight", (Piece(("norm", "weight")),), (H,)))
    if not cfg.tie_word_embeddings:
        specs.append(HFTensor("lm_head.weight", (Piece(("lm_head",)),), (V, H)))
    return specs


def _swap_last_two(a: np.ndarray, tile: int = 256) -> np.ndarray:
    """`np.swapaxes(a, -1, -2)` as a new C-contiguous array, copied tile by tile: several times faster than numpy's
    strided copy of a large matrix (which misses the cache on every row), and dtype-blind (bfloat16 moves as bits)."""
    bits = a.view(f"u{a.dtype.itemsize}")
    out = np.empty((*a.shape[:-2], a.shape[-1], a.shape[-2]), bits.dtype)
    src, dst = bits.reshape(-1, *a.shape[-2:]), out.reshape(-1, a.shape[-1], a.shape[-2])
    rows, cols = a.shape[-2:]
    for k in range(src.shape[0]):
        for i in range(0, rows, tile):
            for j in range(0, cols, tile):
                dst[k, j:j + tile, i:i + tile] = src[k, i:i + tile, j:j + tile].T
    return out.view(a.dtype)


def _piece_to_hf(a: np.ndarray, spec: HFTensor) -> np.ndarray:
    if spec.n_in is None:
        return a.reshape(-1)
    b = spec.n_batch
    n_in = math.prod(a.shape[b:b + spec.n_in])
    return _swap_last_two(np.ascontiguousarray(a).reshape(*a.shape[:b], n_in, -1))


def _piece_from_hf(t: np.ndarray, shape: tuple[int, ...], spec: HFTensor) -> np.ndarray:
    if spec.n_in is None:
        return t.reshape(shape)
    return _swap_last_two(np.ascontiguousarray(t)).reshape(shape)


def _piece_shape(param_shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    return np.empty(param_shape, dtype=np.bool_)[index].shape


def _flat_params(model: GraniteModel) -> dict[Path, nnx.Variable]:
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


ReadPiece = Callable[[Path, tuple], np.ndarray]  # (parameter path, index) -> that slice of the parameter, on host


def hf_tensors(model: GraniteModel, dtype=None, read: ReadPiece | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) one Hugging Face tensor at a time (only that tensor is materialised on the host).

    `read` fetches parameter slices from elsewhere (e.g. a checkpoint on disk), so `model` may be abstract."""
    if read is None:
        params = _flat_params(model)
        read = lambda path, index: np.asarray(jax.device_get(params[path][...][index]))  # noqa: E731
    empty_dtype = dtype if dtype is not None else jnp.dtype(model.config.param_dtype)
    for spec in tensor_specs(model):
        if not spec.pieces:  # an empty tensor (shared MLP of width 0)
            yield spec.name, np.zeros(spec.shape, empty_dtype)
            continue
        parts = [_piece_to_hf(read(pc.path, pc.index), spec) for pc in spec.pieces]
        t = np.concatenate(parts, axis=spec.n_batch) if len(parts) > 1 else parts[0]
        del parts  # each step below drops its input: about two copies of the tensor at most are alive
        t = t.reshape(spec.shape)
        if dtype is not None:
            t = t.astype(dtype, copy=False)
        yield spec.name, t


# Reading ---------------------------------------------------------------------------------------------------------

def _open_checkpoint(path: str) -> dict[str, Callable[[], np.ndarray]]:
    """name -> loader for every tensor of a single or sharded safetensors checkpoint."""
    from safetensors import safe_open

    index_path, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face model folder? "
                                "(.bin/.pt checkpoints are not read: they need unpickling)")
    loaders = {}
    for file in files:
        handle = safe_open(os.path.join(path, file), framework="numpy")
        for name in handle.keys():
            loaders[name] = (lambda h=handle, n=name: h.get_tensor(n))
    return loaders


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, **config_overrides) -> GraniteModel:
    """Loads a Hugging Face Granite 4.0 folder (config.json + safetensors, single or sharded).

    `dtype` sets both the parameter and the compute dtype. Unknown, missing or mis-shaped tensors are errors naming
    the tensor; nothing is unpickled.
    """
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model folder "
                                "(config.json + model.safetensors or a sharded index)")
    dtype_name = jnp.dtype(dtype).name
    cfg = ModelConfig.from_hf(path, param_dtype=dtype_name, dtype=dtype_name, **config_overrides)
    model = nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0)))
    load_hf_tensors(model, _open_checkpoint(path), source=path)
    return model


def load_hf_tensors(model: GraniteModel, loaders: dict[str, Callable[[], np.ndarray]], *, source: str = "") -> None:
    """Fills `model`'s parameters (which may be abstract, from nnx.eval_shape) from Hugging Face tensors."""
    params = _flat_params(model)
    specs = tensor_specs(model)
    wanted = {s.name for s in specs}
    cfg_tied = model.config.tie_word_embeddings
    if cfg_tied:
        loaders = {k: v for k, v in loaders.items() if k != "lm_head.weight"}  # some writers store the tied copy
    unexpected = sorted(set(loaders) - wanted)
    missing = sorted(wanted - set(loaders))
    if unexpected or missing:
        raise ValueError(f"{source}: checkpoint does not match its config (tie_word_embeddings={cfg_tied}): "
                         f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    host = {path: np.zeros(var.shape, var.dtype) for path, var in params.items()}
    for spec in specs:
        t = loaders[spec.name]()
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"{source}: tensor {spec.name} has shape {tuple(t.shape)}, expected {spec.shape} "
                             "from config.json")
        if not spec.pieces:
            continue
        b = spec.n_batch
        flat = t.reshape(-1) if spec.n_in is None else t.reshape(*spec.shape[:b + 1], -1)
        offset = 0
        for pc in spec.pieces:
            shape = _piece_shape(host[pc.path].shape, pc.index)
            rows = math.prod(shape) if spec.n_in is None else math.prod(shape[b + spec.n_in:])
            part = flat[(slice(None),) * b + (slice(offset, offset + rows),)]
            host[pc.path][pc.index] = _piece_from_hf(part, shape, spec)
            offset += rows
    for path, var in params.items():
        var.set_value(jnp.asarray(host[path], dtype=var.dtype))


# Writing ---------------------------------------------------------------------------------------------------------

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


def _write_safetensors(path: str, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                       tensors: Iterator[np.ndarray]) -> None:
    """Streams tensors into a safetensors file: the header is written from shapes first, then each tensor's bytes."""
    header, offset = {}, 0
    for name, dt, shape in entries:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, dt, shape), t in zip(entries, tensors):
            if t.shape != tuple(shape) or t.dtype != dt:
                raise AssertionError(f"{name}: produced {t.shape} {t.dtype}, header says {shape} {dt}")
            f.write(np.ascontiguousarray(t).reshape(-1).view(np.uint8).data)  # no copy of the bytes


def _is_model_folder(path: str) -> bool:
    """Whether `path` is a Hugging Face model folder (config.json and at least one .safetensors file)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(path))


def check_replaceable(path: str, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Raises FileExistsError unless `path` may be written by `save_pretrained`: it does not exist or, with
    `overwrite`, it is an empty folder or a model folder. Any other path is refused even with `overwrite`, so that
    a mistyped path never deletes user files. `flag` is how the caller's user asks to overwrite."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or (os.listdir(path) and not _is_model_folder(path)):
        raise FileExistsError(f"{path} exists and is not a Hugging Face model folder (config.json + *.safetensors); "
                              "refusing to replace it: choose a new or empty folder")
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass {flag} to replace it")


def _move_into_place(tmp: str, path: str) -> None:
    """Renames folder `tmp` to `path`. An existing `path` is first renamed to a backup sibling and deleted only once
    `tmp` is in place; if that rename fails, the backup is put back. A crash in between leaves both folders on disk
    (`path` missing, the old one as `.tmp-*-old` beside it), never neither."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    backup = tmp + "-old"
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def save_pretrained(model: GraniteModel, path: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                    max_shard_bytes: int = MAX_SHARD_BYTES, read: ReadPiece | None = None,
                    on_tensor: Callable[[str, np.ndarray], None] | None = None,
                    extra_files: Callable[[str], None] | None = None) -> None:
    """Writes `path` as a Hugging Face model folder in the released Granite 4.0 layout (atomically: a temporary
    sibling folder renamed into place). `dtype` (e.g. jnp.bfloat16) casts the weights; None keeps the param dtype.

    An existing `path` needs `overwrite=True` and must be an empty folder or a model folder (config.json +
    safetensors), which is deleted only once the new one is in place; any other path is refused (FileExistsError).

    `read` is passed to `hf_tensors`; `on_tensor(name, array)` sees each tensor before it is written (raise to
    abort); `extra_files(tmp_dir)` adds files (tokenizer, generation config) before the folder is renamed into place.
    """
    path = os.fspath(path)
    check_replaceable(path, overwrite)
    cfg = model.config
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    specs = tensor_specs(model)
    entries = [(s.name, out_dtype, s.shape) for s in specs]
    shards, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path), dir=parent)
    try:
        stream = hf_tensors(model, out_dtype, read)
        if on_tensor is not None:
            stream = ((n, on_tensor(n, t) or t) for n, t in stream)
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            _write_safetensors(os.path.join(tmp, name), shard, (t for _, (_, t) in zip(shard, stream)))
            weight_map.update({entry[0]: name for entry in shard})
        if len(shards) > 1:
            total = sum(math.prod(e[2]) * out_dtype.itemsize for e in entries)
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(cfg.to_hf_json(dtype=out_dtype.name))
        if extra_files is not None:
            extra_files(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
