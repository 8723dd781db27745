"""Two real hosts on one machine: a torchrun agent in each of two network
namespaces joined by a veth link (tests/netns.py), each with its own address
and interface, meeting by c10d rendezvous at host A's address.

What a cluster user wants to know before trusting a multi-node run: the ranks
really talk over the link (each rank's interface and address), the run trains
and exports as one world, a lost host or a lost link ends in a restart from
the latest checkpoint or a clear error (never a hang), and a slow host is
named in the logs. The rendezvous store runs on host A (never the host we
kill). Steps are slowed by an injected per-step sleep (launch/faults.py) so
that a fault lands mid-run; the tests wait on files and log lines, never on
fixed sleeps. Needs root and iproute2: skipped with the reason elsewhere.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dist_train.checkpoint import safe_load
from launch import cli as launch_cli
from tests.conftest import PYTHON, REPO, tiny_overrides
from tests.netns import Host, TwoHosts, pids_in

pytestmark = pytest.mark.integration

CONFIG = REPO / "configs" / "facecom.yaml"
PORT = 29400  # the namespaces are fresh: nothing else listens there
TIMEOUT_S = 20  # dist.timeout_s: how long a collective waits for a lost peer
RUN_DEADLINE = 300  # a tiny run on a busy 2-core machine, with margin


class Agents:
    """The torchrun agent of each host, with its own log. Losing a host kills
    every process in its namespace: the agent and its workers (torchrun starts
    them in sessions of their own, so a process group is not enough)."""

    def __init__(self, tmp_path: Path, hosts: TwoHosts):
        self.tmp, self.hosts = tmp_path, hosts
        self.procs: dict[str, subprocess.Popen] = {}
        self.host_of: dict[str, Host] = {}
        self.starts: dict[str, int] = {}

    def env(self, host: Host, **extra: str) -> dict[str, str]:
        return {**os.environ, **launch_cli.RESTART_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "GLOO_SOCKET_IFNAME": host.dev, **extra}

    def torchrun(self, host: Host, overrides: list[str], rdzv_id: str, max_restarts: int = 0) -> list[str]:
        """What ``biomtl launch`` runs on that host (built in-process: one torch import less per host)."""
        args = launch_cli.build_arg_parser("biomtl launch").parse_intermixed_args(
            ["--config", str(CONFIG), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint",
             f"{self.hosts.a.addr}:{PORT}", "--rdzv-id", rdzv_id, "--max-restarts", str(max_restarts), *overrides])
        return launch_cli.torchrun_command(args, str(CONFIG), python=PYTHON, is_host=host is self.hosts.a,
                                           local_addr=host.addr)

    def start(self, name: str, host: Host, cmd: list[str], env: dict[str, str]) -> None:
        self.starts[name] = self.starts.get(name, 0) + 1
        self.host_of[name] = host
        with self.log_path(name).open("a") as out:
            out.write(f"=== start {self.starts[name]}\n")
            out.flush()
            self.procs[name] = subprocess.Popen([*host.exec_prefix(), *cmd], cwd=REPO, env=env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def log_path(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL the host's agent and every process it started."""
        for pid in pids_in(self.host_of[name]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs[name].wait()

    def wait(self, names: list[str], deadline: float) -> dict[str, int]:
        codes = {}
        for name in names:
            try:
                codes[name] = self.procs[name].wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still running at the deadline\n{self.tails()}") from None
        return codes

    def wait_until(self, what: str, ready: Callable[[], bool], deadline: float) -> float:
        """Poll ``ready`` (a file or a log line) until true; fails if every agent ended first."""
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.tails()}")
            if all(p.poll() is not None for p in self.procs.values()):
                if ready():
                    break
                raise AssertionError(f"every agent ended before {what}\n{self.tails()}")
            time.sleep(0.1)
        return time.monotonic()

    def tails(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-4000:]}" for n in self.procs)

    def stop_all(self) -> None:
        for name in self.procs:
            self.kill(name)  # also a worker that outlived its agent


@pytest.fixture
def agents(tmp_path: Path, two_hosts: TwoHosts) -> Iterator[Agents]:
    a = Agents(tmp_path, two_hosts)
    try:
        yield a
    finally:  # before the namespaces go (fixtures tear down in reverse)
        a.stop_all()


def _flat(text: str) -> str:
    return "".join(text.split())  # rich wraps long log lines


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _only_run(tmp_path: Path) -> Path:
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def _checkpoint_at(tmp_path: Path, step: int) -> Callable[[], bool]:
    return lambda: any((tmp_path / "runs").glob(f"*/checkpoints/periodic/step_{step:08d}.pt"))


def _rank_of(log: str, host: Host) -> int:
    """The rank c10d gave ``host``: from rank 0's 'rank N: host ..., GLOO_SOCKET_IFNAME=dev (addr)' lines."""
    flat = _flat(log)
    ranks = [r for r in range(2) if f"rank{r}:host" in flat and
             flat.split(f"rank{r}:host", 1)[1].split("GLOO_SOCKET_IFNAME=", 1)[1].startswith(f"{host.dev}(")]
    assert len(ranks) == 1, log[-3000:]
    return ranks[0]


def test_two_hosts_train_as_one_world_and_export_once(tmp_path: Path, two_hosts: TwoHosts,
                                                      agents: Agents) -> None:
    """``biomtl launch`` with the same arguments on each host: inside host A it
    finds that it hosts the rendezvous (A's hostname resolves to loopback, not
    to the endpoint) and each host advertises its own link address (else rank
    0's hostname, loopback here, would be the workers' MASTER_ADDR); both ranks
    use their veth interface; the run trains as one world of 2, ends with
    identical weights on both hosts, and exports model.pt once."""
    hosts = two_hosts
    probe = "from launch.cli import hosts_rendezvous as h, address_towards as a; import sys; " \
            "e = sys.argv[1]; print(h(e), a(e))"
    seen = {h.netns: subprocess.run([*h.exec_prefix(), PYTHON, "-c", probe, f"{hosts.a.addr}:{PORT}"], cwd=REPO,
                                    capture_output=True, text=True, timeout=60).stdout.split()
            for h in (hosts.a, hosts.b)}
    assert seen == {hosts.a.netns: ["True", hosts.a.addr], hosts.b.netns: ["False", hosts.b.addr]}

    overrides = tiny_overrides(tmp_path, train__max_steps=3, train__val_every_steps=3, dist__cpu_threads=1)
    launch = [PYTHON, "-m", "dist_train.cli", "launch", "--config", str(CONFIG), "--nnodes", "2",
              "--nproc-per-node", "1", "--rdzv-endpoint", f"{hosts.a.addr}:{PORT}", "--rdzv-id", "two-hosts",
              *overrides]
    for name, host in (("a", hosts.a), ("b", hosts.b)):
        agents.start(name, host, launch, agents.env(host))
    codes = agents.wait(["a", "b"], time.monotonic() + RUN_DEADLINE)
    assert codes == {"a": 0, "b": 0}, agents.tails()
    logs = {n: agents.log(n) for n in ("a", "b")}
    main = [n for n, text in logs.items() if "run directory:" in text]
    assert len(main) == 1, agents.tails()  # one rank 0, one writer
    flat = _flat(logs[main[0]])
    assert "(worldsize2," in flat
    # each rank on its own host, over its own interface and address
    assert {_rank_of(logs[main[0]], hosts.a), _rank_of(logs[main[0]], hosts.b)} == {0, 1}
    assert f"GLOO_SOCKET_IFNAME={hosts.a.dev}({hosts.a.addr})" in flat
    assert f"GLOO_SOCKET_IFNAME={hosts.b.dev}({hosts.b.addr})" in flat
    assert "weightsidenticalonall2ranks" in flat, logs[main[0]][-3000:]
    assert sum(text.count("exported the fp32 model") for text in logs.values()) == 1
    run = _only_run(tmp_path)
    assert (run / "model.pt").exists() and safe_load(run / "model.pt")
    assert [int(r["step"]) for r in _rows(run / "logs" / "train_logs.csv")] == [1, 2, 3]
    ckpt = safe_load(run / "checkpoints" / "latest.pt")
    assert ckpt["client"]["loop"]["step"] == 3 and len(ckpt["client"]["rng"]) == 2


def _slow_run(tmp_path: Path, steps: int, **extra: object) -> list[str]:
    """A run whose steps last long enough that a fault lands mid-run (one
    thread per rank: the two "hosts" share this machine's cores)."""
    return tiny_overrides(tmp_path, train__max_steps=steps, train__val_every_steps=steps,
                          checkpoint__every_steps=2, dist__timeout_s=TIMEOUT_S, dist__cpu_threads=1, **extra)


def test_lost_host_comes_back_and_the_run_resumes_without_losing_a_step(
        tmp_path: Path, two_hosts: TwoHosts, agents: Agents) -> None:
    """Host B (agent and worker) is SIGKILLed after the step-4 checkpoint; host
    A's worker fails at once (its peer's connection closed), A's agent waits
    in a new rendezvous round (--max-restarts 1) until B's agent is started
    again; the new group resumes from the latest checkpoint in the same run
    directory and every step appears once in the train log."""
    hosts, steps = two_hosts, 8
    overrides = _slow_run(tmp_path, steps)
    slow = {"BIOMTL_FAULT_SLEEP_S": "0.5"}
    for name, host in (("a", hosts.a), ("b", hosts.b)):
        agents.start(name, host, agents.torchrun(host, overrides, "lost-host", max_restarts=1),
                     agents.env(host, **slow))
    deadline = time.monotonic() + RUN_DEADLINE
    agents.wait_until("the step-4 checkpoint", _checkpoint_at(tmp_path, 4), deadline)
    agents.kill("b")
    agents.wait_until("host A's worker to stop", lambda: "stopped: another rank failed" in agents.log("a"), deadline)
    assert agents.procs["a"].poll() is None  # A's agent is waiting for a new round, not gone
    agents.start("b", hosts.b, agents.torchrun(hosts.b, overrides, "lost-host", max_restarts=1),
                 agents.env(hosts.b, **slow))
    codes = agents.wait(["a", "b"], deadline + RUN_DEADLINE)
    assert codes == {"a": 0, "b": 0}, agents.tails()
    run = _only_run(tmp_path)  # the restart went on in the same run directory
    text = _flat(agents.log("a") + agents.log("b"))
    assert "restart1:continuing" in text, agents.tails()
    resumed_at = int(text.split(f"resumedfrom{run / 'checkpoints' / 'latest.pt'}atstep", 1)[1].split("(")[0])
    assert 4 <= resumed_at < steps
    assert [int(r["step"]) for r in _rows(run / "logs" / "train_logs.csv")] == list(range(1, steps + 1))
    ckpt = safe_load(run / "checkpoints" / "latest.pt")
    assert ckpt["client"]["loop"]["step"] == steps and len(ckpt["client"]["rng"]) == 2
    assert (run / "model.pt").exists()


def test_lost_host_without_restarts_stops_the_survivor_naming_the_peer(
        tmp_path: Path, two_hosts: TwoHosts, agents: Agents) -> None:
    """Without restarts, host A ends on its own soon after B is killed (well
    within dist.timeout_s), exit non-zero, with one error line that names B's
    address; no hang."""
    hosts = two_hosts
    overrides = _slow_run(tmp_path, 12)
    for name, host in (("a", hosts.a), ("b", hosts.b)):
        agents.start(name, host, agents.torchrun(host, overrides, "lost-host-0"),
                     agents.env(host, BIOMTL_FAULT_SLEEP_S="0.5"))
    agents.wait_until("the step-4 checkpoint", _checkpoint_at(tmp_path, 4), time.monotonic() + RUN_DEADLINE)
    agents.kill("b")
    killed_at = time.monotonic()
    code = agents.wait(["a"], killed_at + 3 * TIMEOUT_S)["a"]
    took = time.monotonic() - killed_at
    log = agents.log("a")
    assert code != 0
    assert took < TIMEOUT_S + 15, (took, log[-3000:])  # the agent's own shutdown included
    errors = [line for line in log.splitlines() if line.startswith("error: rank")]
    assert len(errors) == 1 and "stopped: another rank failed or its connection was lost" in errors[0], log[-3000:]
    assert hosts.b.addr in errors[0], errors
    ckpt = safe_load(_only_run(tmp_path) / "checkpoints" / "latest.pt")
    assert 4 <= ckpt["client"]["loop"]["step"] < 12


def test_link_down_longer_than_the_timeout_stops_both_hosts(tmp_path: Path, two_hosts: TwoHosts,
                                                            agents: Agents) -> None:
    """The link goes down after the step-4 checkpoint and stays down past
    dist.timeout_s: both workers stop with a clear error (no hang); the link
    comes back only then, and both agents end non-zero. The latest checkpoint
    is whole: it loads weights-only."""
    hosts = two_hosts
    overrides = _slow_run(tmp_path, 12)
    for name, host in (("a", hosts.a), ("b", hosts.b)):
        agents.start(name, host, agents.torchrun(host, overrides, "link-down"),
                     agents.env(host, BIOMTL_FAULT_SLEEP_S="0.5"))
    agents.wait_until("the step-4 checkpoint", _checkpoint_at(tmp_path, 4), time.monotonic() + RUN_DEADLINE)
    hosts.set_link(hosts.a, up=False)
    down_at = time.monotonic()
    try:
        for name in ("a", "b"):
            agents.wait_until(f"host {name.upper()}'s worker to stop",
                              lambda n=name: "stopped: another rank failed" in agents.log(n), down_at + 4 * TIMEOUT_S)
        stopped_after = time.monotonic() - down_at
    finally:
        hosts.set_link(hosts.a, up=True)
    codes = agents.wait(["a", "b"], time.monotonic() + 3 * TIMEOUT_S)
    assert codes["a"] != 0 and codes["b"] != 0, agents.tails()
    assert stopped_after < 3 * TIMEOUT_S, stopped_after
    for name in ("a", "b"):
        errors = [line for line in agents.log(name).splitlines() if line.startswith("error: rank")]
        assert len(errors) == 1 and "connection was lost" in errors[0], agents.tails()
    ckpt = safe_load(_only_run(tmp_path) / "checkpoints" / "latest.pt")
    assert 4 <= ckpt["client"]["loop"]["step"] < 12 and len(ckpt["client"]["rng"]) == 2


def test_link_blip_and_a_slow_host_the_run_completes_and_names_the_straggler(
        tmp_path: Path, two_hosts: TwoHosts, agents: Agents) -> None:
    """Host B sleeps 2 s after each step (a slow host), and the link is down
    for 2 s (well below dist.timeout_s) after the step-2 checkpoint: TCP
    retransmits, the run completes with every step once, and the logs name B's
    rank as the straggler (per-rank own step time, CSV column slowest_rank)."""
    hosts, steps = two_hosts, 5
    overrides = _slow_run(tmp_path, steps)
    agents.start("a", hosts.a, agents.torchrun(hosts.a, overrides, "blip"), agents.env(hosts.a))
    agents.start("b", hosts.b, agents.torchrun(hosts.b, overrides, "blip"),
                 agents.env(hosts.b, BIOMTL_FAULT_SLEEP_S="2"))
    deadline = time.monotonic() + RUN_DEADLINE
    agents.wait_until("the step-2 checkpoint", _checkpoint_at(tmp_path, 2), deadline)
    hosts.set_link(hosts.b, up=False)
    try:
        time.sleep(2)  # the fault itself: a 2 s outage (nothing is waited for here)
    finally:
        hosts.set_link(hosts.b, up=True)
    codes = agents.wait(["a", "b"], deadline)
    assert codes == {"a": 0, "b": 0}, agents.tails()
    run = _only_run(tmp_path)
    rows = _rows(run / "logs" / "train_logs.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    main_log = next(agents.log(n) for n in ("a", "b") if "run directory:" in agents.log(n))
    slow_rank = _rank_of(main_log, hosts.b)
    assert f"rank{slow_rank}isastraggler" in _flat(main_log), main_log[-3000:]
    # Each step after the first carries the slow host's sleep after the step before, except the first
    # step of an epoch (the loop starts a new interval there): in all others B's rank is the slowest.
    later = rows[1:]
    slowed = [r for r in later if float(r["step_s_slowest"]) >= 2]
    assert len(slowed) >= len(later) - 1, later
    assert all(int(float(r["slowest_rank"])) == slow_rank for r in slowed), later
    assert _flat(main_log).count("isastraggler") >= len(slowed)
    assert not any("straggler" in agents.log(n) for n in ("a", "b") if agents.log(n) != main_log)  # rank 0 only
