"""Measuring a failover run from the network: the host pings the guest (inbound
traffic, which the guest only answers) and every loss window is explained."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from failover_backend.lab.console import GuestConsole
from failover_backend.lab.continuity import UNEXPLAINED, Window, explain
from failover_backend.lab.traffic import PingTrace
from failover_backend.timeline import Timeline

#: What steering may add to the guest's own window (the issue's target).
STEERING_ALLOWANCE = 0.3


@dataclass
class Continuity:
    trace: PingTrace
    windows: list[Window]
    origin: float
    end: float | None = None

    def report(self) -> str:
        sent = [
            seq
            for seq, at in self.trace.sent.items()
            if at >= self.origin and (self.end is None or at <= self.end)
        ]
        lost = sum(1 for seq in sent if seq not in self.trace.answered)
        lines = [f"{len(sent)} requests, {lost} lost"]
        lines += [f"  {w.describe(self.origin)}" for w in self.windows]
        return "\n".join(lines)

    @property
    def inherent(self) -> float:
        """The longest guest-inherent window (primary registered until its link up)."""
        return max((w.inherent for w in self.windows), default=0.0)


def analyse(
    trace: PingTrace,
    timeline: Timeline,
    consoles: Iterable[GuestConsole],
    start: float | None = None,
    end: float | None = None,
    vms: Iterable[str] | None = None,
) -> Continuity:
    windows = explain(trace.gaps(start, end), timeline, consoles, vms)
    for window in windows:
        timeline.add(
            "host-ping", "lost", f"{window.gap.seconds:.2f} s: {window.cause}", at=window.gap.start
        )
    origin = start if start is not None else min(trace.sent.values(), default=time.time())
    return Continuity(trace, windows, origin, end)


def assert_bounded(result: Continuity) -> None:
    """Every loss has a cause on the timeline, and none outlasts what the host could
    not help (the guest's own window, the VM paused for the switch-over) by more
    than the allowance."""
    report = result.report()
    assert all(w.cause != UNEXPLAINED for w in result.windows), report
    for window in result.windows:
        assert window.gap.seconds <= window.beyond_the_host + STEERING_ALLOWANCE, report
