"""`granite-jax quickstart [--workdir DIR] [--data DIR] [--steps N]`: the README's first command.

Prepares the demo corpus (Python's standard library + a BPE tokenizer) if missing, trains `experiments/quickstart.py`
on CPU with a progress bar showing the loss fall, and exports the trained model in the Hugging Face layout to
`WORKDIR/hf` (with the demo tokenizer). Running it again resumes from the checkpoints in WORKDIR.
"""

from __future__ import annotations

import argparse
import os
import sys

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "quickstart.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-jax quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart", help="run directory (default runs/quickstart)")
    parser.add_argument("--data", default="data/demo", help="demo corpus directory, built if missing")
    parser.add_argument("--steps", type=int, default=None, help="train steps (default: the config's)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from granite_jax import train

    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        from data_pipelines.demo import build_demo
        print(f"preparing the demo corpus in {args.data} (once)...", flush=True)
        build_demo(args.data)
    if not os.path.exists(CONFIG):
        print(f"granite-jax quickstart: {CONFIG} not found (run from a source checkout)", file=sys.stderr)
        return 2
    overrides = [f"data.sources=[{{'name': 'demo', 'path': {os.path.abspath(args.data)!r}, 'weight': 1.0}}]"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = train.load_config(CONFIG, overrides)
    code = train.run(cfg, args.workdir)
    if code:
        return code

    from granite_jax import export

    # `granite-jax export` (config, generation config, safetensors, the demo tokenizer), float32: the small model
    # exactly as trained.
    out = export.export(args.workdir, os.path.join(args.workdir, "hf"), dtype="float32", overwrite=True,
                        tokenizer=args.data if os.path.exists(os.path.join(args.data, "tokenizer.json")) else None)
    print(f"exported the trained model to {out} (granite_jax.hf.from_pretrained or transformers can load it; "
          f"`granite-jax export {args.workdir} --out DIR` does the same for any step)")
    return 0
