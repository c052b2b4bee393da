"""Host network devices for tests: TAPs and raw sockets, created uniquely and always removed."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33


def unique_name(prefix: str) -> str:
    """An interface name no other test (or test run) uses; at most 15 characters."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"[:15]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def quiet_tap(name: str) -> Iterator[str]:
    """A persistent TAP with a virtio-net header and IPv6 off, so the host sends
    nothing on it by itself (no router solicitations or MLD reports)."""
    ip("tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr")
    try:
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def raw_socket(interface: str, timeout: float = 5.0) -> socket.socket:
    """An AF_PACKET socket bound to ``interface``: sees every frame on it, sends raw frames."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    # Room for a whole test burst: the default buffer holds about a hundred full frames.
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    sock.bind((interface, 0))
    sock.settimeout(timeout)
    return sock


def read_counter(interface: str, name: str) -> int:
    return int(Path(f"/sys/class/net/{interface}/statistics/{name}").read_text())
