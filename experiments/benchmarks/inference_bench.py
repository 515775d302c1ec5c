"""Inference figures (docs/inference.md): the generation cache's bytes against context length for the hybrid
granite-4.0-h-micro and the dense granite-4.0-micro (computed from the cache shapes, bfloat16); decode tokens/s of
`granite_jax.inference.generate` beside transformers' `generate` on the same weights; loglikelihood requests/s of the
lm-eval model `granite_jax` beside lm-eval's `hf` model on the exported folder.

    python experiments/benchmarks/inference_bench.py cache [--contexts 4096 32768 131072]
    python experiments/benchmarks/inference_bench.py cache-aot [--contexts 32768 131072 --topology v5e:2x2 --models granite-4.0-micro]
    python experiments/benchmarks/inference_bench.py decode [--preset bench-hybrid-20m --batches 1 32 --new 64]
    python experiments/benchmarks/inference_bench.py eval [--preset bench-hybrid-20m --requests 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from granite_jax.config import preset  # noqa: E402


def cache_table(contexts):
    from granite_jax.inference.cache import cache_bytes

    hybrid, dense = (preset(n, dtype="bfloat16") for n in ("granite-4.0-h-micro", "granite-4.0-micro"))
    print("| context | h-micro cache | micro (dense) cache | h-micro / micro | saving |")
    print("|---|---|---|---|---|")
    for n in contexts:
        h, d = cache_bytes(hybrid, 1, n), cache_bytes(dense, 1, n)
        print(f"| {n:,} | {h / 2**20:,.1f} MiB | {d / 2**20:,.1f} MiB | {h / d:.3f} | {1 - h / d:.1%} |")


def cache_aot(contexts, topology, models):
    """The decode step compiled ahead of time for one TPU chip (libtpu): its per-device HBM beside the computed
    cache bytes (the step's arguments are the parameters, the cache and a token per row)."""
    import jax
    from flax import nnx
    from jax.experimental import topologies

    from granite_jax.inference.cache import cache_bytes, init_cache
    from granite_jax.inference.generate import _step
    from granite_jax.model import GraniteModel

    device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    one = jax.sharding.SingleDeviceSharding(device)
    print("| model | context | computed cache | compiled step: arguments | temporaries | arguments - params |")
    print("|---|---|---|---|---|---|")
    for name in models:
        cfg = preset(name, dtype="bfloat16", param_dtype="bfloat16").for_platform("tpu")
        graphdef, params = nnx.split(nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0))))
        on_tpu = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), tree)  # noqa: E731
        params = on_tpu(params)
        param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
        for n in contexts:
            cache = on_tpu(jax.eval_shape(lambda n=n: init_cache(cfg, 1, n)))
            tokens, key = on_tpu(jax.ShapeDtypeStruct((1,), "int32")), jax.eval_shape(lambda: jax.random.key(0))
            compiled = _step.lower(graphdef, params, cache, tokens, on_tpu(key), temperature=0.0, top_p=1.0).compile()
            mem = compiled.memory_analysis()
            print(f"| {name} | {n:,} | {cache_bytes(cfg, 1, n) / 2**20:,.1f} MiB | "
                  f"{mem.argument_size_in_bytes / 2**30:.2f} GiB | {mem.temp_size_in_bytes / 2**20:,.1f} MiB | "
                  f"{(mem.argument_size_in_bytes - param_bytes) / 2**20:,.1f} MiB |", flush=True)


def _model(name):
    import jax
    from flax import nnx

    from granite_jax.model import GraniteModel
    cfg = preset(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GraniteModel(cfg, rngs=nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(GraniteModel(cfg, rngs=nnx.Rngs(0)))[1])()
    return nnx.merge(graphdef, state)


def decode(name, batches, prompt_len, new):
    import torch
    import transformers

    from granite_jax import hf
    from granite_jax.inference.generate import Generator

    model = _model(name)
    folder = tempfile.mkdtemp()
    hf.save_pretrained(model, os.path.join(folder, "hf"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, "hf")).eval()
    gen = Generator(model)
    rng = np.random.default_rng(0)
    print(f"| batch | granite-jax tok/s | transformers tok/s | ratio |  ({name}, prompt {prompt_len}, {new} new)")
    print("|---|---|---|---|")
    for b in batches:
        prompts = rng.integers(2, model.config.vocab_size, (b, prompt_len)).tolist()
        gen.generate(prompts, max_new_tokens=new, eos_id=None)  # compile
        t = time.perf_counter()
        gen.generate(prompts, max_new_tokens=new, eos_id=None)
        ours = b * new / (time.perf_counter() - t)
        ids = torch.as_tensor(prompts)
        with torch.no_grad():
            ref.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # warm-up
            t = time.perf_counter()
            ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)
            theirs = b * new / (time.perf_counter() - t)
        print(f"| {b} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} |")


def eval_throughput(name, n_requests, batch_size, max_length):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models, pre_tokenizers

    from granite_jax import hf
    from granite_jax.inference.lm_eval_model import GraniteJaxLM

    model = _model(name)
    V = model.config.vocab_size
    # A word-level tokenizer over the model's ids ("t0 t1 ..."): requests of known token counts.
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = os.path.join(tempfile.mkdtemp(), "hf")
    hf.save_pretrained(model, folder)
    tok.save(os.path.join(folder, "tokenizer.json"))
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"t{i}" for i in rng.integers(2, V, n))  # noqa: E731
    requests = [Instance("loglikelihood", {}, (words(int(rng.integers(16, 160))), " " + words(int(rng.integers(1, 8)))), 0)
                for _ in range(n_requests)]
    import transformers
    ref = HFLM(pretrained=folder, tokenizer=transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(
        folder, "tokenizer.json")), batch_size=batch_size, max_length=max_length, device="cpu", dtype="float32",
        prefix_token_id=0)
    ours = GraniteJaxLM(model, tok, batch_size=batch_size, max_length=max_length, prefix_token_id=0)
    ours.loglikelihood(requests[:batch_size])  # compile
    t = time.perf_counter()
    got = ours.loglikelihood(requests)
    ours_rps = n_requests / (time.perf_counter() - t)
    t = time.perf_counter()
    want = ref.loglikelihood(requests)
    ref_rps = n_requests / (time.perf_counter() - t)
    err = max(abs(g[0] - w[0]) / max(abs(w[0]), 1) for g, w in zip(got, want))
    print(f"| {name} | {n_requests} requests | granite_jax {ours_rps:.1f} req/s | hf {ref_rps:.1f} req/s | "
          f"ratio {ours_rps / ref_rps:.2f} | max rel. diff {err:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("cache", "cache-aot", "decode", "eval"))
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--models", nargs="+", default=["granite-4.0-h-micro", "granite-4.0-micro"],
                        help="cache-aot: the presets to compile the decode step for")
    parser.add_argument("--preset", default="bench-hybrid-20m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    if args.what == "cache":
        cache_table(args.contexts)
    elif args.what == "cache-aot":
        cache_aot(args.contexts, args.topology, args.models)
    elif args.what == "decode":
        decode(args.preset, args.batches, args.prompt_len, args.new)
    else:
        eval_throughput(args.preset, args.requests, args.batch_size, args.max_length)


if __name__ == "__main__":
    main()
