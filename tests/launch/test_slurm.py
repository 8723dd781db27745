"""The SLURM scripts, on a real (one-node, throw-away) SLURM cluster.

``sbatch --wait slurm/dcal.sh`` trains the DCAL recipe (tiny, CPU) through the
script's srun -> torchrun (c10d) path; ``srun`` without torchrun trains with the
ranks taken from SLURM's variables. Needs root and Debian's slurm-wlm + munge:
skipped with the reason elsewhere, a failure under CI=true (.ci/run installs them).
"""
from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dist_train.checkpoint import safe_load
from tests.conftest import PYTHON, REPO
from tests.slurm_cluster import SlurmCluster, require_slurm

pytestmark = pytest.mark.integration  # torchrun / DeepSpeed / SLURM / full training runs

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
JOB_TIMEOUT = 300


def tiny_dcal_overrides(root: Path) -> list[str]:
    """configs/dcal_twins.yaml as a seconds-long CPU run (cf. tests/conftest.py tiny_overrides)."""
    return [
        f"experiment.output_dir={root / 'runs'}",
        f"data.synthetic.cache_dir={root / 'synthetic-cache'}",
        "data.synthetic.num_identities=12",
        "data.synthetic.samples_per_identity=4",
        "data.synthetic.image_size=32",
        "data.batch_size=8",
        "recipe.params.img_size=32",
        "recipe.params.depth=1",
        "train.precision=fp32",
        "train.max_steps=3",
        "train.log_every_steps=1",
        "train.val_every_steps=3",
        "logging.progress=false",
        "logging.plot=false",
    ]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------
# Static checks: no SLURM needed.


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_have_sane_headers(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    headers = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, flags=re.M))
    assert headers["ntasks-per-node"] == "1"  # one torchrun agent per node
    assert headers["output"] == "logs/%x-%j.out"
    assert headers["open-mode"] == "append"  # a requeued job keeps the first attempt's log
    assert {"job-name", "nodes", "cpus-per-task", "time"} <= set(headers)
    assert not re.search(r"^#SBATCH --(gpus|gres|gpus-per-node)", text, flags=re.M)  # CPU partitions work


def test_recipe_scripts_exist_and_default_configs() -> None:
    assert {p.name for p in SCRIPTS} >= {"train.sh", "dcal.sh", "facecom.sh"}
    assert "configs/dcal_twins.yaml" in (REPO / "slurm" / "dcal.sh").read_text()
    assert "configs/facecom.yaml" in (REPO / "slurm" / "facecom.sh").read_text()
    train = (REPO / "slurm" / "train.sh").read_text()
    for needle in ("export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "--rdzv-backend=c10d", "--max-restarts",
                   'scontrol show hostnames "${SLURM_JOB_NODELIST:-}"', "scontrol show node -o", "SLURM_JOB_ID % 20000",
                   "launch/slurm_agent.py"):
        assert needle in train, needle


def test_script_refuses_to_run_outside_slurm() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "dcal.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


# ---------------------------------------------------------------------------
# A real cluster.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    require_slurm()
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _resolves(host: str) -> bool:
    try:
        socket.gethostbyname(host)
        return True
    except OSError:
        return False


def _job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    env = cluster.env()
    env.update(OMP_NUM_THREADS="1", BIOMTL_REPO=str(REPO), BIOMTL_PYTHON=PYTHON, **extra)
    if not _resolves(cluster.node):  # a CI container whose own hostname is not in /etc/hosts
        env["BIOMTL_RDZV_HOST"] = env["MASTER_ADDR"] = "127.0.0.1"
    return env


def _sbatch(cluster: SlurmCluster, args: list[str], cwd: Path, env: dict[str, str]) -> tuple[str, int]:
    proc = subprocess.run(["sbatch", "--wait", "--parsable", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=JOB_TIMEOUT)
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch failed ({proc.returncode}): {proc.stderr}\n{cluster.logs()}"
    return job_id, proc.returncode


def test_sbatch_dcal_trains_on_cpu(cluster: SlurmCluster, tmp_path: Path) -> None:
    """``sbatch --wait slurm/dcal.sh`` from another directory (the repo found via
    BIOMTL_REPO), tiny overrides via BIOMTL_OVERRIDES plus one script argument."""
    work = tmp_path / "submit"
    (work / "logs").mkdir(parents=True)  # #SBATCH --output=logs/%x-%j.out
    overrides = tiny_dcal_overrides(tmp_path)
    env = _job_env(cluster, BIOMTL_OVERRIDES=" ".join(overrides[:-1]), BIOMTL_MAX_RESTARTS="0")
    started = time.monotonic()
    job_id, code = _sbatch(cluster, ["--cpus-per-task=2", str(REPO / "slurm" / "dcal.sh"), overrides[-1]],
                           work, env)
    log_file = work / "logs" / f"dcal-{job_id}.out"
    assert log_file.exists(), cluster.job_info(job_id) + cluster.logs()
    log = log_file.read_text(errors="replace")
    assert code == 0, f"job {job_id} exit {code} after {time.monotonic() - started:.0f} s\n{log[-5000:]}"
    head = env.get("BIOMTL_RDZV_HOST", "127.0.0.1")  # the first node's NodeAddr, from scontrol
    assert f"rendezvous {head}:{20000 + int(job_id) % 20000}" in log
    assert "configs/dcal_twins.yaml" in log and "run directory:" in log and "world size 1" in log
    runs = list((tmp_path / "runs").glob("dcal_twins_*"))
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / "launch_id").read_text().strip() == f"slurm-{job_id}/torchrun-{job_id}"
    ckpt = safe_load(run / "checkpoints" / "latest.pt")
    assert ckpt["client"]["loop"]["step"] == 3
    assert ckpt["client"]["config"]["recipe"]["name"] == "dcal_twins"
    assert [int(r["step"]) for r in _rows(run / "logs" / "train_logs.csv")] == [1, 2, 3]
    assert (run / "model.pt").exists()


def test_srun_without_torchrun_two_ranks(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Two srun tasks running dist_train/main.py directly: ranks, world size,
    master address and port all come from SLURM's variables (launch/env.py)."""
    from tests.conftest import tiny_overrides

    work = tmp_path / "submit"
    work.mkdir()
    overrides = tiny_overrides(tmp_path, train__max_steps=1)
    command = " ".join([f"srun --kill-on-bad-exit=1 {PYTHON} {REPO / 'dist_train' / 'main.py'}",
                        f"--config {REPO / 'configs' / 'facecom.yaml'}", *overrides])
    job_id, code = _sbatch(cluster, ["--ntasks=2", "--cpus-per-task=1", "--output=job-%j.out",
                                     f"--wrap={command}"], work, _job_env(cluster))
    log = (work / f"job-{job_id}.out").read_text(errors="replace")
    assert code == 0, log[-5000:]
    assert "world size 2" in log, log[-3000:]
    run = next((tmp_path / "runs").glob("facecom_*"))
    ckpt = safe_load(run / "checkpoints" / "latest.pt")
    assert ckpt["client"]["loop"]["step"] == 1
    assert len(ckpt["client"]["rng"]) == 2  # one RNG state per rank: two ranks really ran
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
