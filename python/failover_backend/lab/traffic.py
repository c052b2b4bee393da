"""Traffic through a failover, measured from both sides.

Guest -> host: the guest pings the host bridge at a fixed interval into a file, and
the replies that came back tell where traffic was lost. Busybox ``ping`` numbers its
requests; a reply line carries the request's ``seq``. Request ``n`` left at about
``n * interval`` of guest time (guest time stops while the VM is paused for the
switch-over), so runs of missing numbers are the windows in which the guest could
not reach the host.

Host -> guest (:class:`HostPinger`): the host pings the guest, which only answers.
This is the measurement that shows steering faults: a guest that talks on its own
re-teaches the host's switch where it is and hides them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import time
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


# -- host -> guest -------------------------------------------------------------------

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
#: A reply later than this counts as lost: the path was not usable.
REPLY_DEADLINE = 1.0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def echo_request(ident: int, seq: int, payload: bytes = b"failover-backend") -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF)
    checksum = _checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum, ident, seq & 0xFFFF) + payload


@dataclass(frozen=True)
class Gap:
    """A stretch of wall-clock time in which no request got its reply."""

    start: float
    """When the first unanswered request left (wall clock)."""
    end: float
    """When the next answered request left."""
    lost: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class PingTrace:
    """Echo requests the host sent (wall-clock time by sequence number) and which
    ones were answered within :data:`REPLY_DEADLINE`."""

    interval: float
    sent: dict[int, float]
    answered: frozenset[int]

    def gaps(self, start: float | None = None, end: float | None = None) -> list[Gap]:
        """Runs of unanswered requests sent between ``start`` and ``end``."""
        gaps = []
        first: int | None = None
        for seq in sorted(self.sent):
            at = self.sent[seq]
            if (start is not None and at < start) or (end is not None and at > end):
                continue
            if seq not in self.answered:
                if first is None:
                    first = seq
            elif first is not None:
                gaps.append(Gap(self.sent[first], at, seq - first))
                first = None
        if first is not None:
            last = max(s for s in self.sent if s >= first)
            gaps.append(Gap(self.sent[first], self.sent[last] + self.interval, last - first + 1))
        return gaps

    @property
    def lost(self) -> int:
        return len(self.sent) - len(self.answered)


class HostPinger:
    """The host pings the guest at a fixed interval, as a client of a server VM
    would reach it: inbound traffic the guest only answers, so nothing the guest
    sends on its own re-teaches the switch.

    Raw ICMP (root): requests carry our identifier, replies are matched by it.
    """

    def __init__(self, target: str, interval: float = 0.05) -> None:
        self.target = target.split("/")[0]
        self.interval = interval
        self.ident = random.randint(1, 0xFFFF)
        self.sent: dict[int, float] = {}
        self.replies: dict[int, float] = {}
        self._socket: socket.socket | None = None
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setblocking(False)
        self._socket = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._receive)
        self._sender = asyncio.create_task(self._send_forever())

    async def _send_forever(self) -> None:
        assert self._socket is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        seq = 0
        while True:
            self.sent[seq] = time.time()
            with contextlib.suppress(OSError):  # no route / no neighbour: a loss
                self._socket.sendto(echo_request(self.ident, seq), (self.target, 0))
            seq += 1
            await asyncio.sleep(max(0.0, start + seq * self.interval - loop.time()))

    def _receive(self) -> None:
        assert self._socket is not None
        while True:
            try:
                packet, (source, _) = self._socket.recvfrom(2048)
            except BlockingIOError:
                return
            if source != self.target:
                continue
            header = (packet[0] & 0x0F) * 4
            kind, _, _, ident, seq = struct.unpack("!BBHHH", packet[header : header + 8])
            if kind == ICMP_ECHO_REPLY and ident == self.ident:
                # The sequence number wraps at 16 bits: match the latest request.
                candidates = [s for s in self.sent if s & 0xFFFF == seq]
                if candidates:
                    self.replies.setdefault(max(candidates), time.time())

    def trace(self) -> PingTrace:
        answered = frozenset(
            seq for seq, at in self.replies.items() if at - self.sent[seq] <= REPLY_DEADLINE
        )
        return PingTrace(self.interval, dict(self.sent), answered)

    async def stop(self) -> PingTrace:
        """Stop sending, wait for late replies, and return the trace."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await asyncio.sleep(min(REPLY_DEADLINE, 0.3))
        if self._socket is not None:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        return self.trace()


class EchoListener:
    """The host hears the guest's pings (guest -> host) as they arrive, on the host's
    clock: the requests that never arrived are the windows in which the guest could
    not reach the host (the host answers them as usual).

    Start it before the guest starts pinging (:func:`start_pinging`).
    """

    def __init__(self, source: str, interval: float = 0.05) -> None:
        self.source = source.split("/")[0]
        self.interval = interval
        self.arrivals: dict[int, float] = {}
        self._socket: socket.socket | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setblocking(False)
        self._socket = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._receive)

    def _receive(self) -> None:
        assert self._socket is not None
        while True:
            try:
                packet, (source, _) = self._socket.recvfrom(2048)
            except BlockingIOError:
                return
            if source != self.source:
                continue
            header = (packet[0] & 0x0F) * 4
            kind, _, _, _, seq = struct.unpack("!BBHHH", packet[header : header + 8])
            if kind == ICMP_ECHO_REQUEST:
                self.arrivals.setdefault(seq, time.time())

    def trace(self) -> PingTrace:
        """Requests by sequence number: a missing one is put between its neighbours."""
        if not self.arrivals:
            return PingTrace(self.interval, {}, frozenset())
        first, last = min(self.arrivals), max(self.arrivals)
        sent: dict[int, float] = {}
        previous = self.arrivals[first]
        for seq in range(first, last + 1):
            if seq in self.arrivals:
                previous = sent[seq] = self.arrivals[seq]
            else:
                following = next(
                    self.arrivals[s] for s in range(seq, last + 1) if s in self.arrivals
                )
                sent[seq] = min(previous + self.interval, following)
                previous = sent[seq]
        return PingTrace(self.interval, sent, frozenset(self.arrivals))

    async def stop(self) -> PingTrace:
        if self._socket is not None:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        return self.trace()
