"""What QEMU says about a VM's devices: QOM properties of the devices created with an
id, the failover pairs among them, and the PCI devices the guest can see. Every
controller step asks through these.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from .errors import MonitorCommandError, MonitorError
from .qmp import Monitor

PERIPHERAL = "/machine/peripheral"

logger = logging.getLogger(__name__)


async def qom_property(qmp: Monitor, path: str, name: str) -> Any:
    """A QOM property, or ``None`` when the object or the property does not exist."""
    try:
        return await qmp.qom_get(path, name)
    except MonitorCommandError:
        return None


async def peripheral_ids(qmp: Monitor) -> list[str]:
    """Ids of the devices created with an ``id`` (realized ones: a hidden primary is not)."""
    children = await qmp.execute("qom-list", {"path": PERIPHERAL})
    return [c["name"] for c in children if str(c.get("type", "")).startswith("child<")]


async def peripherals_where(qmp: Monitor, prop: str, value: Any) -> list[str]:
    """Ids of the realized devices whose QOM property ``prop`` equals ``value``."""
    return [
        device_id
        for device_id in await peripheral_ids(qmp)
        if await qom_property(qmp, f"{PERIPHERAL}/{device_id}", prop) == value
    ]


async def find_primary(qmp: Monitor, standby_id: str) -> str | None:
    """The realized device that names ``standby_id`` as its pair, if any."""
    paired = await peripherals_where(qmp, "failover_pair_id", standby_id)
    return paired[0] if paired else None


async def failover_pairs(qmp: Monitor) -> dict[str, str | None]:
    """Every standby of the VM (virtio-net with ``failover=on``) and its realized
    primary (``None``: none, or still hidden)."""
    pairs: dict[str, str | None] = {}
    ids = await peripheral_ids(qmp)
    for device_id in ids:
        path = f"{PERIPHERAL}/{device_id}"
        if await qom_property(qmp, path, "type") == "virtio-net-pci" and await qom_property(
            qmp, path, "failover"
        ):
            pairs[device_id] = None
    for device_id in ids:
        pair = await qom_property(qmp, f"{PERIPHERAL}/{device_id}", "failover_pair_id")
        if pair in pairs:
            pairs[str(pair)] = device_id
    return pairs


async def pci_devices(qmp: Monitor) -> list[dict[str, Any]]:
    """Every PCI device the guest can see, bridges' children included, each with
    the ``bus`` number it sits on."""
    found: list[dict[str, Any]] = []

    def walk(devices: list[dict[str, Any]], bus: int) -> None:
        for device in devices:
            found.append({**device, "bus": bus})
            bridge = device.get("pci_bridge")
            if bridge:
                walk(bridge.get("devices", []), bridge["bus"]["secondary"])

    for bus in await qmp.execute("query-pci"):
        walk(bus["devices"], bus["bus"])
    return found


async def visible_device_ids(qmp: Monitor) -> set[str]:
    """Ids of the PCI devices the guest can see (a hidden primary is not among them)."""
    return {d["qdev_id"] for d in await pci_devices(qmp) if d.get("qdev_id")}


async def primaries_visible_within(
    qmp: Monitor, primaries: Iterable[str], timeout: float, poll: float = 0.2
) -> bool:
    """Whether every one of ``primaries`` is (or becomes, within ``timeout`` s) visible to
    the guest: after a cancelled migration QEMU plugs them back, at once for a guest that
    released them, after up to 30 s for one that never did. A monitor error on one poll
    (QEMU busy finishing the job) is only a reason to ask again."""
    wanted = set(primaries)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if wanted <= await visible_device_ids(qmp):
                return True
        except MonitorError as err:
            logger.debug("%s", err)
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
