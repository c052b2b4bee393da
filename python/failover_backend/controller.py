"""The controller of one VM's failover pair (what ``python -m failover_backend run`` runs).

It watches the VM over QMP and acts on what it sees:

- checks the pairing before touching anything (:mod:`failover_backend.pairing`);
- tracks the guest's STANDBY negotiation, with a deadline;
- plugs the configured primary (hidden by QEMU until negotiation), repairs one left
  half unplugged;
- keeps the standby backend's steering in step with the primary
  (:mod:`failover_backend.steering`), so the host's switch follows the guest;
- says when QEMU negotiated a standby for which it has no primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .backend import StandbyBackend
from .errors import MonitorError
from .pairing import require_pairing
from .primary import Primary, PrimaryState
from .qmp import Monitor, QmpEvent
from .standby import BackendLink, backend_link
from .standby_negotiation import standby_negotiated, wait_negotiated
from .steering import PairSteering
from .timeline import Timeline
from .vm_devices import find_primary, visible_device_ids

logger = logging.getLogger(__name__)

#: What the controller follows: the primary's life and the VM's.
WATCHED_EVENTS = frozenset(
    {
        "FAILOVER_NEGOTIATED",
        "UNPLUG_PRIMARY",
        "MIGRATION",
        "RESUME",
        "DEVICE_DELETED",
        "SHUTDOWN",
    }
)


#: Seconds between looks at whether the primary is in the VM, when no event came.
PRIMARY_RECHECK_S = 2.0


@dataclass(frozen=True)
class PairStatus:
    run_state: str
    standby_id: str
    standby_negotiated: bool
    primary_id: str | None
    primary_state: PrimaryState | None
    migration: str | None
    backend_link: BackendLink
    """The vhost-user connection as QEMU sees it."""
    backend_state: str | None
    """The backend's own state, when it runs in this process."""
    steering: str | None = None

    def lines(self) -> list[str]:
        backend = self.backend_link.describe()
        if self.backend_state is not None:
            backend += f"; {self.backend_state} (backend's side)"
        lines = [
            f"VM:        {self.run_state}",
            f"standby:   {self.standby_id} "
            + ("(STANDBY negotiated)" if self.standby_negotiated else "(not negotiated)"),
            f"backend:   {backend}",
            f"primary:   {self.primary_id or '-'}"
            + (f" ({self.primary_state})" if self.primary_state else ""),
            f"migration: {self.migration or '-'}",
        ]
        if self.steering is not None:
            lines.append(f"steering:  {self.steering}")
        return lines

    def to_json(self) -> dict[str, Any]:
        """The same facts for scripts (``status --json``)."""
        return {
            "vm": self.run_state,
            "standby": self.standby_id,
            "standby_negotiated": self.standby_negotiated,
            "primary": {"id": self.primary_id, "state": self.primary_state},
            "migration": self.migration,
            "backend": {
                "qemu_side": self.backend_link.state,
                "socket": self.backend_link.socket,
                "listening": self.backend_link.listening,
                "backend_side": self.backend_state,
            },
            "steering": self.steering,
            "healthy": self.healthy,
        }

    @property
    def healthy(self) -> bool:
        """The pair can fail over: the standby's backend is connected."""
        return self.backend_link.state == "connected"


class FailoverController:
    """Controls the pair of ``standby_id`` in the VM behind ``qmp``.

    :param backend: The standby's backend when it runs in this process (for steering).
    :param primary: The primary this controller plugs and repairs, if any.
    """

    def __init__(
        self,
        qmp: Monitor,
        standby_id: str,
        *,
        backend: StandbyBackend | None = None,
        primary: Primary | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        self.qmp = qmp
        self.standby_id = standby_id
        self.backend = backend
        self.primary = primary
        self.timeline = timeline or qmp.timeline or Timeline()
        if qmp.timeline is None:
            qmp.timeline = self.timeline
        self.warnings: list[str] = []
        #: What the metrics show, kept current from QEMU's events: the guest negotiated
        #: STANDBY on this standby (since this controller started), and its primary is
        #: in the VM now.
        self.negotiated = False
        self.primary_present = False
        self._watcher: asyncio.Task[None] | None = None
        self.steering = (
            PairSteering(
                backend,
                standby_id,
                primary_id=primary.device_id if primary else None,
                timeline=self.timeline,
            )
            if backend is not None
            else None
        )

    def _warn(self, message: str) -> None:
        logger.warning("%s", message)
        self.warnings.append(message)
        self.timeline.add("controller", "warning", message)

    async def check(self) -> None:
        """:raise PairingError: With every rule the pair breaks."""
        await require_pairing(
            self.qmp, self.standby_id, self.primary.config if self.primary else None
        )

    async def start(self) -> None:
        """Start watching QEMU's events (steering, negotiation warnings)."""
        if self._watcher is None:
            since = self.qmp.mark()
            if self.steering is not None:
                await self.steering.start(self.qmp)
            self.negotiated = await standby_negotiated(self.qmp, self.standby_id)
            await self._refresh_primary_present()
            self._watcher = asyncio.create_task(self._watch(since))

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        self._watcher = None

    async def _watch(self, since: int) -> None:
        try:
            index = since
            incoming = await self.qmp.run_state() == "inmigrate"
            while True:
                try:
                    event = await self.qmp.wait_event(
                        WATCHED_EVENTS, since=index, timeout=PRIMARY_RECHECK_S
                    )
                except TimeoutError:
                    # QEMU plugs a primary back after a cancelled migration without an
                    # event of its own: look again now and then.
                    await self._refresh_primary_present()
                    continue
                index = self.qmp.index_after(event, index)
                await self._on_event(event, incoming)
                if event.name == "RESUME":
                    incoming = False
        except MonitorError as err:
            logger.info("stopped watching %s: %s", self.qmp.name, err)

    async def _refresh_primary_present(self) -> None:
        primary_id = (
            self.primary.device_id
            if self.primary
            else await find_primary(self.qmp, self.standby_id)
        )
        self.primary_present = primary_id is not None and primary_id in await visible_device_ids(
            self.qmp
        )

    async def _on_event(self, event: QmpEvent, incoming: bool) -> None:
        if self.steering is not None:
            await self.steering.on_event(self.qmp, event, incoming)
        if event.name == "FAILOVER_NEGOTIATED" and event.data.get("device-id") == self.standby_id:
            self.negotiated = True
        if event.name != "SHUTDOWN":
            await self._refresh_primary_present()
        if (
            event.name == "FAILOVER_NEGOTIATED"
            and event.data.get("device-id") == self.standby_id
            and not incoming
            and await find_primary(self.qmp, self.standby_id) is None
        ):
            self._warn(
                f"the guest negotiated STANDBY on {self.standby_id} but QEMU has no "
                "primary for it (QEMU: 'Primary device not found'); traffic stays on "
                "the standby until one is plugged"
            )

    async def wait_warning(self, fragment: str, timeout: float) -> str:
        """The first warning containing ``fragment`` (events are handled asynchronously).

        :raise TimeoutError: When there is none within ``timeout`` seconds.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for warning in self.warnings:
                if fragment in warning:
                    return warning
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no warning about {fragment!r} within {timeout:.1f} s")
            await asyncio.sleep(0.05)

    async def wait_negotiated(self, timeout: float) -> None:
        """:raise NegotiationTimeout: When the guest does not negotiate STANDBY in time."""
        await wait_negotiated(self.qmp, self.standby_id, timeout=timeout)

    async def plug_primary(self) -> PrimaryState:
        if self.primary is None:
            raise ValueError("no primary configured")
        state = await self.primary.plug()
        self.timeline.add("controller", "primary-plugged", f"{self.primary.device_id} {state}")
        return state

    async def status(self) -> PairStatus:
        migration = (await self.qmp.execute("query-migrate")).get("status")
        primary_id = (
            self.primary.device_id
            if self.primary
            else await find_primary(self.qmp, self.standby_id)
        )
        primary_state: PrimaryState | None = None
        if self.primary is not None:
            primary_state = await self.primary.state()
        elif primary_id is not None:
            visible = primary_id in await visible_device_ids(self.qmp)
            primary_state = "visible" if visible else "unplugging"
        steering = self.backend.steering() if self.backend else None
        return PairStatus(
            run_state=await self.qmp.run_state(),
            standby_id=self.standby_id,
            standby_negotiated=await standby_negotiated(self.qmp, self.standby_id),
            primary_id=primary_id,
            primary_state=primary_state,
            migration=migration,
            backend_link=await backend_link(self.qmp, self.standby_id),
            backend_state=self.backend.state if self.backend else None,
            steering=f"{steering.mode}, switch pointed at the {steering.path}"
            if steering
            else None,
        )
