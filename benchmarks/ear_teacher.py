"""Does the self-supervised ear teacher learn identity? (issue 14)

AMI ears (../shared/data/ami_ears: 70 subjects x 7 views, research use only)
are packed with ``biomtl shards create --format ear`` (subject folders, whole
image = box) into an identity-disjoint split: ``--train-subjects`` subjects to
train on, the rest held out. The ``ear_teacher`` recipe trains on the train
subjects WITHOUT identity labels (reconstruction + ArcFace on instance
pseudo-labels; SimSiam and k-means labels selectable). On the held-out subjects' right-ear views (``back`` = the left
ear is left out, PROVENANCE.txt), three embeddings are compared:

- the trained teacher (its projection, what ``biomtl extract`` returns, and its
  pooled backbone features);
- the same network untrained (same seed, same architecture);
- raw pixels (the same normalised crop the networks see, flattened).

Metrics: k-NN top-1 (cosine, leave-one-out among the test images) and the
verification EER over all test pairs. One command, prints a Markdown table
(mean +- std over seeds) and writes JSON:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ear_teacher.py --seeds 0 1 2 --out /tmp/ear_bench.json

Defaults (a CPU-minutes budget): a narrow ConvNeXt (atto layout, widths
24/48/96/192, depths 1/1/2/1) at 64 px, 800 steps of 32, reconstruction 0.1 +
ArcFace (scale 10, margin 0) 1.0 on instance pseudo-labels (every training
image its own class; head re-initialised from the embeddings every epoch),
augmentation rotation 10 deg, zoom 0.15, shift 0.08, brightness / contrast /
saturation 0.3, noise 0.03; SimSiam and crop jitter off. The previous default
(k-means labels, ArcFace s 30 m 0.3 weight 0.1, milder augmentation) is
``--pseudo-labels kmeans --pseudo-every 2 --metric-weight 0.1 --scale 30
--margin 0.3 --reconstruction-weight 1 --zoom 0 --shift 0 --brightness 0.2
--contrast 0 --saturation 0 --steps 400`` (docs/results.md has both).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pack(data: Path, out: Path, train_subjects: int, total: int) -> Path:
    from shards.build import create
    from shards.manifest import Manifest

    if (out / "manifest.json").is_file():
        return out
    create("ear", data, out, splits=[("train", train_subjects / total), ("test", 1 - train_subjects / total)],
           split_by="identity", seed=0)
    m = Manifest.load(out)
    print(f"packed {data} -> {out}: train {m.split_size('train')} / test {m.split_size('test')} images",
          file=sys.stderr)
    return out


def overrides(args: argparse.Namespace, shards: Path, seed: int, out_dir: Path) -> list[str]:
    o = {"experiment.name": f"ear_bench_s{seed}", "experiment.seed": seed, "experiment.output_dir": str(out_dir),
         "data.source": "shards", "data.shards": str(shards), "data.val_split": "none", "data.test_split": "test",
         "data.batch_size": args.batch_size, "recipe.params.backbone": args.backbone,
         "recipe.params.img_size": args.img_size, "recipe.params.projection_dim": args.projection_dim,
         "recipe.params.projection_hidden": 4 * args.projection_dim,
         "recipe.params.decoder_width": args.decoder_width,
         "recipe.params.pseudo_labels": args.pseudo_labels,
         "recipe.params.num_pseudo_classes": args.pseudo_classes,  # instance labels: the recipe uses the split size
         "recipe.params.scale": args.scale, "recipe.params.margin": args.margin,
         "recipe.params.reconstruction_weight": args.reconstruction_weight,
         "recipe.params.pseudo_label_every": args.pseudo_every,
         "recipe.params.pseudo_label_seed": seed, "recipe.params.metric_loss": args.metric_loss,
         "recipe.params.simsiam_weight": args.simsiam_weight, "recipe.params.metric_weight": args.metric_weight,
         "recipe.params.flip": "false", "recipe.params.rotation": args.rotation,
         "recipe.params.brightness": args.brightness, "recipe.params.noise": args.noise,
         "recipe.params.zoom": args.zoom, "recipe.params.shift": args.shift,
         "recipe.params.contrast": args.contrast, "recipe.params.saturation": args.saturation,
         "recipe.params.crop_jitter": args.crop_jitter,
         "train.max_steps": args.steps, "train.lr": args.lr, "train.precision": "fp32",
         "train.log_every_steps": 25, "logging.progress": "false", "logging.plot": "false",
         "logging.tracking": "none", "checkpoint.every_epochs": 0}
    if args.dims:
        o["recipe.params.dims"] = "[" + ",".join(str(d) for d in args.dims) + "]"
        o["recipe.params.depths"] = "[" + ",".join(str(d) for d in args.depths) + "]"
    return [f"{k}={v}" for k, v in o.items()]


@torch.no_grad()
def embed_test(model, recipe, shards: Path) -> dict[str, np.ndarray]:
    from recipes.batch import label_column, sample_keys, valid_mask
    from shards.stream import build_eval_loader

    model.eval()
    cols: dict[str, list[np.ndarray]] = {"projection": [], "features": [], "pixels": [], "identity": []}
    keys: list[str] = []
    for batch in build_eval_loader(shards, "test", recipe.transform, 32, 0, 1, 0):
        n = batch["image"].shape[0]
        v = valid_mask(batch, n)
        out = model.net(batch["image"], reconstruct=False)
        cols["projection"].append(out["projection"].numpy()[v])
        cols["features"].append(out["features"].numpy()[v])
        cols["pixels"].append(batch["image"].flatten(1).numpy()[v])
        cols["identity"].append(label_column(batch, "identity", n)[v])
        keys += [k for k, ok in zip(sample_keys(batch, n), v) if ok]
    res = {k: np.concatenate(c) for k, c in cols.items()}
    right_ear = np.array(["_back" not in k for k in keys])   # 'back' is the left ear (PROVENANCE.txt)
    return {k: a[right_ear] for k, a in res.items()}


def retrieval(emb: np.ndarray, ident: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_curve

    x = emb.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    top1 = float((ident[sim.argmax(1)] == ident).mean())
    iu = np.triu_indices(len(ident), 1)
    scores, same = sim[iu], (ident[:, None] == ident[None, :])[iu]
    fpr, tpr, _ = roc_curve(same, scores)
    i = int(np.nanargmin(np.abs(fpr - (1 - tpr))))
    return {"knn_top1": top1, "eer": float((fpr[i] + 1 - tpr[i]) / 2)}


def run_seed(args: argparse.Namespace, shards: Path, seed: int) -> dict[str, dict[str, float]]:
    from dist_train.config import load_config
    from dist_train.inference import InferenceEngine
    from dist_train.main import train

    out_dir = Path(args.work) / "runs" / f"seed{seed}"
    cfg = load_config(REPO / "configs" / "ear_teacher.yaml", overrides(args, shards, seed, out_dir))
    t0 = time.process_time()
    wall = time.perf_counter()
    train(cfg, None)
    cpu_s, wall_s = time.process_time() - t0, time.perf_counter() - wall
    (run,) = sorted(out_dir.iterdir())[-1:]
    engine = InferenceEngine.from_checkpoint(run / "model.pt", "cpu")
    trained = embed_test(engine.model, engine.recipe, shards)
    torch.manual_seed(seed)
    untrained = embed_test(engine.recipe.build_model(), engine.recipe, shards)
    ident = trained["identity"]
    rows = {"teacher (projection)": retrieval(trained["projection"], ident),
            "teacher (backbone features)": retrieval(trained["features"], ident),
            "untrained (projection)": retrieval(untrained["projection"], ident),
            "untrained (backbone features)": retrieval(untrained["features"], ident),
            "raw pixels": retrieval(trained["pixels"], ident)}
    rows["_run"] = {"cpu_s": cpu_s, "wall_s": wall_s, "test_images": int(len(ident)),
                    "test_subjects": int(len(np.unique(ident))), "run_dir": str(run)}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ami_ears")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ear_teacher_bench"))
    ap.add_argument("--shards", type=Path, default=None, help="packed AMI shards to reuse (default: WORK/shards_N)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ear_teacher_bench/results.json"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--train-subjects", type=int, default=50)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--backbone", default="convnext_atto")
    ap.add_argument("--dims", type=int, nargs="*", default=[24, 48, 96, 192])
    ap.add_argument("--depths", type=int, nargs="*", default=[1, 1, 2, 1])
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--projection-dim", type=int, default=128)
    ap.add_argument("--decoder-width", type=int, default=64)
    ap.add_argument("--pseudo-labels", choices=["instance", "kmeans"], default="instance")
    ap.add_argument("--pseudo-classes", type=int, default=64,
                    help="k-means k (instance labels: one class per training image, whatever this is)")
    ap.add_argument("--pseudo-every", type=int, default=1)
    ap.add_argument("--metric-loss", default="arcface")
    ap.add_argument("--metric-weight", type=float, default=1.0)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--reconstruction-weight", type=float, default=0.1)
    ap.add_argument("--simsiam-weight", type=float, default=0.0)   # 1.0 measured worse here (see the notes)
    ap.add_argument("--rotation", type=float, default=10.0)
    ap.add_argument("--zoom", type=float, default=0.15)
    ap.add_argument("--shift", type=float, default=0.08)
    ap.add_argument("--brightness", type=float, default=0.3)
    ap.add_argument("--contrast", type=float, default=0.3)
    ap.add_argument("--saturation", type=float, default=0.3)
    ap.add_argument("--noise", type=float, default=0.03)
    ap.add_argument("--crop-jitter", type=float, default=0.0)     # 0.2 measured worse here
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    total = sum(1 for p in args.data.iterdir() if p.is_dir())
    shards = pack(args.data, args.shards or args.work / f"shards_{args.train_subjects}", args.train_subjects, total)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(args, shards, seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
                                        "per_seed": per_seed}, indent=1))
        print(f"seed {seed}: {json.dumps(per_seed[seed])}", file=sys.stderr)
    names = [k for k in per_seed[args.seeds[0]] if not k.startswith("_")]
    run0 = per_seed[args.seeds[0]]["_run"]
    print(f"\nAMI ears, {run0['test_subjects']} held-out subjects, {run0['test_images']} right-ear test images; "
          f"seeds {args.seeds}; mean ± std\n")
    print("| embedding | k-NN top-1 | EER |")
    print("|---|---|---|")
    for name in names:
        cell = []
        for metric in ("knn_top1", "eer"):
            v = np.array([per_seed[s][name][metric] for s in args.seeds])
            cell.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        print(f"| {name} | {cell[0]} | {cell[1]} |")
    cpu = [per_seed[s]["_run"]["cpu_s"] for s in args.seeds]
    print(f"\ntraining: {args.steps} steps x batch {args.batch_size}, {np.mean(cpu):.0f} CPU-s per seed; "
          f"results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
