"""Two "hosts" on one machine: two network namespaces joined by a veth pair.

Each namespace has its own loopback and one end of the link with its own
address, so processes started with ``ip netns exec NS ...`` see a real network
interface and a peer at another address, and the link can be taken down
(``ip link set DEV down``) to cut them apart. Names and the /30 subnet are
derived from the pid and random bits (``10.A.B.0/30``, names ``bm<hex>a/b``),
so concurrent test sessions do not collide; a clash with an existing name or
address is retried with other bits.

The namespaces are always removed: by the fixture's ``finally`` and, should
the test process die before that, by an ``atexit`` handler (deleting a
namespace also deletes its end of the veth, and with it the pair). Processes
still running inside are the caller's to stop (by their pids) first.

Needs root and iproute2 (``apt-get install -y iproute2``); where namespaces
cannot be made (not root, a container without CAP_SYS_ADMIN) the fixture
skips with the reason. Under ``CI=true`` a missing ``ip`` fails instead
(.ci/run installs iproute2).
"""
from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

IP = shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


@dataclass(frozen=True)
class Host:
    netns: str  # namespace name
    dev: str  # its end of the veth pair
    addr: str  # IPv4 address on dev

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the namespace."""
        return [IP, "netns", "exec", self.netns]


@dataclass(frozen=True)
class TwoHosts:
    a: Host
    b: Host

    def set_link(self, host: Host, up: bool) -> None:
        _ip("-n", host.netns, "link", "set", host.dev, "up" if up else "down")


def pids_in(host: Host) -> list[int]:
    """Every process running inside the host's namespace (what losing the host kills)."""
    out = subprocess.run([IP, "netns", "pids", host.netns], capture_output=True, text=True, timeout=30).stdout
    return [int(p) for p in out.split()]


def _ip(*args: str) -> None:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def _delete(names: list[str]) -> None:
    for name in names:
        subprocess.run([IP, "netns", "delete", name], capture_output=True, timeout=30)


def _unavailable() -> str | None:
    if IP is None:
        return "iproute2 not installed (no `ip`): apt-get install -y iproute2"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _skip(reason: str, fail_in_ci: bool = False) -> None:
    if fail_in_ci and os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def make_two_hosts() -> tuple[TwoHosts, list[str]]:
    """Create the namespaces and the link; returns them and the names to delete."""
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    last_error = None
    for _ in range(5):
        tag = f"{rng.getrandbits(28):07x}"
        # 10.A.B.C/30 with C a multiple of 4: .C+1 and .C+2 are the hosts
        a_, b_, c_ = rng.randrange(64, 250), rng.randrange(256), rng.randrange(0, 256, 4)
        a = Host(f"bm{tag}a", f"bm{tag}a", f"10.{a_}.{b_}.{c_ + 1}")
        b = Host(f"bm{tag}b", f"bm{tag}b", f"10.{a_}.{b_}.{c_ + 2}")
        names: list[str] = []  # only what this run made: a clash must not delete another run's namespace
        try:
            for h in (a, b):
                _ip("netns", "add", h.netns)
                names.append(h.netns)
            # created in the first namespace, then one end moved into the second
            _ip("-n", a.netns, "link", "add", a.dev, "type", "veth", "peer", "name", b.dev, "netns", b.netns)
            for h in (a, b):
                _ip("-n", h.netns, "addr", "add", f"{h.addr}/30", "dev", h.dev)
                _ip("-n", h.netns, "link", "set", "lo", "up")
                _ip("-n", h.netns, "link", "set", h.dev, "up")
            return TwoHosts(a, b), names
        except OSError as exc:
            last_error = exc
            _delete(names)
    raise OSError(f"could not make two network namespaces: {last_error}")


def two_hosts_context() -> Iterator[TwoHosts]:
    reason = _unavailable()
    if reason:
        _skip(reason, fail_in_ci=IP is None)
    try:
        hosts, names = make_two_hosts()
    except OSError as exc:
        _skip(f"network namespaces cannot be made here: {exc}")
    cleanup = functools.partial(_delete, names)
    atexit.register(cleanup)  # should the test process end before the finally below
    try:
        yield hosts
    finally:
        cleanup()
        atexit.unregister(cleanup)


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    yield from two_hosts_context()


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()
