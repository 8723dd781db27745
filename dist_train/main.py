"""Training entry point for torchrun, srun and plain python.

    torchrun --nproc_per_node=2 dist_train/main.py --config configs/facecom.yaml train.lr=3e-4
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying for ~46 s
os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # torchrun restarts (PyTorch #135712)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dist_train import distributed  # noqa: E402
from dist_train.checkpoint import atomic_write, final_model_path  # noqa: E402
from dist_train.config import Config, ConfigError, dump_config, synthetic_cache_dir  # noqa: E402
from dist_train.distributed import check_backend_here  # noqa: E402
from dist_train.preflight import check_resume, load_checked_config, synthetic_spec  # noqa: E402
from models.backbones import WeightsError  # noqa: E402
from models.losses import LpipsWeightsMissing  # noqa: E402
from dist_train.stored_recipe import build_recipe  # noqa: E402
from recipes.base import ParallelContext, RecipeDataError  # noqa: E402
from shards.reading import CorruptDataError, corrupt_data_line  # noqa: E402
from shards.remote import dataset_root  # noqa: E402
from launch import faults  # noqa: E402
from launch.env import detect, launch_id, restart_count  # noqa: E402

log = logging.getLogger("biomtl")


def build_arg_parser(prog: str = "dist_train/main.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a biomtl recipe (DDP, DeepSpeed or FSDP2).")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.batch_size=64")
    return parser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_suffix(strategy: str) -> str:
    return "" if strategy in ("deepspeed", "fsdp") else ".pt"  # (folders: DeepSpeed's, DCP's)


def resolve_resume(cfg: Config, resume: str | None) -> Path | None:
    from dist_train.trainer import find_latest_checkpoint

    if resume is None:
        return None
    if resume == "latest":
        found = find_latest_checkpoint(Path(cfg.experiment.output_dir), cfg.experiment.name,
                                       checkpoint_suffix(cfg.train.strategy))
        if found is None:
            raise ConfigError(f"--resume latest: no checkpoint under {cfg.experiment.output_dir} of experiment "
                              f"'{cfg.experiment.name}' (in its run directories "
                              f"{cfg.experiment.name}_<date>-<time>/checkpoints/)")
    else:
        found = Path(resume)
        if not found.exists():
            raise ConfigError(f"--resume: path does not exist: {resume}")
    # Before anything is created or written: the checkpoint loads weights-only
    # (DeepSpeed's engine unpickles its folder itself, so every file of it is
    # checked) and fits this config's recipe, optimizer and model shapes.
    check_resume(cfg, found)
    return found


def run_dir_for(cfg: Config, resume: Path | None, is_main: bool) -> Path:
    """The run directory; the same on every rank (rank 0 decides). A resumed
    checkpoint inside a run (``RUN/checkpoints/...``) continues that run; one
    anywhere else (a copied file) starts a new run directory, so that its
    folder is never turned into a run."""
    from dist_train.checkpoint import run_dir_of

    if resume is not None and run_dir_of(resume) is not None:
        return run_dir_of(resume)
    from dist_train.checkpoint import new_run_dir

    name = str(new_run_dir(cfg.experiment.output_dir, cfg.experiment.name)) if is_main else None
    return Path(distributed.broadcast_object(name))


LAUNCH_FILE = "launch_id"  # in a run directory: the launch that started it (see restart_point)


def attempt_of_group() -> int:
    """The restart count of this attempt, the same on every rank: the largest
    of the ranks' counts. An agent started anew after its host was lost (its
    own count 0) joins a group whose other agents restarted: the group is a
    restart, and every rank must take the same path through the collectives."""
    return max(distributed.all_gather_objects(restart_count()))


def restart_point(cfg: Config, resume: Path | None, is_main: bool,
                  attempt: int | None = None) -> tuple[Path, Path | None] | None:
    """After torchrun restarted the worker group (or SLURM requeued the job):
    the first attempt's run directory and the checkpoint to go on from, so the
    run resumes by itself; None on a first attempt or when no run is found.

    The first attempt's rank 0 writes the launch id (SLURM job id / torchrun
    rendezvous id, shared by all attempts) into its run directory; a restart
    takes the newest run directory carrying the same id, and its ``latest``
    checkpoint if this launch saved it, else the checkpoint the first attempt
    started from (``resume``; None = from scratch). ``attempt``: the group's
    (:func:`attempt_of_group`; None: this process's restart count)."""
    attempt = restart_count() if attempt is None else attempt
    if attempt == 0:
        return None
    found = None
    if is_main:
        found = _find_launch_run(cfg, resume)
        if found is None:
            log.warning("restart %d: no run directory of launch %s under %s; starting a new run",
                        attempt, launch_id(), cfg.experiment.output_dir)
    found = distributed.broadcast_object(found)
    if found is None:
        return None
    run, ckpt = found
    return Path(run), Path(ckpt) if ckpt else None


def _find_launch_run(cfg: Config, resume: Path | None) -> tuple[str, str | None] | None:
    from dist_train.checkpoint import checkpoint_path, experiment_runs, run_dir_of

    lid = launch_id()
    if lid is None:
        return None
    candidates = [run / LAUNCH_FILE for run in experiment_runs(cfg.experiment.output_dir, cfg.experiment.name)]
    if resume is not None and run_dir_of(resume) is not None:
        candidates.append(run_dir_of(resume) / LAUNCH_FILE)
    marks = [m for m in candidates if m.is_file() and m.read_text().strip() == lid]
    if not marks:
        return None
    mark = max(marks, key=lambda m: m.stat().st_mtime)
    latest = checkpoint_path(mark.parent, suffix=checkpoint_suffix(cfg.train.strategy))
    if latest.exists() and latest.stat().st_mtime >= mark.stat().st_mtime:
        return str(mark.parent), str(latest)
    return str(mark.parent), str(resume) if resume is not None else None


def prepare_data(cfg: Config, ctx: distributed.DistContext) -> Path:
    if cfg.data.source == "shards":
        return dataset_root(cfg.data.shards)  # a Path, or a remote dataset's URL (Path folds its '//')
    from shards.synthetic import ensure_synthetic

    cache, spec = synthetic_cache_dir(cfg), synthetic_spec(cfg)
    # One writer per node (nodes may not share a filesystem); the data is a
    # pure function of the spec, so every node makes the same bytes.
    if ctx.env.is_local_main:
        path = ensure_synthetic(cache, spec)
    distributed.barrier()
    if not ctx.env.is_local_main:
        path = ensure_synthetic(cache, spec)
    return path


def train(cfg: Config, resume: Path | None) -> dict[str, float]:
    from dist_train.checkpoint import run_dir_of
    from dist_train.run_logging import setup_console_logging
    from shards.manifest import Manifest

    env = detect()
    setup_console_logging(env.is_main, env.rank)
    # run() reports these in one line (a config mistake found once the data
    # exists; an I/O failure naming the path): no rank traceback for them.
    with distributed.process_group(env, cfg.dist.backend, cfg.dist.timeout_s,
                                   reported=(ConfigError, OSError, PeerLost, CorruptDataError, FloatingPointError),
                                   cpu_threads=cfg.dist.cpu_threads) as ctx:
        data_dir = prepare_data(cfg, ctx)
        attempt = attempt_of_group()
        restart = restart_point(cfg, resume, ctx.is_main, attempt)
        if restart is not None:
            resume = restart[1]
        try:  # a resumed run's weights come from its checkpoint: nothing is read to start them
            recipe = build_recipe(cfg, Manifest.load(data_dir).data_info(cfg.data.train_split),
                                  weights_from_checkpoint=resume is not None,
                                  parallel=ParallelContext(ctx.rank, ctx.world_size, training=True))
        except RecipeDataError as exc:  # the recipe refuses these data (e.g. a modality it needs is missing)
            raise ConfigError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        if resume is not None:  # again, now that the data exist (the preflight may not have known them)
            check_resume(cfg, resume, recipe.data_info)
        if restart is not None:  # torchrun restarted the group: go on in the first attempt's run
            run_dir = restart[0]
            log.info("restart %d: continuing %s from %s", attempt, run_dir, resume or "scratch")
        else:
            run_dir = run_dir_for(cfg, resume, ctx.is_main)
            if resume is not None and ctx.is_main and run_dir_of(resume) is None:
                log.info("%s is not inside a run's checkpoints/ folder: continuing it in a new run directory",
                         resume)
        made_now = restart is None and (resume is None or run_dir_of(resume) is None)
        try:
            return _train_in(run_dir, cfg, ctx, recipe, data_dir, resume, attempt)
        except (ConfigError, WeightsError, LpipsWeightsMissing) as exc:
            if made_now and ctx.is_main:  # a refused resume or weights that do not fit leave no new, empty run dir
                with contextlib.suppress(OSError):
                    run_dir.rmdir()  # only ever removes an empty folder
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError((str(exc).splitlines() or [type(exc).__name__])[0]) from None  # tensors that do not fit
        except OSError as exc:
            if exc.filename is None and exc.errno is not None:  # a bare write() failure: say where the run writes
                exc.filename = str(run_dir)
            raise
        except RuntimeError as exc:
            if lost_peer(exc):  # the rank that failed says why; this one only that it stopped
                raise PeerLost(_first_words(exc)) from exc
            raise


class PeerLost(RuntimeError):
    """A collective failed because another rank died or stopped (its own error is the cause)."""


# gloo's words when a peer process died, or stopped answering for dist.timeout_s
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe",
              "Timed out waiting")


def lost_peer(exc: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistError", ())) or any(m in str(exc) for m in _PEER_LOST)


def _first_words(exc: BaseException) -> str:
    """gloo's '[.../pair.cc:561] Connection closed by peer [127.0.0.1]:5824. This is typically...'
    -> 'Connection closed by peer [127.0.0.1]:5824'."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0][:200]


def _train_in(run_dir: Path, cfg: Config, ctx: distributed.DistContext, recipe: Any, data_dir: Path,
              resume: Path | None, attempt: int = 0) -> dict[str, float]:
    from dist_train.rank_report import describe_this_rank
    from dist_train.trainer import LoaderFactory, Trainer

    places = distributed.all_gather_objects(describe_this_rank(ctx.backend))
    if ctx.is_main:
        log.info("run directory: %s  (world size %d, %s, %s)", run_dir, ctx.world_size, ctx.device,
                 ctx.backend)
        for rank, place in enumerate(places):
            log.info("rank %d: %s", rank, place)
        log.info("%s", ctx.cpu_threads)
    seed_everything(cfg.experiment.seed)  # same initial weights on every rank
    trainer = Trainer(cfg, ctx, recipe, data_dir, run_dir, LoaderFactory(cfg, ctx, data_dir, recipe),
                      after_step=faults.hook_from_env())
    seed_everything(cfg.experiment.seed + 1000 * ctx.rank)  # per-rank dropout etc.
    if resume is not None:
        trainer.resume(resume)
    if ctx.is_main:  # only now that a resume has worked: the run's own files change
        if attempt == 0 and launch_id():
            (run_dir / LAUNCH_FILE).write_text(launch_id() + "\n")
        text = dump_config(cfg)
        atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(text))
    metrics = trainer.fit()
    if cfg.train.strategy == "ddp" and ctx.world_size > 1:  # (ZeRO shards differ by design)
        from dist_train.rank_report import weights_digest

        digests = distributed.all_gather_objects(weights_digest(trainer.strategy.module))
        if ctx.is_main and len(set(digests)) == 1:
            log.info("weights identical on all %d ranks (digest %s)", len(digests), digests[0])
        elif ctx.is_main:
            log.warning("weights differ between ranks: %s", ", ".join(f"rank {r} {d}" for r, d in enumerate(digests)))
    if trainer.state.step >= trainer.total_steps or trainer.state.stopped_early:
        # The consolidated fp32 weights for inference (any strategy, any ZeRO stage).
        from dist_train.config import resolved_config_dict
        from dist_train.export import export_live

        export_live(trainer.strategy, final_model_path(run_dir), resolved_config_dict(cfg),
                    recipe.data_info.to_dict(), ctx.is_main)
    if ctx.is_main:
        from recipes.metrics_json import json_text, not_computed_reasons

        why = not_computed_reasons(metrics)  # null in JSON; the reason beside it
        text = json_text({"step": trainer.state.step, "epoch": trainer.state.epoch, **metrics,
                          **({"not_computed": why} if why else {})})
        atomic_write(run_dir / "final_metrics.json", lambda tmp: tmp.write_text(text))
    return metrics


def run(argv: list[str] | None = None, prog: str = "dist_train/main.py") -> int:
    """Exit codes: 0 done; 2 a mistake in the config, data or --resume, found
    before anything is written (or, for data that only exists once the group
    does, before training); 1 an I/O failure during the run (disk full, a
    folder gone read-only), more corrupt samples than
    ``data.max_corrupt_fraction``, a loss that is no longer finite. Each is one ``error:`` line on stderr."""
    args = build_arg_parser(prog).parse_args(argv)
    env = detect()
    try:
        cfg = load_checked_config(args.config, args.overrides, start=args.resume is None)
        check_backend_here(cfg.dist.backend)
        resume = resolve_resume(cfg, args.resume)
    except ConfigError as exc:
        if env.is_local_main:  # every rank finds the same mistake: one line per node
            _error(str(exc))
        return 2
    try:
        train(cfg, resume)
    except ConfigError as exc:
        if env.is_main:
            _error(str(exc))
        return 2
    except OSError as exc:
        _error(f"{_rank_of(env)}I/O failure: {describe_os_error(exc)}")
        log.debug("I/O failure", exc_info=True)
        return 1
    except PeerLost as exc:
        _error(f"{_rank_of(env)}stopped: another rank failed or its connection was lost ({exc})")
        return 1
    except CorruptDataError as exc:  # found while streaming: the run's checkpoints stay; fix the data, --resume
        _error(f"{_rank_of(env)}training stopped: {corrupt_data_line(exc)}")
        return 1
    except FloatingPointError as exc:  # the trainer's check of the logged losses: the run diverged
        _error(f"{_rank_of(env)}training stopped: {exc} (the loss diverged: lower train.lr or set train.grad_clip)")
        return 1
    return 0


def _rank_of(env: Any) -> str:
    return f"rank {env.rank}: " if env.world_size > 1 else ""


def describe_os_error(exc: OSError) -> str:
    """``PATH: cause`` in one line (``[Errno 28] ...`` and tracebacks say less to a user)."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


def _error(line: str) -> None:
    print(f"error: {line.splitlines()[0] if line else 'failed'}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    # record: under torchrun, a rank's exception goes into the failure summary (the "root cause")
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(run)())
