"""Network interfaces of this host: which address an interface has, and which
interface holds an address (the standard library lists interface names but
not their addresses; SIOCGIFADDR answers for IPv4)."""
from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFADDR = 0x8915


def interface_address(name: str) -> str | None:
    """IPv4 address of interface ``name``, None if it has none (or no such interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_with(address: str) -> str | None:
    """The interface of this host that holds IPv4 ``address``, None where none does."""
    for _, name in socket.if_nameindex():
        if interface_address(name) == address:
            return name
    return None
