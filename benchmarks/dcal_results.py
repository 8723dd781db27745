"""Reproduce the DCAL results table of docs/results.md in one run (CPU is enough).

    python benchmarks/dcal_results.py                       # all datasets -> runs/dcal_results/
    python benchmarks/dcal_results.py --datasets orl --steps 100 --out /tmp/r

For every dataset, DCAL (SA + GLCA + PWCA) and the plain-ViT baseline
(``use_glca: false, use_pwca: false``: same ViT, heads, metric loss, data,
augmentation, optimizer, LR schedule, batch size and number of optimizer
steps) are trained by the real trainer (``dist_train.main.train``, one CPU
process, fp32) and their *final* weights are evaluated on identities never
seen in training (no checkpoint selection on test data).

Datasets
--------
* ``orl``: ``../shared/data/orl_faces`` (40 identities x 10 grey 92x112 images)
  packed with ``biomtl shards create --format folder``; 30 identities train, 10 test.
* ``cmu``: ``../shared/data/cmu_faces`` at scale ``_4`` (32x30) packed with
  ``biomtl shards create --format cmu --scale 4``; 15 identities train, 5 test.
* ``synthetic``: the built-in synthetic faces with co-twins (``twin_fraction``
  0.5, identity-disjoint train/val/test, twins kept in the same split).

ORL/CMU have no validation split here: the trainer validates on the test
identities *for monitoring only* (logged curves); nothing is selected with it.
Metrics (``dist_train.evaluation``) come from the recipe's end-of-training test
report (``RUN/eval/test/metrics.json``): all genuine and all impostor pairs
of the test identities (twin impostors separately on synthetic data); EER
and TAR@FAR=1e-2 need no threshold. Note that a DCAL step costs about twice a
baseline step (the PWCA branch is a second pass through the blocks in
training); the budget compared is the same number of optimizer steps.

Writes ``OUT/results.json``, ``OUT/results.md`` (the table) and one run
directory per (dataset, model) with its logs, plots and evaluation pictures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"
MODELS = {"DCAL": {"use_glca": "true", "use_pwca": "true"}, "ViT baseline": {"use_glca": "false", "use_pwca": "false"}}


def pack(kind: str, out: Path) -> Path:
    """Shards of a real dataset via ``biomtl shards create`` (the shards package's API)."""
    if (out / "manifest.json").is_file():
        return out
    try:
        from shards.cli import run as shards_run
    except ImportError as exc:  # pragma: no cover - the shards CLI is part of the toolkit
        raise SystemExit(f"biomtl shards create is not available ({exc}); cannot pack {kind}") from None
    if kind == "orl":
        args = ["create", "--format", "folder", "--input", str(SHARED / "orl_faces")]
    else:
        args = ["create", "--format", "cmu", "--input", str(SHARED / "cmu_faces"), "--scale", "4"]
    args += ["--output", str(out), "--splits", "train=0.75,test=0.25", "--split-by", "identity", "--seed", "0",
             "--no-progress", "--workers", "1"]
    rc = shards_run(args, prog="biomtl shards")
    if rc != 0 or not (out / "manifest.json").is_file():
        raise SystemExit(f"packing {kind} failed (exit {rc})")
    return out


def overrides(dataset: str, data_dir: Path | None, out: Path, steps: int, model: dict[str, str],
              name: str) -> list[str]:
    o = {
        "experiment.name": name,
        "experiment.output_dir": str(out / "runs"),
        "experiment.seed": 0,
        "data.batch_size": 32,
        "data.num_workers": 0,
        "recipe.params.backbone": "vit_tiny_patch16_224",
        "recipe.params.img_size": 32,
        "recipe.params.patch_size": 8,          # 4x4 tokens
        "recipe.params.depth": 4,
        "recipe.params.top_r": 0.3,             # R = 5 of 16 patches (0.1 would leave 2)
        "recipe.params.crop_scale_min": 0.85,
        "train.precision": "fp32",              # bf16 autocast is 5-10x slower on CPUs without bf16 units
        "train.max_steps": steps,
        "train.val_every_steps": steps,         # validate once, at the end (monitoring only)
        "train.lr": 1.0e-3,
        "train.scheduler.warmup_ratio": 0.1,
        "train.early_stopping.metrics": "[]",
        "train.early_stopping.modes": "[]",
        "train.log_every_steps": 25,
        "logging.progress": "false",
        "logging.plot": "true",
        "logging.tracking": "none",
    }
    if dataset == "synthetic":
        o.update({"data.source": "synthetic", "data.synthetic.num_identities": 48,
                  "data.synthetic.samples_per_identity": 12, "data.synthetic.twin_fraction": 0.5,
                  "data.synthetic.image_size": 32, "data.synthetic.split_by": "identity",
                  "data.synthetic.cache_dir": str(out / "data")})
    else:
        o.update({"data.source": "shards", "data.shards": str(data_dir), "data.val_split": "test"})
    o.update({f"recipe.params.{k}": v for k, v in model.items()})
    return [f"{k}={v}" for k, v in o.items()]


def train_and_read(dataset: str, data_dir: Path | None, out: Path, steps: int, label: str) -> dict:
    from dist_train.config import load_config
    from dist_train.main import train

    name = f"{dataset}_{'dcal' if label == 'DCAL' else 'vit'}"
    cfg = load_config(REPO / "configs" / "dcal_twins.yaml", overrides(dataset, data_dir, out, steps, MODELS[label], name))
    before = set((out / "runs").glob(f"{name}_*")) if (out / "runs").is_dir() else set()
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg, None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    (run,) = set((out / "runs").glob(f"{name}_*")) - before
    m = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    a, t = m["all_impostors"], m["twin_impostors"]
    return {"dataset": dataset, "model": label, "run": str(run), "steps": steps, "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "test_samples": m["samples"], "test_identities": m["identities"],
            "pairs": m["pairs"], "eer": a["eer"], "auc": a["auc"], "tar_at_far_1e-2": a["tar_at_far_0.01"],
            "acc_10fold": a["acc_10fold"], "twin_eer": t.get("eer"), "twin_auc": t.get("auc"),
            "twin_tar_at_far_1e-2": t.get("tar_at_far_0.01")}


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
    lines = ["| dataset (test ids / images) | model | EER (all impostors) | TAR@FAR=1e-2 | AUC | "
             "twin-impostor EER | train wall / CPU s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} ({r['test_identities']} / {r['test_samples']}) | {r['model']} | "
                     f"{pct(r['eer'])} | {pct(r['tar_at_far_1e-2'])} | {r['auc']:.3f} | "
                     f"{pct(r['twin_eer']) if r['pairs']['twin_impostor'] else 'no twins'} | "
                     f"{r['wall_s']:.0f} / {r['cpu_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "dcal_results")
    ap.add_argument("--datasets", default="orl,cmu,synthetic")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: per dataset)")
    args = ap.parse_args()
    default_steps = {"orl": 180, "cmu": 180, "synthetic": 180}
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    for ds in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if ds not in default_steps:
            raise SystemExit(f"unknown dataset {ds!r} (orl, cmu, synthetic)")
        data_dir = None if ds == "synthetic" else pack(ds, args.out / "shards" / ds)
        for label in MODELS:
            r = train_and_read(ds, data_dir, args.out, args.steps or default_steps[ds], label)
            rows.append(r)
            print(json.dumps(r), flush=True)
    total = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "total": total}, indent=1))
    md = table(rows) + f"\n\nTotal: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU (this process).\n"
    (args.out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
