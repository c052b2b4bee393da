"""Waits that stay bounded and cancellable.

``asyncio.wait_for`` before Python 3.12 returns the result instead of raising when a
task is cancelled just as what it waits for completes (CPython gh-86296): the
cancelled task runs on, and whoever awaits it to end waits forever. ``run`` met this
at the end of a migration (QEMU's last events and the shutdown's cancel came
together). The waits here never swallow a cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """``awaitable``'s result, or :class:`asyncio.TimeoutError` after ``timeout``
    seconds (it is cancelled then). A cancel of the caller cancels it too, and is
    raised, whatever it completed meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise asyncio.TimeoutError
    return task.result()


class Changes:
    """Tells every coroutine waiting (on one event loop) that something changed; they
    then look at what they wait for. A waiter cancelled or timed out leaves the others
    waiting."""

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None

    def notify(self) -> None:
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None

    async def wait(self, timeout: float | None) -> None:
        """Until the next :meth:`notify`, or ``timeout`` seconds (no error: look again)."""
        loop = asyncio.get_running_loop()
        if self._next is None or self._next.get_loop() is not loop:
            self._next = loop.create_future()
        # asyncio.wait, not await: a cancelled waiter must not cancel the shared future.
        await asyncio.wait({self._next}, timeout=timeout)
