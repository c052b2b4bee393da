"""What ``serve`` and ``run`` share: the standby backends one process serves, from
their start to the counters printed when they stop, and the signals that stop them.

::

    async with ServedBackends([("standby0", backend)]) as served, stop_signals() as stop:
        label, reason = await served.first_failure()   # or: await stop.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from .backend import StandbyBackend
from .config import BackendSection

logger = logging.getLogger("failover_backend.serve")


def standby_backend(section: BackendSection) -> StandbyBackend:
    """The backend ``section`` describes (not started)."""
    return StandbyBackend(section.socket, **section.keywords())


@contextlib.asynccontextmanager
async def stop_signals() -> AsyncIterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM while inside."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def log_events(backend: StandbyBackend, label: str = "") -> None:
    """Log the backend's events as they happen (cancel to stop), prefixed with
    ``label`` when there is one."""
    prefix = f"{label}: " if label else ""
    async for event in backend.watch():
        level = logging.WARNING if event.details.get("reason") else logging.INFO
        logger.log(level, "%s%s", prefix, event.message)


class ServedBackends:
    """The standby backends one process serves, each under a label that prefixes its
    messages and heads its counters (the standby's device id in ``run``, a name or
    the socket in ``serve``; empty for ``serve``'s single backend).

    Entering starts them all and logs their events; leaving stops them (off the event
    loop: a stop joins native threads), lets the logs say their last, and prints each
    one's counters.

    :raise BackendError: On entering, when one cannot start (those started are stopped).
    """

    def __init__(self, named: Sequence[tuple[str, StandbyBackend]]) -> None:
        self.named = list(named)
        self._started: list[StandbyBackend] = []
        self._loggers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> ServedBackends:
        try:
            for label, backend in self.named:
                backend.start()
                self._started.append(backend)
                self._loggers.append(asyncio.create_task(log_events(backend, label)))
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()
        for (label, backend), started in zip(self.named, self._started, strict=False):
            assert backend is started
            if label:
                print(f"{label} ({backend.socket_path}):", flush=True)
            print(backend.stats().table(), file=sys.stdout, flush=True)

    async def _stop(self) -> None:
        loop = asyncio.get_running_loop()
        for backend in self._started:
            await loop.run_in_executor(None, backend.stop)
        # Let the loggers print the last events (disconnect, stopped).
        await asyncio.sleep(0.2)
        for task in self._loggers:
            task.cancel()
        for task in self._loggers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loggers = []

    async def first_failure(self) -> tuple[str, str]:
        """Wait until one backend cannot serve any more: its label and why."""
        waits = {
            asyncio.ensure_future(backend.wait_failed()): label for label, backend in self.named
        }
        try:
            done, _ = await asyncio.wait(set(waits), return_when=asyncio.FIRST_COMPLETED)
            task = done.pop()
            return waits[task], task.result()
        finally:
            for task in waits:
                task.cancel()
