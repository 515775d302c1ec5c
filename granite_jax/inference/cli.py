"""`granite-jax generate` and `granite-jax eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run directory (its latest checkpoint, or --step) or a Hugging Face folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: the latest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or a folder with one (default: the "
                        "folder's, or the run's data source's)")


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax generate",
                                     description="continue prompts with a checkpoint or a Hugging Face folder")
    _common(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from granite_jax.inference.generate import Generator
    from granite_jax.inference.load import load_model, load_tokenizer

    try:
        model, tok_source = load_model(args.source, args.step)
        tokenizer = load_tokenizer(tok_source, args.tokenizer)
        prompts = [tokenizer.encode(p).ids for p in args.prompt]
        outputs = Generator(model).generate(prompts, max_new_tokens=args.max_new_tokens,
                                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                            progress=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"granite-jax generate: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompt, outputs):
        print(prompt + tokenizer.decode(out))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax eval",
                                     description="evaluate a checkpoint on lm-evaluation-harness tasks")
    _common(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (e.g. "
                        "hellaswag,arc_easy; the shipped offline task: granite_jax_tiny)")
    parser.add_argument("--include-path", default=None, help="a folder of extra task YAMLs (the shipped tasks "
                        "are always included)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=8, help="packed rows per forward")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per packed row (default: 2048, or "
                        "less where the model's max_position_embeddings is less)")
    parser.add_argument("--output", default=None, help="write the results JSON here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from granite_jax.inference.lm_eval_model import evaluate_tasks
    from granite_jax.inference.load import load_model, load_tokenizer

    try:
        model, tok_source = load_model(args.source, args.step)
        tokenizer = load_tokenizer(tok_source, args.tokenizer)
        scores = evaluate_tasks(model, tokenizer, args.tasks.split(","), limit=args.limit,
                                batch_size=args.batch_size, max_length=args.max_length,
                                include_path=args.include_path)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"granite-jax eval: {e}", file=sys.stderr)
        return 2
    text = json.dumps(scores, indent=2, sort_keys=True)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
