"""A timeline of what happened during a failover operation, from every source
(source QEMU, target QEMU, backends, the controller), in time order."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TimelineEntry:
    time: float
    """Wall-clock time (seconds since the epoch); QMP events carry QEMU's own stamp."""
    source: str
    """Who saw it: ``source``, ``target``, ``controller``, a backend..."""
    what: str
    """An event name (``UNPLUG_PRIMARY``), a migration state (``wait-unplug``)..."""
    detail: str = ""


class Timeline:
    def __init__(self) -> None:
        self._entries: list[TimelineEntry] = []

    def add(
        self, source: str, what: str, detail: str = "", at: float | None = None
    ) -> TimelineEntry:
        entry = TimelineEntry(time.time() if at is None else at, source, what, detail)
        self._entries.append(entry)
        return entry

    @property
    def entries(self) -> list[TimelineEntry]:
        return sorted(self._entries, key=lambda e: e.time)

    def only(self, keep: Callable[[TimelineEntry], bool]) -> Timeline:
        """A copy with the entries ``keep`` accepts."""
        copy = Timeline()
        copy._entries = [e for e in self._entries if keep(e)]
        return copy

    def find(self, source: str, what: str) -> TimelineEntry | None:
        """The first entry from ``source`` about ``what``."""
        return next((e for e in self.entries if e.source == source and e.what == what), None)

    def table(self) -> str:
        """The entries as an aligned table, times relative to the first entry."""
        entries = self.entries
        if not entries:
            return "(no events)"
        start = entries[0].time
        width_source = max(len("source"), *(len(e.source) for e in entries))
        width_what = max(len("event"), *(len(e.what) for e in entries))
        lines = [f"{'t (s)':>9}  {'source':<{width_source}}  {'event':<{width_what}}  detail"]
        for e in entries:
            lines.append(
                f"{e.time - start:>9.3f}  {e.source:<{width_source}}  {e.what:<{width_what}}"
                f"  {e.detail}".rstrip()
            )
        return "\n".join(lines)
