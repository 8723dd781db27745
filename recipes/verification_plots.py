"""Pictures and report files of the verification protocol (:mod:`recipes.verification`):
ROC, score histograms, the hardest errors as image pairs, ``metrics.json``.

Every file is handed to a ``publish(path, write)`` function (the trainer's and
the CLI's atomic writer), so a reader never sees half a picture."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from recipes.metrics_json import json_text
from recipes.verification import FAR_TARGETS, Pairs, cosine_scores, verification_report

Publish = Callable[[Path, Callable[[Path], None]], Path]

# ----------------------------------------------------------------------------- report files

def _savefig(fig: Any, path: Path, publish: Publish) -> None:
    import matplotlib.pyplot as plt

    try:
        publish(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def plot_roc(report: Mapping[str, Any], path: Path, publish: Publish, title: str = "") -> None:
    """Both impostor kinds on one plot, log-scale FAR, EER points and FAR targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    styles = {"all": ("tab:blue", "all impostors"), "twin": ("tab:red", "twin impostors")}
    floor = None
    for block, (color, name) in styles.items():
        r = report[block]
        if "_roc" not in r:
            if block == "twin" and not r.get("impostor_pairs"):
                ax.plot([], [], color=color, ls=":", label=f"{name}: none in this split")
            continue
        fpr, tpr = r["_roc"]
        n_imp = max(r["impostor_pairs"], 1)
        lo = 0.5 / n_imp                      # show FAR = 0 at half the smallest non-zero FAR
        floor = lo if floor is None else min(floor, lo)
        x = np.maximum(fpr, lo)
        label = (f"{name}: EER {100 * r['eer']:.2f}%, AUC {r['auc']:.4f}\n"
                 f"   ({r['genuine_pairs']} genuine / {r['impostor_pairs']} impostor pairs)")
        ax.step(x, tpr, where="post", color=color, label=label)
        ax.plot([max(r["eer"], lo)], [1 - r["eer"]], "o", color=color, markersize=5)
    if floor is None:
        ax.text(0.5, 0.5, "no genuine/impostor pairs", ha="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log")
        ax.set_xlim(floor, 1.0)
        for t in FAR_TARGETS:
            if t > floor:
                ax.axvline(t, color="grey", lw=0.6, ls=":")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (FAR, log scale; FAR = 0 drawn at the left edge)")
    ax.set_ylabel("true accept rate (TAR = 1 - FRR)")
    ax.set_title(title or "verification ROC")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=7.5)
    fig.tight_layout()
    _savefig(fig, path, publish)


def plot_histograms(scores: np.ndarray, pairs: Pairs, path: Path, publish: Publish, threshold: float | None,
                    title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lo, hi = float(np.min(scores)) if scores.size else -1, float(np.max(scores)) if scores.size else 1
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 60)
    groups = [("genuine (same identity)", pairs.label, "tab:green"),
              ("impostor, not twins", ~pairs.label & ~pairs.twin, "tab:blue"),
              ("impostor, co-twins", pairs.twin, "tab:red")]
    for name, mask, color in groups:
        if mask.any():
            ax.hist(scores[mask], bins=bins, density=True, alpha=0.45, color=color,
                    label=f"{name} (n={int(mask.sum())})")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("similarity score (cosine)")
    ax.set_ylabel("density (each group normalised)")
    ax.set_title(title or "score distributions")
    ax.legend(fontsize=7.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, path, publish)


def _pair_tile(img_a: Any, img_b: Any, size: int = 96) -> np.ndarray:
    """Two images side by side (each resized to ``size`` px high) with a white gap."""
    from PIL import Image

    tiles = []
    for img in (img_a, img_b):
        if img is None:
            tiles.append(np.full((size, size, 3), 200, np.uint8))
            continue
        img = img.convert("RGB")
        w = max(1, round(img.width * size / img.height))
        tiles.append(np.asarray(img.resize((w, size), Image.BILINEAR)))
    gap = np.full((size, max(4, size // 16), 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1]], axis=1)


def plot_hardest_errors(scores: np.ndarray, pairs: Pairs, keys: Sequence[str], identities: np.ndarray,
                        images: Mapping[str, Any], path: Path, publish: Publish, threshold: float, k: int = 6,
                        names: Sequence[str] | None = None) -> None:
    """Two rows of pair tiles: the highest-scoring impostor pairs (false accepts when
    at or above the threshold) and the lowest-scoring genuine pairs (false rejects
    when below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imp = np.flatnonzero(~pairs.label)
    gen = np.flatnonzero(pairs.label)
    fa = imp[np.argsort(-scores[imp], kind="stable")[:k]] if imp.size else imp
    fr = gen[np.argsort(scores[gen], kind="stable")[:k]] if gen.size else gen
    cols = max(len(fa), len(fr), 1)
    fig, axes = plt.subplots(2, cols, figsize=(2.5 * cols + 0.6, 4.6), squeeze=False)

    def label_of(i: int) -> str:
        ident = int(identities[i])
        if names is not None and 0 <= ident < len(names):
            return str(names[ident])
        return f"id {ident}"

    rows = ((fa, "impostor", "highest-scoring\nimpostor pairs"), (fr, "genuine", "lowest-scoring\ngenuine pairs"))
    for row, (idx, kind, row_title) in enumerate(rows):
        for c in range(cols):
            ax = axes[row, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(idx):
                ax.axis("off")
                continue
            p = int(idx[c])
            i, j = int(pairs.a[p]), int(pairs.b[p])
            ax.imshow(_pair_tile(images.get(keys[i]), images.get(keys[j])))
            s = float(scores[p])
            wrong = s >= threshold if kind == "impostor" else s < threshold
            verdict = ("FALSE ACCEPT" if kind == "impostor" else "FALSE REJECT") if wrong else "correct"
            color = "tab:red" if wrong else "tab:green"
            twin_tag = "  (co-twins)" if pairs.twin[p] else ""
            ax.set_title(f"{label_of(i)} vs {label_of(j)}{twin_tag}", fontsize=8)
            ax.set_xlabel(f"score {s:.3f}: {verdict}", fontsize=8.5, color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2)
        axes[row, 0].set_ylabel(row_title, fontsize=9)
    fig.suptitle(f"hardest pairs at threshold {threshold:.3f} (accept when score >= threshold)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _savefig(fig, path, publish)


def write_report(out_dir: str | os.PathLike, table: Mapping[str, Any], pairs: Pairs, publish: Publish, *,
                 threshold: float | None = None, threshold_source: str = "none",
                 images: Mapping[str, Any] | None = None, identity_names: Sequence[str] | None = None,
                 extra: Mapping[str, Any] | None = None, seed: int = 0, title: str = "") -> dict[str, Any]:
    """Score ``pairs`` on ``table`` (an embedding table, :func:`recipes.verification.embed_batches`), write
    ``metrics.json``, ``roc.png``, ``score_histograms.png`` and (with ``images``)
    ``hardest_errors.png`` into ``out_dir``; return the metrics dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = cosine_scores(table["embedding"], pairs.a, pairs.b)
    report = verification_report(scores, pairs.label, pairs.twin, seed=seed, threshold=threshold, keep_roc=True)
    shown_thr = threshold if threshold is not None else report["all"].get("eer_threshold")
    metrics = {"protocol": pairs.source, "pairs": pairs.counts(), "samples": int(len(table["keys"])),
               "identities": int(np.unique(table["identity"][table["identity"] >= 0]).size),
               "threshold": threshold, "threshold_source": threshold_source,
               "all_impostors": report["all"], "twin_impostors": report["twin"], **(extra or {})}
    text = json_text(metrics)
    publish(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    plot_roc(report, out / "roc.png", publish, title=title and f"ROC: {title}")
    if shown_thr is not None and math.isfinite(shown_thr):
        plot_histograms(scores, pairs, out / "score_histograms.png", publish, shown_thr,
                        title=f"score distributions{': ' + title if title else ''}")
        if images is not None:
            plot_hardest_errors(scores, pairs, table["keys"], table["identity"], images, out / "hardest_errors.png",
                                publish, float(shown_thr), names=identity_names)
    return metrics
