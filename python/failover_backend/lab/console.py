"""The lab guest's serial console: progress markers and commands.

QEMU serves the console on a Unix socket (``-chardev socket,server=on,wait=off``).
The guest's ``/init`` (``guest_init.sh``) prints markers such as ``FB-NET-UP eth0``
and runs commands sent as ``ID:command``, answering ``FB-BEGIN ID``, the output, and
``FB-END ID EXIT-CODE``. After a migration the guest talks to the target QEMU's
console: connect a second :class:`GuestConsole` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path


class ConsoleError(RuntimeError):
    """The console closed, or what was awaited did not appear in time."""


#: Lines the guest prints on its own (``fb.watch=1``), never part of a command's output.
SLAVES_MARKER = "FB-SLAVES"

# The first line of a kernel oops, and how many lines of it an error shows.
_OOPS = re.compile(r"\] (BUG:|Oops|general protection fault|kernel BUG at|WARNING:)")
_OOPS_LINES = 80


@dataclass(frozen=True)
class Slave:
    name: str
    driver: str
    carrier: bool


@dataclass(frozen=True)
class SlaveChange:
    """The guest's failover slaves as they were from ``time`` (host wall clock of the
    console line, within the guest's 50 ms polling)."""

    time: float
    slaves: tuple[Slave, ...]

    def by_driver(self, driver: str) -> Slave | None:
        return next((s for s in self.slaves if s.driver == driver), None)


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    output: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.output)


class GuestConsole:
    """One connection to a guest's serial console."""

    _ids = itertools.count(1)

    def __init__(self, path: Path, name: str = "guest") -> None:
        self.path = path
        self.name = name
        self.lines: list[tuple[float, str]] = []
        self._changed = asyncio.Condition()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect, retrying while QEMU has not created the socket yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if time.monotonic() > deadline:
                    raise ConsoleError(f"{self.name}: no console at {self.path}: {err}") from err
                await asyncio.sleep(0.05)
        self._task = asyncio.create_task(self._read_lines())

    async def _read_lines(self) -> None:
        assert self._reader is not None
        try:
            while True:
                raw = await self._reader.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip("\r\n")
                async with self._changed:
                    self.lines.append((time.time(), line))
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._closed = True
                self._changed.notify_all()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        """First line (from index ``since``) matching ``pattern``.

        :raise ConsoleError: When none appears within ``timeout`` seconds, or the
            console closes; the message carries the last lines seen.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = since
        async with self._changed:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index][1])
                    if match:
                        return match
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    why = "console closed" if self._closed else f"not within {timeout:.0f} s"
                    raise ConsoleError(f"{self.name}: {pattern!r} {why}; {self._last_words()}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    def _last_words(self) -> str:
        """The last console lines; from the start of a kernel oops when there is one,
        since its first lines (what failed, the call trace) say the most."""
        oops = next((i for i, (_, line) in enumerate(self.lines) if _OOPS.search(line)), None)
        if oops is None:
            shown, what = self.lines[-15:], "last console lines"
        else:
            shown, what = self.lines[max(oops - 5, 0) :][:_OOPS_LINES], "the guest kernel failed"
        return f"{what}:\n" + "\n".join(line for _, line in shown)

    async def run(self, command: str, timeout: float = 30.0) -> CommandResult:
        """Run a shell command in the guest and return its exit code and output."""
        if self._writer is None:
            raise ConsoleError(f"{self.name}: not connected")
        command_id = next(self._ids)
        start = len(self.lines)
        self._writer.write(f"{command_id}:{command}\n".encode())
        await self._writer.drain()
        await self.wait_for(rf"^FB-BEGIN {command_id}$", timeout, since=start)
        begin = next(
            i for i in range(start, len(self.lines)) if self.lines[i][1] == f"FB-BEGIN {command_id}"
        )
        end = await self.wait_for(rf"^FB-END {command_id} (\d+)$", timeout, since=begin)
        end_index = next(
            i for i in range(begin, len(self.lines)) if self.lines[i][1] == end.group(0)
        )
        output = [
            line
            for _, line in self.lines[begin + 1 : end_index]
            if not line.startswith(SLAVES_MARKER)
        ]
        return CommandResult(int(end.group(1)), output)

    def slave_changes(self) -> list[SlaveChange]:
        """Every change of the guest's failover slaves seen so far (``fb.watch=1``)."""
        changes = []
        for at, line in self.lines:
            if not line.startswith(SLAVES_MARKER + " ") and line != SLAVES_MARKER:
                continue
            slaves = []
            for entry in line.split()[1:]:
                name, driver, carrier = entry.split(":")
                slaves.append(Slave(name, driver, carrier == "1"))
            changes.append(SlaveChange(at, tuple(slaves)))
        return changes

    async def check(self, command: str, timeout: float = 30.0) -> str:
        """Like :meth:`run`, raising when the command fails; returns its output."""
        result = await self.run(command, timeout)
        if result.exit_code != 0:
            raise ConsoleError(
                f"{self.name}: {command!r} exited {result.exit_code}:\n{result.text}"
            )
        return result.text
