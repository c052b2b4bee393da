"""Host networking for a lab run: one Linux bridge with a host address, standing in
for the NIC's embedded switch; the primaries' TAPs and the standby backends' TAPs
are its ports.

Every device gets a unique name and is removed on exit, whatever happened.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import subprocess
import uuid
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)


class HostNetworkError(RuntimeError):
    """A host network step failed (the message has the command and its error)."""


def _ip(*args: str) -> None:
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise HostNetworkError("ip (iproute2) not found") from err
    except subprocess.CalledProcessError as err:
        raise HostNetworkError(f"ip {' '.join(args)}: {err.stderr.strip()}") from err


def _quiet(interface: str) -> None:
    """No IPv6 on lab devices: no router solicitations or MLD reports in the traffic."""
    path = Path(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6")
    with contextlib.suppress(OSError):
        path.write_text("1")


def unique_name(prefix: str) -> str:
    """An interface name of at most 15 characters no other run uses."""
    return f"{prefix}{uuid.uuid4().hex}"[:15]


class HostNetwork:
    """A bridge ``10.R.S.1/24`` with a random private subnet; use as a context manager.

    :param subnet: Override the random ``/24``.
    """

    def __init__(self, subnet: str | None = None) -> None:
        if subnet is None:
            subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24"
        self.subnet = ipaddress.ip_network(subnet)
        self.extra_subnets: list[ipaddress.IPv4Network] = []
        self.bridge = unique_name("fbbr")
        self.bridge_mac = "02:fb:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(4))
        self._devices: list[str] = []

    @property
    def host_address(self) -> str:
        return str(self.subnet.network_address + 1)

    def address(self, host: int) -> str:
        """``A.B.C.host/24`` for a guest."""
        return f"{self.subnet.network_address + host}/{self.subnet.prefixlen}"

    def add_subnet(self) -> ipaddress.IPv4Network:
        """One more ``/24`` on the bridge, host at ``.1`` (for a guest's second
        failover master, which needs its own subnet to be reached through its own pair)."""
        base = int(self.subnet.network_address) + 256 * (len(self.extra_subnets) + 1)
        subnet = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(base)}/24")
        _ip("addr", "add", f"{subnet.network_address + 1}/24", "dev", self.bridge)
        self.extra_subnets.append(subnet)
        return subnet

    def __enter__(self) -> HostNetwork:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._devices.append(self.bridge)
        try:
            # A bridge takes the lowest MAC of its ports unless given one: a port
            # added later (a new primary's TAP) would change the address guests have
            # in their ARP caches.
            _ip("link", "set", self.bridge, "address", self.bridge_mac)
            _quiet(self.bridge)
            _ip("addr", "add", f"{self.host_address}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add_tap(self, prefix: str = "fbtp") -> str:
        """A new persistent TAP on the bridge (for an emulated primary's netdev)."""
        name = unique_name(prefix)
        _ip("tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr")
        self._devices.append(name)
        _quiet(name)
        self.attach(name)
        return name

    def attach(self, interface: str) -> None:
        """Put an existing interface (a backend's TAP) on the bridge and up."""
        _quiet(interface)
        _ip("link", "set", interface, "master", self.bridge)
        _ip("link", "set", interface, "up")
        if interface not in self._devices:
            self._devices.append(interface)

    def forget(self, interface: str) -> None:
        """An interface that went away by itself (its owner removed it)."""
        with contextlib.suppress(ValueError):
            self._devices.remove(interface)

    def close(self) -> None:
        for device in reversed(self._devices):
            result = subprocess.run(["ip", "link", "del", device], capture_output=True, text=True)
            if result.returncode != 0 and "Cannot find device" not in result.stderr:
                logger.warning("cannot remove %s: %s", device, result.stderr.strip())
        self._devices.clear()
