"""``biomtl export``: a checkpoint (DeepSpeed directory or DDP ``.pt``) to one
consolidated fp32 model file, loadable with ``torch.load(weights_only=True)``.

    biomtl export --checkpoint runs/facecom_X/checkpoints/latest --output model.pt
    biomtl export --checkpoint runs/facecom_X --output model.pt      # its latest checkpoint
    biomtl export --checkpoint runs/facecom_X/model.pt --format onnx --output face.onnx

``--format onnx|torchscript``: the recipe's inference graph (embedding, plus the task heads
where the model has them) with a dynamic batch size, for onnxruntime / C++ (:mod:`dist_train.deploy`).
An existing ``--output`` is replaced only when biomtl export wrote it.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys


def build_arg_parser(prog: str = "biomtl export") -> argparse.ArgumentParser:
    from dist_train.deploy import FORMATS

    parser = argparse.ArgumentParser(
        prog=prog, description="Write a consolidated fp32 state dict {model, config, data_info} from a "
                               "checkpoint: a DeepSpeed checkpoint directory (any ZeRO stage), a DDP .pt "
                               "checkpoint, or a run directory (its latest checkpoint).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory / .pt file / run directory")
    parser.add_argument("--output", required=True, help="the file to write, e.g. model.pt or model.onnx (an "
                        "existing file is replaced only when biomtl export wrote it)")
    parser.add_argument("--format", choices=FORMATS, default="pt",
                        help="pt: consolidated fp32 weights + config (default); onnx / torchscript: the inference "
                        "graph (preprocessed images -> embedding and task heads), dynamic batch size")
    return parser


def run(argv: list[str] | None = None, prog: str = "biomtl export") -> int:
    args = build_arg_parser(prog).parse_args(argv)
    from dist_train.export import ExportError, export_checkpoint

    if args.format == "onnx" and importlib.util.find_spec("onnx") is None:  # an optional extra
        print("error: --format onnx needs the onnx package: pip install 'biomtl[onnx]'", file=sys.stderr)
        return 2

    try:
        out = export_checkpoint(args.checkpoint, args.output, args.format)
    except (ExportError, OSError) as exc:  # OSError names its path: an unreadable checkpoint, say
        print(f"error: {(str(exc).splitlines() or [type(exc).__name__])[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
