"""``biomtl export``: a checkpoint (DeepSpeed directory or DDP ``.pt``) to one
consolidated fp32 model file, loadable with ``torch.load(weights_only=True)``.

    biomtl export --checkpoint runs/facecom_X/checkpoints/latest --output model.pt
    biomtl export --checkpoint runs/facecom_X --output model.pt      # its latest checkpoint
"""
from __future__ import annotations

import argparse
import sys


def build_arg_parser(prog: str = "biomtl export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Write a consolidated fp32 state dict {model, config, data_info} from a "
                               "checkpoint: a DeepSpeed checkpoint directory (any ZeRO stage), a DDP .pt "
                               "checkpoint, or a run directory (its latest checkpoint).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory / .pt file / run directory")
    parser.add_argument("--output", required=True, help="the file to write, e.g. model.pt")
    return parser


def run(argv: list[str] | None = None, prog: str = "biomtl export") -> int:
    args = build_arg_parser(prog).parse_args(argv)
    from dist_train.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.output)
    except (ExportError, OSError) as exc:  # OSError names its path: an unreadable checkpoint, say
        print(f"error: {(str(exc).splitlines() or [type(exc).__name__])[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
