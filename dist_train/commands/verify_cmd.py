"""``biomtl verify``: are two face images the same person?

    biomtl verify --checkpoint C a.png b.png [--threshold T] [--show-attention out.png] [--json]

Prints the cosine score, the threshold (and where it came from) and the
decision. Exit code 0 whatever the decision; 2 on a usage error (missing file,
not a checkpoint). ``--show-attention`` (DCAL checkpoints) writes a picture: each
image as the model sees it and the same image with the attention rollout
(CLS row, :meth:`models.dcal.DCAL.attention_rollout`) laid over it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dist_train.commands import fail, output_clash
from recipes.base import has_attention_rollout


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Verify whether two face images show the same identity.")
    ap.add_argument("--checkpoint", required=True, help="trainer checkpoint (.pt) or exported model file")
    ap.add_argument("image1")
    ap.add_argument("image2")
    ap.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the checkpoint's)")
    ap.add_argument("--show-attention", metavar="PNG", default=None,
                    help="write the attention rollout of both images over them (DCAL)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap


def run(argv: list[str] | None = None, prog: str = "biomtl verify") -> int:
    args = build_parser(prog).parse_args(argv)
    from dist_train.inference import CheckpointError, InferenceEngine

    for img in (args.image1, args.image2):
        if not Path(img).is_file():
            return fail(f"image not found: {img}")
    if args.show_attention and Path(args.show_attention).suffix.lower() != ".png":
        return fail(f"--show-attention must name a .png file, got {args.show_attention}")
    clash = args.show_attention and output_clash("--show-attention", args.show_attention, [
        ("image1", args.image1), ("image2", args.image2), ("--checkpoint", args.checkpoint)])
    if clash:
        return fail(clash)
    try:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, args.device)
    except CheckpointError as exc:
        return fail(str(exc))
    if args.show_attention and not has_attention_rollout(engine.model):
        return fail(f"--show-attention needs a DCAL checkpoint; this one is recipe {engine.recipe_name!r}")
    try:
        result = engine.verify_pair(args.image1, args.image2, threshold=args.threshold)
    except (OSError, ValueError) as exc:
        return fail(str(exc).splitlines()[0])
    source = "--threshold" if args.threshold is not None else engine.threshold_source
    if args.show_attention:
        maps = engine.attention_maps([args.image1, args.image2])
        write_attention_figure(Path(args.show_attention), [args.image1, args.image2], maps, result,
                               engine.recipe.params.img_size)
    if args.json:
        print(json.dumps({**result, "threshold_source": source, "image1": args.image1, "image2": args.image2}))
    else:
        decision = "MATCH (same identity)" if result["match"] else "NO MATCH (different identities)"
        print(f"score {result['score']:.4f}  threshold {result['threshold']:.4f} ({source})  ->  {decision}")
        if args.show_attention:
            print(f"attention picture: {args.show_attention}")
    return 0


def write_attention_figure(path: Path, images: list[str], maps: np.ndarray, result: dict, model_size: int,
                           display: int = 224) -> None:
    """For each image: the model's input view and the rollout map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from dist_train.image_files import read_image_file

    fig, axes = plt.subplots(1, 4, figsize=(11.5, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 1]})
    im = None
    for k, (img_path, amap) in enumerate(zip(images, maps)):
        img = read_image_file(img_path).convert("RGB")
        view = np.asarray(img.resize((model_size, model_size), Image.BILINEAR).resize((display, display),
                                                                                        Image.NEAREST))
        heat = np.asarray(Image.fromarray((amap * 255).astype(np.uint8)).resize((display, display), Image.BILINEAR),
                          dtype=np.float32) / 255.0
        a, b = axes[2 * k], axes[2 * k + 1]
        a.imshow(view)
        a.set_title(f"image {k + 1}: {Path(img_path).name}\n(as the model sees it, {model_size}x{model_size})",
                    fontsize=8)
        b.imshow(view)
        im = b.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        gh, gw = amap.shape
        b.set_title(f"image {k + 1}: attention rollout\n({gh}x{gw} patch grid, CLS row)", fontsize=8)
        for ax in (a, b):
            ax.set_xticks([])
            ax.set_yticks([])
    decision = "MATCH" if result["match"] else "NO MATCH"
    fig.suptitle(f"cosine score {result['score']:.4f}, threshold {result['threshold']:.4f}: {decision}",
                 fontsize=10, color="tab:green" if result["match"] else "tab:red")
    fig.tight_layout(rect=(0, 0, 0.93, 0.93))
    cax = fig.add_axes((0.94, 0.12, 0.012, 0.68))
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("attention (0 = least, 1 = most)", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
