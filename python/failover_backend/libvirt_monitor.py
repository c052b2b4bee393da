"""libvirt as the way to a domain's QEMU: its QMP events through libvirt's QMP event
passthrough, and commands through ``qemuMonitorCommand``, as a
:class:`~failover_backend.qmp.Monitor`, so every controller step (pairing, steering,
the wait-unplug deadline) works unchanged on a domain libvirt runs.

libvirt's own events name none of the failover steps (UNPLUG_PRIMARY, ``wait-unplug``,
FAILOVER_NEGOTIATED); QEMU's do. libvirt's client calls back from its own event loop,
on a thread of its own (``libvirtaio`` would run it in asyncio's, but it is not
thread-safe and libvirt's client touches its handles from whichever thread makes a
call); each event is handed to the asyncio loop in order. A call blocks until libvirt
answers: it runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt
import libvirt_qemu

from .errors import MonitorCommandError, MonitorUnavailable, QemuGone
from .qmp import Monitor, QmpEvent
from .timeline import Timeline

logger = logging.getLogger(__name__)

_events_thread: threading.Thread | None = None
_events_lock = threading.Lock()


def _run_libvirt_events() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def _quiet(_context: object, _error: object) -> None:
    pass


def start_libvirt_events() -> None:
    """libvirt's own event loop on a thread of its own (once per process, before the
    first connection opens: connections opened before it get no events)."""
    global _events_thread
    with _events_lock:
        if _events_thread is None:
            # Errors reach the caller as exceptions; libvirt's default handler would
            # also print each one (a retry while a domain is not defined yet).
            libvirt.registerErrorHandler(_quiet, None)
            libvirt.virEventRegisterDefaultImpl()
            _events_thread = threading.Thread(
                target=_run_libvirt_events, name="libvirt-events", daemon=True
            )
            _events_thread.start()


def describe_libvirt_error(err: libvirt.libvirtError) -> str:
    return str(err.get_error_message() or err)


class LibvirtMonitor(Monitor):
    """The QEMU of domain ``domain`` on the libvirt at ``uri``.

    :param name: Names it in messages and timelines (``source``, ``target``).
    """

    def __init__(self, name: str, uri: str, domain: str, timeline: Timeline | None = None) -> None:
        super().__init__(name, timeline)
        self.uri = uri
        self.domain_name = domain
        self.connection: libvirt.virConnect | None = None
        self.domain: libvirt.virDomain | None = None
        self._callbacks: list[int] = []
        self._lifecycle: int | None = None
        self._job_callbacks: list[int] = []
        self._close_callback = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def connect(self, timeout: float = 5.0) -> None:
        """Open the connection, find the domain, follow its QEMU's events, and wait
        until it runs; a domain not defined yet (the target of a migration) or not
        started yet is waited for up to ``timeout`` seconds.

        :raise MonitorUnavailable: When libvirt cannot be reached, or the domain does
            not run within ``timeout``.
        """
        start_libvirt_events()
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._attach()
                break
            except libvirt.libvirtError as err:
                await self.close()
                if time.monotonic() >= deadline:
                    raise MonitorUnavailable(
                        f"{self.name}: domain {self.domain_name} on {self.uri}: "
                        f"{describe_libvirt_error(err)}"
                    ) from err
                await asyncio.sleep(0.5)
        while not await asyncio.to_thread(self._active):
            if time.monotonic() >= deadline:
                raise MonitorUnavailable(
                    f"{self.name}: domain {self.domain_name} on {self.uri} is not running "
                    f"after {timeout:g} s"
                )
            await asyncio.sleep(0.5)

    def _active(self) -> bool:
        assert self.domain is not None
        try:
            return bool(self.domain.isActive())
        except libvirt.libvirtError:
            return False

    async def _attach(self) -> None:
        connection = await asyncio.to_thread(libvirt.open, self.uri)
        self.connection = connection
        domain = await asyncio.to_thread(connection.lookupByName, self.domain_name)
        self.domain = domain
        self._callbacks.append(
            await asyncio.to_thread(
                libvirt_qemu.qemuMonitorEventRegister,
                connection,
                domain,
                None,
                self._on_qmp_event,
                None,
                0,
            )
        )
        self._lifecycle = await asyncio.to_thread(
            connection.domainEventRegisterAny,
            domain,
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            self._on_lifecycle,
            None,
        )
        await asyncio.to_thread(connection.registerCloseCallback, self._on_close, None)
        self._close_callback = True

    def on_job_completed(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """``callback(statistics)`` on the asyncio loop when the domain's job (a
        migration) completes: libvirt's JOB_COMPLETED event."""
        assert self.connection is not None and self.domain is not None

        def completed(
            _conn: libvirt.virConnect, _dom: libvirt.virDomain, params: dict[str, Any], _o: object
        ) -> None:
            self._on_loop(callback, dict(params))

        self._job_callbacks.append(
            self.connection.domainEventRegisterAny(
                self.domain, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, completed, None
            )
        )

    async def xml(self) -> str:
        """The running domain's XML."""
        assert self.domain is not None
        return str(await asyncio.to_thread(self.domain.XMLDesc, 0))

    def _on_loop(self, callback: Any, *args: Any) -> None:
        """Run ``callback`` on the asyncio loop (libvirt calls back on its own thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_qmp_event(
        self,
        _conn: libvirt.virConnect,
        _dom: libvirt.virDomain,
        event: str,
        seconds: int,
        micros: int,
        details: str | None,
        _opaque: object,
    ) -> None:
        data = json.loads(details) if details else {}
        event_data = data if isinstance(data, dict) else {}
        self._on_loop(self._record, QmpEvent(seconds + micros / 1e6, event, event_data))

    def _on_lifecycle(
        self,
        _conn: libvirt.virConnect,
        _dom: libvirt.virDomain,
        event: int,
        _detail: int,
        _opaque: object,
    ) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._on_loop(self._mark_gone, "the domain stopped (its QEMU exited)")

    def _on_close(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        self._on_loop(self._mark_gone, f"the connection to {self.uri} closed ({reason})")

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        assert self.domain is not None, "connect() first"
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            text = await asyncio.to_thread(
                libvirt_qemu.qemuMonitorCommand, self.domain, json.dumps(request), 0
            )
        except libvirt.libvirtError as err:
            if err.get_error_code() in (
                libvirt.VIR_ERR_OPERATION_INVALID,
                libvirt.VIR_ERR_NO_DOMAIN,
            ):
                await self._set_gone(describe_libvirt_error(err))
                raise QemuGone(f"{self.name}: {self._gone}") from err
            raise MonitorCommandError(
                command, arguments, "libvirt", describe_libvirt_error(err)
            ) from err
        reply = json.loads(text)
        if "error" in reply:
            error = reply["error"]
            raise MonitorCommandError(
                command, arguments, str(error.get("class", "")), str(error.get("desc", ""))
            )
        return reply.get("return")

    async def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is None:
            return
        await asyncio.to_thread(self._let_go, connection)
        self._callbacks, self._lifecycle, self._job_callbacks = [], None, []

    def _let_go(self, connection: libvirt.virConnect) -> None:
        for callback in self._callbacks:
            try:
                libvirt_qemu.qemuMonitorEventDeregister(connection, callback)
            except libvirt.libvirtError as err:
                logger.debug("%s: %s", self.name, describe_libvirt_error(err))
        for event in [self._lifecycle, *self._job_callbacks]:
            if event is None:
                continue
            try:
                connection.domainEventDeregisterAny(event)
            except libvirt.libvirtError as err:
                logger.debug("%s: %s", self.name, describe_libvirt_error(err))
        if self._close_callback:
            try:
                connection.unregisterCloseCallback()
            except libvirt.libvirtError as err:
                logger.debug("%s: %s", self.name, describe_libvirt_error(err))
        self._close_callback = False
        connection.close()
