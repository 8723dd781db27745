"""The photometric_mtl recipe on real faces: CMU Face Images (``../shared/data/cmu_faces``)
as one grey modality, tasks identity (20), pose (4), expression (4, the recipe's
``emotion``) and sunglasses (2, its ``spectacles``); closed-set split by sample.

    python benchmarks/photometric_cmu.py                        # -> runs/photometric_cmu/
    python benchmarks/photometric_cmu.py --steps 300 --seed 1 --out /tmp/cmu
    python benchmarks/photometric_cmu.py --set recipe.params.adversarial_weight=0

1. ``biomtl shards create --format cmu --scale 2 --split-by sample`` (64x60 images,
   train/val/test = 0.6/0.2/0.2, split seed = ``--seed``) into ``OUT/shards``;
2. trivial baselines per task on the test split: the training split's majority
   class, and the nearest training image on raw pixels (Euclidean, the recipe's
   eval transform: 64x64, scaled);
3. the recipe through the real trainer (``dist_train/main.py``, one CPU process,
   one thread, fp32), the *final* weights evaluated on the test split
   (``RUN/final_metrics.json``, ``test_*``).

Writes ``OUT/results.json`` and ``OUT/results.md``; prints the table and the
CPU seconds of the training process.
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

CONFIG = REPO / "configs" / "photometric_mtl.yaml"
TASKS = {"identity": ("identity", "identity_top1"), "pose": ("pose", "pose_acc"),
         "expression": ("emotion", "emotion_acc"), "sunglasses": ("spectacles", "spectacles_acc")}
TARGETS = {"identity": 0.95, "pose": 0.95, "sunglasses": 0.98}


def overrides(args: argparse.Namespace) -> list[str]:
    o = {
        "experiment.name": f"cmu_seed{args.seed}", "experiment.seed": args.seed,
        "experiment.output_dir": str(args.out / "runs"),
        "data.source": "shards", "data.shards": str(args.out / "shards"), "data.batch_size": args.batch,
        "recipe.params.modality": "image", "recipe.params.backbone": "cbam_resnet",
        "recipe.params.img_size": 64, "recipe.params.cbam_width": args.width,
        "recipe.params.cbam_blocks": "[1,1,1,1]", "recipe.params.embedding_dim": args.embedding,
        "recipe.params.nonid_dim": 128, "recipe.params.attributes": "[pose,emotion,spectacles]",
        "recipe.params.crop_scale_min": 0.85,
        "train.precision": "fp32", "train.epochs": 1000, "train.max_steps": args.steps, "train.lr": args.lr,
        "train.val_every_steps": max(args.steps // 4, 1), "train.log_every_steps": 25,
        "train.early_stopping.metrics": "[]", "train.early_stopping.modes": "[]",
        "logging.progress": "false", "logging.tracking": "none", "logging.plot": "false",
    }
    return [f"{k}={v}" for k, v in o.items()] + list(args.set)


def make_shards(args: argparse.Namespace) -> Path:
    out = args.out / "shards"
    if (out / "manifest.json").is_file():
        return out
    from shards.cli import run as shards_cli

    rc = shards_cli(["create", "--format", "cmu", "--input", str(args.data), "--output", str(out), "--scale", "2",
                     "--split-by", "sample", "--splits", "train=0.6,val=0.2,test=0.2", "--seed", str(args.seed),
                     "--workers", "1", "--no-progress"])
    if rc:
        raise SystemExit(f"shards create failed (exit {rc})")
    return out


def split_arrays(data: Path, split: str, recipe) -> tuple[dict, "object"]:
    import numpy as np

    from shards.stream import build_eval_loader

    xs, labels = [], {k: [] for k in TASKS}
    for batch in build_eval_loader(data, split, recipe.transform, 64, 0, 1, 0):
        valid = batch["_valid"].numpy().astype(bool)
        xs.append(batch["image"].flatten(1).numpy()[valid])
        for name, (key, _) in TASKS.items():
            labels[name].append(batch[key].numpy()[valid])
    return {k: np.concatenate(v) for k, v in labels.items()}, np.concatenate(xs)


def baselines(data: Path, args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from dist_train.config import load_config, recipe_params
    from recipes.base import get_recipe
    from shards.manifest import Manifest

    torch.set_num_threads(1)
    cfg = load_config(CONFIG, overrides(args))
    recipe = get_recipe("photometric_mtl")(recipe_params(cfg), Manifest.load(data).data_info())
    y_tr, x_tr = split_arrays(data, "train", recipe)
    y_te, x_te = split_arrays(data, "test", recipe)
    d = (x_te ** 2).sum(1)[:, None] - 2 * x_te @ x_tr.T + (x_tr ** 2).sum(1)[None]
    nn_idx = d.argmin(1)
    out = {"n_train": int(len(x_tr)), "n_test": int(len(x_te))}
    for name in TASKS:
        majority = np.bincount(y_tr[name]).argmax()
        out[f"{name}_majority"] = float((y_te[name] == majority).mean())
        out[f"{name}_nn_pixels"] = float((y_te[name] == y_tr[name][nn_idx]).mean())
    return out


def train(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(REPO / "dist_train" / "main.py"), "--config", str(CONFIG), *overrides(args)]
    t0, c0 = time.time(), os.times()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    c1 = os.times()
    if proc.returncode:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    run = max((args.out / "runs").glob(f"cmu_seed{args.seed}_*"), key=lambda p: p.stat().st_mtime)
    final = json.loads((run / "final_metrics.json").read_text())
    row = {"run": str(run), "wall_s": round(time.time() - t0, 1),
           "cpu_s": round(c1.children_user - c0.children_user + c1.children_system - c0.children_system, 1)}
    for name, (_, metric) in TASKS.items():
        row[name] = final.get(f"test_{metric}")
    row["eer_closed_set"] = final.get("test_eer")
    return row


def table(base: dict, res: dict) -> str:
    lines = ["| task | majority class | 1-NN raw pixels | photometric_mtl | target |", "|---|---|---|---|---|"]
    for name in TASKS:
        target = f">= {TARGETS[name]:.0%}" if name in TARGETS else "-"
        lines.append(f"| {name} | {base[f'{name}_majority']:.3f} | {base[f'{name}_nn_pixels']:.3f} | "
                     f"{res[name]:.3f} | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cmu_faces")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "photometric_cmu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--embedding", type=int, default=512)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further config override, e.g. recipe.params.adversarial_weight=0 (repeatable)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: no CMU faces at {args.data}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_shards(args)
    base = baselines(data, args)
    res = train(args)
    md = table(base, res)
    print(md)
    print(f"train {base['n_train']} / test {base['n_test']} images; training {res['cpu_s']} CPU-s "
          f"({res['wall_s']} s wall); closed-set EER {res['eer_closed_set']}")
    (args.out / "results.json").write_text(json.dumps({"baselines": base, "photometric_mtl": res,
                                                       "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    (args.out / "results.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
