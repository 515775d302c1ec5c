"""Granite 4.0's pretraining data recipe: four stages (10T / 2T / 2T / 0.5T tokens), then long context towards 512K.

    python experiments/data/granite4_mixture.py [--root $GRANITE_DATA] [--global-batch-tokens 4194304] [--check]

prints the stage schedule (steps, seq_len, rows per batch, mixture) and with --check verifies every source directory.
The trainer takes `get_config(...)` as its data config and calls `data_pipelines.make_batches` on it.

Prepare each source once (a SLURM array or a pod's hosts can split one with --shard I/N, then merge-manifests):

    granite-jax prepare --input '/raw/dclm/**/*.jsonl.gz' --tokenizer granite-4.0-h-tiny/tokenizer.json \
        --out $GRANITE_DATA/dclm

Sources are the public corpora FACTS.md §5 names; point each at your own prepared copy. IBM has not published the
exact per-stage mixtures: the weights below follow the published shape (later stages raise high-quality, math and
code; the last stages anneal) and are the place to put your own.
"""

from __future__ import annotations

import argparse
import os

import data_pipelines as dp

SOURCES = {  # name -> what to prepare into $GRANITE_DATA/<name>
    "dclm": "DCLM-baseline web text",
    "gneissweb": "IBM GneissWeb (filtered FineWeb)",
    "txt360": "TxT360 curated subsets (papers, books, legal, forums)",
    "wikipedia": "Wikipedia, all languages used in training",
    "code": "permissively licensed source code",
    "math": "math web pages and proofs",
    "multilingual": "non-English web text",
    "business": "finance, legal and business documents",
}

T = 10**12
STAGES = [  # (tokens, seq_len, mixture)
    (10 * T, 4096, {"dclm": 30, "gneissweb": 30, "txt360": 8, "wikipedia": 3, "code": 14, "math": 5,
                    "multilingual": 8, "business": 2}),
    (2 * T, 4096, {"dclm": 20, "gneissweb": 25, "txt360": 12, "wikipedia": 5, "code": 18, "math": 10,
                   "multilingual": 7, "business": 3}),
    (2 * T, 4096, {"dclm": 12, "gneissweb": 20, "txt360": 15, "wikipedia": 6, "code": 22, "math": 15,
                   "multilingual": 6, "business": 4}),
    (T // 2, 4096, {"gneissweb": 15, "txt360": 20, "wikipedia": 10, "code": 25, "math": 20, "multilingual": 5,
                    "business": 5}),  # anneal: high quality only
]
# Long context, 4K towards 512K: long documents (books, papers, repositories) weigh more as rows grow.
LONG_CONTEXT = [
    (50 * 10**9, 32_768, {"txt360": 40, "code": 30, "gneissweb": 15, "math": 10, "wikipedia": 5}),
    (50 * 10**9, 131_072, {"txt360": 45, "code": 35, "gneissweb": 10, "math": 10}),
    (25 * 10**9, 524_288, {"txt360": 50, "code": 40, "math": 10}),
]


def get_config(root: str | None = None, *, global_batch_tokens: int = 4 * 2**20, process_count: int = 1):
    """The data config. Every stage keeps `global_batch_tokens` per step: rows per process = that / (seq_len x
    processes), at least 1."""
    root = root or os.environ.get("GRANITE_DATA", "/data/granite4")
    cfg = dp.default_data_config([{"name": n, "path": os.path.join(root, n), "weight": 1.0} for n in SOURCES])
    cfg.stages = [
        {"tokens": tokens, "seq_len": seq_len, "mixture": mixture,
         "batch_size": max(1, global_batch_tokens // (seq_len * process_count))}
        for tokens, seq_len, mixture in STAGES + LONG_CONTEXT
    ]
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="where the prepared sources live (default: $GRANITE_DATA)")
    parser.add_argument("--global-batch-tokens", type=int, default=4 * 2**20)
    parser.add_argument("--process-count", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="open every source (manifests must exist)")
    args = parser.parse_args()
    cfg = get_config(args.root, global_batch_tokens=args.global_batch_tokens, process_count=args.process_count)
    schedule = dp.StageSchedule(cfg, batch_size=1, seq_len=4096, process_count=args.process_count)
    print(f"{'stage':>5} {'first step':>11} {'steps':>9} {'seq_len':>8} {'rows/proc':>9}  mixture")
    for s in schedule.stages:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in s.mixture.items())
        print(f"{s.index:>5} {s.first_step:>11,} {s.num_steps:>9,} {s.seq_len:>8,} {s.batch_size:>9}  {mix}")
    if args.check:
        try:
            it = dp.make_batches(cfg, batch_size=1, seq_len=4096, seed=0, process_count=args.process_count)
        except ValueError as e:
            raise SystemExit(f"--check: {e}") from None
        print("all sources open:", ", ".join(f"{s.name} ({s.num_tokens:,} tokens)" for s in it.sources))


if __name__ == "__main__":
    main()
