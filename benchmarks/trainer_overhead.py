"""Trainer overhead: samples/s of the biomtl Trainer vs a bare PyTorch loop.

Both run in this one process on the same recipe model, the same shard stream,
batch size and precision; the bare loop is forward, backward, optimizer step
and nothing else. Overhead = 1 - trainer / bare. Target: under 5%.

    python benchmarks/trainer_overhead.py [--steps 60] [--precision bf16] [--backbone resnet18]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dist_train import distributed  # noqa: E402
from dist_train.config import load_config, recipe_params  # noqa: E402
from dist_train.main import prepare_data, seed_everything, train  # noqa: E402
from dist_train.precision import Precision, resolve_precision  # noqa: E402
from dist_train.recipe import get_recipe  # noqa: E402
from dist_train.strategies.ddp import move_to  # noqa: E402
from launch.env import detect  # noqa: E402
from shards.manifest import Manifest  # noqa: E402
from shards.stream import build_train_loader  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def bare_loop(cfg, steps: int, warmup: int) -> float:
    env = detect()
    with distributed.process_group(env, "gloo", 600) as ctx:
        data_dir = prepare_data(cfg, ctx)
        recipe = get_recipe(cfg.recipe.name)(recipe_params(cfg), Manifest.load(data_dir).data_info())
        seed_everything(cfg.experiment.seed)
        model = recipe.build_model().to(ctx.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        precision = Precision(resolve_precision(cfg.train.precision, ctx.device), ctx.device.type)
        done, epoch, start = 0, 0, None
        while done < steps + warmup:
            for batch in build_train_loader(data_dir, cfg.data.train_split, recipe.transform, cfg.data.batch_size,
                                            0, 1, cfg.data.num_workers, cfg.experiment.seed, epoch,
                                            shuffle_buffer=cfg.data.shuffle_buffer):
                if done == warmup:
                    start = time.perf_counter()
                batch = move_to(batch, ctx.device)
                with precision.autocast():
                    loss = model(batch)["loss"]
                loss.float().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                done += 1
                if done == steps + warmup:
                    break
            epoch += 1
        return steps * cfg.data.batch_size / (time.perf_counter() - start)


def trainer_rate(cfg, warmup_intervals: int = 1) -> float:
    train(cfg, None)
    run = sorted(Path(cfg.experiment.output_dir).iterdir())[-1]
    with (run / "logs" / "train_logs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # Rows after warm-up; each row's samples/s covers the steps since the last log.
    rates = [float(r["samples_per_s"]) for r in rows[1 + warmup_intervals:]]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    overrides = [f"experiment.output_dir={out / 'runs'}", f"data.synthetic.cache_dir={out / 'data'}",
                 f"recipe.params.backbone={args.backbone}", f"recipe.params.img_size={args.image_size}",
                 f"data.synthetic.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
                 f"train.precision={args.precision}", f"train.max_steps={args.steps + 10}",
                 "train.log_every_steps=10", f"train.val_every_steps={10**6}", "logging.progress=false",
                 "data.synthetic.num_identities=20", "data.synthetic.samples_per_identity=30"]
    cfg = load_config(REPO / "configs" / "facecom.yaml", overrides)
    bare, ours = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
        bare.append(bare_loop(cfg, args.steps, warmup=10))
        ours.append(trainer_rate(cfg))
    b, t = max(bare), max(ours)
    print(f"model {args.backbone} @ {args.image_size}px, batch {args.batch_size}, {args.precision}, "
          f"{args.steps} steps, best of {args.repeats}")
    print(f"bare PyTorch loop : {b:8.1f} samples/s   (runs: {', '.join(f'{x:.1f}' for x in bare)})")
    print(f"biomtl Trainer    : {t:8.1f} samples/s   (runs: {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"trainer overhead  : {100 * (1 - t / b):6.2f} %  (target < 5 %)")


if __name__ == "__main__":
    main()
