"""Experiment trackers beyond the local files (CSV logs, plots, checkpoints).

``logging.tracking`` in the config:

* ``tensorboard`` (default): TensorBoard event files in ``run_dir/tb`` (rank 0).
* ``mlflow``: TensorBoard as above *and* an MLflow run in the SQLite store
  ``<experiment.output_dir>/mlflow.db``, one store for every run of the output
  dir (so runs compare in one view; artefacts in ``<output_dir>/mlartifacts``),
  or in ``logging.mlflow_uri`` when set (a server, another database). Offline by
  default: no server, no network; MLflow's telemetry is switched off. Logged:
  the resolved config as params (dotted keys), every train/validation/test
  scalar as metrics (``train/loss``, ``val/eer``, ...) at its optimizer step,
  and at the end of the run the config, the CSV logs, the plots and the
  evaluation report (``eval/``) as artefacts. A resumed run continues the same
  MLflow run (``run_dir/mlflow_run.json``). Look at it with
  ``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db``. Needs the
  optional extra (``pip install mlflow`` or ``pip install biomtl[mlflow]``);
  without it the config is refused with a one-line error before anything starts.
* ``wandb``: TensorBoard as above *and* a Weights & Biases run in **offline**
  mode in ``run_dir/wandb`` (``WANDB_MODE=offline`` for this run: nothing is
  sent, no account or API key is needed). Logged: the resolved config, every
  train/validation/test scalar at its optimizer step, the pictures the run
  writes (plots, the recipe's validation pictures and reports) as
  ``wandb.Image`` media at the step that wrote them; at the end the config,
  CSV logs, plots and evaluation report are copied into the run's files
  (``offline-run-*/files/logs/train_logs.csv``, ``files/plots/latest.png``,
  ``files/eval/...``). A resumed run continues the same W&B run (its id is kept in
* ``none``: no tracker and no TensorBoard: only the local CSV logs, plots,
  checkpoints and artefacts in the run directory.

:func:`tracker_for_run` is what ``dist_train.run_logging.RunLogger`` calls.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

from dist_train.checkpoint import atomic_write

log = logging.getLogger("biomtl")

__all__ = ["Tracker", "MLflowTracker", "WandbTracker", "TrackingError", "require_mlflow", "require_wandb",
           "tracker_for_run", "flatten", "mlflow_store"]

RUN_ID_FILE = "biomtl_run_id"   # in run_dir/wandb: the W&B run a resumed run continues
MLFLOW_RUN_FILE = "mlflow_run.json"  # in run_dir: the MLflow store and run a resumed run continues
MLFLOW_DB = "mlflow.db"          # in experiment.output_dir: the default MLflow store of all its runs
MLFLOW_ARTIFACTS = "mlartifacts"  # beside a SQLite store: the artefacts of its experiments


class TrackingError(RuntimeError):
    """A tracker that cannot be used (one-line message)."""


class Tracker:
    """Does nothing; the interface the run logger calls."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifacts(self, paths: list[Path]) -> None: ...

    def log_images(self, images: Mapping[str, Path], step: int) -> None:
        """``{tag: PNG file}``: pictures a validation (or the end of the run) wrote."""

    def close(self, status: str = "FINISHED") -> None: ...


def _quiet_mlflow_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    # creating a SQLite store runs its schema migrations: a dozen INFO lines otherwise
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def require_mlflow() -> None:
    """Raise :class:`dist_train.config.ConfigError` (one line) if mlflow is missing."""
    from dist_train.config import ConfigError

    _quiet_mlflow_env()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("logging.tracking: 'mlflow' needs the optional extra: pip install mlflow "
                          "(or pip install 'biomtl[mlflow]'); or use tensorboard / none") from None


def require_wandb() -> None:
    """Raise :class:`dist_train.config.ConfigError` (one line) if wandb is missing."""
    from dist_train.config import ConfigError

    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logging.tracking: 'wandb' needs the optional extra: pip install wandb "
                          "(or pip install 'biomtl[wandb]'); or use tensorboard / mlflow / none") from None


def flatten(tree: Mapping[str, Any], prefix: str = "", as_text: bool = True) -> dict[str, Any]:
    """Dotted keys of a nested config; values as text (MLflow params), or, with
    ``as_text=False``, numbers and booleans kept and the rest as text (TensorBoard hparams)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + ".", as_text))
        elif not as_text and isinstance(v, (bool, int, float)):
            out[key] = v
        else:
            out[key] = str(v)[:6000]
    return out


def run_config(run_dir: Path) -> dict[str, Any]:
    """``run_dir/config.yaml`` as a dict ({} when absent or unreadable)."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return {}
    from dist_train.config import ConfigError, read_yaml_file

    try:
        config = read_yaml_file(cfg_file, str(cfg_file)) or {}
    except ConfigError:
        return {}
    return config if isinstance(config, dict) else {}


def mlflow_store(output_dir: Path, uri: str = "") -> str:
    """The tracking URI of ``logging.mlflow_uri``; empty: the SQLite store
    ``<output_dir>/mlflow.db`` that every run of the output dir shares (current
    MLflow reads it as it is; the plain file store needs MLFLOW_ALLOW_FILE_STORE)."""
    return uri or "sqlite:///" + str((Path(output_dir) / MLFLOW_DB).resolve())


def _artifact_root(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artefacts: beside the
    database (MLflow's own default is ./mlruns of whatever folder the shell is
    in). None for a server or other store: its own default."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / MLFLOW_ARTIFACTS).resolve().as_uri()


class MLflowTracker(Tracker):
    """An MLflow run in the store of :func:`mlflow_store` (client API, no global
    state); a resumed run continues the MLflow run named in ``run_dir/mlflow_run.json``."""

    def __init__(self, run_dir: Path, experiment: str, run_name: str, uri: str = ""):
        _quiet_mlflow_env()
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError("logging.tracking: 'mlflow' needs the optional extra: pip install mlflow") from None

        self.uri = mlflow_store(run_dir.parent, uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            experiment, artifact_location=_artifact_root(self.uri))
        id_file = run_dir / MLFLOW_RUN_FILE
        self.run_id = self._resumed_run(id_file)
        if self.run_id is None:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            text = json.dumps({"tracking_uri": self.uri, "run_id": self.run_id})
            atomic_write(id_file, lambda tmp: tmp.write_text(text + "\n"))
        self.params_logged = False

    def _resumed_run(self, id_file: Path) -> str | None:
        """The MLflow run a resumed run continues: the one it wrote, in the same store."""
        try:
            stored = json.loads(id_file.read_text())
            if stored["tracking_uri"] != self.uri:
                return None
            rid = str(stored["run_id"])
            self.client.get_run(rid)
            self.client.update_run(rid, status="RUNNING")
            return rid
        except Exception:  # noqa: BLE001 (none yet, or a deleted/corrupt run: start a new one)
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.params_logged:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        try:
            existing = self.client.get_run(self.run_id).data.params
            items = [p for p in items if p.key not in existing]  # params are immutable in MLflow
            for s in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[s:s + 100])
        except Exception as exc:  # noqa: BLE001 (tracking must never stop training)
            log.warning("mlflow: could not log params: %s", exc)
        self.params_logged = True

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_at_"), float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        try:
            for s in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[s:s + 500])
        except Exception as exc:  # noqa: BLE001
            log.warning("mlflow: could not log metrics at step %d: %s", step, exc)

    def log_artifacts(self, paths: list[Path]) -> None:
        for p in paths:
            try:
                if p.is_dir():
                    self.client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
                elif p.is_file():
                    self.client.log_artifact(self.run_id, str(p))
            except Exception as exc:  # noqa: BLE001
                log.warning("mlflow: could not log artefact %s: %s", p, exc)

    def log_images(self, images: Mapping[str, Path], step: int) -> None:
        """Each picture as an MLflow time-stepped image (``key`` = the TensorBoard
        tag, ``step``: the validation that wrote it), what MLflow's UI shows as an
        image series per key, as TensorBoard's image slider does. The PNG files are
        also among the end-of-run artefacts (``plots``, ``eval``)."""
        import re

        from PIL import Image

        for tag, path in images.items():
            key = re.sub(r"[^a-zA-Z0-9_\-./ ]", "_", tag)  # the characters MLflow allows in a key
            try:
                with Image.open(path) as image:
                    self.client.log_image(self.run_id, image.convert("RGB"), key=key, step=int(step),
                                          synchronous=True)
            except Exception as exc:  # noqa: BLE001 (tracking must never stop training)
                log.warning("mlflow: could not log picture %s at step %d: %s", path, step, exc)

    def close(self, status: str = "FINISHED") -> None:
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            log.warning("mlflow: could not close run: %s", exc)


class WandbTracker(Tracker):
    """A Weights & Biases run, offline, in ``run_dir/wandb`` (synced later with ``wandb sync``)."""

    def __init__(self, run_dir: Path, experiment: str, run_name: str):
        try:
            import wandb
        except ImportError:
            raise TrackingError("logging.tracking: 'wandb' needs the optional extra: pip install wandb") from None
        self.run_dir = run_dir.resolve()
        self.dir = (run_dir / "wandb").resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        id_file = self.dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=experiment, name=run_name, id=run_id, resume="allow", mode="offline",
                              dir=str(run_dir.resolve()), reinit="create_new",
                              settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True,
                                                      silent=True))
        self.params_logged = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.params_logged:
            return
        try:
            self.run.config.update(dict(params), allow_val_change=True)
        except Exception as exc:  # noqa: BLE001 (tracking must never stop training)
            log.warning("wandb: could not log the config: %s", exc)
        self.params_logged = True

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import math

        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(float(v))}
        try:
            if values:
                self.run.log(values, step=int(step))
        except Exception as exc:  # noqa: BLE001
            log.warning("wandb: could not log metrics at step %d: %s", step, exc)

    def log_artifacts(self, paths: list[Path]) -> None:
        """Each file under ``paths`` into the run's files, at its path in the run
        directory (``logs/train_logs.csv``, ``plots/latest.png``, ``eval/test/...``)."""
        for p in paths:
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
            for f in files:
                # a copy in the run's files folder (what `wandb sync` uploads): wandb.save
                # would leave a symlink, dangling once the run directory moves
                target = Path(self.run.dir) / f.relative_to(self.run_dir)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, target)
                except Exception as exc:  # noqa: BLE001
                    log.warning("wandb: could not save %s: %s", f, exc)

    def log_images(self, images: Mapping[str, Path], step: int) -> None:
        import wandb

        try:
            if images:
                self.run.log({tag: wandb.Image(str(path)) for tag, path in images.items()}, step=int(step))
        except Exception as exc:  # noqa: BLE001
            log.warning("wandb: could not log pictures at step %d: %s", step, exc)

    def close(self, status: str = "FINISHED") -> None:
        try:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        except Exception as exc:  # noqa: BLE001
            log.warning("wandb: could not close run: %s", exc)


def tracker_for_run(run_dir: Path, tracking: str | None = None) -> Tracker | None:
    """The tracker of ``logging.tracking`` (read from ``run_dir/config.yaml`` when
    not given): an :class:`MLflowTracker` for ``mlflow``, a :class:`WandbTracker`
    for ``wandb``, else None."""
    config = run_config(run_dir)
    if tracking is None:
        tracking = (config.get("logging") or {}).get("tracking", "tensorboard")
    if tracking not in ("mlflow", "wandb"):
        return None
    experiment = str((config.get("experiment") or {}).get("name", "biomtl"))
    if tracking == "mlflow":
        uri = str((config.get("logging") or {}).get("mlflow_uri") or "")
        tracker: Tracker = MLflowTracker(run_dir, experiment, run_dir.name, uri)
    else:
        tracker = WandbTracker(run_dir, experiment, run_dir.name)
    if config:
        tracker.log_params(config)
    return tracker
