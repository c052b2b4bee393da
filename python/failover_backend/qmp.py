"""A QMP session with one QEMU: commands, and every event recorded in order.

It wraps ``qemu.qmp.QMPClient`` (QEMU's own asyncio client; no framing here) and adds
what a failover controller needs: all events are recorded from the moment of
connecting, so a waiter never misses one that arrived before it started waiting
(pass ``since=session.mark()`` taken *before* acting); every wait is bounded; a QEMU
that goes away turns into :class:`~failover_backend.errors.QemuGone` for every
pending and later call instead of a hang.

::

    async with QmpSession("source") as qmp:
        await qmp.connect("/run/vm1/qmp.sock")
        mark = qmp.mark()
        await qmp.execute("migrate", {"uri": "unix:/run/mig.sock"})
        event = await qmp.wait_event("UNPLUG_PRIMARY", since=mark, timeout=10)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from .errors import MonitorCommandError, MonitorUnavailable, QemuGone
from .timeline import Timeline

logger = logging.getLogger(__name__)

#: Longest a single command may take before the session gives up on QEMU.
COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class QmpEvent:
    time: float
    """QEMU's timestamp of the event (wall clock)."""
    name: str
    data: dict[str, Any] = field(default_factory=dict)


EventMatch = Callable[[QmpEvent], bool]


class QmpSession:
    """One QMP connection.

    :param name: Names the QEMU in messages and timelines (``source``, ``target``).
    :param timeline: Every event is also added here, when given.
    """

    def __init__(self, name: str, timeline: Timeline | None = None) -> None:
        self.name = name
        self.timeline = timeline
        self.path: Path | None = None
        self.events: list[QmpEvent] = []
        self._client = QMPClient(name)
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._gone: str | None = None
        #: When QEMU closed the connection (wall clock).
        self.gone_at: float | None = None

    async def __aenter__(self) -> QmpSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self, path: str | Path, timeout: float = 5.0) -> None:
        """Connect to the QMP socket at ``path``, retrying until ``timeout``.

        :raise MonitorUnavailable: When there is no socket, or QEMU does not answer.
        """
        self.path = Path(path)
        deadline = time.monotonic() + timeout
        # Wait for the socket to exist first: QEMU may still be starting, and the
        # client logs every failed attempt as an error.
        while not self.path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        while True:
            try:
                await asyncio.wait_for(self._client.connect(str(self.path)), timeout)
                break
            except (QMPError, OSError, asyncio.TimeoutError) as err:
                if time.monotonic() >= deadline:
                    reason = err.__cause__ or err
                    raise MonitorUnavailable(
                        f"{self.name}: cannot connect to QMP at {self.path}: {reason} "
                        f"(is QEMU running with -qmp unix:{self.path},server=on,wait=off, "
                        "and no other client on it?)"
                    ) from err
                await asyncio.sleep(0.1)
        self._tasks = [
            asyncio.create_task(self._record_events()),
            asyncio.create_task(self._watch_connection()),
        ]

    async def _record_events(self) -> None:
        with self._client.listener() as listener:
            async for message in listener:
                raw: dict[str, Any] = dict(message)
                stamp = raw.get("timestamp", {})
                at = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
                event = QmpEvent(at or time.time(), str(raw["event"]), dict(raw.get("data", {})))
                if self.timeline is not None:
                    self.timeline.add(self.name, event.name, _describe(event), at=event.time)
                async with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()

    async def _watch_connection(self) -> None:
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        await self._set_gone("QEMU closed the monitor connection")

    async def _set_gone(self, why: str) -> None:
        async with self._changed:
            if self._gone is None:
                self._gone = why
                self.gone_at = time.time()
                if self.timeline is not None:
                    self.timeline.add(self.name, "QMP-CLOSED", why)
            self._changed.notify_all()

    @property
    def gone(self) -> bool:
        return self._gone is not None

    async def wait_gone(self) -> str:
        """Wait until QEMU closes the connection; returns why."""
        async with self._changed:
            while self._gone is None:
                await self._changed.wait()
            return self._gone

    def _raise_if_gone(self) -> None:
        if self._gone is not None:
            raise QemuGone(f"{self.name}: {self._gone}")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        # Closing never fails: a QEMU that already went away leaves qemu.qmp with the
        # EOF it saw, which disconnect() re-raises.
        with contextlib.suppress(QMPError, OSError, EOFError, asyncio.TimeoutError):
            await asyncio.wait_for(self._client.disconnect(), 5)

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Any:
        """Run ``command`` and return QEMU's answer.

        :raise MonitorCommandError: When QEMU refuses it (its error class and message kept).
        :raise QemuGone: When QEMU is gone, or goes away meanwhile.
        """
        self._raise_if_gone()
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as err:
            raise MonitorCommandError(
                command, arguments, err.error_class, err.error.error.desc
            ) from err
        except asyncio.TimeoutError as err:
            raise QemuGone(f"{self.name}: {command} got no answer in {timeout:.0f} s") from err
        except (QMPError, OSError, EOFError) as err:
            await self._set_gone(f"the monitor connection failed during {command}: {err}")
            raise QemuGone(f"{self.name}: {self._gone}") from err

    def mark(self) -> int:
        """Where the event log is now: pass as ``since`` to wait for later events only."""
        return len(self.events)

    async def wait_event(
        self,
        names: str | Iterable[str],
        *,
        since: int = 0,
        match: EventMatch | None = None,
        timeout: float | None,
    ) -> QmpEvent:
        """The first event (from index ``since``) named ``names`` that ``match`` accepts.

        :param timeout: Seconds to wait; ``None`` waits as long as QEMU is there.
        :raise TimeoutError: When none arrives within ``timeout`` seconds.
        :raise QemuGone: When QEMU goes away first.
        """
        wanted = {names} if isinstance(names, str) else set(names)
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        index = since
        async with self._changed:
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    index += 1
                    if event.name in wanted and (match is None or match(event)):
                        return event
                self._raise_if_gone()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.name}: no {'/'.join(sorted(wanted))} within {timeout:.1f} s"
                    )
                if remaining == float("inf"):
                    await self._changed.wait()
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)

    def index_after(self, event: QmpEvent, since: int = 0) -> int:
        """The ``since`` to pass to see only events after ``event``."""
        for index in range(since, len(self.events)):
            if self.events[index] is event:
                return index + 1
        return len(self.events)

    async def wait_device_deleted(self, device_id: str, *, since: int, timeout: float) -> QmpEvent:
        """DEVICE_DELETED for ``device_id`` (the guest released it, QEMU removed it).

        :raise TimeoutError: When it does not come within ``timeout`` seconds.
        """
        return await self.wait_event(
            "DEVICE_DELETED",
            since=since,
            match=lambda e: e.data.get("device") == device_id,
            timeout=timeout,
        )

    def events_named(self, name: str, since: int = 0) -> list[QmpEvent]:
        return [e for e in self.events[since:] if e.name == name]

    # -- common queries --------------------------------------------------------

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def run_state(self) -> str:
        """``running``, ``paused``, ``inmigrate``, ``postmigrate``..."""
        status = await self.execute("query-status")
        return str(status["status"])

    async def pci_devices(self) -> list[dict[str, Any]]:
        """Every PCI device the guest can see, bridges' children included, each with
        the ``bus`` number it sits on."""
        found: list[dict[str, Any]] = []

        def walk(devices: list[dict[str, Any]], bus: int) -> None:
            for device in devices:
                found.append({**device, "bus": bus})
                bridge = device.get("pci_bridge")
                if bridge:
                    walk(bridge.get("devices", []), bridge["bus"]["secondary"])

        for bus in await self.execute("query-pci"):
            walk(bus["devices"], bus["bus"])
        return found

    async def visible_device_ids(self) -> set[str]:
        """Ids of the PCI devices the guest can see (a hidden primary is not among them)."""
        return {d["qdev_id"] for d in await self.pci_devices() if d.get("qdev_id")}


def _describe(event: QmpEvent) -> str:
    if event.name == "MIGRATION":
        return str(event.data.get("status", ""))
    if not event.data:
        return ""
    return " ".join(f"{key}={value}" for key, value in event.data.items())
