"""`granite-jax quickstart [--workdir DIR] [--data DIR] [--steps N]`: the README's first command.

Prepares the demo corpus (Python's standard library + a BPE tokenizer) if missing, trains `experiments/quickstart.py`
on CPU with a progress bar showing the loss fall (scoring the shipped lm-eval task `tiny_stdlib_choice` every 100
steps when lm-evaluation-harness is installed, `.[eval]`), exports the trained model in the Hugging Face layout to
`WORKDIR/hf` (with the demo tokenizer), then samples a continuation of a prompt from it and prints the task's score.
Running it again resumes from the checkpoints in WORKDIR.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

PROMPT = "def __init__(self"
TASK = "tiny_stdlib_choice"
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "quickstart.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart", help="run directory (default runs/quickstart)")
    parser.add_argument("--data", default="data/demo", help="demo corpus directory, built if missing")
    parser.add_argument("--steps", type=int, default=None, help="train steps (default: the config's)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    from granite_jax import train
    from granite_jax.checkpoint import CheckpointMismatch

    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        from data_pipelines.demo import build_demo
        print(f"preparing the demo corpus in {args.data} (once)...", flush=True)
        build_demo(args.data)
    if not os.path.exists(CONFIG):
        print(f"granite-jax quickstart: {CONFIG} not found (run from a source checkout)", file=sys.stderr)
        return 2
    overrides = [f"data.sources=[{{'name': 'demo', 'path': {os.path.abspath(args.data)!r}, 'weight': 1.0}}]"]
    if args.steps is not None:
        if args.steps < 1:
            print(f"granite-jax quickstart: --steps {args.steps}: give a number of steps >= 1", file=sys.stderr)
            return 2
        # A shorter run keeps the config's warmup share (30 of 300 steps).
        overrides += [f"train.steps={args.steps}", f"schedule.warmup_steps={args.steps // 10}"]
    if importlib.util.find_spec("lm_eval") is None:
        print(f"lm-evaluation-harness is not installed: training without the {TASK} score "
              "(pip install -e '.[eval]' adds it)", flush=True)
        overrides.append("eval.every_steps=0")
    try:
        cfg = train.load_config(CONFIG, overrides)
        train.validate(cfg, jax.device_count(), jax.process_count())
    except ValueError as e:  # e.g. a --steps the config rejects
        print(f"granite-jax quickstart: invalid config: {e}", file=sys.stderr)
        return 2
    try:
        code = train.run(cfg, args.workdir)
    except CheckpointMismatch as e:  # a WORKDIR holding another model's run
        print(f"granite-jax quickstart: {e}", file=sys.stderr)
        return 2
    if code:
        return code

    from granite_jax import export

    # `granite-jax export` (config, generation config, safetensors, the demo tokenizer), float32: the small model
    # exactly as trained.
    out = export.export(args.workdir, os.path.join(args.workdir, "hf"), dtype="float32", overwrite=True,
                        tokenizer=args.data if os.path.exists(os.path.join(args.data, "tokenizer.json")) else None)
    print(f"exported the trained model to {out} (granite_jax.hf.from_pretrained or transformers can load it; "
          f"`granite-jax export {args.workdir} --out DIR` does the same for any step)")
    show_sample(out)
    show_task_score(args.workdir)
    return 0


def show_sample(hf_dir: str) -> None:
    """A sampled continuation of PROMPT (temperature 0.8, top-p 0.95) from the exported folder, with the hybrid cache."""
    from granite_jax.inference.generate import Generator
    from granite_jax.inference.load import load_model, load_tokenizer

    model, tok_source = load_model(hf_dir)
    tokenizer = load_tokenizer(tok_source)
    (tokens,) = Generator(model).generate([tokenizer.encode(PROMPT).ids], max_new_tokens=48, temperature=0.8,
                                          top_p=0.95, seed=0)
    print(f"sampled continuation (`granite-jax generate {hf_dir} --prompt ... --temperature 0.8 --top-p 0.95`):")
    print("    " + (PROMPT + tokenizer.decode(tokens)).replace("\n", "\n    "))


def show_task_score(workdir: str) -> None:
    """The last in-training score of the shipped task, from metrics.jsonl."""
    key = f"eval_{TASK}_acc"
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        scores = [(m["step"], m[key]) for m in map(json.loads, f) if key in m]
    if scores:
        trail = ", ".join(f"step {step}: {acc:.2f}" for step, acc in scores)
        print(f"{TASK} accuracy (20 questions, chance 0.25), scored during training: {trail} "
              f"(`granite-jax eval {workdir} --tasks {TASK}` scores any checkpoint)")
