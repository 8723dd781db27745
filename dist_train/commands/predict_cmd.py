"""``biomtl predict``: gender and identity of new face images (FaceCom checkpoints).

    biomtl predict --checkpoint RUN --input DIR|LIST.csv --output predictions.csv [--top-k 5]

``--input`` is a folder (images found recursively, as ``biomtl extract`` does;
a row's ``key`` is the path relative to the folder) or a CSV file with a
``path`` (or ``image``) column, else paths in its first column; relative paths
are read from the CSV's folder and the ``key`` is the path as written there.

``predictions.csv`` starts with the columns of a run's ``submission.csv``
(``key, gender, gender_confidence, identity, confidence``: names and softmax
probabilities of the top classes), then ``top5_identities`` and
``top5_confidences`` (``;``-separated, best first; ``--top-k`` changes 5).
Images that cannot be read are listed on stderr and skipped; when none can
be read the command fails (exit 2) and writes nothing.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

from dist_train.commands import fail, output_clash
from dist_train.commands.extract_cmd import find_images
from recipes.facecom import SUBMISSION_COLUMNS

PATH_COLUMNS = ("path", "image", "file", "filename")


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Predict gender and identity of face images "
                                 "(FaceCom checkpoint) into a submission-style CSV.")
    ap.add_argument("--checkpoint", required=True, help="run directory, trainer checkpoint or exported model file")
    ap.add_argument("--input", required=True, help="folder of images, or a CSV listing image paths")
    ap.add_argument("--output", required=True, help="predictions .csv")
    ap.add_argument("--top-k", type=int, default=5, help="identities listed per image (default 5)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def read_input(source: Path) -> list[tuple[str, Path]]:
    """``[(key, path)]`` of a folder or a CSV list; raises ``ValueError`` (one line)."""
    if source.is_dir():
        return [(p.relative_to(source).as_posix(), p) for p in find_images(source)]
    if not source.is_file():
        raise ValueError(f"--input: no such folder or file: {source}")
    if source.suffix.lower() != ".csv":
        raise ValueError(f"--input: expected a folder or a .csv list of images, got {source}")
    with source.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"--input {source}: empty CSV")
    header = [c.strip().lower() for c in rows[0]]
    column = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    body = rows[1:] if column is not None else rows
    column = column or 0
    out = []
    for r in body:
        text = r[column].strip() if column < len(r) else ""
        if text:
            p = Path(text)
            out.append((text, p if p.is_absolute() else source.parent / p))
    return out


def run(argv: list[str] | None = None, prog: str = "biomtl predict") -> int:
    args = build_parser(prog).parse_args(argv)
    from dist_train.checkpoint import atomic_write
    from dist_train.inference import CheckpointError, InferenceEngine
    from dist_train.progress import progress_bar

    out = Path(args.output)
    if out.suffix.lower() != ".csv":
        return fail(f"--output must end in .csv, got {out}")
    if args.top_k < 1 or args.batch_size < 1:
        return fail("--top-k and --batch-size must be >= 1")
    clash = output_clash("--output", out, [("--input", args.input), ("--checkpoint", args.checkpoint)])
    if clash is not None:
        return fail(clash)
    try:
        items = read_input(Path(args.input))
    except (OSError, ValueError) as exc:
        return fail(str(exc))
    if not items:
        return fail(f"--input {args.input}: no images found")
    try:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, args.device, batch_size=args.batch_size)
    except CheckpointError as exc:
        return fail(str(exc))
    recipe = engine.recipe
    gender_names = getattr(recipe, "gender_names", None)
    if gender_names is None:
        return fail(f"predict needs a FaceCom checkpoint (gender + identity heads); "
                    f"this one is recipe {engine.recipe_name!r}")
    identity_names = recipe.data_info.identities

    rows: list[list[str]] = []
    bad: list[tuple[str, str]] = []
    bs = args.batch_size
    with progress_bar(not args.no_progress, "predicting", math.ceil(len(items) / bs)) as advance:
        for start in range(0, len(items), bs):
            chunk = items[start:start + bs]
            good, tensors, failed = engine.load_images([p for _, p in chunk])
            bad += [(chunk[i][0], reason) for i, reason in failed]
            if tensors:
                import torch

                probs = engine.head_probabilities(torch.stack(tensors))
                for j, i in enumerate(good):
                    rows.append(_row(chunk[i][0], probs["gender"][j], probs["identity"][j], gender_names,
                                     identity_names, args.top_k))
            advance()
    for key, reason in bad:
        print(f"skipped {key}: {reason}", file=sys.stderr)
    if not rows:
        return fail(f"none of the {len(items)} images could be read; nothing written")
    header = SUBMISSION_COLUMNS + [f"top{args.top_k}_identities", f"top{args.top_k}_confidences"]

    def write(tmp: Path) -> None:
        with Path(tmp).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    print(f"{len(rows)} predictions -> {out}" + (f"; {len(bad)} unreadable images skipped" if bad else ""))
    return 0


def _name(names: tuple[str, ...] | list[str], index: int) -> str:
    return str(names[index]) if index < len(names) else str(index)


def _row(key: str, gender: np.ndarray, identity: np.ndarray, gender_names, identity_names, k: int) -> list[str]:
    g = int(gender.argmax())
    top = np.argsort(-identity, kind="stable")[:k]
    return [key, _name(gender_names, g), f"{gender[g]:.4f}", _name(identity_names, int(top[0])),
            f"{identity[top[0]]:.4f}", ";".join(_name(identity_names, int(i)) for i in top),
            ";".join(f"{identity[i]:.4f}" for i in top)]
