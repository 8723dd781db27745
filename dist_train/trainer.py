"""The training loop: epochs, accumulation windows, validation, early stopping,
checkpoints and exact resume. Recipe- and strategy-agnostic."""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from dist_train import distributed
from dist_train.checkpoint import (LATEST, CheckpointManager, CheckpointPolicy, atomic_write, checkpoint_path,
                                   experiment_runs, rng_state, safe_load, set_rng_state, staging_owner)
from dist_train.config import Config, ConfigError, config_changes, resolved_config_dict, validates
from dist_train.distributed import DistContext
from dist_train.inference import load_frozen_model
from dist_train.low_memory_build import build_model
from dist_train.picture_draw import PictureDraw
from dist_train.precision import Precision, resolve_precision
from dist_train.rank_report import LoaderWait, StepTimer, straggler
from dist_train.run_logging import NullLogger, RunLogger
from dist_train.schedulers import build_scheduler
from dist_train.strategies import Strategy, StrategyOptions, build_strategy
from dist_train.val_bins import bin_scorer
from recipes.model_file import run_description
from recipes.base import ArtifactContext, Recipe
from shards.reading import ShardLoader

log = logging.getLogger("biomtl")


@dataclass
class LoopState:
    """Where training is; all of it goes into the checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    samples_seen: int = 0
    early_stop_best: list[float | None] = field(default_factory=list)
    validations_without_improvement: int = 0
    stopped_early: bool = False


class EarlyStopping:
    """Stop when none of the watched metrics improved for ``patience`` validations."""

    def __init__(self, metrics: list[str], modes: list[str], patience: int, min_delta: float, state: LoopState):
        self.metrics, self.modes, self.patience, self.min_delta = metrics, modes, patience, min_delta
        self.state = state
        if len(state.early_stop_best) != len(metrics):
            state.early_stop_best = [None] * len(metrics)

    def update(self, values: dict[str, float]) -> bool:
        if not self.metrics:
            return False
        improved = False
        for i, (name, mode) in enumerate(zip(self.metrics, self.modes)):
            if name not in values:
                raise KeyError(f"train.early_stopping.metrics: no validation metric '{name}' "
                               f"(have: {', '.join(sorted(values))})")
            best, value = self.state.early_stop_best[i], values[name]
            if best is None or (value < best - self.min_delta if mode == "min" else value > best + self.min_delta):
                self.state.early_stop_best[i] = value
                improved = True
        self.state.validations_without_improvement = 0 if improved else \
            self.state.validations_without_improvement + 1
        return self.state.validations_without_improvement >= self.patience


def build_optimizer(cfg: Config, recipe: Recipe) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    t = cfg.train

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = recipe.param_groups(model, t.lr) or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        if t.optimizer == "adamw":
            # one fused kernel per step on GPUs (the strategy has moved the model there by now)
            fused = all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]) or None
            return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused)
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                               weight_decay=t.weight_decay)

    return make


def strategy_options(cfg: Config, precision: Precision, world_size: int) -> StrategyOptions:
    """What the strategy gets of the config: its own options (with DeepSpeed, the
    JSON built and checked by the preflight's builder for this world and precision)."""
    t = cfg.train
    ds_json = None
    if t.strategy == "deepspeed":
        from dist_train.preflight import deepspeed_json

        ds_json = deepspeed_json(cfg, world_size, precision.name)
    # (no grad_accum: the trainer marks the window boundaries in micro_step; DeepSpeed gets it in its JSON)
    return StrategyOptions(precision=precision, grad_clip=t.grad_clip,
                           find_unused_parameters=t.find_unused_parameters, compile=t.compile,
                           channels_last=t.channels_last, world_size=world_size, deepspeed_json=ds_json)


def run_forwards(total_steps: int, batches_per_epoch: int, accum: int) -> int:
    """Micro-batches (training forward passes) in ``total_steps`` optimizer steps: an
    epoch is ``ceil(batches_per_epoch / accum)`` steps whose last window may be shorter."""
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    epochs, rest = divmod(total_steps, steps_per_epoch)
    return epochs * batches_per_epoch + min(rest * accum, batches_per_epoch)


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, recipe: Recipe, data_dir: Path, run_dir: Path,
                 loaders: "LoaderFactory", after_step: Callable[[int, int], None] | None = None):
        """``after_step(step, rank)`` runs after every optimizer step and its
        checkpoint (the tests inject faults there; nothing else needs it)."""
        self.cfg, self.ctx, self.recipe = cfg, ctx, recipe
        self.after_step = after_step
        self.data_dir, self.run_dir = data_dir, run_dir
        self.loaders = loaders
        self.state = LoopState()
        self.batches_per_epoch = loaders.train_batches_per_epoch()
        accum = cfg.train.grad_accum
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.precision = Precision(resolve_precision(cfg.train.precision, ctx.device), ctx.device.type)
        recipe.train_forwards = run_forwards(self.total_steps, self.batches_per_epoch, accum)
        recipe.frozen_model_loader = partial(load_frozen_model, device=ctx.device)  # teachers (distillation)
        options = strategy_options(cfg, self.precision, ctx.world_size)
        # FSDP2 / ZeRO-3: parameters sliced over the ranks while they are built (train.low_memory_build)
        model, partitions = build_model(recipe.build_model, cfg.train.low_memory_build, cfg.train.strategy,
                                        options.deepspeed_json, ctx.rank, ctx.world_size, ctx.device)
        self.strategy: Strategy = build_strategy(
            cfg.train.strategy, model=model, device=ctx.device, make_optimizer=build_optimizer(cfg, recipe),
            make_scheduler=lambda opt: build_scheduler(cfg.train.scheduler, opt, self.total_steps),
            options=options, **({"partitions": partitions} if partitions is not None else {}))
        self.checkpoints = CheckpointManager(
            checkpoint_path(run_dir).parent,
            CheckpointPolicy(cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.checkpoint.top_k,
                             cfg.checkpoint.every_steps), ctx.is_main, self.strategy.checkpoint_suffix,
            owner=distributed.broadcast_object(staging_owner()), lean=self.strategy.lean_checkpoint,
            lean_suffix=self.strategy.lean_suffix)
        self.validates = validates(cfg)
        self.bin_scorer = bin_scorer(cfg, recipe.transform, self.precision, ctx.device)  # data.val_bins
        self.step_timer = StepTimer(ctx.device, ctx.rank, ctx.world_size)  # per-rank step time: stragglers
        self.loader_wait = LoaderWait()  # time blocked on the training loader, logged beside the step time
        self.val_points = self._validation_steps() if self.validates else set()
        if not self.validates:
            log.info("no validation (data.val_split=%s): only checkpoints/%s is kept, no best or top-k",
                     cfg.data.val_split, LATEST)
        log.info("%s, precision %s, %d batches/epoch/rank, %d optimizer steps (accumulation %d)",
                 cfg.train.strategy.upper(), self.precision.name, self.batches_per_epoch, self.total_steps, accum)

    # ------------------------------------------------------------------
    def _validation_steps(self) -> set[int]:
        """Optimizer steps after which validation runs (besides the last step)."""
        t = self.cfg.train
        if t.val_every_steps:
            return set(range(t.val_every_steps, self.total_steps + 1, t.val_every_steps))
        points = set()
        every = t.val_every_epochs * self.steps_per_epoch
        k = 1
        while (s := math.ceil(k * every - 1e-9)) <= self.total_steps:
            points.add(max(1, s))
            k += 1
        return points

    def resume(self, path: Path) -> None:
        fresh = _schedule_snapshot(self.strategy)  # this config's LR schedule at step 0, before the load
        try:
            client = self.strategy.load_checkpoint(path)
        except (KeyError, ValueError, RuntimeError) as exc:
            # What the preflight cannot see (it compares names and shapes): an
            # optimizer or scheduler state of another layout. Nothing is written yet.
            if isinstance(exc, RuntimeError) and "state_dict" not in str(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--resume {path}: does not load into the model and optimizer this config builds "
                              f"({type(exc).__name__}: {first}); resume with the run's own config (its "
                              f"config.yaml)") from None
        loop = client["loop"]
        self.state = LoopState(**loop)
        self.checkpoints.load_policy_state(client["checkpoint_policy"])
        rng = client["rng"]
        self._continue_epoch(len(rng), client.get("batches_per_epoch"))
        set_rng_state(rng[self.ctx.rank] if self.ctx.rank < len(rng) else rng[0])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step, self.state.epoch,
                 self.state.batch_in_epoch)
        changes = [c for c in config_changes(client.get("config") or {}, resolved_config_dict(self.cfg))
                   if c[0].startswith(_REPORTED_CHANGES) and not c[0].startswith(_UNREPORTED_CHANGES)]
        old_total = client.get("total_steps", self.total_steps)
        schedule_changed = old_total != self.total_steps or any(k.startswith(_SCHEDULE_KEYS) for k, _, _ in changes)
        if changes or schedule_changed:
            text = ", ".join(f"{k} {a} -> {b}" for k, a, b in changes) or "the number of steps per epoch"
            if old_total != self.total_steps:
                text += f" (total optimizer steps {old_total} -> {self.total_steps})"
            log.warning("resuming with settings changed since the checkpoint: %s", text)
        if schedule_changed:
            if fresh is None or not _replay_schedule(self.strategy, fresh):
                log.warning("the optimizer and LR schedule state come from the checkpoint unchanged (this strategy "
                            "has no torch LR scheduler to recompute)")
            else:
                log.warning("the learning-rate schedule now follows the new settings from step %d (lr %g)",
                            self.state.step, self.strategy.scheduler.get_last_lr()[0])

    def _continue_epoch(self, saved_world: int, saved_batches: int | None) -> None:
        """Where in its epoch a resumed run goes on. At the saving world size: the next
        batch. At another one (each rank then gets another share of the epoch's shards,
        so no batch maps one to one): the same fraction of the epoch, rounded down to a
        window boundary (a few samples seen again rather than skipped); past the end of
        the epoch, the next one."""
        st, n = self.state, self.batches_per_epoch
        if saved_world != self.ctx.world_size and st.batch_in_epoch:
            before = saved_batches or math.ceil(n * self.ctx.world_size / saved_world)
            accum = self.cfg.train.grad_accum
            at = (st.batch_in_epoch * n // max(before, 1)) // accum * accum
            if self.ctx.is_main:
                log.warning("resuming on %d rank(s) a run saved on %d: epoch %d goes on from batch %d of %d (batch "
                            "%d of %d before); the order of samples follows the new world size",
                            self.ctx.world_size, saved_world, st.epoch, at, n, st.batch_in_epoch, before)
            st.batch_in_epoch = at
        if st.batch_in_epoch >= n:
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0

    def _client_state(self) -> dict[str, Any]:
        # The run's description makes a checkpoint self-describing: inference and
        # export rebuild the recipe model from the file alone.
        return {"loop": vars(self.state).copy(), "checkpoint_policy": self.checkpoints.policy_state(),
                "rng": distributed.all_gather_objects(rng_state()), "total_steps": self.total_steps,
                "batches_per_epoch": self.batches_per_epoch,
                **run_description(resolved_config_dict(self.cfg), self.recipe.data_info.to_dict())}

    def save(self, metrics: dict[str, float] | None, periodic: bool = False) -> None:
        # The client state is made inside the write: by then the policy counts this
        # save's own metric, which a resume from this checkpoint must know.
        self.checkpoints.save(lambda p: self.strategy.save_checkpoint(p, self._client_state()), self.state.step,
                              metrics, periodic)
        distributed.barrier()

    def epoch_start(self, epoch: int) -> None:
        """The recipe's ``on_epoch_start`` hook (when it has one), on every rank, with
        the model in eval mode and the global RNGs left as they were (resume stays exact)."""
        if type(self.recipe).on_epoch_start is Recipe.on_epoch_start:
            return
        saved = rng_state()
        self.strategy.eval()
        ctx = ArtifactContext(run_dir=self.run_dir, is_main=self.ctx.is_main,
                              loaders={"train": self.loaders.train_eval()}, gather=distributed.all_gather_objects,
                              publish=atomic_write, read_images=self.loaders.read_images)
        with self.strategy.gathered() as module:
            self.recipe.on_epoch_start(module, epoch, ctx)
        self.strategy.train()
        set_rng_state(saved)

    # ------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg, st = self.cfg, self.state
        logger = RunLogger(self.run_dir, self.total_steps, st.step, cfg.logging.tracking != "none",
                           cfg.logging.progress, cfg.logging.plot,
                           tracking=cfg.logging.tracking) if self.ctx.is_main else NullLogger()
        stopper = EarlyStopping(cfg.train.early_stopping.metrics, list(cfg.train.early_stopping.modes),
                                cfg.train.early_stopping.patience, cfg.train.early_stopping.min_delta, st)
        stop_at = cfg.train.stop_at_step or self.total_steps
        last_metrics: dict[str, float] = {}
        validated_at = -1
        missing_warned = False
        accum = cfg.train.grad_accum
        global_batch = cfg.data.batch_size * self.ctx.world_size
        self.checkpoints.prepare()
        try:
            while st.step < min(self.total_steps, stop_at) and not st.stopped_early:
                if st.batch_in_epoch == 0:  # a resume mid-epoch finds the hook's state in the checkpoint
                    self.epoch_start(st.epoch)
                loader = self.loaders.train(st.epoch, st.batch_in_epoch)
                n = self.batches_per_epoch
                self.strategy.train()
                epoch_start = time.perf_counter()
                window_terms: dict[str, float] = {}
                interval = self._new_interval()
                for batch in self.loader_wait.batches(loader):
                    i = st.batch_in_epoch
                    window_start = (i // accum) * accum
                    window_len = min(accum, n - window_start)  # a short last window still averages right
                    boundary = i + 1 == window_start + window_len
                    if i == window_start:
                        self.step_timer.meet()
                    out = self.strategy.micro_step(batch, 1.0 / window_len, boundary)
                    for key, value in {"loss": out["loss"], **out.get("terms", {})}.items():
                        window_terms[key] = window_terms.get(key, 0.0) + float(value.detach()) / window_len
                    st.batch_in_epoch += 1
                    st.samples_seen += global_batch
                    interval["samples"] += global_batch
                    if not boundary:
                        continue
                    stats = self.strategy.optimizer_step()
                    st.step += 1
                    for key, value in window_terms.items():
                        interval["terms"][key] = interval["terms"].get(key, 0.0) + value
                    interval["windows"] += 1
                    window_terms = {}
                    if st.step % cfg.train.log_every_steps == 0 or st.step in (1, self.total_steps):
                        self._log_interval(logger, interval, stats)
                        interval = self._new_interval()
                    else:
                        logger.advance(st.step)
                    epoch_done = st.batch_in_epoch >= n
                    if epoch_done:
                        logger.log_epoch(st.epoch, st.step, time.perf_counter() - epoch_start,
                                         self.loaders.corrupt_summary(loader))
                        st.epoch += 1
                        st.batch_in_epoch = 0
                    paused_from = time.perf_counter()
                    metrics = None
                    if st.step in self.val_points or (st.step == self.total_steps and self.validates):
                        metrics = last_metrics = self.validate(logger)
                        validated_at = st.step
                        if cfg.checkpoint.monitor not in metrics and not missing_warned:
                            missing_warned = True  # declared by the recipe, but these data did not give it
                            log.warning("validation at step %d gave no %s (checkpoint.monitor): no best or top-k "
                                        "checkpoint from it", st.step, cfg.checkpoint.monitor)
                        if stopper.update(metrics):
                            st.stopped_early = True
                            log.info("early stopping at step %d: no improvement of %s for %d validations",
                                     st.step, ", ".join(cfg.train.early_stopping.metrics),
                                     cfg.train.early_stopping.patience)
                    periodic = cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0
                    epoch_periodic = bool(cfg.checkpoint.every_epochs and epoch_done
                                          and st.epoch % cfg.checkpoint.every_epochs == 0)
                    finished = st.step >= min(self.total_steps, stop_at) or st.stopped_early
                    if metrics is not None or periodic or epoch_periodic or finished:
                        self.save(metrics, epoch_periodic)
                    # Throughput counts training only; validation and checkpoints are timed apart.
                    interval["t0"] += time.perf_counter() - paused_from
                    if self.after_step is not None:  # counted: an injected delay is this rank's own time
                        self.after_step(st.step, self.ctx.rank)
                    if finished or epoch_done:
                        break
            if self.validates and validated_at != st.step and st.step >= self.total_steps:
                last_metrics = self.validate(logger)
                self.save(last_metrics)
            if st.step >= self.total_steps or st.stopped_early:
                history = list(logger.val_csv.rows) if self.ctx.is_main else []  # (rank 0 keeps the log)
                with self.strategy.gathered() as module:
                    test_metrics = self.recipe.write_artifacts(module, self.artifact_context(history))
                if test_metrics:
                    logger.log_validation(st.step, st.epoch, test_metrics, split="test")
                    last_metrics = {**last_metrics, **{f"test_{k}": v for k, v in test_metrics.items()}}
        finally:
            logger.close()
        return last_metrics

    def artifact_context(self, validation_history: Sequence[Mapping[str, Any]] = ()) -> ArtifactContext:
        return ArtifactContext(run_dir=self.run_dir, is_main=self.ctx.is_main, loaders=self.loaders.eval_loaders(),
                               gather=distributed.all_gather_objects, publish=atomic_write,
                               read_images=self.loaders.read_images, validation_history=validation_history)

    def _new_interval(self) -> dict[str, Any]:
        """A log interval starting now (the loader wait counts from here too)."""
        self.loader_wait.take()
        return {"terms": {}, "windows": 0, "samples": 0, "t0": time.perf_counter()}

    def _log_interval(self, logger: Any, interval: dict[str, Any], stats: Any) -> None:
        windows = max(interval["windows"], 1)
        keys = sorted(interval["terms"])
        # the loader wait rides along with the loss terms: the mean over the ranks, no extra collective
        local = torch.tensor([interval["terms"][k] / windows for k in keys] + [self.loader_wait.take() / windows],
                             dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            local = local.to(self.ctx.device)
            dist.all_reduce(local)
            local = local.cpu() / dist.get_world_size()
        seconds = max(time.perf_counter() - interval["t0"], 1e-9)
        values = {k: float(v) for k, v in zip(keys, local)}
        step_s, data_s = seconds / windows, float(local[-1])
        values.update(lr=stats.lr, grad_norm=stats.grad_norm, samples_per_s=interval["samples"] / seconds,
                      step_s=step_s, data_s=data_s, data_fraction=min(data_s / step_s, 1.0))
        per_rank = self.step_timer.per_rank(seconds, windows)
        slowest = max(range(len(per_rank)), key=per_rank.__getitem__)
        values.update(step_s_slowest=per_rank[slowest], slowest_rank=slowest)
        if self.ctx.is_main and straggler(per_rank) is not None:
            log.warning("step %d: rank %d is a straggler: %.3f s/step of its own vs %.3f on the fastest (s/step by "
                        "rank: %s; where each rank runs: the 'rank N:' lines at the start)", self.state.step,
                        slowest, per_rank[slowest], min(per_rank), " ".join(f"{t:.3f}" for t in per_rank))
        if stats.skipped:
            log.warning("step %d: fp16 overflow, optimizer step skipped", self.state.step)
        for key, value in values.items():
            if key in keys and not math.isfinite(value):
                raise FloatingPointError(f"step {self.state.step}: {key} is {value}")
        logger.log_train(self.state.step, self.state.epoch, values)

    @torch.no_grad()
    def validate(self, logger: Any) -> dict[str, float]:
        started = time.perf_counter()
        self.strategy.eval()
        metrics = self.recipe.new_metrics()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        pictures: dict[str, torch.Tensor] = {}
        draw = self._picture_draw()
        for i, batch in enumerate(self.loaders.val()):
            out = self.strategy.eval_forward(batch)
            if draw is not None:
                draw.offer(out, batch)
            elif i == 0 and self.ctx.is_main:  # the same samples at every validation, so pictures compare
                pictures = self.recipe.validation_images(out, batch)
            valid = batch["_valid"]
            n_valid = float(valid.sum())
            # The batch loss averages padding rows too; weighting by valid rows
            # keeps the epoch mean exact up to that padding (at most one batch).
            loss_sum += torch.tensor([float(out["loss"]) * n_valid, n_valid], dtype=torch.float64)
            metrics.update(out, batch)
        states = distributed.all_gather_objects((metrics.state(), loss_sum.tolist()))
        values = type(metrics).compute([s for s, _ in states])
        total = [sum(x) for x in zip(*(l for _, l in states))]
        values = {"loss": total[0] / max(total[1], 1.0), **values}
        if self.bin_scorer is not None:  # every rank: the images are split over the ranks
            with self.strategy.gathered() as module:
                values.update(self.bin_scorer.score(module))
        drawn = draw.result() if draw is not None else None
        if drawn is not None:
            pictures = self.recipe.validation_images(*drawn)
        log.info("validation took %.1f s", time.perf_counter() - started)
        logger.log_validation(self.state.step, self.state.epoch, values)
        if pictures:
            logger.log_images(self.state.step, pictures)
            self._save_pictures(pictures)
        logger.log_pictures(self.state.step)  # the PNGs this validation wrote (plots, the recipe's pictures)
        self.strategy.train()
        return values

    def _picture_draw(self) -> PictureDraw | None:
        """Rank 0's random draw of the rows the recipe's pictures show, when it asks for one."""
        rows = self.recipe.validation_picture_rows() if self.ctx.is_main else 0
        return PictureDraw(rows, self.cfg.experiment.seed, self.state.epoch) if rows > 0 else None

    def _save_pictures(self, pictures: dict[str, torch.Tensor]) -> None:
        """The validation pictures the recipe also wants as PNG files (rank 0, atomic)."""
        from torchvision.utils import save_image

        for tag, image in pictures.items():
            rel = self.recipe.validation_image_file(tag, self.state.epoch)
            if rel:
                atomic_write(self.run_dir / rel, lambda tmp, im=image: save_image(
                             im.float() / 255.0 if im.dtype == torch.uint8 else im.float(), tmp, format="png"))


# Config keys whose change on --resume is reported; the schedule ones make the
# resumed run recompute its LR schedule (and optimizer hyper-parameters).
_REPORTED_CHANGES = ("train.", "data.", "recipe.", "checkpoint.")
_UNREPORTED_CHANGES = ("train.stop_at_step", "train.log_every_steps", "data.shards", "data.num_workers",
                       "data.synthetic.cache_dir")
_SCHEDULE_KEYS = ("train.lr", "train.weight_decay", "train.betas", "train.momentum", "train.nesterov",
                  "train.scheduler.", "train.max_steps", "train.epochs")


def _schedule_snapshot(strategy: Strategy) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The optimizer's hyper-parameters and the LR scheduler's state as this
    config built them (step 0), or None for a strategy without a torch scheduler."""
    scheduler = strategy.scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        return None
    groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in scheduler.optimizer.param_groups]
    return groups, copy.deepcopy(scheduler.state_dict())


def _replay_schedule(strategy: Strategy, fresh: tuple[list[dict[str, Any]], dict[str, Any]]) -> bool:
    """Restart the loaded scheduler from this config's step-0 state and step it
    as often as the checkpoint's had been stepped: the LR (and weight decay,
    betas...) of the new settings at the resumed step, for every scheduler
    type (the loaded state would keep the old base LR and schedule length)."""
    scheduler = strategy.scheduler
    groups, state = fresh
    param_groups = scheduler.optimizer.param_groups
    if len(groups) != len(param_groups):
        return False
    steps = int(scheduler.last_epoch)
    for group, saved in zip(param_groups, groups):
        group.update(copy.deepcopy(saved))
    scheduler.load_state_dict(copy.deepcopy(state))
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": replaying on purpose
        warnings.simplefilter("ignore")
        for _ in range(steps - int(scheduler.last_epoch)):
            scheduler.step()
    return True


class LoaderFactory:
    """Builds the shard loaders the trainer iterates, from the config."""

    def __init__(self, cfg: Config, ctx: DistContext, data_dir: Path, recipe: Recipe):
        from shards import stream

        self.stream = stream
        self.cfg, self.ctx, self.data_dir, self.recipe = cfg, ctx, data_dir, recipe
        # page-locked batches: the strategies' non_blocking copies overlap with compute only from them
        self.pin_memory = ctx.device.type == "cuda"
        self._train_stream: Any = None  # one stream loader for the run: its workers live across epochs

    def train(self, epoch: int, skip_batches: int = 0) -> ShardLoader:
        d = self.cfg.data
        if d.batching != "stream":  # twin-aware P×K or triplet batches (shards/batching.py)
            from shards import batching

            common = dict(rank=self.ctx.rank, world_size=self.ctx.world_size, num_workers=d.num_workers,
                          seed=self.cfg.experiment.seed, epoch=epoch, skip_batches=skip_batches,
                          twin_prob=d.twin_prob, max_corrupt_fraction=d.max_corrupt_fraction,
                          verify_checksums=d.verify_checksums, pin_memory=self.pin_memory)
            if d.batching == "pk":
                return batching.build_pk_loader(self.data_dir, d.train_split, self.recipe.transform,
                                                d.batch_size // d.pk_k, d.pk_k, **common)
            return batching.build_triplet_loader(self.data_dir, d.train_split, self.recipe.transform,
                                                 d.batch_size, **common)
        if self._train_stream is not None:
            self._train_stream.set_epoch(epoch, skip_batches)
            return self._train_stream
        self._train_stream = self.stream.build_train_loader(
            self.data_dir, d.train_split, self.recipe.transform, d.batch_size, self.ctx.rank, self.ctx.world_size,
            d.num_workers, self.cfg.experiment.seed, epoch, skip_batches=skip_batches,
            shuffle_buffer=d.shuffle_buffer, max_corrupt_fraction=d.max_corrupt_fraction, resampled=d.resampled,
            verify_checksums=d.verify_checksums, pin_memory=self.pin_memory)
        return self._train_stream

    def train_batches_per_epoch(self) -> int:
        return len(self.train(0))

    def corrupt_summary(self, loader: ShardLoader) -> dict[str, Any]:
        """What ``loader`` lost on all ranks in its last iteration: ``{"samples": n,
        "shards": {shard: n}}``. A collective: every rank calls it at the same point."""
        shards: dict[str, int] = {}
        total = 0
        for part in distributed.all_gather_objects(loader.corrupt_summary()):
            total += int(part["samples"])
            for name, n in part["shards"].items():
                shards[name] = shards.get(name, 0) + int(n)
        return {"samples": total, "shards": shards}

    def _eval(self, split: str) -> ShardLoader:
        d = self.cfg.data
        return self.stream.build_eval_loader(self.data_dir, split, self.recipe.transform, d.batch_size,
                                             self.ctx.rank, self.ctx.world_size, d.num_workers,
                                             verify_checksums=d.verify_checksums)

    def val(self) -> ShardLoader:
        return self._eval(self.cfg.data.val_split)

    def train_eval(self) -> ShardLoader:
        """The training split with the evaluation transform, each sample once over the ranks."""
        return self._eval(self.cfg.data.train_split)

    def _roles(self) -> dict[str, str]:
        roles = {"val": self.cfg.data.val_split, "test": self.cfg.data.test_split}
        return roles if validates(self.cfg) else {"test": roles["test"]}

    def eval_loaders(self) -> dict[str, ShardLoader]:
        from shards.manifest import Manifest

        splits = Manifest.load(self.data_dir).splits
        return {role: self._eval(split) for role, split in self._roles().items() if splits.get(split)}

    def read_images(self, role: str, keys: Sequence[str]) -> dict[str, Any]:
        from shards.reading import read_images_by_key

        return read_images_by_key(self.data_dir, self._roles()[role], keys)


def find_latest_checkpoint(output_dir: Path, experiment: str, suffix: str = ".pt") -> Path | None:
    candidates = [checkpoint_path(p, LATEST, suffix) for p in experiment_runs(output_dir, experiment)]
    candidates = [c for c in candidates if c.exists()]
    return max(candidates, key=lambda c: c.stat().st_mtime) if candidates else None


__all__ = ["Trainer", "LoaderFactory", "LoopState", "find_latest_checkpoint", "safe_load"]
