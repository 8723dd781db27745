"""Why a THz-only student does (not) gain from its THz + visible teacher: the
measurements behind the "Why" part of docs/results.md's THz section.

    python benchmarks/thz_diagnose.py pixels [--seed 0] [--size 32]
    python benchmarks/thz_diagnose.py run RUN_DIR [--mtl RUN_DIR] [--batches 6] [--checkpoint FILE]

``pixels``: what the concealment removes and what stays, in 8-bit levels, on the
synthetic dataset of ``benchmarks/thz_results.py`` (40 identities x 12, seed =
the training seed). For every concealed sample, the covered pixels are those
where the dense-fabric THz image differs from its unconcealed target by more
than 2 levels; on them: the target's own structure (standard deviation), how
much of it the concealed image still carries (least-squares slope and r^2 of
concealed on target) and what the fabric adds (the residual's standard
deviation). The same for the visible image the teacher sees (grey levels).

``run``: a finished ``thz_distill`` run (its last checkpoint holds teacher and
student) and optionally a ``thz_mtl`` run of the same seed, on the test split:
EER of the student, the teacher and thz_mtl on pairs of two unconcealed
images, one of each, two concealed; the agreement of teacher and student
(Pearson r of the pairwise cosine similarities); and, on ``--batches``
training batches in training mode, the cosine between the gradient of each
loss term and the gradient of SupCon (the verification loss) on the student's
shared parameters (encoder and embedding layer).

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------- pixels

def _region_stats(conc: "np.ndarray", target: "np.ndarray") -> dict:
    """Least squares ``conc ~ a * target + b`` on the covered pixels, in 8-bit levels."""
    import numpy as np

    t, c = target.astype(np.float64), conc.astype(np.float64)
    tc, cc = t - t.mean(), c - c.mean()
    var_t = float((tc ** 2).mean())
    slope = float((tc * cc).mean() / var_t) if var_t > 0 else 0.0
    resid = cc - slope * tc
    r2 = 1.0 - float((resid ** 2).mean()) / float((cc ** 2).mean()) if (cc ** 2).mean() > 0 else 0.0
    return {"target_std": var_t ** 0.5, "slope": slope, "r2": r2, "added_std": float(resid.std())}


def pixel_accounting(seed: int, size: int, identities: int = 40, samples: int = 12) -> dict:
    """Per modality (``thz_dense``, ``vis`` in grey), the mean over concealed samples of
    :func:`_region_stats` on the covered pixels, and the covered share of the image."""
    import numpy as np

    from shards.synthetic import SyntheticSpec, render_sample

    spec = SyntheticSpec(num_identities=identities, samples_per_identity=samples, image_size=size, seed=seed,
                         modalities=("thz_dense", "vis", "vis_target"), split_by="identity")
    rows: dict[str, list[dict]] = {"thz_dense": [], "vis": []}
    covered = []
    for i in range(identities):
        for k in range(samples):
            s = render_sample(spec, i, k)
            if not s["labels"]["concealed"]:
                continue
            mask = np.abs(s["thz_dense"].astype(int) - s["thz_target"].astype(int)) > 2
            if mask.sum() < 4:
                continue
            covered.append(float(mask.mean()))
            rows["thz_dense"].append(_region_stats(s["thz_dense"][mask], s["thz_target"][mask]))
            grey = [x.astype(np.float64).mean(2) for x in (s["vis"], s["vis_target"])]
            rows["vis"].append(_region_stats(grey[0][mask], grey[1][mask]))
    out = {"concealed_samples": len(covered), "covered_fraction": float(np.mean(covered))}
    for name, rs in rows.items():
        out[name] = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
    return out


# ----------------------------------------------------------------------------- trained runs

def _eer(scores: "np.ndarray", labels: "np.ndarray") -> float:
    from sklearn.metrics import roc_curve

    from recipes.verification import eer_from_roc

    if labels.all() or not labels.any():
        return float("nan")
    return eer_from_roc(*roc_curve(labels, scores))[0]


def _test_embeddings(engine, teacher: bool) -> dict:
    """Student (or thz_mtl) embeddings, and the teacher's when asked, on the test split."""
    import numpy as np
    import torch

    from dist_train.commands.eval_cmd import resolve_data_dir
    from shards.stream import build_eval_loader

    model = engine.model.eval()
    cols: dict[str, list] = {"student": [], "teacher": [], "identity": [], "concealed": []}
    with torch.no_grad():
        for batch in build_eval_loader(resolve_data_dir(engine.config), "test", engine.recipe.transform,
                                       32, 0, 1, 0):
            valid = batch["_valid"].numpy().astype(bool)
            cols["student"].append(model.embed(batch["image"]).numpy()[valid])
            if teacher:
                cols["teacher"].append(model.teacher(batch["image"], batch["vis"], reconstruct=False)
                                       ["embedding"].numpy()[valid])
            cols["identity"].append(batch["identity"].numpy()[valid])
            cols["concealed"].append(batch["concealed"].numpy()[valid])
    return {k: np.concatenate(v) for k, v in cols.items() if v}


def _pair_table(emb: dict, names: tuple[str, ...]) -> dict:
    """EER per pair kind (0, 1 or 2 concealed images) of each embedding in ``names``,
    and the Pearson r of teacher and student pair similarities."""
    import numpy as np

    a, b = np.triu_indices(len(emb["identity"]), k=1)
    label = emb["identity"][a] == emb["identity"][b]
    n_conc = emb["concealed"][a] + emb["concealed"][b]
    sims = {}
    for name in names:
        e = emb[name] / np.linalg.norm(emb[name], axis=1, keepdims=True)
        sims[name] = np.einsum("ij,ij->i", e[a], e[b])
    out: dict = {"pairs": {str(k): {"genuine": int((label & (n_conc == k)).sum()),
                                    "impostor": int((~label & (n_conc == k)).sum())} for k in (0, 1, 2)}}
    for name in names:
        out[name] = {"all": _eer(sims[name], label),
                     **{f"concealed_{k}": _eer(sims[name][n_conc == k], label[n_conc == k]) for k in (0, 1, 2)}}
    if "teacher" in sims:
        out["teacher_student_r"] = float(np.corrcoef(sims["teacher"], sims["student"])[0, 1])
        for k in (0, 1, 2):
            m = n_conc == k
            out[f"teacher_student_r_concealed_{k}"] = float(np.corrcoef(sims["teacher"][m], sims["student"][m])[0, 1])
    return out


def gradient_cosines(engine, batches: int) -> dict:
    """Mean over training batches of cos(grad term, grad supcon) on the student's
    encoder + embedding layer (the parameters every term reaches)."""
    import numpy as np
    import torch

    from dist_train.commands.eval_cmd import resolve_data_dir
    from shards import batching

    model = engine.model.train()
    net = model.student.net
    shared = [p for p in (*net.encoder.parameters(), *net.heads.embedding.parameters()) if p.requires_grad]
    cfg = engine.config
    loader = batching.build_triplet_loader(resolve_data_dir(cfg), "train", engine.recipe.transform,
                                           cfg.data.batch_size, 0, 1, 0, cfg.experiment.seed, 0,
                                           twin_prob=cfg.data.twin_prob)
    cos: dict[str, list[float]] = {}
    norms: dict[str, list[float]] = {}
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        terms = model(batch)["terms"]
        names = [n for n in terms if not n.startswith("teacher_") and terms[n].requires_grad]
        grads = {}
        for n in names:
            g = torch.autograd.grad(terms[n], shared, retain_graph=True, allow_unused=True)
            grads[n] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, shared)])
        ref = grads["supcon"]
        for n, g in grads.items():
            cos.setdefault(n, []).append(float(torch.nn.functional.cosine_similarity(g, ref, dim=0)))
            norms.setdefault(n, []).append(float(g.norm()))
    return {n: {"cos_with_supcon": float(np.mean(c)), "grad_norm": float(np.mean(norms[n]))} for n, c in cos.items()}


def run_report(run: Path, mtl: Path | None, batches: int, checkpoint: Path | None = None) -> dict:
    import torch

    from dist_train.checkpoint import LATEST, checkpoint_path
    from dist_train.inference import InferenceEngine

    torch.set_num_threads(1)
    engine = InferenceEngine.from_checkpoint(checkpoint or checkpoint_path(run, LATEST), "cpu")
    emb = _test_embeddings(engine, teacher=True)
    names = ("student", "teacher")
    if mtl is not None:
        emb["thz_mtl"] = _test_embeddings(InferenceEngine.from_checkpoint(checkpoint_path(mtl, LATEST), "cpu"),
                                          teacher=False)["student"]
        names += ("thz_mtl",)
    out = {"run": str(run), "checkpoint": str(checkpoint or "latest"), "mtl_run": str(mtl) if mtl else None, "eer_by_pair_kind": _pair_table(emb, names)}
    torch.manual_seed(0)
    out["gradient"] = gradient_cosines(engine, batches)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    px = sub.add_parser("pixels")
    px.add_argument("--seed", type=int, default=0)
    px.add_argument("--size", type=int, default=32)
    rn = sub.add_parser("run")
    rn.add_argument("run", type=Path)
    rn.add_argument("--mtl", type=Path)
    rn.add_argument("--batches", type=int, default=6)
    rn.add_argument("--checkpoint", type=Path, help="this checkpoint of the run (default: its last)")
    args = ap.parse_args()
    if args.what == "pixels":
        res = pixel_accounting(args.seed, args.size)
    else:
        res = run_report(args.run, args.mtl, args.batches, args.checkpoint)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
