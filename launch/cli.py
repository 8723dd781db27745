"""``biomtl launch``: start training the right way for where you are.

    biomtl launch --config configs/facecom.yaml                       # this machine, all GPUs (or 1 CPU rank)
    biomtl launch --config C --nproc-per-node 2 train.lr=3e-4         # 2 ranks here
    biomtl launch --config C --nnodes 2 --rdzv-endpoint host0:29400   # run the same on each of 2 hosts
    biomtl launch --config C --slurm --nnodes 2 --gpus-per-node 4     # sbatch slurm/<recipe>.sh
    biomtl launch ... --dry-run                                       # print the command(s), run nothing

Locally it runs torchrun (``python -m torch.distributed.run``): ``--standalone``
on one node, c10d rendezvous at ``--rdzv-endpoint`` for several. The host whose
address the endpoint names runs the rendezvous store: torchrun guesses that
from this machine's hostname, which fails where the name does not resolve to
that address (several interfaces, containers, network namespaces), so this
command checks it itself (can it bind the endpoint's address?) and then tells
torchrun (``--rdzv-conf=is_host=true``); ``--dry-run`` prints the command of the
rendezvous host and of the others. With
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
import socket
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
    p.add_argument("--local-addr", default=None,
                   help="several nodes: this host's address that the other hosts reach (torchrun tells the "
                        "workers rank 0's as MASTER_ADDR) [the address on the route to the rendezvous host]")
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


def hosts_rendezvous(endpoint: str) -> bool:
    """Whether this host should run the c10d rendezvous store of ``HOST:PORT``:
    HOST resolves to an address of this host (it can bind it) other than
    loopback, and nothing listens on PORT there yet. torchrun decides that
    from the hostname alone and, where the name does not resolve to the
    endpoint's address, no agent hosts the store and the rendezvous times out.
    Loopback is left to torchrun (several agents on one machine: the first
    one to bind hosts, the others connect)."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        if sockaddr[0].startswith("127.") or sockaddr[0] == "::1":
            return False
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((sockaddr[0], int(port) if port.isdigit() else 0))
                return True
            except OSError:
                continue
    return False


def address_towards(endpoint: str) -> str | None:
    """This host's address on the route to the endpoint's host (a UDP
    ``connect`` only asks the routing table: nothing is sent), None where
    there is no route. torchrun hands the rank-0 host's address to every worker
    as MASTER_ADDR; by default that is its hostname, which may resolve to
    loopback or to a network the other hosts cannot reach."""
    host = endpoint.rpartition(":")[0].strip("[]")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, 9, proto=socket.IPPROTO_UDP)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return probe.getsockname()[0]
    except (OSError, UnicodeError, IndexError):
        return None


def torchrun_command(args: argparse.Namespace, config: str, python: str = sys.executable,
                     is_host: bool | None = None, local_addr: str | None = None) -> list[str]:
    """The torchrun command of this host; with several nodes ``is_host``:
    whether it runs the rendezvous store (None: :func:`hosts_rendezvous`), and
    ``local_addr``: the address other hosts reach it at (None: ``--local-addr``,
    else :func:`address_towards` the endpoint; "" leaves it to torchrun)."""
    nproc = args.nproc_per_node or local_gpus() or 1
    cmd = [python, "-m", "torch.distributed.run"]
    if args.nnodes == 1 and not args.rdzv_endpoint:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        cmd += [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                f"--rdzv-id={args.rdzv_id}"]
        if is_host if is_host is not None else hosts_rendezvous(args.rdzv_endpoint):
            cmd.append("--rdzv-conf=is_host=true")
        if local_addr is None:
            local_addr = args.local_addr or address_towards(args.rdzv_endpoint)
        if local_addr:
            cmd.append(f"--local-addr={local_addr}")
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


def run(argv: list[str] | None, prog: str, load_config: Callable[[str, Sequence[str], bool], Any]) -> int:
    """``load_config(path, overrides, start)`` returns the validated config (with
    ``experiment.name`` and ``recipe.name``) or raises ``ValueError`` with a
    one-line message; ``start`` is false for a ``--resume`` (files read only to
    start a run are not required then)."""
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
        cfg = load_config(args.config, args.overrides, not args.resume)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = str(Path(args.config).resolve())
    args.rdzv_id = args.rdzv_id or f"biomtl-{cfg.experiment.name}"

    if args.slurm:
        extra_env, cmd = sbatch_command(args, config, cfg.recipe.name)
    else:
        extra_env, cmd = dict(RESTART_ENV), torchrun_command(args, config)
    if args.dry_run and not args.slurm and args.nnodes > 1:
        host = args.rdzv_endpoint.rpartition(":")[0]
        print(f"# on the rendezvous host ({host}):\n"
              f"{shell_line(extra_env, torchrun_command(args, config, is_host=True, local_addr=host))}\n"
              f"# on each of the other {args.nnodes - 1} host(s), ADDR its own address that the others reach "
              f"(biomtl launch with these arguments there fills it in):\n"
              f"{shell_line(extra_env, torchrun_command(args, config, is_host=False, local_addr='ADDR'))}")
        return 0
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

