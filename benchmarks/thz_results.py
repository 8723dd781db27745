"""Reproduce the THz table of docs/results.md: the distilled student (teacher on THz +
visible, ``thz_distill``) against ``thz_mtl`` alone, same budget, several seeds.

    python benchmarks/thz_results.py                                # -> runs/thz_results/
    python benchmarks/thz_results.py --steps 100 --seeds 0 --out /tmp/r

Both recipes train with the real trainer (``dist_train/main.py``, one CPU
process with one thread, fp32) on the built-in synthetic THz faces (dense
fabric concealment, modalities ``thz_dense`` + ``vis``): the same network
(the ``custom`` small ResNet, ``--width``/``--depth``, embedding 128, MoE U-Net
with hard gating), data, triplet batches, augmentation, optimizer, LR schedule,
batch size and number of optimizer steps; ``thz_distill`` adds the teacher and
the distillation terms (a step costs about twice as much). The dataset seed is
the training seed. The *final* weights are evaluated on the test split
(identities never seen in training): the recipe's end-of-training report
(``RUN/eval/test/metrics.json``; the student only for ``thz_distill``).

``--frozen-teacher`` adds a two-stage student per seed: the joint run's teacher
(trained by then) is loaded frozen (``freeze_teacher``, ``teacher_weights``) and a
fresh student is distilled from it with ``--frozen-feature`` / ``--frozen-relation``
(similarity-preserving: the batch's pairwise cosine similarities) and no
posture-logit term.

``--residual`` trains both with residual reconstruction experts
(``recipe.params.residual=true``: the expert corrects the input's logit).

Two references on the same test images: the untrained model (the trainer's
initial weights for that seed) and "copy the input" (the concealed THz image
itself as the reconstruction: what a model has to beat to have removed any
concealment).

Writes ``OUT/results.json``, ``OUT/results.md`` and one run directory per (recipe, seed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPES = {"thz_mtl": REPO / "configs" / "thz_mtl.yaml", "thz_distill (student)": REPO / "configs" / "thz_distill.yaml"}
KEYS = ("ssim", "ssim_concealed", "psnr", "posture_acc", "eer", "auc")


def overrides(out: Path, seed: int, args: argparse.Namespace, distill: bool) -> list[str]:
    o = {
        "experiment.name": f"seed{seed}", "experiment.seed": seed, "experiment.output_dir": str(out),
        "data.synthetic.cache_dir": str(args.out / "data"),
        "data.synthetic.num_identities": args.identities, "data.synthetic.samples_per_identity": args.samples,
        "data.synthetic.image_size": args.size,
        # the same data for both recipes (thz_mtl reads no visible image; the files are shared)
        "data.synthetic.modalities": "[thz_dense,vis]",
        "data.batch_size": args.batch,
        "recipe.params.img_size": args.size, "recipe.params.width": args.width, "recipe.params.depth": args.depth,
        "train.precision": "fp32", "train.max_steps": args.steps, "train.val_every_steps": max(args.steps // 3, 1),
        "train.log_every_steps": 25, "logging.progress": "false", "logging.tracking": "none",
    }
    if distill:
        o["recipe.params.fusion_dim"] = args.fusion_dim
    if args.residual:
        o["recipe.params.residual"] = "true"
    return [f"{k}={v}" for k, v in o.items()]


FROZEN = "thz_distill (student of the frozen trained teacher)"


def train_and_read(recipe: str, config: Path, seed: int, args: argparse.Namespace, extra: tuple[str, ...] = (),
                   folder: str = "") -> dict:
    out = args.out / "runs" / (folder or recipe.split()[0])
    cmd = [sys.executable, str(REPO / "dist_train" / "main.py"), "--config", str(config),
           *overrides(out, seed, args, "distill" in recipe), *extra]
    t0, c0 = time.time(), os.times()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    c1 = os.times()
    if proc.returncode:
        raise SystemExit(f"{recipe} seed {seed} failed:\n{proc.stderr[-3000:]}")
    run = max(out.glob(f"seed{seed}_*"), key=lambda p: p.stat().st_mtime)
    final = json.loads((run / "final_metrics.json").read_text())
    row = {"recipe": recipe, "seed": seed, "run": str(run), "wall_s": round(time.time() - t0, 1),
           "cpu_s": round(c1.children_user - c0.children_user + c1.children_system - c0.children_system, 1)}
    row.update({k: final.get(f"test_{k}") for k in KEYS})
    if "distill" in recipe and not extra:
        row["teacher"] = teacher_metrics(run)
    return row


def frozen_teacher_run(joint: dict, seed: int, args: argparse.Namespace) -> dict:
    """A second student, distilled from the joint run's teacher (trained by then, and
    frozen), with the ``--frozen-*`` weights; no posture-logit term."""
    from dist_train.checkpoint import LATEST, checkpoint_path

    extra = ("recipe.params.freeze_teacher=true", f"recipe.params.teacher_weights={checkpoint_path(Path(joint['run']), LATEST)}",
             f"recipe.params.feature_weight={args.frozen_feature}", "recipe.params.logit_weight=0",
             f"recipe.params.relation_weight={args.frozen_relation}")
    return train_and_read(FROZEN, RECIPES["thz_distill (student)"], seed, args, extra, folder="thz_distill_frozen")


def teacher_metrics(run: Path) -> dict:
    """The distillation teacher itself (THz + visible) on the test split, from the run's
    last checkpoint (``model.pt`` holds the student only)."""
    import torch

    from dist_train.checkpoint import LATEST, checkpoint_path
    from dist_train.inference import InferenceEngine
    from recipes.batch import valid_mask
    from recipes.verification import VerificationMetrics
    from shards.stream import build_eval_loader

    torch.set_num_threads(1)
    engine = InferenceEngine.from_checkpoint(checkpoint_path(run, LATEST), "cpu")
    teacher, recipe = engine.model.teacher.eval(), engine.recipe
    from dist_train.commands.eval_cmd import resolve_data_dir

    data = resolve_data_dir(engine.config)
    ver = VerificationMetrics()
    hits, total = 0, 0
    with torch.no_grad():
        for batch in build_eval_loader(data, "test", recipe.transform, 32, 0, 1, 0):
            out = teacher(batch["image"], batch["vis"], reconstruct=False)
            ver.update(out, batch)
            valid = torch.as_tensor(valid_mask(batch, len(batch["image"])))
            hits += int(((out["posture_logits"].argmax(1) == batch["posture"]) & valid).sum())
            total += int(valid.sum())
    v = VerificationMetrics.compute([ver.state()])
    return {"eer": v["eer"], "auc": v["auc"], "posture_acc": hits / max(total, 1)}


def references(seed: int, args: argparse.Namespace) -> dict:
    """Untrained model and copy-the-input on the test split of this seed's data."""
    import numpy as np
    import torch

    from dist_train.config import load_config, recipe_params
    from dist_train.main import prepare_data, seed_everything
    from models.losses import ssim_index
    from recipes.base import get_recipe
    from shards.manifest import Manifest
    from shards.stream import build_eval_loader

    torch.set_num_threads(1)
    cfg = load_config(RECIPES["thz_mtl"], overrides(args.out / "unused", seed, args, False))
    # (with --residual the untrained model *is* copy-the-input: its output layer starts at zero)

    class _Ctx:
        class env:
            is_local_main = True

    data = prepare_data(cfg, _Ctx())
    recipe = get_recipe("thz_mtl")(recipe_params(cfg), Manifest.load(data).data_info())
    seed_everything(seed)
    model = recipe.build_model().eval()
    metrics = recipe.new_metrics()
    copy, copy_conc = [], []
    with torch.no_grad():
        for batch in build_eval_loader(data, "test", recipe.transform, 32, 0, 1, 0):
            metrics.update(model(batch), batch)
            valid = batch["_valid"].numpy().astype(bool)
            s = ssim_index(batch["image"], batch["target"], per_sample=True).numpy()[valid]
            copy.append(s)
            copy_conc.append(s[batch["concealed"].numpy()[valid] == 1])
    untrained = type(metrics).compute([metrics.state()])
    return {"seed": seed, "untrained": {k: untrained.get(k) for k in KEYS},
            "copy_ssim": float(np.concatenate(copy).mean()), "copy_ssim_concealed": float(np.concatenate(copy_conc).mean())}


def cell(rows: list[dict], key: str, fmt: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    return f"{fmt.format(mean)} ({', '.join(fmt.format(v) for v in vals)})"


def table(rows: list[dict], refs: list[dict]) -> str:
    head = ("| model | test SSIM | SSIM, concealed | PSNR dB | posture acc | EER | AUC | CPU s / run |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for recipe in (*RECIPES, FROZEN):
        rs = [r for r in rows if r["recipe"] == recipe]
        if not rs:
            continue
        lines.append(f"| {recipe} | {cell(rs, 'ssim', '{:.3f}')} | {cell(rs, 'ssim_concealed', '{:.3f}')} | "
                     f"{cell(rs, 'psnr', '{:.2f}')} | {cell(rs, 'posture_acc', '{:.3f}')} | "
                     f"{cell(rs, 'eer', '{:.3f}')} | {cell(rs, 'auc', '{:.3f}')} | {cell(rs, 'cpu_s', '{:.0f}')} |")
    teachers = [r["teacher"] for r in rows if "teacher" in r]
    if teachers:
        lines.append(f"| thz_distill teacher (THz + visible; not exported) | - | - | - | "
                     f"{cell(teachers, 'posture_acc', '{:.3f}')} | {cell(teachers, 'eer', '{:.3f}')} | "
                     f"{cell(teachers, 'auc', '{:.3f}')} | - |")
    un = [dict(r["untrained"]) for r in refs]
    lines.append(f"| untrained (initial weights) | {cell(un, 'ssim', '{:.3f}')} | {cell(un, 'ssim_concealed', '{:.3f}')} "
                 f"| {cell(un, 'psnr', '{:.2f}')} | {cell(un, 'posture_acc', '{:.3f}')} | {cell(un, 'eer', '{:.3f}')} "
                 f"| {cell(un, 'auc', '{:.3f}')} | - |")
    lines.append(f"| copy the input | {cell(refs, 'copy_ssim', '{:.3f}')} | {cell(refs, 'copy_ssim_concealed', '{:.3f}')}"
                 " | - | - | - | - | - |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "thz_results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16, help="anchors per step (each with a positive and a negative)")
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--fusion-dim", type=int, default=32)
    ap.add_argument("--residual", action="store_true", help="residual reconstruction experts (both recipes)")
    ap.add_argument("--frozen-teacher", action="store_true",
                    help="also distil a fresh student from each seed's trained teacher, frozen (two stages)")
    ap.add_argument("--frozen-feature", type=float, default=0.0, help="feature_weight of that student")
    ap.add_argument("--frozen-relation", type=float, default=1.0, help="relation_weight of that student")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, refs = [], []
    for seed in args.seeds:
        refs.append(references(seed, args))
        for recipe, config in RECIPES.items():
            rows.append(train_and_read(recipe, config, seed, args))
            print(json.dumps(rows[-1]), flush=True)
        if args.frozen_teacher:
            rows.append(frozen_teacher_run(rows[-1], seed, args))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows, "references": refs}, indent=1))
    text = (f"{'residual' if args.residual else 'direct'} reconstruction, {args.steps} steps x {args.batch} anchors, "
            f"{args.size} px, seeds {args.seeds}\n\n") + table(rows, refs)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
