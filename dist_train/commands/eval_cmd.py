"""``biomtl eval``: the verification report of a checkpoint on a shard split.

    biomtl eval --checkpoint runs/X/checkpoints/best.pt                  # the run's own data, test split
    biomtl eval --checkpoint C --data DIR --split test --optimize-threshold --output out/

Pairs: ``--pairs FILE``, else ``DIR/<split>_pairs.json`` when the dataset has one,
else the manifest's ``pairs`` of the split, else genuine / twin impostor /
general impostor pairs generated from the split (identity-disjoint from
training when the dataset was split by identity). ``--pairs`` may also name image
files (the original DCAL ``test_pairs.json``): those images are embedded from
disk, no split needed (:mod:`dist_train.commands.path_pairs`). The decision threshold:
``--threshold``, else (``--optimize-threshold``) the best-accuracy threshold on
the validation split's pairs, else the checkpoint's (see :mod:`dist_train.inference`). Writes ``metrics.json``, ``roc.png``,
``score_histograms.png`` and ``hardest_errors.png`` into ``--output``
(default: ``<run dir>/eval/<split>`` for a run, its checkpoints or its ``model.pt``, else
``<file stem>_eval/<split>`` beside the model file).
Metric definitions: :mod:`recipes.verification`.

``--bin lfw.bin [--bin cfp_fp.bin ...]``: insightface's verification sets instead of a
split (10-fold accuracy as insightface computes it, EER, AUC, TAR@FAR; flip-summed
embeddings unless ``--no-flip``): :mod:`dist_train.commands.eval_bins`.

A recipe may replace the report with its own (``Recipe.eval_report``, e.g. the
THz recipes: per-sample / per-identity / per-posture tables, reconstruction
grids, posture confusion, plus this verification report); it receives the
embedding table, the pairs and the threshold resolved here.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dist_train.commands import fail, output_clash

log = logging.getLogger("biomtl.eval")


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Verification metrics (EER, AUC, TAR@FAR, accuracy) "
                                 "of a checkpoint on a shard split, with ROC / histogram / error pictures.")
    ap.add_argument("--checkpoint", required=True, help="trainer checkpoint (.pt) or exported model file")
    ap.add_argument("--data", default=None, help="shard directory (default: the checkpoint's own data)")
    ap.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ap.add_argument("--pairs", default=None, help='JSON list of {"img1", "img2", "label"}: sample keys of the '
                    "split, or image files (the original DCAL test_pairs.json; see dist_train/commands/path_pairs.py)")
    ap.add_argument("--image-root", default=None,
                    help="folder of the relative image paths of --pairs (default: the pairs file's folder)")
    ap.add_argument("--optimize-threshold", action="store_true",
                    help="pick the decision threshold on the validation split (best accuracy)")
    ap.add_argument("--val-split", default=None, help="split for --optimize-threshold (default: the config's)")
    ap.add_argument("--threshold", type=float, default=None, help="decision threshold (overrides the rest)")
    ap.add_argument("--output", default=None, help="output directory")
    ap.add_argument("--max-pairs", type=int, default=2_000_000, help="cap on generated pairs (default 2M)")
    ap.add_argument("--seed", type=int, default=0, help="seed of pair sampling and of the 10 folds")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--bin", action="append", default=None, metavar="FILE",
                    help="insightface verification .bin (LFW, CFP-FP, AgeDB-30...; repeatable): 10-fold accuracy "
                    "as insightface computes it plus EER/AUC/TAR@FAR, into OUTPUT/bins.json (default <run>/eval/bins)")
    ap.add_argument("--no-flip", action="store_true",
                    help="--bin: embed the image alone (default: image + its horizontal flip, summed)")
    return ap


def resolve_data_dir(cfg: Any, run: Path | None = None) -> Path:
    """The shard directory a training config used (the synthetic set is rebuilt if absent,
    in the cache of the run's output folder when no cache folder is named)."""
    if cfg.data.source == "shards":
        if not cfg.data.shards:
            raise FileNotFoundError("the checkpoint's config names no shard directory; pass --data DIR")
        path = Path(cfg.data.shards)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"the checkpoint's data directory {path} is not here; pass --data DIR")
        return path
    from dist_train.config import synthetic_cache_dir, synthetic_spec
    from shards.synthetic import ensure_synthetic

    return ensure_synthetic(synthetic_cache_dir(cfg, run.parent if run is not None else None), synthetic_spec(cfg))


def default_output(checkpoint: Path, split: str) -> Path:
    """``RUN/eval/<split>`` for a run, its checkpoints and its model.pt; beside any
    other model file: ``<folder>/<file stem>_eval/<split>``. Never the working folder."""
    from dist_train.checkpoint import run_of

    run = run_of(checkpoint)
    if run is not None:
        return run / "eval" / split
    checkpoint = Path(checkpoint).absolute()
    return checkpoint.parent / f"{checkpoint.stem}_eval" / split


def run(argv: list[str] | None = None, prog: str = "biomtl eval") -> int:
    from shards.reading import CorruptDataError, corrupt_data_line

    args = build_parser(prog).parse_args(argv)
    try:
        return _evaluate(args)
    except CorruptDataError as exc:  # the split cannot be read: before any report file is written
        return fail(corrupt_data_line(exc))


class _EvalError(Exception):
    """One line for :func:`fail`, raised by the steps of :func:`_evaluate`."""


def _evaluate(args: argparse.Namespace) -> int:
    from dist_train.inference import CheckpointError, InferenceEngine

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.bin:  # insightface's .bin sets (dist_train/commands/eval_bins.py)
        from dist_train.commands.eval_bins import evaluate_bins

        return evaluate_bins(args, default_output)
    if args.pairs and not Path(args.pairs).is_file():
        return fail(f"--pairs: file not found: {args.pairs}")
    clash = args.output and (output_clash("--output", args.output, [("--checkpoint", args.checkpoint),
                                                                     ("--pairs", args.pairs),
                                                                     ("--image-root", args.image_root)])
                             or output_clash("--output", args.output, [("--data", args.data)], folders_whole=True))
    if clash:
        return fail(clash)
    try:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, args.device, batch_size=args.batch_size)
    except CheckpointError as exc:
        return fail(str(exc))
    try:
        return _evaluate_with(args, engine)
    except _EvalError as exc:
        return fail(str(exc))


def _evaluate_with(args: argparse.Namespace, engine: Any) -> int:
    path_pairs = None
    if args.pairs:
        from dist_train.commands.path_pairs import read_path_pairs

        try:
            path_pairs = read_path_pairs(Path(args.pairs), Path(args.image_root) if args.image_root else None)
        except ValueError as exc:
            raise _EvalError(str(exc)) from None
        if path_pairs is not None and not (args.optimize_threshold and args.threshold is None):
            threshold = engine.threshold if args.threshold is None else args.threshold
            source = f"checkpoint ({engine.threshold_source})" if args.threshold is None else "--threshold"
            return _eval_image_files(args, engine, *path_pairs, threshold, source, {})
    data = _SplitData(args, engine)
    val_split = args.val_split or engine.config.data.val_split
    if args.optimize_threshold and args.threshold is None:
        if val_split not in data.manifest.splits or val_split == args.split:
            raise _EvalError(f"--optimize-threshold needs a validation split other than {args.split!r} "
                             f"(looked for {val_split!r} in {data.dir}); pass --val-split or --threshold")
    print(engine.describe(), file=sys.stderr)
    if path_pairs is not None:  # image files, with a threshold picked on the data's val split
        val_acc, threshold = data.val_threshold(val_split)
        return _eval_image_files(args, engine, *path_pairs, threshold,
                                 f"best accuracy on {val_split!r} pairs (--optimize-threshold)",
                                 {"val_best_acc": val_acc, "data": str(data.dir)})
    table = data.embed(args.split)
    try:
        pairs = data.pairs_for(args.split, table, args.pairs)
    except (KeyError, ValueError) as exc:
        raise _EvalError(str(exc).strip("'\"")) from None
    if not pairs.label.any() or pairs.label.all():
        raise _EvalError(f"split {args.split!r}: the pairs need both genuine and impostor pairs "
                         f"(got {pairs.counts()}); are identities labelled?")
    threshold, source = engine.threshold, f"checkpoint ({engine.threshold_source})"
    extra: dict[str, Any] = {}
    if args.threshold is not None:
        threshold, source = args.threshold, "--threshold"
    elif args.optimize_threshold:
        extra["val_best_acc"], threshold = data.val_threshold(val_split)
        source = f"best accuracy on {val_split!r} pairs (--optimize-threshold)"
    return _write_split_report(args, engine, data, table, pairs, threshold, source, extra)


class _SplitData:
    """The shard dataset ``eval`` scores: its manifest, embeddings of a split, the
    split's verification pairs, a threshold picked on another split."""

    def __init__(self, args: argparse.Namespace, engine: Any) -> None:
        from dist_train.checkpoint import run_of
        from shards.manifest import Manifest

        self.args, self.engine = args, engine
        try:
            self.dir = Path(args.data) if args.data else resolve_data_dir(engine.config, run_of(args.checkpoint))
            self.manifest = Manifest.load(self.dir)
        except (FileNotFoundError, ValueError) as exc:
            raise _EvalError(str(exc).splitlines()[0]) from None
        clash = args.output and output_clash("--output", args.output, [("--data", self.dir)], folders_whole=True)
        if clash:  # the checkpoint's own data: the report is not written into the dataset
            raise _EvalError(clash)
        if args.split not in self.manifest.splits:
            have = ", ".join(sorted(self.manifest.splits))
            raise _EvalError(f"split {args.split!r} not in {self.dir} (have: {have})")

    def loader(self, split: str):
        from shards.stream import build_eval_loader

        return build_eval_loader(self.dir, split, self.engine.recipe.transform, self.args.batch_size, 0, 1, 0)

    def embed(self, split: str) -> dict[str, Any]:
        from dist_train.progress import progress_bar
        from recipes import verification as ev

        loader = self.loader(split)
        with progress_bar(not self.args.no_progress, f"embedding {split}", len(loader)) as advance:
            return ev.embed_batches(self.engine.embed_tensor, loader, advance)

    def pairs_for(self, split: str, table: dict[str, Any], explicit: str | None):
        from recipes import verification as ev

        candidate = Path(explicit) if explicit else self.dir / f"{split}_pairs.json"
        if explicit or candidate.is_file():
            return ev.pairs_from_file(candidate, table["keys"], table["identity"], table["twin"])
        listed = self.manifest.split_pairs(split)
        if listed:  # the manifest's own protocol
            rows = [{"img1": r["key1"], "img2": r["key2"], "label": r["label"]} for r in listed]
            return ev.pairs_from_rows(rows, table["keys"], table["identity"], table["twin"],
                                      source=f"{self.dir}/manifest.json pairs ({split})")
        return ev.generate_pairs(table["identity"], table["twin"], self.args.max_pairs, self.args.seed)

    def val_threshold(self, val_split: str) -> tuple[float, float]:
        """``(best accuracy, its threshold)`` on ``val_split``'s pairs."""
        from recipes import verification as ev

        val = self.embed(val_split)
        vp = self.pairs_for(val_split, val, None)
        if not vp.label.any() or vp.label.all():
            raise _EvalError(f"split {val_split!r} has no genuine or no impostor pairs to pick a threshold on")
        return ev.best_accuracy_threshold(ev.cosine_scores(val["embedding"], vp.a, vp.b), vp.label)


def _write_split_report(args: argparse.Namespace, engine: Any, data: _SplitData, table: dict[str, Any], pairs: Any,
                        threshold: float, source: str, extra: dict[str, Any]) -> int:
    from dist_train.checkpoint import atomic_write
    from recipes import verification as ev
    from recipes.base import EvalContext
    from recipes.verification_plots import write_report
    from shards.reading import read_images_by_key

    out_dir = Path(args.output) if args.output else default_output(Path(args.checkpoint), args.split)
    extra.update(checkpoint=str(args.checkpoint), data=str(data.dir), split=args.split, recipe=engine.recipe_name)
    own = engine.recipe.eval_report(engine.model, EvalContext(
        out_dir=out_dir, split=args.split, data_dir=data.dir, loader=lambda: data.loader(args.split),
        table=table, pairs=pairs, threshold=threshold, threshold_source=source, publish=atomic_write,
        identity_names=data.manifest.identities, extra=extra, device=engine.device, seed=args.seed,
        progress=not args.no_progress))
    if own is not None:  # the recipe wrote its own report (Recipe.eval_report)
        return 0
    images = read_images_by_key(data.dir, args.split, ev.hardest_error_keys(table, pairs))
    metrics = write_report(out_dir, table, pairs, atomic_write, threshold=threshold, threshold_source=source,
                           images=images, identity_names=data.manifest.identities, extra=extra, seed=args.seed,
                           title=f"{args.split} split")
    _print_summary(metrics, out_dir)
    return 0


def _eval_image_files(args: argparse.Namespace, engine: Any, rows: list[dict[str, Any]], files: list[Path],
                      threshold: float, source: str, extra: dict[str, Any]) -> int:
    """The verification report of pairs that name image files (no shard split involved)."""
    from dist_train.checkpoint import atomic_write
    from dist_train.commands.path_pairs import table_from_files
    from dist_train.image_files import read_image_file
    from recipes import verification as ev
    from recipes.verification_plots import write_report

    progress = not args.no_progress
    print(engine.describe(), file=sys.stderr)
    try:
        table = table_from_files(rows, files, lambda fs: engine.extract_features(fs, progress=progress))
        pairs = ev.pairs_from_rows(rows, table["keys"], source=str(args.pairs))
    except (OSError, KeyError, ValueError) as exc:
        return fail(str(exc).strip("'\"").splitlines()[0])
    if not pairs.label.any() or pairs.label.all():
        return fail(f"--pairs {args.pairs}: the pairs need both genuine and impostor pairs (got {pairs.counts()})")
    by_key = dict(zip(table["keys"], files))
    images = {k: read_image_file(by_key[k]).convert("RGB") for k in ev.hardest_error_keys(table, pairs)}
    out_dir = Path(args.output) if args.output else default_output(Path(args.checkpoint), "pairs")
    extra = {**extra, "checkpoint": str(args.checkpoint), "split": f"image files of {args.pairs}",
             "recipe": engine.recipe_name}
    metrics = write_report(out_dir, table, pairs, atomic_write, threshold=threshold, threshold_source=source,
                           images=images, identity_names=table["identity_names"], extra=extra, seed=args.seed,
                           title=f"pairs of {Path(args.pairs).name}")
    _print_summary(metrics, out_dir)
    return 0


def _print_summary(metrics: dict[str, Any], out_dir: Path) -> None:
    from dist_train.run_logging import table_console
    from rich.table import Table

    n = metrics["pairs"]
    t = Table(title=f"verification on {metrics.get('split')} ({n['genuine']} genuine, "
                    f"{n['impostor']} impostor, {n['twin_impostor']} twin impostor pairs)")
    t.add_column("metric")
    t.add_column("all impostors", justify="right")
    t.add_column("twin impostors", justify="right")
    a, w = metrics["all_impostors"], metrics["twin_impostors"]
    keys = [k for k in a if not k.startswith("_") and not k.startswith("thr_at") and not k.endswith("_pairs")]
    for k in keys:
        def fmt(v: Any) -> str:
            return "-" if v is None or v != v else f"{v:.4f}"
        t.add_row(k, fmt(a.get(k)), fmt(w.get(k)))
    console = table_console()  # full-width tables in a redirected output too
    console.print(t)
    thr = metrics.get("threshold")
    console.print(f"threshold {thr:.4f} ({metrics['threshold_source']})" if thr is not None else "no threshold")
    console.print(f"wrote {out_dir}/metrics.json, roc.png, score_histograms.png, hardest_errors.png")
