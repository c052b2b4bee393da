"""What the lab guest sees: its network devices and who is enslaved to whom."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from failover_backend.lab.console import GuestConsole

_LIST = (
    "for d in /sys/class/net/*; do "
    'n=$(basename "$d"); '
    'm=$(basename "$(readlink "$d/master")" 2>/dev/null); '
    'v=$(basename "$(readlink "$d/device/driver")" 2>/dev/null); '
    'c=$(cat "$d/carrier" 2>/dev/null); '
    'echo "NETDEV|$n|$m|$v|$c"; done'
)


@dataclass(frozen=True)
class Netdev:
    name: str
    master: str
    driver: str
    carrier: bool


async def netdevs(console: GuestConsole) -> dict[str, Netdev]:
    out = await console.check(_LIST)
    found = {}
    for line in out.splitlines():
        if line.startswith("NETDEV|"):
            _, name, master, driver, carrier = line.split("|")
            found[name] = Netdev(name, master, driver, carrier == "1")
    return found


def masters(devs: dict[str, Netdev]) -> set[str]:
    return {d.master for d in devs.values() if d.master}


def slaves_by_driver(devs: dict[str, Netdev]) -> dict[str, Netdev]:
    """Enslaved netdevs by their driver (virtio_net, e1000e)."""
    return {d.driver: d for d in devs.values() if d.master}


async def wait_primary_enslaved(
    console: GuestConsole, driver: str = "e1000e", timeout: float = 30.0
) -> Netdev:
    """Wait until the primary's netdev is enslaved under the failover master, link up."""
    deadline = time.monotonic() + timeout
    while True:
        devs = await netdevs(console)
        slave = slaves_by_driver(devs).get(driver)
        if slave is not None and slave.carrier:
            return slave
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{driver} not enslaved with link up after {timeout:.0f} s: {devs}"
            )
        await asyncio.sleep(0.5)


async def wait_primary_gone(
    console: GuestConsole, driver: str = "e1000e", timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while any(d.driver == driver for d in (await netdevs(console)).values()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{driver} still in the guest after {timeout:.0f} s")
        await asyncio.sleep(0.3)
