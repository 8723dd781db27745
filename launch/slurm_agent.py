"""One node's torchrun agent in a SLURM job: ``slurm/train.sh`` runs this as
each ``srun`` task (one per node); it fills in what torchrun cannot know about
the node, then becomes ``python -m torch.distributed.run ARGS...``.

    python launch/slurm_agent.py --nnodes=2 --rdzv-endpoint=ADDR:PORT ... dist_train/main.py --config ...

Read from the environment (the script exports the first two):

- ``BIOMTL_NODE_ADDRS``: ``name=addr`` pairs, each node's NodeAddr as SLURM
  reaches it (``scontrol show node``). This node's (``SLURMD_NODENAME``) is
  passed as ``--local-addr``: rank 0's becomes every worker's MASTER_ADDR, and
  torchrun's default, the hostname, may resolve to loopback or to a network
  the other nodes do not reach. Where that address is on an interface of this
  host and ``GLOO_SOCKET_IFNAME`` is unset, gloo is pointed at that interface
  (gloo binds the interface of the hostname otherwise, often loopback).
- ``BIOMTL_RDZV_NODE``: the SLURM_NODEID of the node that hosts the c10d
  store: that agent gets ``--rdzv-conf=is_host=true`` (torchrun's own guess
  compares the endpoint with the hostname and fails where the node's name is
  not its hostname), after a check that the port is free: a taken port is one
  line and exit code 2 at once, not a rendezvous timeout on every node.

Each agent prints one ``biomtl: node NAME (ADDR) ...`` line, so that an
address in a later error (a lost peer) can be matched to its node.
"""
from __future__ import annotations

import os
import socket
import sys

if __package__ in (None, ""):  # run as a script: make the repo importable without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.netif import interface_with  # noqa: E402


def node_addrs(text: str) -> dict[str, str]:
    """``"n1=10.0.0.1 n2=10.0.0.2"`` -> ``{"n1": "10.0.0.1", "n2": "10.0.0.2"}`` (malformed pairs are skipped)."""
    pairs = (item.split("=", 1) for item in text.split() if "=" in item)
    return {name: addr for name, addr in pairs if name and addr}


def ipv4_of(addr: str) -> str | None:
    try:
        return socket.getaddrinfo(addr, None, socket.AF_INET)[0][4][0]
    except (OSError, UnicodeError, IndexError):
        return None


def port_taken(port: int) -> str | None:
    """Why the rendezvous store could not listen on ``port`` here (torchrun's
    TCPStore binds every address), None when it can."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is no clash
        try:
            s.bind(("", port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def endpoint_port(args: list[str]) -> int | None:
    for arg in args:
        if arg.startswith("--rdzv-endpoint="):
            port = arg.rpartition(":")[2]
            return int(port) if port.isdigit() else None
    return None


def agent_command(args: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str], str]:
    """The torchrun command, the variables to set, and the line to print; raises
    ``ValueError`` (one line) where this node cannot host the rendezvous."""
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    addr = node_addrs(env.get("BIOMTL_NODE_ADDRS", "")).get(node)
    extra: list[str] = []
    set_env: dict[str, str] = {}
    notes = []
    host_id = env.get("BIOMTL_RDZV_NODE", "")
    if host_id and env.get("SLURM_NODEID") == host_id:
        port = endpoint_port(args)
        why = port_taken(port) if port is not None else None
        if why:
            raise ValueError(f"rendezvous port {port} on node {node} ({addr or 'its address'}) cannot be used: "
                             f"{why}: set BIOMTL_RDZV_PORT to a free port")
        extra.append("--rdzv-conf=is_host=true")
        notes.append("hosts the rendezvous")
    if addr:
        extra.append(f"--local-addr={addr}")
        ip = ipv4_of(addr)
        dev = interface_with(ip) if ip and not ip.startswith("127.") else None
        if dev and not env.get("GLOO_SOCKET_IFNAME"):
            set_env["GLOO_SOCKET_IFNAME"] = dev
        if env.get("GLOO_SOCKET_IFNAME") or dev:
            notes.append(f"GLOO_SOCKET_IFNAME={env.get('GLOO_SOCKET_IFNAME') or dev}")
    line = f"biomtl: node {node} ({addr or 'address unknown: torchrun advertises the hostname'})" \
           f"{': ' + ', '.join(notes) if notes else ''}"
    return [sys.executable, "-m", "torch.distributed.run", *extra, *args], set_env, line


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cmd, set_env, line = agent_command(args, dict(os.environ))
    except ValueError as exc:
        print(f"slurm/train.sh: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(line, flush=True)
    os.environ.update(set_env)
    os.execv(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
