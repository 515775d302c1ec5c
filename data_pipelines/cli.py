"""`granite-jax prepare` and `granite-jax merge-manifests`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from data_pipelines.engines import ENGINES
from data_pipelines.engines.ray import DEFAULT_MAX_RETRIES
from data_pipelines.formats import TEXT_SPLITS
from data_pipelines.prepare import DEFAULT_EOS_TOKEN, PrepareOptions, merge_manifests, prepare


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: expected 0 <= I < N")
    return i, n


def prepare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="granite-jax prepare",
        description="Tokenize JSONL (.jsonl/.json/.ndjson, optionally .gz), Parquet and plain-text files into "
        "ArrayRecord shards of token ids plus DIR/manifest.json; or build the offline demo corpus with --demo.",
    )
    parser.add_argument("--input", nargs="+", metavar="PATH_OR_GLOB", help="files, directories or globs (quote them)")
    parser.add_argument("--tokenizer", metavar="TOKENIZER_JSON", help="a Hugging Face tokenizer.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default: text)")
    parser.add_argument("--text-split", default="file", choices=TEXT_SPLITS,
                        help="plain-text files: one document per file, per line, or per blank-line paragraph")
    parser.add_argument("--eos-token", default=DEFAULT_EOS_TOKEN,
                        help=f"token appended to every document (default: {DEFAULT_EOS_TOKEN}, Granite's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="local: processes (default: all local cores); ray: tasks at once (default: the "
                        "cluster's CPUs, or all local cores for an embedded Ray)")
    parser.add_argument("--engine", default="local", choices=ENGINES,
                        help="local: this machine's processes (default); ray: one Ray task per input file")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="--engine ray: the cluster to join (e.g. ray://head:10001 or auto); default: start a "
                        "local Ray for this run")
    parser.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES,
                        help=f"--engine ray: retries of a task whose worker died (default {DEFAULT_MAX_RETRIES})")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="prepare only input files k with k %% N == I (run N of these, then merge-manifests)")
    parser.add_argument("--from-dpk", action="store_true",
                        help="--input holds the Parquet output of Data Prep Kit's tokenization transform (a `tokens` "
                        "column of ids): write its documents as they are, no tokenizing; --tokenizer is the one it "
                        "used (for eos, vocab size and the tokenizer identity)")
    parser.add_argument("--demo", action="store_true",
                        help="build the demo corpus (Python's standard library + a BPE tokenizer trained on it) in "
                        "DIR, and its held-out eval split in DIR/eval")
    parser.add_argument("--demo-eval-every", type=int, default=None, metavar="K",
                        help="--demo: hold out every K-th document for DIR/eval (default 20; 0 = no eval split)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        if args.demo:
            if args.input or args.tokenizer:
                parser.error("--demo builds its own corpus and tokenizer; drop --input/--tokenizer")
            from data_pipelines.demo import DEMO_EVAL_EVERY, build_demo

            eval_every = DEMO_EVAL_EVERY if args.demo_eval_every is None else args.demo_eval_every
            result = build_demo(args.out, workers=args.workers, progress=not args.no_progress, eval_every=eval_every)
            eval_manifest = os.path.join(args.out, "eval", "manifest.json")
            if eval_every and os.path.exists(eval_manifest):
                with open(eval_manifest) as f:
                    _print_summary(json.load(f), os.path.join(args.out, "eval"))
        else:
            if not args.input or not args.tokenizer:
                parser.error("--input and --tokenizer are required (or use --demo)")
            options = PrepareOptions(tokenizer=args.tokenizer, out=args.out, text_field=args.text_field,
                                     text_split=args.text_split, eos_token=args.eos_token,
                                     from_dpk=args.from_dpk)
            if args.engine != "ray" and args.ray_address:
                parser.error("--ray-address needs --engine ray")
            engine_options = {}
            if args.engine == "ray":
                engine_options = {"address": args.ray_address, "max_retries": args.max_retries}
            result = prepare(args.input, options, workers=args.workers, shard=args.shard,
                             progress=not args.no_progress, engine=args.engine, **engine_options)
    except ValueError as e:
        print(f"granite-jax prepare: {e}", file=sys.stderr)
        return 2
    _print_summary(result, args.out)
    if args.shard[1] > 1:
        print(f"shard {args.shard[0]}/{args.shard[1]} done; when all {args.shard[1]} are, run "
              f"`granite-jax merge-manifests {args.out}`")
    return 0


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="granite-jax merge-manifests",
        description="Combine the manifest parts of `prepare --shard I/N` runs into one manifest.json.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="--out directories of the prepare runs")
    parser.add_argument("--out", default=None, help="where manifest.json goes (default: the first DIR)")
    args = parser.parse_args(argv)
    try:
        manifest = merge_manifests(args.dirs, args.out or args.dirs[0])
    except ValueError as e:
        print(f"granite-jax merge-manifests: {e}", file=sys.stderr)
        return 2
    _print_summary(manifest, args.out or args.dirs[0])
    return 0


def _print_summary(result: dict, out: str) -> None:
    keys = ("documents", "tokens", "max_document_tokens", "prepare_seconds")
    summary = {k: result[k] for k in keys if k in result}
    if "skipped" in result:
        summary["skipped"] = result["skipped"]["counts"] if isinstance(result["skipped"], dict) else result["skipped"]
    print(f"{out}: {json.dumps(summary)}")
