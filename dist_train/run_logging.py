"""What a run shows and leaves behind: rich console, CSV logs, TensorBoard, plots.

Only rank 0 owns a ``RunLogger`` that writes; other ranks get one that does
nothing, and their Python logging is raised to WARNING so they print only
warnings and errors.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dist_train.checkpoint import atomic_write
from recipes.history_plots import plot_metrics
from recipes.metrics_json import NotComputed

log = logging.getLogger("biomtl")


# Rich draws for 80 columns when it writes to a file or pipe (a SLURM/CI log, a
# redirected command): tables would cut metric names. Tables are as wide as their
# content, so a wide page costs nothing; COLUMNS, when set, still decides.
FILE_WIDTH = 240


def table_console(stderr: bool = False) -> Console:
    """A console for tables: the terminal's width, or :data:`FILE_WIDTH` when not a terminal."""
    console = Console(stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = FILE_WIDTH
    return console


def setup_console_logging(is_main: bool, rank: int) -> None:
    level = logging.INFO if is_main else logging.WARNING
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False,
                          markup=False, log_time_format="[%X]")
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if not is_main else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("matplotlib", "PIL", "urllib3", "fsspec", "s3fs", "botocore", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class CsvLog:
    """Append rows to a CSV; the header grows if a later row brings new keys."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():  # resuming: keep what was written, in order
            with path.open() as fh:
                self.rows = [dict(r) for r in csv.DictReader(fh)]

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run repeats none)."""
        self.rows = [r for r in self.rows if int(float(r["step"])) <= step]
        self._rewrite()

    def append(self, row: Mapping[str, Any]) -> None:
        new_keys = [k for k in row if not self.rows or k not in self.rows[0]]
        self.rows.append(dict(row))
        if new_keys and len(self.rows) > 1:
            self._rewrite()
            return
        write_header = not self.path.exists() or len(self.rows) == 1
        with self.path.open("a" if not write_header else "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.rows[0]), extrasaction="ignore")
            if write_header:
                writer.writeheader()
            writer.writerow(row)

    def _rewrite(self) -> None:
        fields: list[str] = []
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)


# performance columns (throughput, gradient norm, per-rank step time from dist_train/rank_report.py):
# TensorBoard's perf/ section, not losses to plot
# step_s: wall seconds per optimizer step; data_s: of them, blocked on the training
# loader (summed over the step's micro-batches); data_fraction = data_s / step_s
PERF_KEYS = ("samples_per_s", "grad_norm", "step_s_slowest", "slowest_rank", "step_s", "data_s", "data_fraction")


def plot_curves(train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            value = r.get(key)
            if value in (None, ""):
                continue
            xs.append(float(r["step"]))
            ys.append(float(value))
        return xs, ys

    skip = {"step", "epoch", "lr", "epoch_time_s", "time", *PERF_KEYS}
    loss_keys = [k for k in (train_rows[0] if train_rows else {}) if k not in skip]
    # Losses share a panel (train solid, validation dashed); metrics get their own.
    val_loss_keys = [k for k in (val_rows[0] if val_rows else {}) if k not in skip and "loss" in k]
    val_keys = [k for k in (val_rows[0] if val_rows else {}) if k not in skip and "loss" not in k]
    panels = 2 + (1 if val_keys else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    for key in loss_keys:
        axes[0].plot(*series(train_rows, key), label=f"train {key}")
    for key in val_loss_keys:
        axes[0].plot(*series(val_rows, key), "--o", label=f"val {key}")
    axes[0].set_title("losses")
    axes[0].set_xlabel("optimizer step")
    axes[0].legend(fontsize=7)
    axes[1].plot(*series(train_rows, "lr"), color="tab:orange")
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("optimizer step")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if val_keys:  # 0-1 rates on the left axis, others (PSNR in dB...) on a right one
        plot_metrics(axes[2], val_rows, val_keys, marker="o")
        axes[2].set_title("validation metrics")
        axes[2].set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)


def _data_wait(values: Mapping[str, float]) -> str:
    """'0.012 s/step (8%)': the step's wait for the training loader, for the interval line."""
    if "data_s" not in values:
        return "-"
    return f"{values['data_s']:.3f} s/step ({100 * values.get('data_fraction', 0.0):.0f}%)"


class RunLogger:
    """Rank 0's sink for everything a run reports."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, progress: bool,
                 plot: bool, tracking: str | None = None):
        self.run_dir = run_dir
        # logging.tracking (None: read from run_dir/config.yaml): "mlflow" adds an
        # MLflow run (dist_train.tracking) and keeps TensorBoard on.
        from dist_train.tracking import tracker_for_run

        self.tracker = tracker_for_run(run_dir, tracking)
        tensorboard = tensorboard or self.tracker is not None
        self.plot = plot
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        self.train_csv = CsvLog(run_dir / "logs" / "train_logs.csv")
        self.val_csv = CsvLog(run_dir / "logs" / "validation_logs.csv")
        self.test_csv = CsvLog(run_dir / "logs" / "test_logs.csv")
        self.train_csv.truncate_after(start_step)
        self.val_csv.truncate_after(start_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            self._log_config_text(start_step)
        # pictures already there (a resumed run's) were logged by the run that wrote them
        self.pictures_seen = {path: (stamp, _digest(path)) for path, stamp in _pictures(run_dir)}
        self.last_values: dict[str, float] = {}   # {split/metric: last value}: the hparams' metrics
        self.console = table_console(stderr=True)
        # On a terminal a live bar; in a batch log (SLURM, CI) plain lines instead.
        self.live = progress and self.console.is_terminal
        self.progress = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[sps]} samples/s  "
                           "data {task.fields[data]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               loss="-", lr="-", sps="-", data="-")
            self.progress.start()
        self.total_steps = total_steps
        self.last_step = start_step

    def log_train(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        self.last_step = step
        row = {"step": step, "epoch": epoch, **{k: _round(v) for k, v in values.items()}}
        self.train_csv.append(row)
        tags = {(f"train/{k}" if k not in ("lr", *PERF_KEYS) else f"perf/{k}"): v
                for k, v in values.items()}
        if self.tb:
            for tag, value in tags.items():
                self.tb.add_scalar(tag, value, step)
        if self.tracker:
            self.tracker.log_metrics(tags, step)
        if self.progress:
            self.progress.update(self.task, completed=step, loss=f"{values.get('loss', float('nan')):.4f}",
                                 lr=f"{values.get('lr', 0):.2e}", sps=f"{values.get('samples_per_s', 0):.0f}",
                                 data=_data_wait(values))
        else:
            log.info("step %d/%d  epoch %d  loss %.4f  lr %.2e  %.0f samples/s  data %s", step, self.total_steps,
                     epoch, values.get("loss", float("nan")), values.get("lr", 0), values.get("samples_per_s", 0),
                     _data_wait(values))

    MAX_SHARDS_LISTED = 5

    def log_epoch(self, epoch: int, step: int, seconds: float, corrupt: Mapping[str, Any]) -> None:
        """``corrupt``: ``{"samples": lost samples, "shards": {shard: lost samples}}`` of
        the epoch, all ranks (``LoaderFactory.corrupt_summary``); any loss is also
        printed, since a whole shard lost under a permissive
        ``data.max_corrupt_fraction`` would otherwise show only in TensorBoard."""
        lost, shards = int(corrupt["samples"]), dict(corrupt["shards"])
        if self.tb:
            self.tb.add_scalar("perf/epoch_time_s", seconds, step)
            self.tb.add_scalar("data/corrupt_samples", lost, step)
        if lost:
            worst = sorted(shards.items(), key=lambda kv: (-kv[1], kv[0]))
            listed = ", ".join(f"{name} ({n})" for name, n in worst[:self.MAX_SHARDS_LISTED])
            more = f", and {len(worst) - self.MAX_SHARDS_LISTED} more" if len(worst) > self.MAX_SHARDS_LISTED else ""
            log.warning("epoch %d: skipped %d corrupt sample(s) in %d shard(s): %s%s", epoch, lost, len(shards),
                        listed, more)

    def advance(self, step: int) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step)

    def log_images(self, step: int, images: Mapping[str, Any]) -> None:
        """``{tag: [3|1, H, W] float in [0, 1] or uint8}`` to TensorBoard (``val/<tag>``)."""
        if self.tb:
            for tag, image in images.items():
                self.tb.add_image(f"val/{tag}", image, step, dataformats="CHW")
            self.tb.flush()

    def log_pictures(self, step: int) -> None:
        """The PNG files written since the last call (plots, the recipe's
        validation pictures and reports: ROC, histograms, hardest errors,
        rollouts, reconstructions, collages) as TensorBoard images
        ``pictures/<path in the run>`` and tracker media. Called after each
        validation and at the end, for every recipe: recipes only write PNGs."""
        new = {}
        for path, stamp in _pictures(self.run_dir):
            seen = self.pictures_seen.get(path)
            if seen is not None and seen[0] == stamp:
                continue
            digest = _digest(path)  # a plot redrawn the same at the end is not a new picture
            self.pictures_seen[path] = (stamp, digest)
            if seen is None or seen[1] != digest:
                new[f"pictures/{path.relative_to(self.run_dir).with_suffix('').as_posix()}"] = path
        if not new:
            return
        if self.tb:
            for tag, path in new.items():
                image = _read_png(path)
                if image is not None:
                    self.tb.add_image(tag, image, step, dataformats="HWC")
            self.tb.flush()
        if self.tracker:
            self.tracker.log_images(new, step)

    def _log_config_text(self, step: int) -> None:
        """The run's resolved config as TensorBoard text (``config``)."""
        config = self.run_dir / "config.yaml"
        if config.is_file():
            # markdown: four-space indent keeps the YAML as written
            text = "\n".join("    " + line for line in config.read_text().splitlines())
            self.tb.add_text("config", text, step)

    def _log_hparams(self) -> None:
        """The resolved config (flattened) as TensorBoard hparams, with the final
        value of every validation / test metric (the scalars of the same tags)."""
        from torch.utils.tensorboard.summary import hparams

        from dist_train.tracking import flatten, run_config

        config = run_config(self.run_dir)
        metrics = {k: v for k, v in self.last_values.items() if not k.startswith("train/")}
        if not config or not metrics:
            return
        for summary in hparams(flatten(config, as_text=False), metrics):
            self.tb.file_writer.add_summary(summary)

    def log_validation(self, step: int, epoch: int, metrics: Mapping[str, float], split: str = "val") -> None:
        self.last_step = max(self.last_step, step)
        self.last_values.update({f"{split}/{k}": float(v) for k, v in metrics.items()})
        csv_log = self.val_csv if split == "val" else self.test_csv
        csv_log.append({"step": step, "epoch": epoch, **{k: _round(v) for k, v in metrics.items()}})
        if self.tb:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{split}/{key}", value, step)
            self.tb.flush()
        if self.tracker:
            self.tracker.log_metrics({f"{split}/{k}": v for k, v in metrics.items()}, step)
        table = Table(title=f"{split} @ step {step} (epoch {epoch})", show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():  # a metric that could not be computed says why
            table.add_row(key, f"n/a: {value.reason}" if isinstance(value, NotComputed) else f"{value:.4f}")
        self.console.print(table)
        if self.plot:
            self.plot_now()

    def plot_now(self) -> None:
        if self.train_csv.rows:
            plot_curves(self.train_csv.rows, self.val_csv.rows, self.run_dir / "plots" / "latest.png")

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.plot:
            self.plot_now()
        self.log_pictures(self.last_step)
        if self.tb:
            self._log_hparams()
            self.tb.close()
        if self.tracker:
            self.tracker.log_artifacts([self.run_dir / n for n in ("config.yaml", "logs", "plots", "eval")])
            self.tracker.close()


# what the run directory holds that is not the run's own pictures
_NOT_PICTURES = ("tb", "wandb", "checkpoints", "mlruns")


def _pictures(run_dir: Path) -> list[tuple[Path, tuple[int, int]]]:
    """``(PNG file, (mtime_ns, size))`` of the pictures under ``run_dir``."""
    out = []
    for path in sorted(run_dir.rglob("*.png")):
        rel = path.relative_to(run_dir)
        if rel.parts[0] in _NOT_PICTURES or any(part.startswith(".") for part in rel.parts):
            continue  # temp files of atomic writes start with a dot
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((path, (st.st_mtime_ns, st.st_size)))
    return out


def _digest(path: Path) -> str:
    import hashlib

    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _read_png(path: Path) -> Any:
    """An 8-bit RGB array of a picture, or None when it cannot be read (never stops a run)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        log.warning("could not read picture %s for TensorBoard: %s", path, exc)
        return None


class NullLogger:
    """What ranks other than 0 hold: same methods, no output."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _round(value: float) -> float:
    return value if not isinstance(value, float) or math.isnan(value) else float(f"{value:.6g}")
