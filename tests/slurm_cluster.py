"""A throw-away one-node SLURM cluster for tests: munged, slurmctld and slurmd
started from a temp dir with a generated key and ``slurm.conf``.

Everything (sockets, pids, logs, state, spool) lives under the given root;
ports are picked free so parallel test sessions on one machine do not clash.
The daemons run in the foreground as children of the test and are stopped by
their own pids. Readiness is polled with a deadline (socket present,
``scontrol ping`` UP, node idle), never waited for with fixed sleeps.

Needs root (slurmd starts jobs as their user) and Debian's ``slurm-wlm`` and
``munge`` packages (``apt-get install -y slurm-wlm munge``). Where those are
missing the test skips with the reason; under ``CI=true`` it fails instead.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

from tests.netns import Host, TwoHosts

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")


def require_slurm() -> None:
    """Skip (or, in CI, fail) when a local SLURM cluster cannot be started here."""
    missing = [d for d in DAEMONS if shutil.which(d, path=_sbin_path()) is None]
    reason = None
    if missing:
        reason = (f"SLURM/munge not installed (missing: {', '.join(missing)}); "
                  "install with: apt-get install -y slurm-wlm munge")
    elif os.geteuid() != 0:
        reason = "a local SLURM cluster needs root (slurmd launches jobs as their user)"
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(int(int(line.split()[1]) / 1024 * 0.9), 256)
    return 1024


def poll(check: Callable[[], bool], what: str, timeout: float, logs: tuple[Path, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


class SlurmCluster:
    """One node (this host, ``CPUs=cpus``), one partition ``debug``."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = root
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        for sub in ("munge", "state", "spool", "log", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub).chmod(0o700)
        self.munge_socket = root / "munge" / "munge.socket"
        self.conf = root / "slurm.conf"
        self.log = root / "log"
        self.node_states: dict[str, str] = {}  # the last state seen by sinfo
        self.client_prefix: Sequence[str] = ()  # where clients and slurmctld run (a namespace's `ip netns exec`)

    # ------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = _sbin_path()
        env.pop("SLURM_JOB_ID", None)  # never look like we already are inside a job
        return env

    def _start(self, name: str, cmd: list[str], prefix: Sequence[str] = ()) -> None:
        out = (self.log / f"{name}.console").open("wb")
        self.procs[name] = subprocess.Popen([*prefix, *cmd], stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                            cwd=self.root, start_new_session=True)
        out.close()

    def _alive(self, name: str) -> None:
        code = self.procs[name].poll()
        if code is not None:
            console = self.log / f"{name}.console"
            text = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            raise RuntimeError(f"{name} exited with code {code}:\n{text}")

    def node_lines(self) -> list[str]:
        """The node(s) and the partition; the ports and paths the daemons use."""
        r = self.root
        return [
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmdLogFile={self.log / 'slurmd.log'}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_mem_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]

    def write_conf(self) -> None:
        r = self.root
        ctld_port, slurmd_port = _free_port(), _free_port()
        self.conf.write_text("\n".join([
            "ClusterName=biomtltest",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmctldLogFile={self.log / 'slurmctld.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # CPUs/RealMemory below win over the hardware
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=5",  # also makes `sbatch --wait` poll every 2 s (it backs off to 32 s otherwise)
            *self.timeouts(),
            *self.node_lines(),
            "",
        ]))

    def timeouts(self) -> list[str]:
        return ["SlurmctldTimeout=60", "SlurmdTimeout=60"]

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'run' / 'munged.pid'}",
                               f"--log-file={self.log / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        poll(lambda: self._alive("munged") or self.munge_socket.is_socket(), "munged's socket", timeout,
             (self.log / "munged.log", self.log / "munged.console"))
        self.write_conf()
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], self.client_prefix)
        poll(lambda: self._alive("slurmctld") or self._ping(), "slurmctld (scontrol ping)", timeout,
             (self.log / "slurmctld.log", self.log / "slurmctld.console"))
        self.start_slurmds(timeout)
        return self

    def start_slurmds(self, timeout: float) -> None:
        self.start_slurmd(self.node, (), timeout)

    def start_slurmd(self, node: str, prefix: Sequence[str], timeout: float) -> None:
        """``slurmd -N node`` (inside ``prefix``: its namespace), then wait until the node is idle."""
        name = self.slurmd_name(node)
        self._start(name, ["slurmd", "-D", "-f", str(self.conf), "-N", node], prefix)
        try:
            poll(lambda: self._alive(name) or self._node_idle(node), f"node {node} up (idle)", timeout,
                 (self.log / f"{name}.log", self.log / f"{name}.console", self.log / "slurmctld.log"))
        except TimeoutError as exc:
            raise TimeoutError(f"node {node} last seen {self.node_states.get(node)!r}: {exc}") from None

    def slurmd_name(self, node: str) -> str:
        return "slurmd"

    def client(self, *cmd: str) -> list[str]:
        """A client command (sbatch, squeue, scontrol...) as run where slurmctld is reached."""
        return [*self.client_prefix, *cmd]

    def _run(self, *cmd: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.client(*cmd), capture_output=True, text=True, env=self.env(), timeout=timeout)

    def _ping(self) -> bool:
        try:
            return "UP" in self._run("scontrol", "ping").stdout
        except subprocess.TimeoutExpired:
            return False

    def _node_idle(self, node: str) -> bool:
        """Up and taking jobs: idle, or (a node that comes back) still holding the job that was
        requeued when it was lost (``*``: not responding)."""
        try:
            state = self._run("sinfo", "-h", "-n", node, "-o", "%T").stdout.strip()
        except subprocess.TimeoutExpired:
            return False
        self.node_states[node] = state
        return state.startswith(("idle", "completing", "mixed")) and not state.endswith("*")

    def job_info(self, job_id: str) -> str:
        return self._run("scontrol", "show", "job", job_id).stdout

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.log.iterdir()))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel our cluster's jobs, then SIGTERM each daemon we started (by pid,
        newest first), SIGKILL if it lingers."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self._run("scancel", "--full", "--user", str(os.geteuid()))
            except (OSError, subprocess.SubprocessError):
                pass
        daemons = [n for n in self.procs if n.startswith("slurmd")]
        for name in (*daemons, "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def in_netns(host: Host) -> list[str]:
    """Prefix that runs a command in the host's network namespace and nothing else:
    ``ip netns exec`` also remounts /sys, hiding /sys/fs/cgroup, which slurmd's
    cgroup plugin needs even with proctrack/linuxproc."""
    return ["nsenter", f"--net=/run/netns/{host.netns}"]


class TwoNodeSlurmCluster(SlurmCluster):
    """Two nodes on one machine: ``bmn1`` in namespace A and ``bmn2`` in
    namespace B (tests/netns.py), each its own ``slurmd -N`` at its link
    address with its own spool, pid and log files (``%n`` = node name).

    slurmctld runs in A (the head node doubles as the controller and login
    node: clients run there, through :meth:`client`); B's slurmd reaches it
    over the link, and srun's connections back from B go to A's address.
    munged stays in the root namespace: its socket is a file, which every
    network namespace sees. Node names do not resolve (not in /etc/hosts):
    SLURM itself only uses each node's NodeAddr, and so must the scripts."""

    NODES = ("bmn1", "bmn2")

    def __init__(self, root: Path, hosts: TwoHosts, cpus: int = 2, slurmd_timeout: int = 60):
        super().__init__(root, cpus)
        self.hosts = hosts
        self.host_of = dict(zip(self.NODES, (hosts.a, hosts.b)))
        self.addr = {node: host.addr for node, host in self.host_of.items()}
        self.slurmd_timeout = slurmd_timeout
        self.client_prefix = in_netns(hosts.a)

    def node_lines(self) -> list[str]:
        r, mem = self.root, _mem_mb() // len(self.NODES)
        nodes = [f"NodeName={n} NodeAddr={h.addr} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
                 for n, h in self.host_of.items()]
        return [
            f"SlurmctldHost={self.node}({self.hosts.a.addr})",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmdLogFile={self.log / 'slurmd-%n.log'}",
            *nodes,
            f"PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]

    def timeouts(self) -> list[str]:
        return ["SlurmctldTimeout=60", f"SlurmdTimeout={self.slurmd_timeout}"]

    def start_slurmds(self, timeout: float) -> None:
        for node, host in self.host_of.items():
            (self.root / "spool" / node).mkdir(mode=0o700, exist_ok=True)
            self.start_slurmd(node, in_netns(host), timeout)

    def slurmd_name(self, node: str) -> str:
        return f"slurmd-{node}"
