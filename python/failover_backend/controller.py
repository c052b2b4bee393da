"""The controller of one VM's failover pair (what ``python -m failover_backend run`` runs).

It watches the VM over QMP and acts on what it sees:

- checks the pairing before touching anything (:mod:`failover_backend.pairing`);
- tracks the guest's STANDBY negotiation, with a deadline;
- plugs the configured primary (hidden by QEMU until negotiation), repairs one left
  half unplugged;
- steers the host's traffic to the standby (:mod:`failover_backend.steering`) when QEMU
  asks the guest to release the primary, and when the VM resumes here after a
  migration;
- says when QEMU negotiated a standby for which it has no primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from .backend import StandbyBackend
from .errors import MonitorError
from .negotiation import standby_negotiated, wait_negotiated
from .pairing import find_primary, require_pairing
from .primary import Primary, PrimaryState
from .qmp import QmpEvent, QmpSession
from .steering import announce_burst
from .timeline import Timeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairStatus:
    run_state: str
    standby_id: str
    standby_negotiated: bool
    primary_id: str | None
    primary_state: PrimaryState | None
    migration: str | None
    backend_state: str | None

    def lines(self) -> list[str]:
        return [
            f"VM:        {self.run_state}",
            f"standby:   {self.standby_id} "
            + ("(STANDBY negotiated)" if self.standby_negotiated else "(not negotiated)"),
            f"primary:   {self.primary_id or '-'}"
            + (f" ({self.primary_state})" if self.primary_state else ""),
            f"migration: {self.migration or '-'}",
            f"backend:   {self.backend_state or '-'}",
        ]


class FailoverController:
    """Controls the pair of ``standby_id`` in the VM behind ``qmp``.

    :param backend: The standby's backend when it runs in this process (for steering).
    :param primary: The primary this controller plugs and repairs, if any.
    """

    def __init__(
        self,
        qmp: QmpSession,
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
        self._watcher: asyncio.Task[None] | None = None
        self._steering: set[asyncio.Task[int]] = set()

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
            self._watcher = asyncio.create_task(self._watch(self.qmp.mark()))

    async def stop(self) -> None:
        tasks: list[asyncio.Task[None] | asyncio.Task[int]] = [*self._steering]
        if self._watcher is not None:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._watcher = None

    async def _watch(self, since: int) -> None:
        try:
            index = since
            incoming = await self.qmp.run_state() == "inmigrate"
            while True:
                event = await self.qmp.wait_event(
                    {"UNPLUG_PRIMARY", "RESUME", "FAILOVER_NEGOTIATED"}, since=index, timeout=1e9
                )
                index = self.qmp.index_after(event, index)
                await self._on_event(event, incoming)
                if event.name == "RESUME":
                    incoming = False
        except MonitorError as err:
            logger.info("stopped watching %s: %s", self.qmp.name, err)

    async def _on_event(self, event: QmpEvent, incoming: bool) -> None:
        if event.name == "UNPLUG_PRIMARY":
            self._steer(f"primary {event.data.get('device-id')} leaving")
        elif event.name == "RESUME" and incoming:
            self._steer("VM resumed here after migration")
        elif (
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

    def _steer(self, why: str) -> None:
        if self.backend is None:
            return
        self.timeline.add("controller", "steer-to-standby", why)
        task = asyncio.create_task(announce_burst(self.backend))
        self._steering.add(task)
        task.add_done_callback(self._steering.discard)

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
            visible = primary_id in await self.qmp.visible_device_ids()
            primary_state = "visible" if visible else "unplugging"
        return PairStatus(
            run_state=await self.qmp.run_state(),
            standby_id=self.standby_id,
            standby_negotiated=await standby_negotiated(self.qmp, self.standby_id),
            primary_id=primary_id,
            primary_state=primary_state,
            migration=migration,
            backend_state=self.backend.state if self.backend else None,
        )
