"""`checkpoint.save_model` writes what `restore_model` and export read. Export streams: exporting a 665 MB
checkpoint needs host memory on the order of its largest tensor (33.5 MB), not of the model. Peak resident memory
of an export process is measured against the same process exporting a tiny model (imports, tensorstore and the
writer cost the same in both)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from granite_jax.checkpoint import restore_model, save_model
from granite_jax.config import param_count, preset
from granite_jax.model import GraniteModel

_EXPORT = """
import json, sys
from granite_jax import export
from granite_jax.metrics import peak_rss
export.export(sys.argv[1], sys.argv[2], dtype="float32", progress=False)
print(json.dumps({"peak_rss": peak_rss()}))
"""

# 166M float32 parameters (665 MB): 8 layers at width 1024, one attention layer, dense 4096-wide MLPs, untied head.
BIG = dict(vocab_size=8192, hidden_size=1024, num_hidden_layers=8,
           layer_types=("mamba",) * 3 + ("attention",) + ("mamba",) * 4, num_attention_heads=16,
           num_key_value_heads=4, mamba_n_heads=32, mamba_d_head=64, mamba_d_state=128, mamba_chunk_size=64,
           intermediate_size=4096, shared_intermediate_size=4096, tie_word_embeddings=False)


def _export_peak_rss(workdir, out) -> int:
    result = subprocess.run([sys.executable, "-c", _EXPORT, str(workdir), str(out)], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss"]


def test_export_peak_memory_is_near_the_largest_tensor_not_the_model(tmp_path):
    big = preset("debug-hybrid-dense").replace(**BIG)
    model_bytes = param_count(big)[0] * 4
    largest = max(2 * big.shared_intermediate_size, big.vocab_size) * big.hidden_size * 4  # input_linear / embedding
    assert model_bytes > 600e6 and largest < model_bytes / 19
    for name, cfg in (("big", big), ("tiny", preset("debug-hybrid-dense"))):
        save_model(GraniteModel(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))), tmp_path / name)

    baseline = _export_peak_rss(tmp_path / "tiny", tmp_path / "tiny_hf")
    peak = _export_peak_rss(tmp_path / "big", tmp_path / "big_hf")

    written = sum(os.path.getsize(tmp_path / "big_hf" / f) for f in os.listdir(tmp_path / "big_hf")
                  if f.endswith(".safetensors"))
    assert abs(written - model_bytes) < 1e6  # the whole model was exported ...
    extra = peak - baseline
    print(f"export of {model_bytes / 1e6:.0f} MB: peak RSS {peak / 1e6:.0f} MB, {extra / 1e6:.0f} MB above the "
          f"tiny-model export; largest tensor {largest / 1e6:.1f} MB")
    assert extra <= 4 * largest, (extra, largest)  # ... holding a few tensors at a time, not the model


def test_save_model_round_trips_and_refuses_to_overwrite(tmp_path):
    model = GraniteModel(preset("debug-hybrid-moe"), rngs=nnx.Rngs(1))
    save_model(model, tmp_path, step=7)
    restored = restore_model(str(tmp_path))
    for (path, want), got in zip(jax.tree.leaves_with_path(nnx.state(model, nnx.Param)),
                                 jax.tree.leaves(nnx.state(restored, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    with pytest.raises(FileExistsError, match="already has checkpoint 7"):
        save_model(model, tmp_path, step=7)
