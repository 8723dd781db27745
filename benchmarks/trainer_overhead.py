"""Trainer overhead: samples/s of the biomtl Trainer vs a bare PyTorch loop.

Both run in this one process on the same recipe model, the same shard stream,
batch size and precision; the bare loop is forward, backward, optimizer step
and nothing else. Overhead = 1 - trainer / bare. Target: under 5%.

Rates are samples per CPU-second of this process (``time.process_time``) with
one compute thread, so other load on a shared machine barely moves them
(wall-clock rates are printed too). The trainer's validation, checkpoints and
end-of-run artefacts, and the one-time creation of the TensorBoard writer, are
timed apart and left out: the comparison is the
training loop itself (data, forward, backward, step, logging, progress).

    python benchmarks/trainer_overhead.py [--steps 60] [--precision bf16] [--backbone resnet18]
"""
from __future__ import annotations

import argparse
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
from recipes.base import get_recipe  # noqa: E402
from recipes.batch import move_batch  # noqa: E402
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
        done, epoch, start, cpu_start = 0, 0, None, None
        while done < steps + warmup:
            for batch in build_train_loader(data_dir, cfg.data.train_split, recipe.transform, cfg.data.batch_size,
                                            0, 1, cfg.data.num_workers, cfg.experiment.seed, epoch,
                                            shuffle_buffer=cfg.data.shuffle_buffer):
                if done == warmup:
                    start, cpu_start = time.perf_counter(), time.process_time()
                batch = move_batch(batch, ctx.device)
                with precision.autocast():
                    loss = model(batch)["loss"]
                loss.float().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                done += 1
                if done == steps + warmup:
                    break
            epoch += 1
        samples = steps * cfg.data.batch_size
        return samples / (time.process_time() - cpu_start), samples / (time.perf_counter() - start)


def trainer_rate(cfg, steps: int) -> tuple[float, float]:
    """CPU-time rate of Trainer.fit minus validation, checkpoints and artefacts."""
    from dist_train import run_logging
    from dist_train import trainer as trainer_mod
    from recipes.facecom import FaceComRecipe

    spent = {"cpu": 0.0, "wall": 0.0}
    originals = {}

    def excluded(owner, name):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def wrapper(*args, **kwargs):
            c, w = time.process_time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent["cpu"] += time.process_time() - c
                spent["wall"] += time.perf_counter() - w
        setattr(owner, name, wrapper)

    fit = trainer_mod.Trainer.fit
    box = {}

    def timed_fit(self):
        c, w = time.process_time(), time.perf_counter()
        out = fit(self)
        box["cpu"], box["wall"] = time.process_time() - c, time.perf_counter() - w
        return out

    # One-time setup (TensorBoard writer) and evaluation are not the loop's cost.
    for owner, name in ((trainer_mod.Trainer, "validate"), (trainer_mod.Trainer, "save"),
                        (FaceComRecipe, "write_artifacts"), (run_logging.RunLogger, "__init__"),
                        (run_logging.RunLogger, "close")):
        excluded(owner, name)
    trainer_mod.Trainer.fit = timed_fit
    try:
        train(cfg, None)
    finally:
        trainer_mod.Trainer.fit = fit
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    samples = steps * cfg.data.batch_size
    return samples / (box["cpu"] - spent["cpu"]), samples / (box["wall"] - spent["wall"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    overrides = [f"experiment.output_dir={out / 'runs'}", f"data.synthetic.cache_dir={out / 'data'}",
                 f"recipe.params.backbone={args.backbone}", f"recipe.params.img_size={args.image_size}",
                 f"data.synthetic.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
                 f"train.precision={args.precision}", f"train.max_steps={args.steps}",
                 "train.log_every_steps=10", f"train.val_every_steps={10**6}", "logging.progress=false",
                 "data.synthetic.num_identities=20", "data.synthetic.samples_per_identity=30"]
    cfg = load_config(REPO / "configs" / "facecom.yaml", overrides)
    torch.set_num_threads(1)  # CPU-time rates need one compute thread
    bare, ours = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
        bare.append(bare_loop(cfg, args.steps, warmup=0))
        ours.append(trainer_rate(cfg, args.steps))
    b, t = max(x[0] for x in bare), max(x[0] for x in ours)
    print(f"model {args.backbone} @ {args.image_size}px, batch {args.batch_size}, {args.precision}, "
          f"{args.steps} steps, best of {args.repeats}, 1 thread; load average {os.getloadavg()[0]:.1f}")
    print(f"bare PyTorch loop : {b:8.1f} samples/CPU-s   (runs: {', '.join(f'{x[0]:.1f}' for x in bare)}; "
          f"wall {', '.join(f'{x[1]:.1f}' for x in bare)} samples/s)")
    print(f"biomtl Trainer    : {t:8.1f} samples/CPU-s   (runs: {', '.join(f'{x[0]:.1f}' for x in ours)}; "
          f"wall {', '.join(f'{x[1]:.1f}' for x in ours)} samples/s)")
    print(f"trainer overhead  : {100 * (1 - t / b):6.2f} %  (target < 5 %)")


if __name__ == "__main__":
    main()
