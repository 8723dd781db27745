"""``biomtl extract``: embeddings of a folder of images.

    biomtl extract --checkpoint C --images DIR --output features.npz [--similarity-matrix] [--plot pca|tsne]
                   [--feature-type T]

Images are found recursively (png, jpg, jpeg, pgm, ppm, bmp, tif, webp) in sorted
order; an image's label is its first folder below ``DIR`` (the identity folder,
e.g. ``DIR/s1/3.pgm`` -> ``s1``; images directly in ``DIR`` get ``""``).
``features.npz`` holds ``features`` ``[N, D]`` float32 (L2-normalised: cosine =
dot product), ``paths`` (relative to ``DIR``), ``labels`` and, with
``--similarity-matrix``, ``similarity`` ``[N, N]``. ``--plot`` writes a 2-D
PCA or t-SNE map coloured by identity folder to ``--plot-output`` (default:
``<output stem>_<method>.png``).

``--feature-type`` picks what is extracted where a recipe gives several kinds
(``Recipe.feature_types``; the first is the default, what ``embed`` gives):
``dcal_twins`` ``combined|sa|glca`` (the original's ``--feature_type
combined``: both class tokens), ``ear_teacher`` ``projection|features`` (the
backbone's pooled features: 768-d for ConvNeXt-Tiny, what the original
exports; the model's ``feature_type`` param is the default), ``photometric_mtl``
``embedding|backbone|non_identity`` (the identity part, the backbone's pooled
features before the Feature Separation Module, its non-identity part; with
``separation: false`` only ``embedding``), every other recipe ``embedding``;
another value is one line naming the choices, exit 2. The npz records it as
``feature_type``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dist_train.commands import fail, output_clash

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Extract face embeddings of a folder of images.")
    ap.add_argument("--checkpoint", required=True, help="trainer checkpoint (.pt) or exported model file")
    ap.add_argument("--images", required=True, help="folder of images (identity = first sub-folder)")
    ap.add_argument("--output", required=True, help="output .npz file")
    ap.add_argument("--similarity-matrix", action="store_true", help="also store the N x N cosine similarities")
    ap.add_argument("--plot", choices=["pca", "tsne"], default=None, help="2-D map coloured by identity folder")
    ap.add_argument("--plot-output", default=None, help="PNG of the map (default: <output stem>_<method>.png)")
    ap.add_argument("--feature-type", default=None,
                    help="which features where the recipe gives several: dcal_twins combined|sa|glca, "
                         "ear_teacher projection|features, photometric_mtl embedding|backbone|non_identity, "
                         "others embedding (default: the recipe's first)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))


def run(argv: list[str] | None = None, prog: str = "biomtl extract") -> int:
    args = build_parser(prog).parse_args(argv)
    from dist_train.inference import CheckpointError, InferenceEngine

    root = Path(args.images)
    if not root.is_dir():
        return fail(f"--images: not a folder: {root}")
    paths = find_images(root)
    if not paths:
        return fail(f"--images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    out = Path(args.output)
    if out.suffix != ".npz":
        return fail(f"--output must end in .npz, got {out}")
    png = None
    if args.plot:
        png = Path(args.plot_output) if args.plot_output else out.with_name(f"{out.stem}_{args.plot}.png")
    for flag, target in (("--output", out), ("--plot-output", png)):
        clash = target and output_clash(flag, target, [("--checkpoint", args.checkpoint),
                                                       *(("--images", p) for p in paths)])
        if clash:
            return fail(clash)
    try:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, args.device, batch_size=args.batch_size)
    except CheckpointError as exc:
        return fail(str(exc))
    print(engine.describe(), file=sys.stderr)
    kinds = engine.feature_types()
    kind = args.feature_type or kinds[0]
    if kind not in kinds:
        return fail(f"--feature-type {kind}: recipe {engine.recipe_name} gives {'|'.join(kinds)}")
    try:
        feats = engine.extract_features(paths, progress=not args.no_progress, feature_type=kind)
    except (OSError, ValueError) as exc:
        return fail(str(exc).splitlines()[0])
    rel = [str(p.relative_to(root)) for p in paths]
    labels = [Path(r).parts[0] if len(Path(r).parts) > 1 else "" for r in rel]
    arrays = {"features": feats.astype(np.float32), "paths": np.array(rel), "labels": np.array(labels),
              "feature_type": np.array(kind)}
    if args.similarity_matrix:
        arrays["similarity"] = (feats @ feats.T).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"wrote {out}: {feats.shape[0]} images x {feats.shape[1]} {kind} features"
          + (" + similarity matrix" if args.similarity_matrix else ""))
    if args.plot:
        if len(paths) < 3:
            return fail("--plot needs at least 3 images")
        plot_embedding_map(feats, labels, args.plot, png, title=f"{engine.recipe_name} embeddings of {root.name}/")
        print(f"wrote {png}")
    return 0


def plot_embedding_map(feats: np.ndarray, labels: list[str], method: str, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=0)
        xy = pca.fit_transform(feats)
        axis = [f"PC{i + 1} ({100 * r:.0f}% of variance)" for i, r in enumerate(pca.explained_variance_ratio_)]
    else:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(feats) - 1) / 3)))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0,
                  metric="cosine").fit_transform(feats)
        axis = ["t-SNE 1", "t-SNE 2"]
    import re

    names = sorted(set(labels), key=lambda s: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)])
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    markers = "os^DvP*X<>"
    fig, ax = plt.subplots(figsize=(7.5 if len(names) <= 20 else 6.5, 5.5))
    for k, name in enumerate(names):
        sel = np.array([lab == name for lab in labels])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=22, color=cmap(k % cmap.N), marker=markers[(k // cmap.N) % len(markers)],
                   label=name or "(no folder)", alpha=0.85, edgecolors="none")
    if len(names) <= 40:
        ax.legend(fontsize=6.5, ncol=1 if len(names) <= 20 else 2, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  title="identity folder", title_fontsize=7)
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    nice = {"pca": "PCA", "tsne": "t-SNE"}[method]
    ax.set_title(title + f" ({nice}, {len(feats)} images, {len(names)} identities)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
