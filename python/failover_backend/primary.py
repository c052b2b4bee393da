"""The primary: plug, unplug with a guest-ack deadline, replug, repair.

A primary added while the guest has not negotiated STANDBY stays hidden (QEMU keeps
its options and realizes it at negotiation). Unplugging asks the guest to release it
(``device_del``); the guest's eject ends in DEVICE_DELETED. A guest that never ejects
leaves it half unplugged, and QEMU refuses a second primary with a new id: repair
re-adds it with the same id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal

from .errors import MonitorCommandError, PrimaryError, UnplugTimeout
from .pairing import PrimaryConfig, require_pairing
from .qmp import Monitor, QmpEvent
from .standby_negotiation import standby_negotiated
from .vm_devices import PERIPHERAL, pci_devices, visible_device_ids

logger = logging.getLogger(__name__)

PrimaryState = Literal["visible", "hidden", "absent", "unplugging"]

#: PCI class of Ethernet controllers.
ETHERNET_CLASS = 0x0200


class Primary:
    """One primary device of one standby.

    :param netdev: ``netdev_add`` arguments for an emulated primary's host side
        (``None`` for vfio-pci, which has none).
    """

    def __init__(
        self,
        qmp: Monitor,
        config: PrimaryConfig,
        netdev: Mapping[str, Any] | None = None,
    ) -> None:
        self.qmp = qmp
        self.config = config
        self.netdev = dict(netdev) if netdev else None

    @property
    def device_id(self) -> str:
        return self.config.device_id

    async def exists(self) -> bool:
        """Realized in QEMU (visible or half unplugged; a hidden one is not)."""
        try:
            await self.qmp.qom_get(f"{PERIPHERAL}/{self.device_id}", "type")
            return True
        except MonitorCommandError:
            return False

    async def visible(self) -> bool:
        """The guest can see it (it is on the PCI bus)."""
        return self.device_id in await visible_device_ids(self.qmp)

    async def state(self) -> PrimaryState:
        if await self.visible():
            return "visible"
        if await self.exists():
            return "unplugging"
        if await standby_negotiated(self.qmp, self.config.pair_id):
            return "absent"
        return "hidden"

    async def wait_visible(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await self.visible():
            if time.monotonic() > deadline:
                raise PrimaryError(
                    f"{self.device_id} is not visible to the guest after {timeout:.0f} s"
                )
            await asyncio.sleep(0.1)

    async def _add_netdev(self) -> None:
        if self.netdev is None:
            return
        try:
            await self.qmp.execute("netdev_add", self.netdev)
        except MonitorCommandError as err:
            if "Duplicate" not in err.description and "already" not in err.description:
                raise

    async def plug(self, visible_timeout: float = 10.0) -> PrimaryState:
        """Add the primary. It becomes visible at once when the guest already
        negotiated STANDBY, and stays hidden until then otherwise.

        :raise PairingError: When the pair breaks a rule (nothing is added).
        :raise PrimaryError: When QEMU refuses it, or it does not show up.
        """
        await require_pairing(self.qmp, self.config.pair_id, self.config)
        await self._add_netdev()
        try:
            await self.qmp.execute("device_add", self.config.device_add_args())
        except MonitorCommandError as err:
            raise PrimaryError(f"QEMU refused primary {self.device_id}: {err.description}") from err
        if not await standby_negotiated(self.qmp, self.config.pair_id):
            logger.info("%s added; hidden until the guest negotiates STANDBY", self.device_id)
            return "hidden"
        await self.wait_visible(visible_timeout)
        await self._check_class()
        return "visible"

    async def _check_class(self) -> None:
        for device in await pci_devices(self.qmp):
            if device.get("qdev_id") == self.device_id:
                pci_class = int(device.get("class_info", {}).get("class", -1))
                if pci_class != ETHERNET_CLASS:
                    raise PrimaryError(
                        f"{self.device_id} has PCI class {pci_class:#06x}, not Ethernet "
                        f"({ETHERNET_CLASS:#06x}): the guest will not pair it"
                    )

    async def unplug(self, deadline: float) -> QmpEvent:
        """Ask the guest to release the primary and wait for its eject.

        :raise UnplugTimeout: When the guest does not eject within ``deadline``
            seconds; the device is then left half unplugged (see :meth:`repair`).
        """
        mark = self.qmp.mark()
        try:
            await self.qmp.execute("device_del", {"id": self.device_id})
        except MonitorCommandError as err:
            raise PrimaryError(f"cannot unplug {self.device_id}: {err.description}") from err
        try:
            return await self.qmp.wait_device_deleted(self.device_id, since=mark, timeout=deadline)
        except TimeoutError:
            raise UnplugTimeout(
                f"the guest did not release {self.device_id} within {deadline:.0f} s; it is "
                "left half unplugged until the guest ejects it or repair() re-adds it"
            ) from None

    async def replug(self, deadline: float) -> PrimaryState:
        """Unplug (with the guest's ack) and plug again."""
        await self.unplug(deadline)
        return await self.plug()

    async def repair(self, deadline: float = 10.0) -> bool:
        """Re-add a primary left half unplugged (realized, but not on the bus).

        Returns whether anything needed repair.
        """
        if await self.visible() or not await self.exists():
            return False
        logger.warning("%s is half unplugged; re-adding it with the same id", self.device_id)
        mark = self.qmp.mark()
        try:
            await self.qmp.execute("device_del", {"id": self.device_id})
        except MonitorCommandError as err:
            logger.info("device_del %s: %s", self.device_id, err.description)
        if await self.exists():
            try:
                await self.qmp.wait_device_deleted(self.device_id, since=mark, timeout=deadline)
            except TimeoutError:
                raise PrimaryError(
                    f"{self.device_id} cannot be repaired: QEMU did not delete it in "
                    f"{deadline:.0f} s"
                ) from None
        await self.plug()
        return True
