"""Face-verification evaluation: pair protocols, metrics, reports.

Used in three places: the validation metrics of the verification recipes
(:class:`VerificationMetrics`: EER/AUC/TAR@FAR on pairs generated from the val
split's embeddings, every validation during training; ``dcal_twins``, ``thz_*``,
``photometric_*``, ``ear_teacher``), their ``write_artifacts`` (the full report
on the test split after training) and ``biomtl eval`` (the full report for a
checkpoint).

Protocols
---------
* **Dataset pairs**: ``--pairs FILE`` or ``DIR/<split>_pairs.json`` (a list of
  ``{"img1": key, "img2": key, "label": 1|0}`` with shard sample keys; an
  optional ``"twin": true`` marks a twin impostor pair; ``biomtl shards create
  --pairs`` writes this file), else the manifest's ``pairs`` of the split.
* **Generated pairs** (:func:`generate_pairs`) from an identity-disjoint split:
  every genuine pair (same identity), every *twin impostor* pair (the second
  image's identity is the first one's co-twin) and every other impostor pair
  when the split has at most ``max_pairs`` pairs; otherwise genuine pairs are
  capped at ``max_pairs // 2`` (uniform sample) and general impostor pairs are
  drawn uniformly to fill up to ``max_pairs`` (twin impostors are always all
  kept). Deterministic for a given ``seed``; unlabelled samples (identity
  ``-1``) are left out.

Metrics (:func:`verification_report`), computed for two impostor sets:
``all`` (genuine vs every impostor pair, twins included) and ``twin`` (genuine
vs twin impostors only; NaN when the split has no twin pair). Higher score =
same identity; a pair is accepted when ``score >= threshold``.

* ``auc``: ROC AUC (``sklearn.metrics.roc_curve`` + trapezoid ``auc``, equal to
  ``roc_auc_score`` with ties counted half). The ROC keeps every operating
  point (``drop_intermediate=False``): dropping collinear points, sklearn's
  default, leaves AUC and EER alone but loses thresholds that TAR@FAR needs
  when scores tie.
* ``eer``: the point where FAR = FRR on the piecewise-linear ROC (linear
  interpolation between the two ROC points where ``FRR - FAR`` changes sign);
  ``eer_threshold`` is the score threshold of the nearer of the two.
* ``tar_at_far_<t>``: the largest TAR over ROC operating points with FAR <= t
  (no interpolation; 0 when no threshold reaches it) for t in 1e-1, 1e-2,
  1e-3, and 1e-4 when there are >= 10^4 impostor pairs; ``thr_at_far_<t>``
  the threshold.
* Accuracy is *balanced* accuracy, ``(TAR + TRR) / 2``: genuine and impostor
  pairs weigh the same (generated pairs are mostly impostors, where plain
  accuracy rewards rejecting everything); for balanced pair lists (LFW-style)
  it is plain accuracy.
* ``best_acc`` / ``best_threshold``: the best accuracy over all thresholds on
  these pairs (optimistic: the threshold is picked on the test pairs).
* ``acc_10fold`` / ``acc_10fold_std``: LFW-style: pairs are split into 10
  folds (random, by ``seed``), the best-accuracy threshold on 9 folds is
  applied to the 10th; mean and std over the 10 folds.
* ``acc_at_threshold`` (when a threshold is given: picked on the validation
  split with ``--optimize-threshold``, or the checkpoint's): plain accuracy,
  with ``far_at_threshold`` / ``frr_at_threshold``.

Non-finite scores (NaN or inf: a diverged model's embeddings) make every
metric NaN (pair counts stay) with one logged warning naming how many there
are; the best threshold and k-fold accuracy are then NaN too, never a
ranking of NaNs nor an exception from scikit-learn.

Everything is vectorised (one sort per curve, cumulative sums); 2M pairs take
about a second.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from recipes.base import Metrics
from recipes.batch import label_column, sample_keys, valid_mask
from recipes.metrics_json import NotComputed

log = logging.getLogger("biomtl.eval")

FAR_TARGETS = (1e-1, 1e-2, 1e-3)
FAR_EXTRA = 1e-4          # reported when there are >= 1 / FAR_EXTRA impostor pairs
DEFAULT_MAX_PAIRS = 2_000_000

__all__ = ["Pairs", "generate_pairs", "pairs_from_file", "pairs_from_rows", "verification_report", "eer_from_roc",
           "best_accuracy_threshold", "balanced_accuracy", "kfold_accuracy", "summary_metrics", "embed_batches",
           "cosine_scores", "FAR_TARGETS", "VerificationMetrics"]


# ----------------------------------------------------------------------------- pairs

@dataclass
class Pairs:
    """Index pairs into an embedding table. ``label`` 1 = same identity;
    ``twin`` marks twin impostor pairs (always ``label == 0``)."""

    a: np.ndarray
    b: np.ndarray
    label: np.ndarray
    twin: np.ndarray
    source: str = "generated"

    def __len__(self) -> int:
        return int(self.a.size)

    def counts(self) -> dict[str, int]:
        return {"genuine": int(self.label.sum()), "impostor": int((~self.label).sum()),
                "twin_impostor": int(self.twin.sum())}


def _pairs_within(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All unordered pairs inside each group (a loop over groups, not pairs)."""
    a_parts, b_parts = [], []
    for g in groups:
        if g.size < 2:
            continue
        i, j = np.triu_indices(g.size, k=1)
        a_parts.append(g[i])
        b_parts.append(g[j])
    if not a_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a_parts).astype(np.int64), np.concatenate(b_parts).astype(np.int64)


def _pairs_across(g1: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.meshgrid(g1, g2, indexing="ij")
    return a.reshape(-1).astype(np.int64), b.reshape(-1).astype(np.int64)


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting (NumPy 2's hash-based unique is slow on millions of int64)."""
    x = np.sort(x)
    return x[np.r_[True, x[1:] != x[:-1]]] if x.size else x


def generate_pairs(identity: np.ndarray, twin: np.ndarray | None = None,
                   max_pairs: int | None = DEFAULT_MAX_PAIRS, seed: int = 0) -> Pairs:
    """Genuine, twin impostor and general impostor pairs (see the module doc).

    ``identity[i]``: identity index of sample ``i`` (``-1`` = unlabelled);
    ``twin[i]``: identity index of its co-twin or ``-1``.
    """
    identity = np.asarray(identity, dtype=np.int64).reshape(-1)
    n = identity.size
    twin = (np.full(n, -1, np.int64) if twin is None else np.asarray(twin, dtype=np.int64).reshape(-1))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 17]))
    labelled = np.flatnonzero(identity >= 0)
    ids = identity[labelled]
    order = np.argsort(ids, kind="stable")
    uniq, starts = np.unique(ids[order], return_index=True)
    groups = np.split(labelled[order], starts[1:]) if labelled.size else []
    by_id = dict(zip(uniq.tolist(), groups))
    m = labelled.size
    total = m * (m - 1) // 2
    cap = max_pairs if max_pairs and max_pairs > 0 else None

    # twin impostors: identity pairs (p, q), p < q, q the co-twin of p
    t_a, t_b = [], []
    tw_l = twin[labelled]
    sel = (tw_l > ids) & np.isin(tw_l, uniq)
    if sel.any():
        codes = _sorted_unique(ids[sel] * (int(uniq.max()) + 1) + tw_l[sel])
        for code in codes.tolist():
            p, q = divmod(code, int(uniq.max()) + 1)
            a, b = _pairs_across(by_id[p], by_id[q])
            t_a.append(a)
            t_b.append(b)
    ta = np.concatenate(t_a) if t_a else np.zeros(0, np.int64)
    tb = np.concatenate(t_b) if t_b else np.zeros(0, np.int64)

    if cap is None or total <= cap:
        i, j = np.triu_indices(m, k=1)
        a, b = labelled[i], labelled[j]
        same = identity[a] == identity[b]
        is_twin = (twin[a] >= 0) & (twin[a] == identity[b])
        return Pairs(a=a.astype(np.int64), b=b.astype(np.int64), label=same, twin=is_twin & ~same)

    ga, gb = _pairs_within(groups)
    if ga.size > cap // 2:
        keep = np.sort(rng.choice(ga.size, cap // 2, replace=False))
        ga, gb = ga[keep], gb[keep]
    n_imp = max(cap - ga.size - ta.size, 0)
    # general impostors: uniform random pairs of different, non-twin identities (rejection sampling)
    ia, ib = np.zeros(0, np.int64), np.zeros(0, np.int64)
    tries = 0
    while ia.size < n_imp and tries < 20:
        tries += 1
        k = int((n_imp - ia.size) * 1.3) + 16
        x = labelled[rng.integers(0, m, k)]
        y = labelled[rng.integers(0, m, k)]
        ok = (identity[x] != identity[y]) & ~((twin[x] >= 0) & (twin[x] == identity[y]))
        x, y = np.minimum(x[ok], y[ok]), np.maximum(x[ok], y[ok])
        code = _sorted_unique(np.concatenate([ia * n + ib, x * n + y]))
        ia, ib = code // n, code % n
    if ia.size > n_imp:
        keep = np.sort(rng.choice(ia.size, n_imp, replace=False))
        ia, ib = ia[keep], ib[keep]
    a = np.concatenate([ga, ta, ia])
    b = np.concatenate([gb, tb, ib])
    label = np.concatenate([np.ones(ga.size, bool), np.zeros(ta.size + ia.size, bool)])
    is_twin = np.concatenate([np.zeros(ga.size, bool), np.ones(ta.size, bool), np.zeros(ia.size, bool)])
    return Pairs(a=a, b=b, label=label, twin=is_twin)


def pairs_from_file(path: str | os.PathLike, keys: Sequence[str], identity: np.ndarray | None = None,
                    twin: np.ndarray | None = None) -> Pairs:
    """Pairs listed in a JSON file (``[{"img1", "img2", "label"[, "twin"]}, ...]`` or
    ``{"pairs": [...]}``) of sample keys. A pair whose key is not in ``keys``
    raises ``KeyError``. Twin impostors: the ``twin`` field, else co-twin identities."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON pairs file ({type(exc).__name__})") from None
    rows = data.get("pairs") if isinstance(data, Mapping) else data
    return pairs_from_rows(rows, keys, identity, twin, source=str(path))


def pairs_from_rows(rows: Any, keys: Sequence[str], identity: np.ndarray | None = None,
                    twin: np.ndarray | None = None, source: str = "pairs") -> Pairs:
    """:func:`pairs_from_file` for rows already in memory."""
    path = source
    if not isinstance(rows, list) or not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError(f"{path}: expected a non-empty list of {{img1, img2, label}}")
    index = {str(k): i for i, k in enumerate(keys)}
    try:
        a = np.array([index[str(r["img1"])] for r in rows], np.int64)
        b = np.array([index[str(r["img2"])] for r in rows], np.int64)
    except KeyError as exc:
        missing = exc.args[0]
        if missing in ("img1", "img2"):
            raise ValueError(f"{path}: every pair needs img1, img2 and label") from None
        raise KeyError(f"{path}: sample key {missing!r} is not in the evaluated split") from None
    for i, r in enumerate(rows):  # 2, -1 or 0.9 are no verdict: never read as genuine or impostor
        value = r.get("label")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
            shown = repr(value) if isinstance(value, (int, float, str, type(None))) else type(value).__name__
            raise ValueError(f"{path}: pair {i}: label must be 0 (impostor) or 1 (genuine), got {shown[:40]}")
    label = np.array([r["label"] == 1 for r in rows], bool)
    if any("twin" in r for r in rows):
        is_twin = np.array([bool(r.get("twin", False)) for r in rows]) & ~label
    elif identity is not None and twin is not None:
        identity, twin = np.asarray(identity), np.asarray(twin)
        is_twin = ((twin[a] >= 0) & (twin[a] == identity[b])) & ~label
    else:
        is_twin = np.zeros(label.size, bool)
    return Pairs(a=a, b=b, label=label, twin=is_twin, source=source)


def cosine_scores(emb: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 17) -> np.ndarray:
    """Cosine similarity of rows ``a[k]``, ``b[k]`` (chunked: no [P, D] blow-up)."""
    e = np.asarray(emb, dtype=np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    out = np.empty(a.size, np.float32)
    for s in range(0, a.size, chunk):
        out[s:s + chunk] = np.einsum("ij,ij->i", e[a[s:s + chunk]], e[b[s:s + chunk]])
    return out


# ----------------------------------------------------------------------------- metrics

def eer_from_roc(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) where FAR = FRR on the piecewise-linear ROC."""
    fnr = 1.0 - tpr
    d = fnr - fpr                       # decreasing from 1 to -1 along the curve
    k = int(np.argmax(d <= 0))          # first point with FRR <= FAR (the last point always is)
    if k == 0 or d[k] == 0:
        return float(fpr[k]), float(thr[k])
    t = d[k - 1] / (d[k - 1] - d[k])
    eer = float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))
    return eer, float(thr[k - 1] if t < 0.5 else thr[k])


def _sorted_desc(scores: np.ndarray, labels: np.ndarray, *extra: np.ndarray) -> tuple[np.ndarray, ...]:
    order = np.argsort(-scores)          # ties need no stable order: thresholds sit between distinct scores
    return (scores[order], labels[order], *(e[order] for e in extra))


def _group_ends(s: np.ndarray) -> np.ndarray:
    """Last index of each run of equal scores in ``s`` (sorted descending)."""
    return np.flatnonzero(np.r_[s[1:] != s[:-1], True])


def _best_threshold_sorted(s: np.ndarray, y: np.ndarray, w: np.ndarray | None = None,
                           ends: np.ndarray | None = None) -> tuple[float, float]:
    """Best (balanced) accuracy and its threshold, ``s`` sorted descending; ``w``
    an optional mask of the pairs that count (the training folds)."""
    pos = y if w is None else (y & w)
    neg = ~y if w is None else (~y & w)
    ends = _group_ends(s) if ends is None else ends
    tp = np.cumsum(pos, dtype=np.int64)[ends]
    fp = np.cumsum(neg, dtype=np.int64)[ends]
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    acc = 0.5 * (tp / n_pos + (n_neg - fp) / n_neg)            # accept everything down to s[end]
    j = int(np.argmax(acc))
    if acc[j] <= 0.5:                                        # accepting nothing is at least as good
        return 0.5, float(np.nextafter(s[0], np.inf))
    e = ends[j]
    thr = s[e] if e + 1 >= s.size else 0.5 * (s[e] + s[e + 1])   # midway to the next lower score
    if e + 1 < s.size and thr <= s[e + 1]:                   # no float strictly between
        thr = s[e]
    return float(acc[j]), float(thr)


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Mean of TAR and TRR at ``threshold`` (NaN parts ignored)."""
    acc = np.asarray(scores) >= threshold
    labels = np.asarray(labels, bool)
    parts = [acc[labels].mean() if labels.any() else np.nan, (~acc[~labels]).mean() if (~labels).any() else np.nan]
    return float(np.nanmean(parts)) if not np.isnan(parts).all() else float("nan")


def best_accuracy_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best accuracy, threshold) over all thresholds; accept = ``score >= threshold``."""
    scores = np.asarray(scores, np.float64)
    if _warn_nonfinite(scores, "best-accuracy threshold"):
        return float("nan"), float("nan")
    s, y = _sorted_desc(scores, np.asarray(labels, bool))
    return _best_threshold_sorted(s, y)


def _warn_nonfinite(scores: np.ndarray, what: str) -> bool:
    """Log one warning and return True when ``scores`` hold NaN or inf."""
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        log.warning("%s: %d of %d scores are not finite (NaN/inf: diverged embeddings?); reporting NaN",
                    what, bad, scores.size)
    return bad > 0


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 23]))
    return (rng.permutation(n) % folds).astype(np.int8)


def _kfold_sorted(s: np.ndarray, y: np.ndarray, f: np.ndarray, folds: int,
                  ends: np.ndarray) -> tuple[float, float]:
    accs = []
    for k in range(folds):
        held = f == k
        _, thr = _best_threshold_sorted(s, y, ~held, ends)
        accs.append(balanced_accuracy(s[held], y[held], thr))
    return float(np.mean(accs)), float(np.std(accs))


def kfold_accuracy(scores: np.ndarray, labels: np.ndarray, folds: int = 10, seed: int = 0) -> tuple[float, float]:
    """LFW-style accuracy: the best-accuracy threshold of ``folds - 1`` folds is
    applied to the held-out fold; (mean, std) over the folds. Folds are a random
    partition (by ``seed``). One sort, then cumulative sums per fold."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n = scores.size
    if n < folds or labels.all() or not labels.any() or _warn_nonfinite(scores, "k-fold accuracy"):
        return float("nan"), float("nan")
    s, y, f = _sorted_desc(scores, labels, _fold_ids(n, folds, seed))
    return _kfold_sorted(s, y, f, folds, _group_ends(s))


def _curve_metrics(scores: np.ndarray, labels: np.ndarray, far_targets: Sequence[float], folds: int,
                   seed: int, threshold: float | None, finite: bool = True) -> dict[str, Any]:
    """One impostor set's metrics; all NaN (counts kept) when a class is empty or
    ``finite`` is False (the caller found NaN/inf scores and said so once)."""
    from sklearn.metrics import auc, roc_curve

    nan = float("nan")
    n_gen, n_imp = int(labels.sum()), int((~labels).sum())
    out: dict[str, Any] = {"genuine_pairs": n_gen, "impostor_pairs": n_imp}
    targets = list(far_targets) + ([FAR_EXTRA] if n_imp >= round(1 / FAR_EXTRA) and FAR_EXTRA not in far_targets
                                   else [])
    if n_gen == 0 or n_imp == 0 or not finite:
        out.update(auc=nan, eer=nan, eer_threshold=nan, best_acc=nan, best_threshold=nan,
                   acc_10fold=nan, acc_10fold_std=nan)
        for t in targets:
            out[f"tar_at_far_{t:g}"] = nan
            out[f"thr_at_far_{t:g}"] = nan
        if threshold is not None:
            out.update(acc_at_threshold=nan, far_at_threshold=nan, frr_at_threshold=nan)
        return out
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    out["auc"] = float(auc(fpr, tpr))
    out["eer"], out["eer_threshold"] = eer_from_roc(fpr, tpr, thr)
    for t in targets:
        ok = np.flatnonzero(fpr <= t + 1e-12)
        k = ok[np.argmax(tpr[ok])]
        out[f"tar_at_far_{t:g}"] = float(tpr[k])
        out[f"thr_at_far_{t:g}"] = float(thr[k])
    s, y, f = _sorted_desc(scores, labels, _fold_ids(scores.size, folds, seed))
    ends = _group_ends(s)
    out["best_acc"], out["best_threshold"] = _best_threshold_sorted(s, y, None, ends)
    out["acc_10fold"], out["acc_10fold_std"] = (_kfold_sorted(s, y, f, folds, ends) if scores.size >= folds
                                                else (nan, nan))
    if threshold is not None and not np.isfinite(threshold):   # (picked on NaN validation scores)
        out.update(acc_at_threshold=nan, far_at_threshold=nan, frr_at_threshold=nan)
    elif threshold is not None:
        acc = scores >= threshold
        out["acc_at_threshold"] = balanced_accuracy(scores, labels, threshold)
        out["far_at_threshold"] = float(acc[~labels].mean())
        out["frr_at_threshold"] = float((~acc[labels]).mean())
    out["_roc"] = (fpr, tpr)
    return out


def verification_report(scores: np.ndarray, labels: np.ndarray, twin: np.ndarray | None = None,
                        far_targets: Sequence[float] = FAR_TARGETS, folds: int = 10, seed: int = 0,
                        threshold: float | None = None, keep_roc: bool = False) -> dict[str, Any]:
    """``{"all": {...}, "twin": {...}}`` (see the module doc for the keys).
    ``twin`` marks twin impostor pairs; ``keep_roc`` keeps ``(fpr, tpr)`` under ``_roc``."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels, bool).reshape(-1)
    twin = np.zeros_like(labels) if twin is None else (np.asarray(twin, bool).reshape(-1) & ~labels)
    finite = not _warn_nonfinite(scores, "verification metrics")
    report = {"all": _curve_metrics(scores, labels, far_targets, folds, seed, threshold, finite)}
    sel = labels | twin
    report["twin"] = _curve_metrics(scores[sel], labels[sel], far_targets, folds, seed, threshold, finite)
    if not keep_roc:
        for block in report.values():
            block.pop("_roc", None)
    return report


def summary_metrics(report: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Flat scalar dict for logs / TensorBoard: ``all`` keys plain, ``twin`` keys prefixed ``twin_``."""
    out: dict[str, float] = {}
    for block, prefix in (("all", ""), ("twin", "twin_")):
        for k, v in report[block].items():
            if k.startswith("_") or k.startswith("thr_at_far"):
                continue
            out[prefix + k] = float(v)
    return out


# ----------------------------------------------------------------------------- embeddings of a split

def embed_batches(embed: Callable[[Any], Any], batches: Iterable[Mapping[str, Any]],
                  advance: Callable[[], None] | None = None) -> dict[str, Any]:
    """Embed every real row of an evaluation loader's batches.

    ``embed(images_tensor) -> [B, D]`` tensor. Returns the *embedding table*
    ``{"embedding" [N, D] float32, "identity" [N], "twin" [N], "keys" list[str]}``
    in loader order, padding rows (``_valid`` False) left out.
    """
    import torch

    embs, idents, twins, keys = [], [], [], []
    for batch in batches:
        with torch.no_grad():
            e = embed(batch["image"]).detach().float().cpu().numpy()
        n = e.shape[0]
        valid = valid_mask(batch, n)
        embs.append(e[valid])
        idents.append(label_column(batch, "identity", n)[valid])
        twins.append(label_column(batch, "twin", n)[valid])
        keys += [k for k, v in zip(sample_keys(batch, n), valid) if v]
        if advance is not None:
            advance()
    return {"embedding": np.concatenate(embs) if embs else np.zeros((0, 0), np.float32),
            "identity": np.concatenate(idents) if idents else np.zeros(0, np.int64),
            "twin": np.concatenate(twins) if twins else np.zeros(0, np.int64), "keys": keys}


def merge_tables(tables: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One embedding table from the tables of several ranks (rank order)."""
    return {"embedding": np.concatenate([t["embedding"] for t in tables if len(t["keys"])] or
                                        [np.zeros((0, 0), np.float32)]),
            "identity": np.concatenate([t["identity"] for t in tables]),
            "twin": np.concatenate([t["twin"] for t in tables]),
            "keys": [k for t in tables for k in t["keys"]]}


def hardest_error_keys(table: Mapping[str, Any], pairs: Pairs, k: int = 6) -> list[str]:
    """Sample keys the error grid of :func:`recipes.verification_plots.write_report` will show."""
    scores = cosine_scores(table["embedding"], pairs.a, pairs.b)
    imp, gen = np.flatnonzero(~pairs.label), np.flatnonzero(pairs.label)
    idx = np.concatenate([imp[np.argsort(-scores[imp], kind="stable")[:k]],
                          gen[np.argsort(scores[gen], kind="stable")[:k]]])
    keys = table["keys"]
    return sorted({keys[i] for p in idx for i in (int(pairs.a[p]), int(pairs.b[p]))})


# ----------------------------------------------------------------------------- validation metrics

class VerificationMetrics(Metrics):
    """Validation metrics of the verification recipes (EER, AUC, TAR@FAR, twin
    impostors apart) on pairs generated from the gathered embeddings. State:
    embeddings (float16 to keep the gather small), identities, co-twins."""

    KEPT = ("eer", "auc", "tar_at_far_0.1", "tar_at_far_0.01", "tar_at_far_0.001", "tar_at_far_0.0001", "best_acc")
    TWIN = ("eer", "auc", "tar_at_far_0.01")  # also reported on co-twin impostor pairs alone, as twin_<name>
    NAMES = frozenset((*KEPT, "threshold", *(f"twin_{k}" for k in TWIN)))

    def __init__(self, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0) -> None:
        self.max_pairs, self.seed = max_pairs, seed
        self.emb: list[np.ndarray] = []
        self.ident: list[np.ndarray] = []
        self.twin: list[np.ndarray] = []

    def update(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        e = outputs["embedding"].detach().float().cpu().numpy()
        n = e.shape[0]
        valid = valid_mask(batch, n)
        self.emb.append(e[valid].astype(np.float16))
        self.ident.append(label_column(batch, "identity", n)[valid])
        self.twin.append(label_column(batch, "twin", n)[valid])

    def state(self) -> dict[str, Any]:
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        emb = np.concatenate(self.emb) if self.emb else np.zeros((0, 0), np.float16)
        return {"embedding": emb, "identity": cat(self.ident, np.int64), "twin": cat(self.twin, np.int64),
                "max_pairs": self.max_pairs, "seed": self.seed}

    @staticmethod
    def compute(states: list[Any]) -> dict[str, float]:
        states = [s for s in states if s["identity"].size]
        if not states:
            why = NotComputed("no labelled samples in the split")
            return {"eer": why, "auc": why}
        emb = np.concatenate([s["embedding"] for s in states]).astype(np.float32)
        ident = np.concatenate([s["identity"] for s in states])
        twin = np.concatenate([s["twin"] for s in states])
        pairs = generate_pairs(ident, twin, max_pairs=states[0]["max_pairs"], seed=states[0]["seed"])
        scores = cosine_scores(emb, pairs.a, pairs.b)
        flat = summary_metrics(verification_report(scores, pairs.label, pairs.twin, seed=states[0]["seed"]))
        out = {k: flat[k] for k in VerificationMetrics.KEPT if k in flat}
        out["threshold"] = flat["best_threshold"]
        for k in VerificationMetrics.TWIN:
            out[f"twin_{k}"] = flat[f"twin_{k}"] if pairs.twin.any() else NotComputed("no co-twin impostor pairs")
        if pairs.label.all() or not pairs.label.any():
            why = NotComputed("needs genuine and impostor pairs")
            out.update({k: why for k, v in out.items() if v != v})
        log.info("validation pairs: %d genuine, %d impostor (%d co-twin)", pairs.label.sum(), (~pairs.label).sum(),
                 pairs.twin.sum())
        return out
