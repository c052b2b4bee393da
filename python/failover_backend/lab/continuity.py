"""Where traffic was lost during a failover run, and why.

A loss window is explained by what overlapped it on the timeline:

* ``primary leaving``: from QEMU's request to unplug a primary (UNPLUG_PRIMARY) until
  the guest let it go (its netdev gone from the failover master, and the standby's
  backend steering to the standby);
* ``switch-over``: the VM paused for the last copy (the source's STOP until the
  target's RESUME);
* ``primary registered, link down``: the guest registered a (new) primary, whose
  link is not up yet. net_failover drops what arrives on the standby from the
  moment a primary is registered, so inbound traffic has no path until the
  primary's link is up: the guest's and the NIC's time, not the host's. The guest
  reports both moments on its console (``fb.watch=1``).

Anything else is ``unexplained``: a fault to fix, not to report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..timeline import Timeline
from .console import GuestConsole
from .traffic import Gap

PRIMARY_DRIVER = "e1000e"
#: A window touching a cause within this many seconds is put down to it (the
#: guest polls its slaves every 50 ms; pings go every 50 ms).
SLACK = 0.15

PRIMARY_LEAVING = "primary leaving"
SWITCH_OVER = "switch-over"
LINK_DOWN = "primary registered, link down"
UNEXPLAINED = "unexplained"


@dataclass(frozen=True)
class Cause:
    name: str
    start: float
    end: float
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Window:
    """A loss window and what explains it."""

    gap: Gap
    causes: tuple[Cause, ...]

    @property
    def cause(self) -> str:
        return " + ".join(c.name for c in self.causes) if self.causes else UNEXPLAINED

    @property
    def inherent(self) -> float:
        """The longest guest-inherent window this loss overlaps (0 if none)."""
        return max((c.seconds for c in self.causes if c.name == LINK_DOWN), default=0.0)

    @property
    def beyond_the_host(self) -> float:
        """The longest time this loss overlaps in which no host-side steering could
        have helped: the guest's own window, or the VM paused for the switch-over
        (QEMU's downtime, which two TCG guests migrating at once on a busy machine
        stretch past 0.3 s). 0 if none."""
        return max(
            (c.seconds for c in self.causes if c.name in (LINK_DOWN, SWITCH_OVER)),
            default=0.0,
        )

    def describe(self, origin: float) -> str:
        causes = " + ".join(f"{c.name} ({c.seconds:.2f} s)" for c in self.causes)
        return (
            f"{self.gap.seconds:5.2f} s lost ({self.gap.lost} requests) from "
            f"t={self.gap.start - origin:.2f} s: {causes or UNEXPLAINED}"
        )


def link_down_windows(consoles: Iterable[GuestConsole]) -> list[Cause]:
    """Each time the guest registered a primary, until its link came up."""
    causes = []
    for console in consoles:
        registered: dict[str, float] = {}
        for change in console.slave_changes():
            present = {s.name: s for s in change.slaves if s.driver == PRIMARY_DRIVER}
            for name, slave in present.items():
                if name not in registered and not slave.carrier:
                    registered[name] = change.time
                elif name in registered and slave.carrier:
                    causes.append(
                        Cause(
                            LINK_DOWN, registered.pop(name), change.time, f"{console.name} {name}"
                        )
                    )
            for name in list(registered):
                if name not in present:
                    registered.pop(name)
    return causes


def primary_leaving_windows(timeline: Timeline, consoles: Iterable[GuestConsole]) -> list[Cause]:
    """From each UNPLUG_PRIMARY until the guest's primary netdev was gone."""
    gone_at = sorted(
        change.time
        for console in consoles
        for change in console.slave_changes()
        if not any(s.driver == PRIMARY_DRIVER for s in change.slaves)
    )
    causes = []
    for entry in timeline.entries:
        if entry.what != "UNPLUG_PRIMARY":
            continue
        end = next((t for t in gone_at if t >= entry.time), entry.time)
        steered = next(
            (
                e.time
                for e in timeline.entries
                if e.time >= entry.time
                and e.what == "path_changed"
                and "to the standby" in e.detail
            ),
            entry.time,
        )
        causes.append(Cause(PRIMARY_LEAVING, entry.time, max(end, steered), entry.detail))
    return causes


def switch_over_windows(timeline: Timeline) -> list[Cause]:
    causes = []
    for entry in timeline.entries:
        if entry.what == "STOP":
            resume = next(
                (e for e in timeline.entries if e.what == "RESUME" and e.time >= entry.time),
                None,
            )
            if resume is not None:
                causes.append(Cause(SWITCH_OVER, entry.time, resume.time))
    return causes


def explain(
    gaps: Iterable[Gap],
    timeline: Timeline,
    consoles: Iterable[GuestConsole],
    vms: Iterable[str] | None = None,
) -> list[Window]:
    """Each gap with the causes that overlap it.

    :param vms: Only the timeline entries of these QEMUs (and their backends) count,
        when several guests share the timeline.
    """
    consoles = list(consoles)
    if vms is not None:
        names = tuple(vms)
        timeline = timeline.only(lambda e: e.source.startswith(names))
    causes = (
        primary_leaving_windows(timeline, consoles)
        + switch_over_windows(timeline)
        + link_down_windows(consoles)
    )
    windows = []
    for gap in gaps:
        overlapping = tuple(
            c for c in causes if c.start - SLACK <= gap.end and gap.start <= c.end + SLACK
        )
        windows.append(Window(gap, overlapping))
    return windows
