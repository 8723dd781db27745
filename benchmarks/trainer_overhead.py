"""Trainer overhead: samples/s of the biomtl Trainer vs a bare PyTorch loop.

Both run in this one process on the same recipe model, the same shard stream,
batch size and precision; the bare loop is forward, backward, gradient
clipping (when the config clips: ~3 % of a step here, work the user asked
for), optimizer step and nothing else. Overhead = 1 - trainer / bare. Target: under 3%.

Rates are samples per CPU-second of this process (``time.process_time``) with
one compute thread, so other load on a shared machine barely moves them
(wall-clock rates are printed too; on a GPU the wall-clock rates are compared), over the same window of optimizer steps
after ``--warmup`` steps (one-off start-up costs are outside it for both). The
trainer's validation, checkpoints and
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


class Window:
    """CPU and wall time from the end of optimizer step ``warmup`` to the end of
    step ``warmup + steps``, less what ran inside :meth:`excluded` calls. Both
    loops are timed over the same steps, so one-off costs (first loader start,
    first-step allocations, run set-up) are outside it for both."""

    def __init__(self, warmup: int, steps: int):
        self.first, self.last = warmup, warmup + steps
        self.done = 0
        self.t0 = self.c0 = self.t1 = self.c1 = None
        self.spent_cpu = self.spent_wall = 0.0

    @property
    def open(self) -> bool:
        return self.t0 is not None and self.t1 is None

    def step_done(self) -> None:
        self.done += 1
        if self.done in (self.first, self.last) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the window ends when the GPU's work has, not when it was queued
        if self.done == self.first:
            self.c0, self.t0 = time.process_time(), time.perf_counter()
        elif self.done == self.last:
            self.c1, self.t1 = time.process_time(), time.perf_counter()

    def excluded(self, fn):
        def wrapper(*args, **kwargs):
            c, w = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.open:
                    self.spent_cpu += time.process_time() - c
                    self.spent_wall += time.perf_counter() - w
        return wrapper

    def rates(self, samples: int) -> tuple[float, float]:
        return (samples / (self.c1 - self.c0 - self.spent_cpu),
                samples / (self.t1 - self.t0 - self.spent_wall))


def bare_loop(cfg, steps: int, warmup: int) -> tuple[float, float]:
    env = detect()
    window = Window(warmup, steps)
    with distributed.process_group(env, "gloo", 600) as ctx:
        data_dir = prepare_data(cfg, ctx)
        recipe = get_recipe(cfg.recipe.name)(recipe_params(cfg), Manifest.load(data_dir).data_info())
        seed_everything(cfg.experiment.seed)
        model = recipe.build_model().to(ctx.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        precision = Precision(resolve_precision(cfg.train.precision, ctx.device), ctx.device.type)
        epoch = 0
        while window.done < window.last:
            for batch in build_train_loader(data_dir, cfg.data.train_split, recipe.transform, cfg.data.batch_size,
                                            0, 1, cfg.data.num_workers, cfg.experiment.seed, epoch,
                                            shuffle_buffer=cfg.data.shuffle_buffer):
                batch = move_batch(batch, ctx.device)
                with precision.autocast():
                    loss = model(batch)["loss"]
                loss.float().backward()
                if cfg.train.grad_clip > 0:  # work the config asks for, not the trainer's overhead
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                window.step_done()
                if window.done == window.last:
                    break
            epoch += 1
    return window.rates(steps * cfg.data.batch_size)


def trainer_rate(overrides: list[str], steps: int, warmup: int) -> tuple[float, float]:
    """CPU-time rate of Trainer.fit over the same window, validation, checkpoints
    and artefacts left out."""
    from dist_train import run_logging
    from dist_train import trainer as trainer_mod
    from dist_train.strategies.ddp import DDPStrategy
    from recipes.facecom import FaceComRecipe

    window = Window(warmup, steps)
    originals = {}

    def patch(owner, name, make):
        originals[(owner, name)] = getattr(owner, name)
        setattr(owner, name, make(originals[(owner, name)]))

    def counted(step):
        def wrapper(self):
            out = step(self)
            window.step_done()
            return out
        return wrapper

    patch(DDPStrategy, "optimizer_step", counted)
    # evaluation, checkpoints, artefacts and the TensorBoard writer are not the loop's cost
    for owner, name in ((trainer_mod.Trainer, "validate"), (trainer_mod.Trainer, "save"),
                        (FaceComRecipe, "write_artifacts"), (run_logging.RunLogger, "__init__"),
                        (run_logging.RunLogger, "close")):
        patch(owner, name, window.excluded)
    cfg = load_config(REPO / "configs" / "facecom.yaml", [*overrides, f"train.max_steps={warmup + steps}"])
    try:
        train(cfg, None)
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    return window.rates(steps * cfg.data.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before the timed window")
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
                 f"train.precision={args.precision}", "train.log_every_steps=10", f"train.val_every_steps={10**6}",
                 "logging.progress=false", "data.synthetic.num_identities=20",
                 "data.synthetic.samples_per_identity=30"]
    cfg = load_config(REPO / "configs" / "facecom.yaml", overrides)
    torch.set_num_threads(1)  # CPU-time rates need one compute thread
    load0 = os.getloadavg()[0]
    bare, ours = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
        bare.append(bare_loop(cfg, args.steps, args.warmup))
        ours.append(trainer_rate(overrides, args.steps, args.warmup))
    # on a GPU the host's CPU time says little about the step: compare wall-clock rates there
    k, unit = (1, "samples/s (wall)") if torch.cuda.is_available() else (0, "samples/CPU-s")
    b, t = max(x[k] for x in bare), max(x[k] for x in ours)
    per_run = [100 * (1 - o[k] / r[k]) for r, o in zip(bare, ours)]
    print(f"model {args.backbone} @ {args.image_size}px, batch {args.batch_size}, {args.precision}, "
          f"{args.steps} steps timed after {args.warmup}, best of {args.repeats}, 1 thread; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    for name, runs, best in (("bare PyTorch loop", bare, b), ("biomtl Trainer   ", ours, t)):
        print(f"{name} : {best:8.1f} {unit}   (CPU-s runs: {', '.join(f'{x[0]:.1f}' for x in runs)}; "
              f"wall runs: {', '.join(f'{x[1]:.1f}' for x in runs)} samples/s)")
    print(f"trainer overhead  : {100 * (1 - t / b):6.2f} % best against best; run by run "
          f"{', '.join(f'{x:.1f}' for x in per_run)} %  (target < 3 %)")


if __name__ == "__main__":
    main()
