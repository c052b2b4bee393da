"""The standby backend: a vhost-user virtio-net device served by the native core.

Quick start::

    from failover_backend import StandbyBackend

    with StandbyBackend("/tmp/standby.sock", port="tap:fbtap0", mac="52:54:00:12:34:56") as backend:
        print(" ".join(backend.qemu_args()))
        await backend.wait_connected(timeout=30)
        print(backend.features.acked_names)
        print(backend.stats().tx_packets)

The datapath runs on native threads that never take the GIL; every method here is
cheap and non-blocking. The ``wait_*`` coroutines and :meth:`StandbyBackend.watch`
wait on an eventfd the native device signals at every change, watched by the event
loop itself: a quiet backend costs no thread and no CPU, so one process can watch
hundreds.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Union

from . import _native
from .errors import BackendError, ConfigError
from .qemu_args import standby_qemu_args
from .settings import SettingError, native_arguments, python_keyword, setting_and_rule
from .waiting import Changes

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Connection states, as :attr:`StandbyBackend.state` reports them.
State = Literal["stopped", "listening", "connecting", "connected", "failed"]

#: What steering is told about the guest's primary (see :meth:`StandbyBackend.steer`).
SteerMode = Literal["off", "standby", "releasing", "plugged", "primary"]
#: Where steering points the host's switch for the guest's MAC.
SteerPath = Literal["unknown", "standby", "primary"]


class _NativeChanges:
    """Wakes coroutines when the native device changes (state, features, events).

    The native side counts every change on an eventfd. The event loop watches it only
    while someone waits (so a backend nobody waits on holds no registration, and a
    dropped one leaves nothing behind); each wake drains the count. A change made
    before a waiter registered leaves the fd readable, so it wakes that waiter once,
    spuriously and harmlessly: waiters look again at what they wait for.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._changes = Changes()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        self._changes.notify()

    async def next(self, timeout: float | None) -> None:
        """Until the next change, or ``timeout`` seconds (no error: look again)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("a StandbyBackend is waited on from one event loop at a time")
        if self._waiting == 0:
            loop.add_reader(self._fd, self._drain)
            self._loop = loop
        self._waiting += 1
        try:
            await self._changes.wait(timeout)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                loop.remove_reader(self._fd)
                self._loop = None


@dataclass(frozen=True)
class QueueStats:
    """Counters of one virtqueue; directions follow the guest's view, as virtio does."""

    queue: int
    direction: Literal["rx", "tx"]
    packets: int
    bytes: int
    drops: int
    errors: int


@dataclass(frozen=True)
class BackendStats:
    """Counters of every virtqueue, summed over all connections so far."""

    queues: tuple[QueueStats, ...]

    def _sum(self, direction: str, field: str) -> int:
        return sum(int(getattr(q, field)) for q in self.queues if q.direction == direction)

    @property
    def tx_packets(self) -> int:
        """Frames the guest sent (guest → host)."""
        return self._sum("tx", "packets")

    @property
    def rx_packets(self) -> int:
        """Frames delivered to the guest (host → guest)."""
        return self._sum("rx", "packets")

    @property
    def tx_bytes(self) -> int:
        return self._sum("tx", "bytes")

    @property
    def rx_bytes(self) -> int:
        return self._sum("rx", "bytes")

    @property
    def drops(self) -> int:
        return sum(q.drops for q in self.queues)

    @property
    def errors(self) -> int:
        return sum(q.errors for q in self.queues)

    def table(self) -> str:
        """The counters as a small aligned table."""
        lines = [f"{'queue':<7}{'packets':>14}{'bytes':>16}{'drops':>10}{'errors':>9}"]
        for q in self.queues:
            name = f"{q.direction}{q.queue // 2}"
            lines.append(f"{name:<7}{q.packets:>14}{q.bytes:>16}{q.drops:>10}{q.errors:>9}")
        return "\n".join(lines)


@dataclass(frozen=True)
class FrontendFeatures:
    """Feature negotiation of the current (or last) vhost-user connection."""

    offered: int
    """virtio feature bits the backend offers."""
    acked: int | None
    """Bits the frontend acked, ``None`` until it sent SET_FEATURES."""
    protocol_offered: int
    """vhost-user protocol feature bits the backend offers."""
    dirty_logging: bool
    """VHOST_F_LOG_ALL is on: a migration is copying guest memory."""
    connections: int
    """Frontend connections accepted so far."""

    @property
    def negotiated(self) -> bool:
        return self.acked is not None

    @property
    def offered_names(self) -> list[str]:
        return _native.feature_names(self.offered)

    @property
    def acked_names(self) -> list[str]:
        return _native.feature_names(self.acked or 0)

    @property
    def protocol_offered_names(self) -> list[str]:
        return _native.protocol_feature_names(self.protocol_offered)

    def has(self, bit_mask: int) -> bool:
        """Whether the frontend acked every bit of ``bit_mask``."""
        return self.acked is not None and self.acked & bit_mask == bit_mask


@dataclass(frozen=True)
class SteeringStatus:
    """What steering does for this standby (TAP ports only)."""

    mode: SteerMode
    path: SteerPath
    """Where the host's switch is steered for the guest's MAC."""
    probe_mac: str
    """The source address of probes (their answers come back to it)."""
    guest_addresses: tuple[str, ...]
    """IPv4 addresses the guest was seen using (probed besides its link-local address)."""
    announcements: int
    probes: int
    answers: int
    held_back: int
    """Frames of the standby's own chatter kept from the switch while a primary is in use."""
    looped: int
    """Frames of the guest's own that came back from the switch (not delivered)."""


@dataclass(frozen=True)
class BackendEvent:
    """Something that happened to the device (connect, negotiation, disconnect...)."""

    time: float
    kind: str
    message: str
    details: dict[str, Any]


class StandbyBackend:
    """A vhost-user virtio-net standby device.

    :param socket_path: The vhost-user Unix socket.
    :param port: Host side: ``"null"`` (count and drop), ``"sink"`` (read each frame,
        then drop it), ``"loop"`` (back to the
        guest), ``"tap:NAME"`` (a TAP device, created if missing) or
        ``"gen:SIZE[,rate=FPS][,count=N]"`` (numbered frames for the guest).
    :param mac: The guest's MAC (the primary must carry the same one); random if omitted.
    :param queues: Queue pairs (one worker thread each).
    :param client: Connect to a socket the frontend listens on, instead of listening.
    :param queue_size: Largest ring the frontend may pick.
    :param mtu: The guest's MTU: :meth:`qemu_args` tells QEMU (``host_mtu``), which
        tells the guest; the TAP port gets it too.
    :param poll_us: Microseconds a worker keeps polling its rings after the last frame
        moved, with the guest's kicks suppressed (0: sleep after every pass). Polling
        saves a kick per batch under load; a quiet guest costs nothing.
    :param socket_mode: Permission bits of the socket (server mode), whatever the umask.
    :param socket_group: Group of the socket, by name or id (QEMU and libvirt often run
        as another user than the backend).
    :param handshake_timeout: Seconds a frontend may take to send its first request,
        and to finish any request it starts; then it is closed and the next one served.
        An idle frontend between requests is never closed.
    :raise ConfigError: When an argument is invalid (the message names it).
    :raise BackendError: When the port cannot be opened.
    """

    def __init__(
        self,
        socket_path: PathLike,
        *,
        port: str = "null",
        mac: str | None = None,
        queues: int = 1,
        client: bool = False,
        queue_size: int = 1024,
        mtu: int = 1500,
        poll_us: int = 50,
        socket_mode: int = 0o600,
        socket_group: str | int | None = None,
        handshake_timeout: float = 5.0,
    ) -> None:
        group = group_id(socket_group)
        try:
            self._native = _native.NativeBackend(
                os.fspath(socket_path),
                **native_arguments(
                    port=port,
                    mac=mac,
                    queues=queues,
                    client=client,
                    queue_size=queue_size,
                    mtu=mtu,
                    poll_us=poll_us,
                    socket_mode=socket_mode,
                    socket_group=group,
                    handshake_timeout=handshake_timeout,
                ),
            )
        except SettingError as err:
            setting, rule = setting_and_rule(err)
            raise ConfigError(python_keyword(setting), rule) from err
        self._event_cursor = 0
        self._changes = _NativeChanges(self._native.change_fd)

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Start serving; in server mode the socket exists when this returns.

        :raise BackendError: When the socket cannot be bound (or is in use).
        """
        self._native.start()

    def stop(self) -> None:
        """Close the connection, stop, remove the socket. Safe to call twice."""
        self._native.stop()

    def __enter__(self) -> StandbyBackend:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> StandbyBackend:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    # -- what it is -----------------------------------------------------------

    @property
    def socket_path(self) -> str:
        return self._native.socket_path

    @property
    def mac(self) -> str:
        return self._native.mac

    @property
    def port(self) -> str:
        return self._native.port

    @property
    def queues(self) -> int:
        return self._native.queues

    @property
    def client(self) -> bool:
        return self._native.client

    @property
    def mtu(self) -> int:
        """The MTU the guest is told (through :meth:`qemu_args`)."""
        return self._native.mtu

    @property
    def state(self) -> State:
        """``stopped``, ``listening``, ``connecting``, ``connected`` or ``failed``."""
        return self._native.state  # type: ignore[return-value]

    @property
    def failure(self) -> str | None:
        """Why the device stopped serving for good (state ``failed``), if it has. It
        does not recover by itself: stop it and start a new one (or let a supervisor
        restart the process)."""
        return self._native.failure

    async def wait_failed(self) -> str:
        """Wait until the device stops serving for good; returns why."""
        await self.wait_state(["failed"], timeout=None)
        return self.failure or "the device failed"

    @property
    def features(self) -> FrontendFeatures:
        """Offered and acked features; read at any time without stalling the datapath."""
        n = self._native.negotiation()
        return FrontendFeatures(
            offered=n["offered_features"],
            acked=n["acked_features"],
            protocol_offered=n["offered_protocol_features"],
            dirty_logging=n["dirty_logging"],
            connections=n["connections"],
        )

    def stats(self) -> BackendStats:
        """Per-queue counters; read at any time without stalling the datapath."""
        return BackendStats(tuple(QueueStats(**q) for q in self._native.stats()))

    def qemu_args(self, device_id: str = "standby0") -> list[str]:
        """The QEMU arguments that attach a ``failover=on`` standby to this backend."""
        return standby_qemu_args(
            socket_path=self.socket_path,
            mac=self.mac,
            queues=self.queues,
            backend_is_client=self.client,
            device_id=device_id,
            mtu=self.mtu,
        )

    # -- events and waits -----------------------------------------------------

    def events(self) -> list[BackendEvent]:
        """Events since the last call (connects, negotiations, disconnects...)."""
        raw, self._event_cursor = self._native.events(self._event_cursor)
        return [_event(e) for e in raw]

    async def watch(self) -> AsyncIterator[BackendEvent]:
        """Yield events as they happen, forever (cancel the task to stop)."""
        while True:
            events = self.events()
            for event in events:
                yield event
            if not events:
                await self._changes.next(None)

    async def _until(self, reached: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``reached()`` holds (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not reached():
            if deadline is None:
                await self._changes.next(None)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self._changes.next(remaining)
        return True

    async def wait_state(self, states: list[State], timeout: float | None) -> State:
        """Wait until the backend is in one of ``states`` (``timeout``: seconds, or
        ``None`` for as long as it takes).

        :raise TimeoutError: When ``timeout`` seconds pass first.
        """
        if not await self._until(lambda: self.state in states, timeout):
            raise TimeoutError(
                f"backend on {self.socket_path} is {self.state}, not {'/'.join(states)}, "
                f"after {timeout:.1f} s"
            )
        return self.state

    async def wait_connected(self, timeout: float) -> None:
        """Wait until a frontend is connected.

        :raise TimeoutError: When none connects within ``timeout`` seconds.
        :raise BackendError: When the backend failed or was stopped meanwhile.
        """
        state = await self.wait_state(["connected", "failed", "stopped"], timeout)
        if state != "connected":
            raise BackendError(f"backend on {self.socket_path} is {state}")

    async def wait_features_acked(self, timeout: float) -> FrontendFeatures:
        """Wait until the connected frontend acked its features.

        :raise TimeoutError: When it does not within ``timeout`` seconds.
        """

        def negotiated() -> bool:
            return self.features.negotiated and self.state == "connected"

        if not await self._until(negotiated, timeout):
            raise TimeoutError(
                f"frontend on {self.socket_path} did not negotiate features in {timeout:.1f} s"
            )
        return self.features

    # -- steering ----------------------------------------------------------------

    def announce(self, count: int = 1) -> int:
        """Send ``count`` RARP frames from the guest's MAC out of the host port, so the
        host's switches learn that the guest is now reached through the standby.

        :raise BackendError: When the port cannot send (``null``/``loop``) or the write fails.
        """
        return self._native.announce(count)

    def steer(self, mode: SteerMode, reason: str = "") -> None:
        """Tell steering where the guest's primary is; it then keeps the host's switch
        pointed at the path the guest uses (``failover_backend.steering`` explains
        the rules):

        - ``standby``: the guest has no primary; announce the standby.
        - ``releasing``: QEMU asked the guest to release its primary; switch to the
          standby the moment the guest answers through it.
        - ``plugged``: a primary was just plugged; the standby carries the traffic
          until the guest answers through the primary.
        - ``primary``: the guest uses its primary; keep the standby's own chatter
          from the switch.
        - ``off``: do nothing.

        :raise BackendError: When the port reaches no switch (``null``, ``loop``).
        """
        self._native.steer(mode, reason)

    def steering(self) -> SteeringStatus | None:
        """Steering's state and counters; ``None`` for ports without a switch."""
        raw = self._native.steering()
        if raw is None:
            return None
        return SteeringStatus(
            mode=raw["mode"],
            path=raw["path"],
            probe_mac=raw["probe_mac"],
            guest_addresses=tuple(raw["guest_addresses"]),
            announcements=raw["announcements"],
            probes=raw["probes"],
            answers=raw["answers"],
            held_back=raw["held_back"],
            looped=raw["looped"],
        )

    def __repr__(self) -> str:
        return (
            f"StandbyBackend({self.socket_path!r}, port={self.port!r}, mac={self.mac!r}, "
            f"queues={self.queues}, client={self.client}, state={self.state!r})"
        )


def group_id(group: str | int | None) -> int | None:
    """A group's id, from its name or id.

    :raise ConfigError: When there is no such group.
    """
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError("socket_group", f"no group named {group!r} on this host") from None


def _event(raw: dict[str, Any]) -> BackendEvent:
    details = {k: v for k, v in raw.items() if k not in ("time", "kind", "message")}
    return BackendEvent(time=raw["time"], kind=raw["kind"], message=raw["message"], details=details)
