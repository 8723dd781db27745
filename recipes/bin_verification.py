"""The verification protocol of insightface's ``.bin`` sets (LFW, CFP-FP, AgeDB-30...),
as their ``recognition/arcface_torch/eval/verification.py`` runs it, so a biomtl
number stands beside published ones:

* each image's embedding is ``embed(image) + embed(horizontal flip)`` (raw
  embeddings summed, ``flip=False``: the image alone), then L2-normalised;
* a pair's distance is the squared L2 distance of its two embeddings
  (``= 2 - 2 cos``); "same" is predicted when ``distance < threshold``;
* 10-fold accuracy: the pairs in file order are cut into 10 contiguous folds
  (scikit-learn ``KFold`` without shuffling: the first ``n % 10`` folds one pair
  longer); on each fold the threshold of the grid ``0, 0.01, ..., 3.99`` with
  the best plain accuracy on the other nine folds (the first such, as
  ``argmax``) is applied; mean and (population) std over the folds.

biomtl adds its own curve metrics on the same pairs (cosine scores):
EER, AUC and TAR@FAR from :func:`recipes.verification.verification_report`.
The file reader (restricted unpickler) is :mod:`shards.verification_bins`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from recipes.verification import summary_metrics, verification_report
from shards.images import open_image
from shards.verification_bins import VerificationBin

__all__ = ["bin_embeddings", "kfold_accuracy", "bin_metrics", "training_metric_names", "TRAINING_KEYS",
           "THRESHOLDS"]

THRESHOLDS = np.arange(0, 4, 0.01)  # insightface's grid of squared-distance thresholds
TRAINING_KEYS = ("acc", "acc_std", "eer")  # logged at each validation as <bin name>_<key>


def training_metric_names(names: Sequence[str]) -> frozenset[str]:
    """The validation metrics ``data.val_bins`` add (``lfw`` -> ``lfw_acc``, ...)."""
    return frozenset(f"{n}_{k}" for n in names for k in TRAINING_KEYS)


def decode_image(data: bytes, transform: Callable[..., dict[str, Any]], name: str) -> torch.Tensor:
    """One encoded image -> the recipe's evaluation input (as ``InferenceEngine.preprocess``)."""
    sample = {"png": open_image(data, name), "json": {}, "__key__": name}
    return transform(sample, train=False)["image"]


@torch.no_grad()
def bin_embeddings(embed: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor],
                   batch_size: int, flip: bool = True) -> np.ndarray:
    """``[N, D]`` float64 embeddings of preprocessed images, flip-summed (when
    ``flip``) then L2-normalised. ``embed`` returns the raw (unnormalised) embedding."""
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.stack(list(images[s:s + batch_size]))
        e = embed(x).double()
        if flip:
            e = e + embed(torch.flip(x, dims=[-1])).double()
        out.append(e.cpu().numpy())
    e = np.concatenate(out) if out else np.zeros((0, 0))
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _fold_slices(n: int, folds: int) -> list[slice]:
    """scikit-learn's ``KFold(folds, shuffle=False)``: contiguous, the first ``n % folds`` one longer."""
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - z), int(e)) for e, z in zip(ends, sizes)]


def kfold_accuracy(distances: np.ndarray, issame: np.ndarray, folds: int = 10,
                   thresholds: np.ndarray = THRESHOLDS) -> tuple[float, float, np.ndarray]:
    """(mean, std, per-fold thresholds) of insightface's 10-fold accuracy (module doc)."""
    d, y = np.asarray(distances, np.float64), np.asarray(issame, bool)
    if d.size < folds or not np.isfinite(d).all():
        return math.nan, math.nan, np.full(folds, np.nan)
    correct = (d[:, None] < thresholds[None, :]) == y[:, None]  # [pairs, thresholds]
    total = correct.sum(0)
    accs, chosen = [], []
    for fold in _fold_slices(d.size, folds):
        held = correct[fold]
        train_acc = (total - held.sum(0)) / (d.size - held.shape[0])
        best = int(np.argmax(train_acc))
        chosen.append(thresholds[best])
        accs.append(held[:, best].mean())
    return float(np.mean(accs)), float(np.std(accs)), np.asarray(chosen)


def bin_metrics(embeddings: np.ndarray, vbin: VerificationBin, folds: int = 10) -> dict[str, Any]:
    """The report of one set from its ``[2 * pairs, D]`` normalised embeddings."""
    e1, e2 = embeddings[0::2], embeddings[1::2]
    distances = np.sum(np.square(e1 - e2), axis=1)
    acc, std, thr = kfold_accuracy(distances, vbin.issame, folds)
    flat = summary_metrics(verification_report(np.sum(e1 * e2, axis=1), vbin.issame))
    out: dict[str, Any] = {"pairs": len(vbin), "same_pairs": int(vbin.issame.sum()), "acc": acc, "acc_std": std,
                           "fold_thresholds": [float(t) for t in thr]}
    # (the random-fold balanced acc_10fold of biomtl's report would only blur the protocol's own acc)
    out.update({k: v for k, v in flat.items()
                if not k.startswith(("twin_", "acc_10fold")) and not k.endswith("_pairs")})
    return out
