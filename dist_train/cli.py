"""The ``biomtl`` command. A subcommand is listed only once it works.

Each subcommand lives in its own module exposing ``run(argv, prog) -> int``;
adding one is one line in ``COMMANDS``.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> (module with run(argv, prog), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "recipes": ("dist_train.commands.recipes_cmd", "list the recipes: what each trains, its configs, its params"),
    "train": ("dist_train.main", "train a recipe (same as dist_train/main.py; torchrun for several ranks)"),
    "eval": ("dist_train.commands.eval_cmd", "verification metrics + ROC/histogram/error pictures of a checkpoint"),
    "extract": ("dist_train.commands.extract_cmd", "embeddings of a folder of images (+ similarity matrix, PCA/t-SNE)"),
    "verify": ("dist_train.commands.verify_cmd", "same person or not? score and decision for two images"),
    "predict": ("dist_train.commands.predict_cmd", "FaceCom: gender + identity (top-5) of images -> submission-style CSV"),
    "demo": ("dist_train.commands.demo_cmd", "local web page (Gradio): verify a pair with attention maps, nearest identities"),
    "export": ("dist_train.commands.export_cmd", "checkpoint (DeepSpeed dir or DDP .pt) -> one fp32 model file"),
    "shards": ("shards.cli", "pack raw datasets into WebDataset shards; info; verify"),
    "launch": ("dist_train.commands.launch_cmd", "torchrun here (1 or N nodes) or sbatch slurm/<recipe>.sh; --dry-run prints it"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: biomtl COMMAND [ARGS...]", "", "Distributed multi-task training for biometric models.",
             "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'biomtl recipes' for what can be trained (and with which configs/params),",
              "'biomtl COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{command}'{hint}; see 'biomtl --help'", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.run(rest, prog=f"biomtl {command}")


if __name__ == "__main__":
    sys.exit(main())
