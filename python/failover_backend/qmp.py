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
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from .errors import MonitorCommandError, MonitorUnavailable, QemuGone
from .timeline import Timeline
from .waiting import Changes, within

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

_M = TypeVar("_M", bound="Monitor")


#: Events a session keeps (between this and twice as many).
KEEP_EVENTS = 10_000


class Monitor:
    """A monitor of one QEMU: commands, and every event recorded in order. The ways
    to reach one (:class:`QmpSession`, a QMP socket; ``LibvirtMonitor``, libvirt's
    QMP passthrough) supply :meth:`_send` and feed :meth:`_record`; every controller
    step takes a ``Monitor``.

    :param name: Names the QEMU in messages and timelines (``source``, ``target``).
    :param timeline: Every event is also added here, when given.
    """

    def __init__(self, name: str, timeline: Timeline | None = None) -> None:
        self.name = name
        self.timeline = timeline
        #: The QMP socket, when reached through one (what ``cancel --qmp`` takes).
        self.path: Path | None = None
        #: The latest events (at most about twice :attr:`keep_events`): a ``run`` lives
        #: as long as its VM and must not keep every event of it.
        self.events: list[QmpEvent] = []
        self.keep_events = KEEP_EVENTS
        #: Events forgotten from the front of :attr:`events`. Positions (``mark``,
        #: ``since``) count every event ever received.
        self._forgotten = 0
        self._changed = Changes()
        self._gone: str | None = None
        #: When QEMU closed the connection (wall clock).
        self.gone_at: float | None = None

    async def __aenter__(self: _M) -> _M:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Let go of the monitor (never fails)."""

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        """Send one command, return QEMU's answer.

        :raise MonitorCommandError: When QEMU refuses it.
        :raise QemuGone: When the monitor is gone (after :meth:`_set_gone`).
        """
        raise NotImplementedError

    def _record(self, event: QmpEvent) -> None:
        if self.timeline is not None:
            self.timeline.add(self.name, event.name, _describe(event), at=event.time)
        self._remember(event)
        self._changed.notify()

    def _mark_gone(self, why: str) -> None:
        if self._gone is None:
            self._gone = why
            self.gone_at = time.time()
            if self.timeline is not None:
                self.timeline.add(self.name, "QMP-CLOSED", why)
        self._changed.notify()

    async def _set_gone(self, why: str) -> None:
        self._mark_gone(why)

    @property
    def gone(self) -> bool:
        return self._gone is not None

    async def wait_closed(self) -> str:
        """Wait until QEMU closes the connection; returns why."""
        while self._gone is None:
            await self._changed.wait(None)
        return self._gone

    def _raise_if_gone(self) -> None:
        if self._gone is not None:
            raise QemuGone(f"{self.name}: {self._gone}")

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
            return await within(self._send(command, arguments), timeout)
        except asyncio.TimeoutError as err:
            raise QemuGone(f"{self.name}: {command} got no answer in {timeout:.0f} s") from err

    def _remember(self, event: QmpEvent) -> None:
        """Keep ``event``; forget the oldest half once twice :attr:`keep_events` are kept
        (in batches, so a long life costs no copying per event)."""
        self.events.append(event)
        if len(self.events) > 2 * self.keep_events:
            drop = len(self.events) - self.keep_events
            del self.events[:drop]
            self._forgotten += drop

    def _end(self) -> int:
        return self._forgotten + len(self.events)

    def mark(self) -> int:
        """Where the event log is now: pass as ``since`` to wait for later events only."""
        return self._end()

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
        while True:
            # Events older than the kept ones are gone: look from the oldest kept.
            index = max(index, self._forgotten)
            while index < self._end():
                event = self.events[index - self._forgotten]
                index += 1
                if event.name in wanted and (match is None or match(event)):
                    return event
            self._raise_if_gone()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name}: no {'/'.join(sorted(wanted))} within {timeout:.1f} s"
                )
            await self._changed.wait(None if remaining == float("inf") else remaining)

    def index_after(self, event: QmpEvent, since: int = 0) -> int:
        """The ``since`` to pass to see only events after ``event``."""
        for index in range(max(since, self._forgotten), self._end()):
            if self.events[index - self._forgotten] is event:
                return index + 1
        return self._end()

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
        return [e for e in self.events[max(since - self._forgotten, 0) :] if e.name == name]

    # -- common queries --------------------------------------------------------

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def run_state(self) -> str:
        """``running``, ``paused``, ``inmigrate``, ``postmigrate``..."""
        status = await self.execute("query-status")
        return str(status["status"])


class QmpSession(Monitor):
    """A QMP socket of QEMU's own (``-qmp unix:PATH,server=on,wait=off``)."""

    def __init__(self, name: str, timeline: Timeline | None = None) -> None:
        super().__init__(name, timeline)
        self._client = QMPClient(name)
        self._tasks: list[asyncio.Task[None]] = []

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
                await within(self._client.connect(str(self.path)), timeout)
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
                self._record(
                    QmpEvent(at or time.time(), str(raw["event"]), dict(raw.get("data", {})))
                )

    async def _watch_connection(self) -> None:
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        await self._set_gone("QEMU closed the monitor connection")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        # Closing never fails: a QEMU that already went away leaves qemu.qmp with the
        # EOF it saw, which disconnect() re-raises.
        with contextlib.suppress(QMPError, OSError, EOFError, asyncio.TimeoutError):
            await within(self._client.disconnect(), 5)

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as err:
            raise MonitorCommandError(
                command, arguments, err.error_class, err.error.error.desc
            ) from err
        except (QMPError, OSError, EOFError) as err:
            await self._set_gone(f"the monitor connection failed during {command}: {err}")
            raise QemuGone(f"{self.name}: {self._gone}") from err


def _describe(event: QmpEvent) -> str:
    if event.name == "MIGRATION":
        return str(event.data.get("status", ""))
    if not event.data:
        return ""
    return " ".join(f"{key}={value}" for key, value in event.data.items())
