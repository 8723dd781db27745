"""Reproduce the DCAL results table of docs/results.md in one run (CPU is enough).

    python benchmarks/dcal_results.py                       # all datasets -> runs/dcal_results/
    python benchmarks/dcal_results.py --datasets orl --steps 100 --seeds 0 --out /tmp/r

For every dataset, DCAL (SA + GLCA + PWCA) and the plain-ViT baseline
(``use_glca: false, use_pwca: false``: same ViT, heads, metric loss, data,
augmentation, optimizer, LR schedule, batch size and number of optimizer
steps) are trained by the real trainer (``dist_train.main.train``, one CPU
process, fp32; a 4-block ViT-Tiny, patch 8 at 32x32 px) with two training
seeds (``--seeds``), and their *final* weights are evaluated on identities
never seen in training (no checkpoint selection on test data).

Datasets
--------
* ``orl``: ``../shared/data/orl_faces`` (40 identities x 10 grey 92x112 images)
  packed with ``biomtl shards create --format folder``; 30 identities train, 10 test.
* ``cmu``: ``../shared/data/cmu_faces`` at scale ``_4`` (32x30) packed with
  ``biomtl shards create --format cmu --scale 4``; 15 identities train, 5 test.
* ``synthetic``: the built-in synthetic faces with co-twins (80 identities x 8
  images, ``twin_fraction`` 0.5, identity-disjoint train/val/test 70/15/15 %,
  co-twins kept in the same split; the dataset seed is the training seed, and
  seeds 0 and 1 both give 3 co-twin pairs among the 11 test identities).

ORL/CMU have no validation split here: the trainer validates on the test
identities *for monitoring only* (logged curves); nothing is selected with it.
Metrics (``recipes.verification``) come from the recipe's end-of-training test
report (``RUN/eval/test/metrics.json``): all genuine and all impostor pairs
of the test identities (twin impostors separately on synthetic data); EER
and TAR@FAR=1e-2 need no threshold. Note that a DCAL step costs about twice a
baseline step (the PWCA branch is a second pass through the blocks in
training); the budget compared is the same number of optimizer steps.

Writes ``OUT/results.json``, ``OUT/results.md`` (the table: mean over seeds,
then each seed's value) and one run directory per (dataset, model, seed) with
its logs, plots and evaluation pictures (``RUN/eval/test/*.png``).
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
              name: str, seed: int) -> list[str]:
    o = {
        "experiment.name": name,
        "experiment.output_dir": str(out / "runs"),
        "experiment.seed": seed,                # initialisation, data order, augmentation (and synthetic data)
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
        # 80 identities x 8 images; seeds 0 and 1 put 3 co-twin pairs among the ~11 test identities
        o.update({"data.source": "synthetic", "data.synthetic.num_identities": 80,
                  "data.synthetic.samples_per_identity": 8, "data.synthetic.twin_fraction": 0.5,
                  "data.synthetic.image_size": 32, "data.synthetic.split_by": "identity",
                  "data.synthetic.cache_dir": str(out / "data")})
    else:
        o.update({"data.source": "shards", "data.shards": str(data_dir), "data.val_split": "test"})
    o.update({f"recipe.params.{k}": v for k, v in model.items()})
    return [f"{k}={v}" for k, v in o.items()]


def train_and_read(dataset: str, data_dir: Path | None, out: Path, steps: int, label: str, seed: int) -> dict:
    from dist_train.config import load_config
    from dist_train.main import train

    name = f"{dataset}_{'dcal' if label == 'DCAL' else 'vit'}_seed{seed}"
    cfg = load_config(REPO / "configs" / "dcal_twins.yaml",
                      overrides(dataset, data_dir, out, steps, MODELS[label], name, seed))
    before = set((out / "runs").glob(f"{name}_*")) if (out / "runs").is_dir() else set()
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg, None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    (run,) = set((out / "runs").glob(f"{name}_*")) - before
    m = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    a, t = m["all_impostors"], m["twin_impostors"]
    return {"dataset": dataset, "model": label, "seed": seed, "run": str(run), "steps": steps,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "test_samples": m["samples"], "test_identities": m["identities"],
            "pairs": m["pairs"], "eer": a["eer"], "auc": a["auc"], "tar_at_far_1e-2": a["tar_at_far_0.01"],
            "acc_10fold": a["acc_10fold"], "twin_eer": t.get("eer"), "twin_auc": t.get("auc"),
            "twin_tar_at_far_1e-2": t.get("tar_at_far_0.01")}


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cell(rows: list[dict], key: str) -> str:
    """Mean over seeds, then the per-seed values."""
    vals = [r[key] for r in rows if r[key] is not None]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    return pct(mean) + (f" ({', '.join(pct(v) for v in vals)})" if len(vals) > 1 else "")


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    lines = ["| dataset: test identities / images | model | EER, all impostors | TAR@FAR=1e-2 | "
             "EER, twin impostors | AUC | train+eval CPU s |", "|---|---|---|---|---|---|---|"]
    for (ds, model), rs in groups.items():
        ids = "/".join(sorted({str(r["test_identities"]) for r in rs}))
        imgs = "/".join(sorted({str(r["test_samples"]) for r in rs}))
        twin = _cell(rs, "twin_eer") if any(r["pairs"]["twin_impostor"] for r in rs) else "no twins"
        auc = sum(r["auc"] for r in rs) / len(rs)
        cpu = sum(r["cpu_s"] for r in rs) / len(rs)
        lines.append(f"| {ds}: {ids} / {imgs} | {model} | {_cell(rs, 'eer')} | {_cell(rs, 'tar_at_far_1e-2')} | "
                     f"{twin} | {auc:.3f} | {cpu:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "dcal_results")
    ap.add_argument("--datasets", default="orl,cmu,synthetic")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: per dataset)")
    ap.add_argument("--seeds", default="0,1", help="training seeds; the table shows the mean and each value")
    args = ap.parse_args()
    default_steps = {"orl": 250, "cmu": 250, "synthetic": 250}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    for ds in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if ds not in default_steps:
            raise SystemExit(f"unknown dataset {ds!r} (orl, cmu, synthetic)")
        data_dir = None if ds == "synthetic" else pack(ds, args.out / "shards" / ds)
        for seed in seeds:
            for label in MODELS:
                r = train_and_read(ds, data_dir, args.out, args.steps or default_steps[ds], label, seed)
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
