"""The THz report: per sample, per identity, per posture; pictures; verification.

Written by ``thz_mtl`` / ``thz_distill`` after training (``run_dir/eval/test``,
threshold picked on the val split) and by ``biomtl eval`` for their checkpoints
(``--output``, threshold as the command resolves it). Into the output directory:

- ``per_sample.csv``: ``key, identity, posture, posture_pred, concealed, ssim,
  psnr, lpips, pos_key, pos_score, neg_key, neg_score``. Each sample's
  verification pair: ``pos`` = the next sample (by key, cyclically) of the same
  identity, ``neg`` = the sample at the same position among the co-twin's
  samples when the co-twin is in the split, else among the next identity's (by
  index, cyclically); scores are cosine similarities of the embeddings (empty
  when no such sample exists). ``lpips`` is empty without LPIPS weights.
- ``per_identity.csv`` and ``per_posture.csv``: means of the above;
- ``reconstructions.png``: rows of concealed input | reconstruction | target
  (concealed samples first); ``posture_confusion.png``;
- the verification report of :func:`recipes.verification_plots.write_report`
  on the split's pairs: ``metrics.json`` (which also holds the reconstruction and
  posture summaries), ``roc.png``, ``score_histograms.png``, ``hardest_errors.png``.

A rich table (per posture and overall) is printed. After training,
``plots/latest_val.png`` plots the validation history
(``ArtifactContext.validation_history``) by kind (``plots/latest.png``, the
training curves, is the trainer's).
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from recipes import verification as ev
from recipes.base import ArtifactContext, EvalContext
from recipes.batch import label_column, move_batch, sample_keys, valid_mask
from recipes.history_plots import plot_history
from recipes.verification_plots import write_report

log = logging.getLogger("biomtl.thz")

Publish = Callable[[Path, Callable[[Path], None]], Any]
QUALITY = ("ssim", "psnr", "lpips")


# ----------------------------------------------------------------------------- one pass over a split

def _u8(x: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [0, 1] -> ``[B, H, W]`` (grey) or ``[B, H, W, 3]`` uint8."""
    a = (x.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
    return a[:, 0] if a.shape[1] == 1 else np.moveaxis(a[:, :3], 1, -1)


def collect(module: nn.Module, batches: Iterable[Mapping[str, Any]], grid: int = 8,
            advance: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``module`` (eval mode, no grad) over evaluation batches; the real rows'
    keys, labels, predictions, quality, embeddings, THz inputs (uint8) and up to
    ``grid`` (input, reconstruction, target) triples of concealed samples (then
    any samples)."""
    param = next(module.parameters())
    was_training = module.training
    module.eval()
    cols: dict[str, list[np.ndarray]] = {}
    keys: list[str] = []
    shown: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, int]] = []

    def add(name: str, v: np.ndarray) -> None:
        cols.setdefault(name, []).append(v)

    try:
        with torch.no_grad():
            for batch in batches:
                out = module(move_batch(batch, param.device, param.dtype))
                n = out["embedding"].shape[0]
                valid = valid_mask(batch, n)
                k = sample_keys(batch, n)
                keys += [k[j] for j in np.flatnonzero(valid)]
                add("embedding", out["embedding"].float().cpu().numpy()[valid])
                for name in ("identity", "twin", "posture", "concealed"):
                    add(name, label_column(batch, name, n)[valid])
                add("posture_pred", out["posture_logits"].float().argmax(1).cpu().numpy()[valid])
                quality = out.get("quality") or {}
                for name in QUALITY:
                    add(name, quality[name].float().cpu().numpy()[valid] if name in quality
                        else np.full(int(valid.sum()), np.nan))
                add("input", _u8(batch["image"])[valid])
                if "reconstruction" in out and "target" in batch and len(shown) < 2 * grid:
                    rec, tgt = _u8(out["reconstruction"]), _u8(batch["target"])
                    conc = label_column(batch, "concealed", n)
                    inp = _u8(batch["image"])
                    for j in np.flatnonzero(valid):
                        if len(shown) < 2 * grid:
                            shown.append((k[j], inp[j], rec[j], tgt[j], int(conc[j])))
                if advance is not None:
                    advance()
    finally:
        module.train(was_training)
    table = {name: np.concatenate(v) for name, v in cols.items()}
    table["keys"] = keys
    table["shown"] = shown
    return table


def merge(parts: Sequence[Mapping[str, Any]], grid: int = 8) -> dict[str, Any]:
    """One table from the tables of several ranks, rows sorted by key."""
    parts = [p for p in parts if len(p["keys"])]
    if not parts:
        return {"keys": [], "shown": []}
    keys = [k for p in parts for k in p["keys"]]
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    out: dict[str, Any] = {"keys": [keys[i] for i in order]}
    for name in parts[0]:
        if name not in ("keys", "shown"):
            out[name] = np.concatenate([p[name] for p in parts])[order]
    shown = sorted((s for p in parts for s in p["shown"]), key=lambda s: (-s[4], s[0]))
    out["shown"] = shown[:grid]
    return out


# ----------------------------------------------------------------------------- summaries

def pair_partners(keys: Sequence[str], identity: np.ndarray, twin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's genuine and impostor partner (indices, -1 = none); see the module doc."""
    n = len(keys)
    pos, neg = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    order = sorted(range(n), key=lambda i: keys[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        if identity[i] >= 0:
            groups.setdefault(int(identity[i]), []).append(i)
    ids = sorted(groups)
    for g, members in groups.items():
        if len(ids) > 1:
            t = int(twin[members[0]]) if members else -1
            other = t if t in groups and t != g else ids[(ids.index(g) + 1) % len(ids)]
        else:
            other = None
        for r, i in enumerate(members):
            if len(members) > 1:
                pos[i] = members[(r + 1) % len(members)]
            if other is not None:
                neg[i] = groups[other][r % len(groups[other])]
    return pos, neg


def _mean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)] if v.dtype.kind == "f" else v
    return float(v.mean()) if v.size else float("nan")


def summary(t: Mapping[str, Any]) -> dict[str, float]:
    """Reconstruction and posture means over the table's rows."""
    from sklearn.metrics import f1_score

    out = {name: _mean(t[name]) for name in QUALITY if name in t and np.isfinite(t[name]).any()}
    conc = t["concealed"] == 1
    out["ssim_concealed"] = _mean(t["ssim"][conc])
    out["psnr_concealed"] = _mean(t["psnr"][conc])
    m = t["posture"] >= 0
    out["posture_acc"] = float((t["posture"][m] == t["posture_pred"][m]).mean()) if m.any() else float("nan")
    out["posture_macro_f1"] = (float(f1_score(t["posture"][m], t["posture_pred"][m], average="macro",
                                              zero_division=0)) if m.any() else float("nan"))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]], publish: Publish) -> None:
    rows = list(rows)

    def write(tmp: Path) -> None:
        with Path(tmp).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows([[_fmt(v) for v in r] for r in rows])

    publish(path, write)


def _group_rows(t: Mapping[str, Any], by: np.ndarray, names: Callable[[int], str],
                scores: Mapping[str, np.ndarray]) -> list[list[Any]]:
    rows = []
    for g in sorted(set(by.tolist())):
        m = by == g
        y, yp = t["posture"][m], t["posture_pred"][m]
        lab = y >= 0
        rows.append([names(g), int(m.sum()), int((t["concealed"][m] == 1).sum()),
                     *[_mean(t[q][m]) for q in QUALITY],
                     float((y[lab] == yp[lab]).mean()) if lab.any() else float("nan"),
                     _mean(scores["pos"][m]), _mean(scores["neg"][m])])
    return rows


# ----------------------------------------------------------------------------- pictures

def plot_reconstructions(shown: Sequence[tuple], out: Path, publish: Publish) -> bool:
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 3, figsize=(6, 2 * len(shown)), squeeze=False)
    for r, (key, inp, rec, tgt, conc) in enumerate(shown):
        for c, (img, title) in enumerate(((inp, f"{key} ({'concealed' if conc == 1 else 'unconcealed'})"),
                                          (rec, "reconstruction"), (tgt, "target"))):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    try:
        publish(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)
    return True


def confusion(t: Mapping[str, Any], classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    m = t["posture"] >= 0
    return confusion_matrix(t["posture"][m], t["posture_pred"][m], labels=list(range(classes)))


def plot_confusion(cm: np.ndarray, names: Sequence[str], out: Path, publish: Publish) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted posture")
    ax.set_ylabel("true posture")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    try:
        publish(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)


# panels of plots/latest_val.png: title -> validation metrics drawn together
VAL_PANELS = {"reconstruction": ("ssim", "ssim_concealed", "lpips"), "psnr (dB)": ("psnr",),
              "posture": ("posture_acc", "posture_macro_f1"), "verification": ("eer", "auc", "best_acc"),
              "loss": ("loss",)}


# ----------------------------------------------------------------------------- the report

def write_thz_report(out_dir: Path, t: Mapping[str, Any], pairs: ev.Pairs, publish: Publish, *,
                     threshold: float | None, threshold_source: str, identity_names: Sequence[str],
                     posture_names: Sequence[str], extra: Mapping[str, Any] | None = None, seed: int = 0,
                     title: str = "", print_table: bool = True) -> dict[str, Any]:
    """Write everything of the module doc for table ``t`` (:func:`collect` / :func:`merge`)
    and verification ``pairs`` on it; return ``metrics.json``'s content."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    emb = t["embedding"]
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    pos, neg = pair_partners(t["keys"], t["identity"], t["twin"])
    scores = {name: np.where(idx >= 0, np.einsum("ij,ij->i", e, e[np.maximum(idx, 0)]), np.nan)
              for name, idx in (("pos", pos), ("neg", neg))}

    def ident(i: int) -> str:
        return identity_names[i] if 0 <= i < len(identity_names) else str(i)

    def posture(i: int) -> str:
        return posture_names[i] if 0 <= i < len(posture_names) else str(i)

    keys = t["keys"]
    _write_csv(out_dir / "per_sample.csv",
               ["key", "identity", "posture", "posture_pred", "concealed", *QUALITY, "pos_key", "pos_score",
                "neg_key", "neg_score"],
               ([keys[i], ident(int(t["identity"][i])), posture(int(t["posture"][i])),
                 posture(int(t["posture_pred"][i])), int(t["concealed"][i]), *[float(t[q][i]) for q in QUALITY],
                 keys[pos[i]] if pos[i] >= 0 else "", float(scores["pos"][i]),
                 keys[neg[i]] if neg[i] >= 0 else "", float(scores["neg"][i])] for i in range(len(keys))),
               publish)
    group_header = ["samples", "concealed", *QUALITY, "posture_acc", "pos_score", "neg_score"]
    _write_csv(out_dir / "per_identity.csv", ["identity", *group_header],
               _group_rows(t, t["identity"], ident, scores), publish)
    by_posture = _group_rows(t, t["posture"], posture, scores)
    _write_csv(out_dir / "per_posture.csv", ["posture", *group_header], by_posture, publish)
    plot_reconstructions(t["shown"], out_dir / "reconstructions.png", publish)
    cm = confusion(t, len(posture_names))
    plot_confusion(cm, posture_names, out_dir / "posture_confusion.png", publish)
    summ = summary(t)
    table = {"embedding": emb, "identity": t["identity"], "twin": t["twin"], "keys": keys}
    errors = ev.hardest_error_keys(table, pairs) if len(pairs) else []
    index = {k: i for i, k in enumerate(keys)}
    images = {k: Image.fromarray(t["input"][index[k]]) for k in errors if k in index}
    metrics = write_report(out_dir, table, pairs, publish, threshold=threshold, threshold_source=threshold_source,
                           images=images, identity_names=identity_names, seed=seed, title=title,
                           extra={"reconstruction": {k: v for k, v in summ.items() if not k.startswith("posture")},
                                  "posture": {"accuracy": summ["posture_acc"], "macro_f1": summ["posture_macro_f1"],
                                              "confusion": cm.tolist(), "classes": list(posture_names)},
                                  **(extra or {})})
    if print_table:
        _print_table(by_posture, summ, metrics, title)
    return metrics


def _print_table(by_posture: list[list[Any]], summ: Mapping[str, float], metrics: Mapping[str, Any],
                 title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"THz report{': ' + title if title else ''}")
    for c in ("posture", "samples", "concealed", "SSIM", "PSNR", "LPIPS", "posture acc", "pos score", "neg score"):
        tab.add_column(c, justify="left" if c == "posture" else "right")
    for r in by_posture:
        tab.add_row(*[_fmt(v) or "-" for v in r])
    a = metrics["all_impostors"]
    nan = float("nan")
    tab.add_row("all", str(metrics["samples"]), "", _fmt(summ.get("ssim", nan)), _fmt(summ.get("psnr", nan)),
                _fmt(summ.get("lpips", float("nan"))) or "-", _fmt(summ["posture_acc"]), "", "")
    console = Console(stderr=True)
    console.print(tab)
    console.print(f"verification: EER {_fmt(a.get('eer'))}, AUC {_fmt(a.get('auc'))} "
                  f"({metrics['pairs']['genuine']} genuine / {metrics['pairs']['impostor']} impostor pairs)")


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalars the trainer logs as test metrics."""
    out = {k: float(v) for k, v in metrics["reconstruction"].items()}
    out["posture_acc"] = float(metrics["posture"]["accuracy"])
    out["posture_macro_f1"] = float(metrics["posture"]["macro_f1"])
    a = metrics["all_impostors"]
    for k in ("eer", "auc", "tar_at_far_0.01", "acc_10fold", "acc_at_threshold"):
        if k in a:
            out[k] = float(a[k])
    return out


# ----------------------------------------------------------------------------- entry points

def after_training(recipe: Any, model: nn.Module, ctx: ArtifactContext,
                   extra: Mapping[str, Any] | None = None) -> dict[str, float]:
    """``write_artifacts`` of the THz recipes: collect val and test on every rank,
    gather, and on rank 0 write the test report (threshold from val pairs) and
    ``plots/latest_val.png``. Returns the test metrics."""
    p = recipe.params
    module = getattr(model, "module", model)
    local = {role: collect(module, loader, p.report_grid) for role, loader in ctx.loaders.items()
             if role in ("val", "test")}
    gathered = ctx.gather(local)
    if not ctx.is_main:
        return {}
    run_dir = Path(ctx.run_dir)
    plot_history(list(ctx.validation_history), VAL_PANELS, run_dir / "plots" / "latest_val.png", ctx.publish)
    tables = {role: merge([g[role] for g in gathered], p.report_grid) for role in local}
    test = tables.get("test")
    if test is None or not test["keys"]:
        return {}
    threshold, source = None, "none"
    val = tables.get("val")
    if val is not None and val["keys"]:
        vp = ev.generate_pairs(val["identity"], val["twin"], p.val_max_pairs, p.pair_seed)
        if vp.label.any() and (~vp.label).any():
            _, threshold = ev.best_accuracy_threshold(ev.cosine_scores(val["embedding"], vp.a, vp.b), vp.label)
            source = "best accuracy on generated val pairs"
    pairs = ev.generate_pairs(test["identity"], test["twin"], p.val_max_pairs, p.pair_seed)
    out_dir = run_dir / "eval" / "test"
    metrics = write_thz_report(out_dir, test, pairs, ctx.publish, threshold=threshold, threshold_source=source,
                               identity_names=recipe.data_info.identities, posture_names=recipe.posture_names,
                               extra={"split": "test", "recipe": recipe.name, **(extra or {})}, seed=p.pair_seed,
                               title=f"test split, {recipe.name}")
    log.info("THz test report in %s", out_dir)
    flat = flat_metrics(metrics)
    if threshold is not None:
        flat["threshold"] = float(threshold)
    return flat


def for_eval_command(recipe: Any, model: nn.Module, ctx: EvalContext) -> dict[str, Any]:
    """``biomtl eval``'s report for a THz checkpoint (one process): the command's
    pairs and threshold, rows in the order of its embedding table."""
    p = recipe.params
    t = collect(model, ctx.loader(), p.report_grid)
    index = {k: i for i, k in enumerate(t["keys"])}
    missing = [k for k in ctx.table["keys"] if k not in index]
    if missing:
        raise KeyError(f"sample {missing[0]!r} of the embedding table was not seen again (non-deterministic loader?)")
    order = np.asarray([index[k] for k in ctx.table["keys"]], np.int64)
    t = {**{k: (v[order] if isinstance(v, np.ndarray) else v) for k, v in t.items()},
         "keys": list(ctx.table["keys"]), "shown": sorted(t["shown"], key=lambda s: (-s[4], s[0]))[:p.report_grid]}
    metrics = write_thz_report(Path(ctx.out_dir), t, ctx.pairs, ctx.publish, threshold=ctx.threshold,
                               threshold_source=ctx.threshold_source, identity_names=ctx.identity_names,
                               posture_names=recipe.posture_names, extra=dict(ctx.extra), seed=ctx.seed,
                               title=f"{ctx.split} split")
    print(f"wrote {ctx.out_dir}/metrics.json, per_sample.csv, per_identity.csv, per_posture.csv, "
          "reconstructions.png, posture_confusion.png, roc.png, score_histograms.png, hardest_errors.png")
    return metrics
