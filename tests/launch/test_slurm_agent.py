"""launch/slurm_agent.py without SLURM: what each node's agent adds to torchrun
(the rendezvous host flag after a port check, the node's own address, gloo's
interface), and launch/netif.py."""
from __future__ import annotations

import socket

import pytest

from launch import netif, slurm_agent

ARGS = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.9.8.1:{port}",
        "--rdzv-id=7", "dist_train/main.py", "--config", "c.yaml"]


def _args(port: int) -> list[str]:
    return [a.format(port=port) for a in ARGS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_node_addrs_parses_the_scripts_pairs() -> None:
    assert slurm_agent.node_addrs("bmn1=10.0.0.1 bmn2=10.0.0.2 ") == {"bmn1": "10.0.0.1", "bmn2": "10.0.0.2"}
    assert slurm_agent.node_addrs("junk =x y= bmn3=h3") == {"bmn3": "h3"}
    assert slurm_agent.node_addrs("") == {}


def test_interfaces_by_address() -> None:
    assert netif.interface_address("lo") == "127.0.0.1"
    assert netif.interface_address("no-such-if0") is None
    assert netif.interface_with("127.0.0.1") == "lo"
    assert netif.interface_with("192.0.2.77") is None  # TEST-NET-1: on no interface here


def test_the_rendezvous_node_hosts_the_store_and_the_other_does_not() -> None:
    port = _free_port()
    env = {"SLURMD_NODENAME": "bmn1", "SLURM_NODEID": "0", "BIOMTL_RDZV_NODE": "0",
           "BIOMTL_NODE_ADDRS": "bmn1=127.0.0.1 bmn2=10.9.8.2"}
    cmd, set_env, line = slurm_agent.agent_command(_args(port), env)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--rdzv-conf=is_host=true"]
    assert "--local-addr=127.0.0.1" in cmd and cmd[-len(ARGS):] == _args(port)
    assert set_env == {}  # loopback: gloo's own choice is right
    assert line == "biomtl: node bmn1 (127.0.0.1): hosts the rendezvous"
    cmd, _, line = slurm_agent.agent_command(_args(port), {**env, "SLURMD_NODENAME": "bmn2", "SLURM_NODEID": "1"})
    assert "--rdzv-conf=is_host=true" not in cmd and "--local-addr=10.9.8.2" in cmd
    assert line == "biomtl: node bmn2 (10.9.8.2)"


def test_gloo_is_pointed_at_the_interface_of_the_nodes_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm_agent, "interface_with", lambda ip: "eth7" if ip == "10.9.8.2" else None)
    env = {"SLURMD_NODENAME": "bmn2", "SLURM_NODEID": "1", "BIOMTL_RDZV_NODE": "0",
           "BIOMTL_NODE_ADDRS": "bmn1=10.9.8.1 bmn2=10.9.8.2"}
    _, set_env, line = slurm_agent.agent_command(_args(1), env)
    assert set_env == {"GLOO_SOCKET_IFNAME": "eth7"} and line.endswith("GLOO_SOCKET_IFNAME=eth7")
    _, set_env, line = slurm_agent.agent_command(_args(1), {**env, "GLOO_SOCKET_IFNAME": "ib0"})
    assert set_env == {} and line.endswith("GLOO_SOCKET_IFNAME=ib0")  # the user's choice wins


def test_unknown_node_address_leaves_torchrun_its_default() -> None:
    cmd, set_env, line = slurm_agent.agent_command(_args(1), {"SLURMD_NODENAME": "bmn9", "SLURM_NODEID": "1"})
    assert not any(a.startswith(("--local-addr", "--rdzv-conf")) for a in cmd) and set_env == {}
    assert "address unknown" in line


def test_a_taken_rendezvous_port_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"SLURMD_NODENAME": "bmn1", "SLURM_NODEID": "0", "BIOMTL_RDZV_NODE": "0",
               "BIOMTL_NODE_ADDRS": "bmn1=10.9.8.1"}
        with pytest.raises(ValueError, match=f"rendezvous port {port} on node bmn1 \\(10.9.8.1\\) cannot be used"):
            slurm_agent.agent_command(_args(port), env)
        monkeypatch = pytest.MonkeyPatch()
        try:
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            assert slurm_agent.main(_args(port)) == 2
        finally:
            monkeypatch.undo()
    err = capsys.readouterr().err.splitlines()
    assert err == [f"slurm/train.sh: error: rendezvous port {port} on node bmn1 (10.9.8.1) cannot be used: "
                   "Address already in use: set BIOMTL_RDZV_PORT to a free port"]
