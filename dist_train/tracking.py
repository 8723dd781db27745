"""Experiment trackers beyond the local files (CSV logs, plots, checkpoints).

``logging.tracking`` in the config:

* ``tensorboard`` (default): TensorBoard event files in ``run_dir/tb`` (rank 0).
* ``mlflow``: TensorBoard as above *and* an MLflow run in a local file store,
  ``run_dir/mlruns`` (offline: no server, no network; MLflow's telemetry is
  switched off; ``MLFLOW_ALLOW_FILE_STORE=true`` is set for MLflow 3's file
  store). Logged: the resolved config as params (dotted keys), every
  train/validation/test scalar as metrics (``train/loss``, ``val/eer``, ...) at
  its optimizer step, and at the end of the run the config, the CSV logs,
  the plots and the evaluation report (``eval/``) as artefacts. A resumed run
  continues the same MLflow run. Look at it with
  ``mlflow ui --backend-store-uri run_dir/mlruns``. Needs the optional extra
  (``pip install mlflow`` or ``pip install biomtl[mlflow]``); without it the
  config is refused with a one-line error before anything starts.
* ``wandb``: TensorBoard as above *and* a Weights & Biases run in **offline**
  mode in ``run_dir/wandb`` (``WANDB_MODE=offline`` for this run: nothing is
  sent, no account or API key is needed). Logged: the resolved config, every
  train/validation/test scalar at its optimizer step; at the end the config,
  CSV logs, plots and evaluation report are saved into the run's files. A
  resumed run continues the same W&B run (its id is kept in
  ``run_dir/wandb/biomtl_run_id``). Upload later, from a machine with network
  and ``wandb login``: ``wandb sync run_dir/wandb/offline-run-*``. Needs the
  optional extra (``pip install wandb`` or ``pip install 'biomtl[wandb]'``).
* ``none``: no tracker and no TensorBoard: only the local CSV logs, plots,
  checkpoints and artefacts in the run directory.

:func:`tracker_for_run` is what ``dist_train.run_logging.RunLogger`` calls.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("biomtl")

__all__ = ["Tracker", "MLflowTracker", "WandbTracker", "TrackingError", "require_mlflow", "require_wandb",
           "tracker_for_run", "flatten"]

RUN_ID_FILE = "biomtl_run_id"   # in run_dir/mlruns: the MLflow run a resumed run continues


class TrackingError(RuntimeError):
    """A tracker that cannot be used (one-line message)."""


class Tracker:
    """Does nothing; the interface the run logger calls."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifacts(self, paths: list[Path]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def _quiet_mlflow_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    # MLflow >= 3.x refuses the plain file store unless asked for (it is in
    # "maintenance mode" but works, needs no database and no server).
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


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


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


class MLflowTracker(Tracker):
    """An MLflow run in the local file store ``run_dir/mlruns`` (client API, no global state)."""

    def __init__(self, run_dir: Path, experiment: str, run_name: str):
        _quiet_mlflow_env()
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError("logging.tracking: 'mlflow' needs the optional extra: pip install mlflow") from None
        import warnings

        self.store = (run_dir / "mlruns").resolve()
        self.store.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow 3 warns that the file store is deprecated (it works)
            self.client = MlflowClient(tracking_uri=self.store.as_uri())
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            id_file = self.store / RUN_ID_FILE
            self.run_id = None
            if id_file.is_file():  # resumed run: continue the same MLflow run
                rid = id_file.read_text().strip()
                try:
                    self.client.get_run(rid)
                    self.client.update_run(rid, status="RUNNING")
                    self.run_id = rid
                except Exception:  # noqa: BLE001 (a deleted/corrupt run: start a new one)
                    self.run_id = None
            if self.run_id is None:
                self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
                id_file.write_text(self.run_id + "\n")
        self.params_logged = False

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
        for p in paths:
            try:
                if p.is_dir():
                    self.run.save(str(p / "**" / "*"), base_path=str(p.parent.parent), policy="end")
                elif p.is_file():
                    self.run.save(str(p), base_path=str(p.parent.parent), policy="end")
            except Exception as exc:  # noqa: BLE001
                log.warning("wandb: could not save %s: %s", p, exc)

    def close(self, status: str = "FINISHED") -> None:
        try:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        except Exception as exc:  # noqa: BLE001
            log.warning("wandb: could not close run: %s", exc)


def tracker_for_run(run_dir: Path, tracking: str | None = None) -> Tracker | None:
    """The tracker of ``logging.tracking`` (read from ``run_dir/config.yaml`` when
    not given): an :class:`MLflowTracker` for ``mlflow``, a :class:`WandbTracker`
    for ``wandb``, else None."""
    config: dict[str, Any] = {}
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        from dist_train.config import ConfigError, read_yaml_file

        try:
            config = read_yaml_file(cfg_file, str(cfg_file)) or {}
        except ConfigError:
            config = {}
        config = config if isinstance(config, dict) else {}
    if tracking is None:
        tracking = (config.get("logging") or {}).get("tracking", "tensorboard")
    if tracking not in ("mlflow", "wandb"):
        return None
    experiment = str((config.get("experiment") or {}).get("name", "biomtl"))
    tracker = (MLflowTracker if tracking == "mlflow" else WandbTracker)(run_dir, experiment, run_dir.name)
    if config:
        tracker.log_params(config)
    return tracker
