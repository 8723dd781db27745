"""Pair-verification metrics from similarity scores (for DCAL / twin verification).

``verification_metrics(scores, same)`` -> ``{"auc", "eer", "eer_threshold",
"tar_at_far_1e-2", "tar_at_far_1e-3", "best_acc", "best_threshold", "pairs"}``.
Higher score = more likely the same identity. TAR@FAR is the true-accept rate
at the largest threshold-defined operating point whose false-accept rate does
not exceed the target (0 when even the strictest threshold exceeds it).
"""
from __future__ import annotations

import numpy as np

__all__ = ["verification_metrics"]


def verification_metrics(scores, same, far_targets=(1e-2, 1e-3)) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(same).astype(bool).reshape(-1)
    nan = float("nan")
    out: dict[str, float] = {"pairs": float(s.size)}
    if s.size == 0 or y.all() or not y.any():   # one class only: ROC undefined
        out.update(auc=nan, eer=nan, eer_threshold=nan, best_acc=nan, best_threshold=nan)
        for t in far_targets:
            out[f"tar_at_far_{t:g}"] = nan
        return out
    fpr, tpr, thr = roc_curve(y, s)
    out["auc"] = float(roc_auc_score(y, s))
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    out["eer"] = float((fpr[i] + fnr[i]) / 2.0)
    out["eer_threshold"] = float(thr[i])
    for t in far_targets:
        ok = fpr <= t
        out[f"tar_at_far_{t:g}"] = float(tpr[ok].max()) if ok.any() else 0.0
    n_pos, n_neg = y.sum(), (~y).sum()
    acc = (tpr * n_pos + (1.0 - fpr) * n_neg) / (n_pos + n_neg)
    j = int(np.argmax(acc))
    out["best_acc"] = float(acc[j])
    out["best_threshold"] = float(thr[j])
    return out
