"""``biomtl launch``: start training the right way for where you are.

    biomtl launch --config configs/facecom.yaml                       # this machine, all GPUs (or 1 CPU rank)
    biomtl launch --config C --nproc-per-node 2 train.lr=3e-4         # 2 ranks here
    biomtl launch --config C --nnodes 2 --rdzv-endpoint host0:29400   # run the same on each of 2 hosts
    biomtl launch --config C --slurm --nnodes 2 --gpus-per-node 4     # sbatch slurm/<recipe>.sh
    biomtl launch ... --dry-run                                       # print the command(s), run nothing

Locally it runs torchrun (``python -m torch.distributed.run``): ``--standalone``
on one node, c10d rendezvous at ``--rdzv-endpoint`` for several. With
``--slurm`` it submits ``slurm/<recipe>.sh`` (the script whose name the
config's recipe name starts with, else ``slurm/train.sh``) with the config and
overrides as script arguments. The config is loaded and validated first (by
the loader the ``biomtl`` command hands in: launch knows nothing of the
trainer), so a mistake stops here with exit code 2, before anything starts or
is queued.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # flaky restarts otherwise (PyTorch #135712, #167288)


def build_arg_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Launch training with torchrun here, or on SLURM.",
                                epilog="Overrides are dotted key=value pairs, e.g. train.lr=3e-4.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint path (passed to the trainer)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (hosts) in the job [1]")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node [local: the GPUs here, or 1 without GPUs; SLURM: decided per node "
                        "by the script]")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="torchrun restarts of a failed worker group; each restart resumes from the run's "
                        "latest checkpoint [local: 0; SLURM: the script's default, 3]")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of the c10d rendezvous (several nodes, local mode): the same on every host")
    p.add_argument("--rdzv-id", default=None,
                   help="rendezvous id, the same on every host [biomtl-<experiment.name>]")
    p.add_argument("--slurm", action="store_true", help="submit slurm/<recipe>.sh with sbatch instead")
    p.add_argument("--gpus-per-node", type=int, default=None, help="with --slurm: sbatch --gpus-per-node")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="with --slurm: one more sbatch option, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the exact command(s) and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.batch_size=64")
    return p


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch / broken driver: count none
        return 0


def torchrun_command(args: argparse.Namespace, config: str, python: str = sys.executable) -> list[str]:
    nproc = args.nproc_per_node or local_gpus() or 1
    cmd = [python, "-m", "torch.distributed.run"]
    if args.nnodes == 1 and not args.rdzv_endpoint:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        cmd += [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                f"--rdzv-id={args.rdzv_id}"]
    cmd += [f"--nproc-per-node={nproc}", f"--max-restarts={args.max_restarts or 0}",
            str(REPO / "dist_train" / "main.py"), "--config", config]
    if args.resume:
        cmd += ["--resume", args.resume]
    return cmd + list(args.overrides)


def slurm_script(recipe: str, slurm_dir: Path = REPO / "slurm") -> Path:
    """``slurm/<recipe>.sh``, else the longest script name the recipe name starts
    with (``dcal_twins`` -> ``dcal.sh``), else the generic ``train.sh``."""
    exact = slurm_dir / f"{recipe}.sh"
    if exact.is_file():
        return exact
    prefixes = [p for p in slurm_dir.glob("*.sh") if p.stem != "train" and recipe.startswith(p.stem)]
    if prefixes:
        return max(prefixes, key=lambda p: len(p.stem))
    return slurm_dir / "train.sh"


def sbatch_command(args: argparse.Namespace, config: str, recipe: str) -> tuple[dict[str, str], list[str]]:
    env = {"BIOMTL_REPO": str(REPO)}
    if args.nproc_per_node:
        env["BIOMTL_NPROC_PER_NODE"] = str(args.nproc_per_node)
    if args.max_restarts is not None:
        env["BIOMTL_MAX_RESTARTS"] = str(args.max_restarts)
    cmd = ["sbatch", f"--nodes={args.nnodes}"]
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    cmd += list(args.sbatch_arg)
    cmd += [_display_path(slurm_script(recipe)), "--config", config]
    if args.resume:
        cmd += ["--resume", args.resume]
    return env, cmd + list(args.overrides)


def _display_path(path: Path) -> str:
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    except ValueError:
        return str(path)


def shell_line(env: dict[str, str], cmd: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)])


def run(argv: list[str] | None, prog: str, load_config: Callable[[str, Sequence[str]], Any]) -> int:
    """``load_config(path, overrides)`` returns the validated config (with
    ``experiment.name`` and ``recipe.name``) or raises ``ValueError`` with a
    one-line message."""
    parser = build_arg_parser(prog)
    args = parser.parse_intermixed_args(argv)
    for name in ("nnodes", "nproc_per_node", "max_restarts", "gpus_per_node"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_restarts" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_restarts' else 1}")
    if not args.slurm and (args.gpus_per_node or args.sbatch_arg):
        parser.error("--gpus-per-node and --sbatch-arg go with --slurm")
    if not args.slurm and args.nnodes > 1 and not args.rdzv_endpoint:
        parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every host; HOST is one of "
                     "the nodes), or --slurm")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = str(Path(args.config).resolve())
    args.rdzv_id = args.rdzv_id or f"biomtl-{cfg.experiment.name}"

    if args.slurm:
        extra_env, cmd = sbatch_command(args, config, cfg.recipe.name)
    else:
        extra_env, cmd = dict(RESTART_ENV), torchrun_command(args, config)
    if args.dry_run:
        print(shell_line(extra_env, cmd))
        return 0
    env = {**os.environ, **extra_env}
    if args.slurm:
        Path("logs").mkdir(exist_ok=True)  # #SBATCH --output=logs/%x-%j.out: SLURM does not create it
    try:
        return subprocess.run(cmd, env=env).returncode
    except FileNotFoundError as exc:
        print(f"error: {exc.filename}: not found{' (is SLURM installed here?)' if args.slurm else ''}",
              file=sys.stderr)
        return 127
    except KeyboardInterrupt:
        return 130

