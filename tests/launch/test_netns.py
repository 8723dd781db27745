"""tests/netns.py: two namespaces joined by a veth link, each end up with its
own address, and always deleted, also when the test using them fails."""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.netns import IP, netns_exists, two_hosts_context


def _ip(netns: str, *args: str) -> str:
    return subprocess.run([IP, "-n", netns, *args], capture_output=True, text=True, timeout=30).stdout


def _eventually(check, timeout: float = 10.0) -> bool:
    """The carrier follows the other end's state a moment later: poll it."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_two_hosts_are_made_and_always_removed() -> None:
    made = two_hosts_context()
    hosts = next(made)
    other = two_hosts_context()  # a second one at once (another test session): no clash
    hosts2 = next(other)
    try:
        assert len({hosts.a.netns, hosts.b.netns, hosts2.a.netns, hosts2.b.netns}) == 4
        for host in (hosts.a, hosts.b):
            lines = {line.split()[0].split("@")[0]: line for line in _ip(host.netns, "-br", "addr").splitlines()}
            assert set(lines) == {"lo", host.dev}  # nothing of this machine's own interfaces
            assert f"{host.addr}/30" in lines[host.dev]
            assert _eventually(lambda h=host: "LOWER_UP" in _ip(h.netns, "link", "show", "dev", h.dev))
        hosts.set_link(hosts.a, up=False)  # B loses its carrier: the link is cut
        assert _eventually(lambda: "NO-CARRIER" in _ip(hosts.b.netns, "link", "show", "dev", hosts.b.dev))
    finally:
        other.close()
    assert not netns_exists(hosts2.a.netns) and not netns_exists(hosts2.b.netns)
    with pytest.raises(RuntimeError):
        made.throw(RuntimeError("the test failed"))  # the fixture's finally still deletes
    assert not netns_exists(hosts.a.netns) and not netns_exists(hosts.b.netns)
