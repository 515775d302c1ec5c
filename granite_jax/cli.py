"""The `granite-jax` command. Each subcommand lives in the module that owns it and is imported only when run, so
`granite-jax --help` stays instant; a subcommand's entry point takes its argument list and returns an exit code."""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("granite_jax.train:main", "train a model from a config file (experiments/*.py); resumes from checkpoints"),
    "compile-check": ("granite_jax.compile_check:main", "AOT-compile a config's train step for a TPU topology, print HBM"),
    "quickstart": ("granite_jax.quickstart:main", "prepare the demo corpus, train a small hybrid model on CPU, export it"),
    "export": ("granite_jax.export:main", "write a run's checkpoint as a Hugging Face model folder (safetensors)"),
    "verify": ("granite_jax.export:verify_main", "check an exported, signed model folder against its model.sig"),
    "import": ("granite_jax.hf_import:main", "write a Hugging Face Granite 4.0 folder as the step-0 checkpoint of a run"),
    "prepare": ("data_pipelines.cli:prepare_main", "tokenize raw text into ArrayRecord shards (or --demo)"),
    "generate": ("granite_jax.inference.cli:generate_main", "continue prompts with a checkpoint or a HF folder"),
    "eval": ("granite_jax.inference.cli:eval_main", "score a checkpoint on lm-evaluation-harness tasks"),
    "sweep": ("granite_jax.sweep:main", "run a sweep (experiments/sweeps/*.py) locally or as a SLURM array job"),
    "sweep-report": ("granite_jax.sweep_report:main", "rewrite a sweep's summary.csv/.md and curve plots"),
    "launch": ("granite_jax.launch:main", "render and submit a training job: --target slurm | tpu-vm | gke"),
    "merge-manifests": ("data_pipelines.cli:merge_main", "combine the manifests of a prepare run split with --shard"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: granite-jax COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `granite-jax COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"granite-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
