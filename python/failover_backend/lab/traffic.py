"""Traffic through a failover: the guest pings the host bridge at a fixed interval
into a file, and the replies that came back tell where traffic was lost.

Busybox ``ping`` numbers its requests; a reply line carries the request's ``seq``.
Request ``n`` left at about ``n * interval`` of guest time (guest time stops while
the VM is paused for the switch-over), so runs of missing numbers are the windows in
which the guest could not reach the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .console import GuestConsole

PING_LOG = "/tmp/fb-ping.log"
_REPLY = re.compile(r"seq=(\d+)")


@dataclass(frozen=True)
class LossWindow:
    first_seq: int
    last_seq: int
    interval: float

    @property
    def lost(self) -> int:
        return self.last_seq - self.first_seq + 1

    @property
    def seconds(self) -> float:
        """How long replies stopped: from the last reply before to the first after."""
        return (self.lost + 1) * self.interval

    @property
    def starts_at(self) -> float:
        """Guest seconds after the first request."""
        return self.first_seq * self.interval


@dataclass(frozen=True)
class PingRecord:
    interval: float
    replies: frozenset[int]

    @property
    def last_seq(self) -> int:
        return max(self.replies, default=-1)

    def windows(self, up_to: int | None = None) -> list[LossWindow]:
        """Runs of lost replies between the first reply and ``up_to`` (default: the last)."""
        end = self.last_seq if up_to is None else up_to
        windows = []
        first_missing: int | None = None
        for seq in range(min(self.replies, default=0), end + 1):
            if seq in self.replies:
                if first_missing is not None:
                    windows.append(LossWindow(first_missing, seq - 1, self.interval))
                    first_missing = None
            elif first_missing is None:
                first_missing = seq
        return windows

    @property
    def longest_gap(self) -> float:
        """Longest time without replies (one interval when nothing was lost)."""
        return max((w.seconds for w in self.windows()), default=self.interval)


def parse_ping(text: str, interval: float) -> PingRecord:
    return PingRecord(interval, frozenset(int(m.group(1)) for m in _REPLY.finditer(text)))


async def start_pinging(console: GuestConsole, host: str, interval: float = 0.05) -> None:
    """Ping ``host`` from the guest in the background, replies into :data:`PING_LOG`."""
    await console.check(f"ping -i {interval} -W 1 {host} > {PING_LOG} 2>&1 &")


async def read_pings(console: GuestConsole, interval: float = 0.05) -> PingRecord:
    return parse_ping(await console.check(f"cat {PING_LOG}"), interval)


async def stop_pinging(console: GuestConsole, interval: float = 0.05) -> PingRecord:
    await console.run("killall ping")
    return await read_pings(console, interval)
