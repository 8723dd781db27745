"""``biomtl eval --bin lfw.bin [--bin cfp_fp.bin ...]``: insightface's verification
sets, scored as insightface does (:mod:`recipes.bin_verification`), plus biomtl's
EER / AUC / TAR@FAR on the same pairs. Every file is read and every image decoded
before anything is embedded or written; one table per set on the console, one
JSON report ``bins.json`` in ``--output`` (default ``<run dir>/eval/bins``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dist_train.commands import fail, output_clash

REPORT = "bins.json"


def evaluate_bins(args: argparse.Namespace, default_output: Any) -> int:
    from dist_train.checkpoint import atomic_write
    from dist_train.inference import CheckpointError, InferenceEngine
    from recipes.bin_verification import bin_embeddings, bin_metrics, decode_image
    from shards.verification_bins import BinFormatError, bin_name, read_bin

    names = [bin_name(p) for p in args.bin]
    if len(set(names)) != len(names):
        return fail(f"--bin: two files share a name ({', '.join(names)}); their reports would collide")
    clash = args.output and output_clash("--output", args.output, [("--checkpoint", args.checkpoint),
                                                                   *(("--bin", b) for b in args.bin)])
    if clash:
        return fail(clash)
    try:  # every file read (restricted unpickler) and shape-checked before the model is even built
        bins = [read_bin(path) for path in args.bin]
    except BinFormatError as exc:
        return fail(str(exc))
    try:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, args.device, batch_size=args.batch_size)
    except CheckpointError as exc:
        return fail(str(exc))
    sets = []
    for vbin in bins:  # every image decoded before anything is embedded or written
        try:
            sets.append((vbin, [decode_image(data, engine.recipe.transform, f"{vbin.path}: image {i}")
                                for i, data in enumerate(vbin.images)]))
        except (OSError, ValueError) as exc:  # Pillow's decoding errors, UnsupportedImage
            return fail((str(exc).splitlines() or [type(exc).__name__])[0][:300])
    print(engine.describe(), file=sys.stderr)
    flip = not args.no_flip
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "recipe": engine.recipe_name, "flip": flip,
                              "folds": 10, "sets": {}}
    for vbin, images in sets:
        emb = bin_embeddings(lambda x: engine.model.embed(x.to(engine.device)).float(), images,
                             engine.batch_size, flip)
        report["sets"][vbin.name] = {"file": str(vbin.path), **bin_metrics(emb, vbin)}
    out_dir = Path(args.output) if args.output else default_output(Path(args.checkpoint), "bins")
    atomic_write(out_dir / REPORT, lambda tmp: Path(tmp).write_text(_json(report)))
    _print_tables(report, out_dir / REPORT)
    return 0


def _json(report: dict[str, Any]) -> str:
    from recipes.metrics_json import json_text

    return json_text(report, indent=2)


def _print_tables(report: dict[str, Any], path: Path) -> None:
    from dist_train.run_logging import table_console
    from rich.table import Table

    console = table_console()  # full-width tables in a redirected output too
    for name, m in report["sets"].items():
        t = Table(title=f"{name}: {m['pairs']} pairs ({m['same_pairs']} same), "
                        f"flip {'on' if report['flip'] else 'off'}")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("accuracy (10-fold)", f"{m['acc']:.4f} ± {m['acc_std']:.4f}")
        for key in ("eer", "auc", *sorted(k for k in m if k.startswith("tar_at_far_"))):
            t.add_row(key, "-" if m.get(key) is None or m[key] != m[key] else f"{m[key]:.4f}")
        console.print(t)
    console.print(f"wrote {path}")
