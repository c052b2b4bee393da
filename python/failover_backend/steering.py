"""Keeping the host's switch pointed at the path the guest uses.

The guest's net_failover driver transmits through the primary while it runs with
carrier and through the standby otherwise; while a primary is registered, it drops
what arrives on the standby. The host's switch (a Linux bridge, the NIC's embedded
switch) forwards the guest's MAC to the port it last saw it on. Each standby
backend does the fast part itself (see :meth:`StandbyBackend.steer`): it probes the
guest to see which way it answers, announces the standby when that is the way,
and keeps the standby's own chatter from re-teaching the switch while the primary
carries the traffic. What it cannot see is what QEMU does with the primary; this
module tells it, from the VM's QMP events:

==============================  ==========  ============================================
QEMU says                       mode        because
==============================  ==========  ============================================
running, primary visible        primary     the guest uses it (probed to be sure)
running, no primary             standby     the standby is the only path
waiting for a migration         off         the VM does not run here yet
FAILOVER_NEGOTIATED             plugged     QEMU plugs the hidden primary now
UNPLUG_PRIMARY (ours)           releasing   the guest's answers show when it let go
MIGRATION active, after that    standby     QEMU saw the eject (if no answer did)
MIGRATION cancelled/failed      plugged     QEMU plugs the primary back (``primary``
                                            if the guest never let it go)
MIGRATION completed (outgoing)  off         the VM runs elsewhere now
RESUME after an incoming one    plugged     the target plugged its primary before RESUME
DEVICE_DELETED (our primary)    standby     the primary is gone
SHUTDOWN                        off
==============================  ==========  ============================================

Cost, when a primary's link goes down without an unplug: the guest then transmits
through the standby; the backend forwards it (so the switch learns the standby) and
probes until the primary answers again. Only the standby's IPv6 multicast (neighbour
and router discovery, MLD) stays held back meanwhile, so the guest's IPv6 address
resolution waits for the primary. A stock net_failover guest drops inbound traffic
on the standby during that time anyway.
"""

from __future__ import annotations

import logging

from .backend import StandbyBackend, SteerMode
from .errors import BackendError, MonitorCommandError
from .qmp import Monitor, QmpEvent
from .timeline import Timeline
from .vm_devices import PERIPHERAL, find_primary, visible_device_ids

logger = logging.getLogger(__name__)


class PairSteering:
    """Tells one standby's backend what QEMU does with its pair's primary.

    :param primary_id: The primary's device id when known (a configured one); found
        in QEMU otherwise.
    """

    def __init__(
        self,
        backend: StandbyBackend,
        standby_id: str,
        *,
        primary_id: str | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        self.backend = backend
        self.standby_id = standby_id
        self.primary_id = primary_id
        self.timeline = timeline
        self.mode: SteerMode = "off"
        #: QEMU asked the guest to release the primary for the current outgoing migration.
        self._unplug_requested = False
        self._migrating_out = False

    @property
    def current_mode(self) -> SteerMode:
        """The backend's mode: it moves on by itself (``releasing`` to ``standby`` when
        the guest lets go, ``plugged`` to ``primary`` when the primary answers)."""
        status = self.backend.steering()
        return status.mode if status is not None else self.mode

    def steer(self, mode: SteerMode, why: str) -> None:
        if mode == self.current_mode and mode in ("off", "primary", "standby"):
            self.mode = mode
            return
        self.mode = mode
        if self.timeline is not None:
            self.timeline.add("controller", f"steer-{mode}", f"{self.standby_id}: {why}")
        logger.info("%s: steering %s (%s)", self.standby_id, mode, why)
        try:
            self.backend.steer(mode, why)
        except BackendError as err:
            logger.warning("%s: cannot steer: %s", self.standby_id, err)

    async def _primary(self, qmp: Monitor) -> str | None:
        found = await find_primary(qmp, self.standby_id)
        if found is not None:
            self.primary_id = found
        return found

    async def _is_ours(self, qmp: Monitor, device_id: object) -> bool:
        if not isinstance(device_id, str):
            return False
        if device_id == self.primary_id:
            return True
        try:
            pair = await qmp.qom_get(f"{PERIPHERAL}/{device_id}", "failover_pair_id")
        except MonitorCommandError:
            return False
        return bool(pair == self.standby_id)

    async def start(self, qmp: Monitor) -> None:
        """Set the mode for the VM as it is now."""
        state = await qmp.run_state()
        if state == "inmigrate":
            self.steer("off", "waiting for the VM to migrate here")
            return
        primary = await self._primary(qmp)
        if primary is not None and primary in await visible_device_ids(qmp):
            self.steer("primary", f"primary {primary} is plugged")
        else:
            self.steer("standby", "no primary plugged")

    async def on_event(self, qmp: Monitor, event: QmpEvent, incoming: bool) -> None:
        """Follow one of the VM's events; ``incoming`` while it waits for a migration."""
        name, data = event.name, event.data
        if name == "FAILOVER_NEGOTIATED" and not incoming:
            if data.get("device-id") != self.standby_id or self.current_mode == "primary":
                return
            if await self._primary(qmp) is not None:
                self.steer("plugged", "the guest negotiated STANDBY: QEMU plugs the primary")
            else:
                self.steer("standby", "the guest negotiated STANDBY; there is no primary")
        elif name == "UNPLUG_PRIMARY" and await self._is_ours(qmp, data.get("device-id")):
            self._migrating_out = True
            self._unplug_requested = True
            self.steer("releasing", "QEMU asked the guest to release its primary")
        elif name == "MIGRATION" and not incoming:
            await self._on_migration(str(data.get("status")))
        elif name == "RESUME" and incoming:
            if await self._primary(qmp) is not None:
                self.steer("plugged", "the VM resumed here with a primary plugged")
            else:
                self.steer("standby", "the VM resumed here without a primary")
        elif name == "DEVICE_DELETED" and data.get("device") == self.primary_id:
            self.steer("standby", f"primary {self.primary_id} was removed")
        elif name == "SHUTDOWN":
            self.steer("off", "the VM shut down")

    async def _on_migration(self, status: str) -> None:
        if status == "setup":
            self._migrating_out = True
            self._unplug_requested = False
        elif status == "active" and self._unplug_requested and self.current_mode == "releasing":
            # The backend usually saw the release first; if not, QEMU's word is enough.
            self.steer("standby", "QEMU saw the guest release its primary")
        elif status == "completed" and self._migrating_out:
            self._migrating_out = False
            self.steer("off", "the VM migrated away")
        elif status in ("cancelled", "failed") and self._migrating_out:
            self._migrating_out = False
            if self._unplug_requested:
                if self.current_mode == "releasing":
                    self.steer("primary", f"migration {status}; the guest kept its primary")
                else:
                    self.steer("plugged", f"migration {status}: QEMU plugs the primary back")
            self._unplug_requested = False
