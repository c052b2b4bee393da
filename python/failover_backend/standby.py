"""Attaching a standby to a running VM, and detaching it.

A standby hot-plugged into a running VM is three objects (described by
:class:`~failover_backend.qemu_args.StandbyDevice`, as on the command line): the chardev
that reaches the backend's socket, the vhost-user netdev on it, and the
``virtio-net-pci`` with ``failover=on`` on a free root port. Attach creates them in that
order and undoes what it made if a later step fails; detach removes them in reverse.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MonitorCommandError, PrimaryError
from .qemu_args import DEFAULT_MTU, StandbyDevice, chardev_id
from .qmp import Monitor
from .vm_devices import PERIPHERAL, find_primary, peripheral_ids

logger = logging.getLogger(__name__)


async def standby_chardev(qmp: Monitor, standby_id: str) -> str | None:
    """The chardev of the vhost-user netdev behind ``standby_id``, if it has one."""
    try:
        netdev = await qmp.qom_get(f"{PERIPHERAL}/{standby_id}", "netdev")
    except MonitorCommandError:
        return None
    info = await qmp.execute("human-monitor-command", {"command-line": "info network"})
    for line in str(info).splitlines():
        line = line.strip(" \\")
        if line.startswith(f"{netdev}:") and "type=vhost-user" in line and " to " in line:
            return line.rsplit(" to ", 1)[1].strip()
    return None


@dataclass(frozen=True)
class BackendLink:
    """The standby's vhost-user connection as QEMU sees it."""

    state: str
    """``connected``, ``disconnected`` (no backend: no failover path), or
    ``not vhost-user``."""
    socket: str | None = None
    """The vhost-user socket's path."""

    @property
    def listening(self) -> bool:
        """A process listens on the socket (a backend QEMU is about to reconnect to);
        a file left by a killed backend does not count."""
        return self.socket is not None and unix_socket_listens(self.socket)

    def describe(self) -> str:
        text = f"{self.state} (QEMU's side)"
        if self.socket is None:
            return text
        if self.state == "disconnected":
            if self.listening:
                return f"{text}: a backend listens on {self.socket}, QEMU reconnects"
            return f"{text}: no backend listens on {self.socket}; no failover path"
        return f"{text}, socket {self.socket}"


#: ``__SO_ACCEPTCON`` in /proc/net/unix's flags: the socket listens.
_SO_ACCEPTCON = 0x10000


def _listening_unix_sockets() -> set[str]:
    """Paths of the Unix sockets something listens on, from /proc/net/unix (no
    connection made: a probe would be a frontend to the backend)."""
    paths: set[str] = set()
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return paths
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & _SO_ACCEPTCON:
            paths.add(fields[7])
    return paths


def unix_socket_listens(path: str | Path) -> bool:
    """Something listens on the Unix socket file at ``path`` (this network namespace),
    found without connecting. The kernel lists a socket by the name it was bound at:
    this project's backend binds ``.NAME.fbPID.N`` beside ``NAME`` and renames it into
    place (rust/standby-net/src/public_socket.rs), so that name counts too."""
    if not Path(path).is_socket():
        return False
    text = str(path)
    directory, name = os.path.split(text)
    renamed_from = os.path.join(directory, f".{name}.fb")
    return any(
        bound == text or bound.startswith(renamed_from) for bound in _listening_unix_sockets()
    )


async def backend_link(qmp: Monitor, standby_id: str) -> BackendLink:
    """The standby's vhost-user connection, as QEMU reports it (``query-chardev``)."""
    chardev = await standby_chardev(qmp, standby_id)
    if chardev is None:
        return BackendLink("not vhost-user")
    for device in await qmp.execute("query-chardev"):
        if device["label"] == chardev:
            filename = str(device["filename"])
            state = "disconnected" if filename.startswith("disconnected") else "connected"
            address = filename.removeprefix("disconnected:")
            socket = (
                address.removeprefix("unix:").split(",")[0] if address.startswith("unix:") else None
            )
            return BackendLink(state, socket)
    return BackendLink("not vhost-user")


async def free_root_ports(qmp: Monitor) -> list[str]:
    """Root ports with nothing plugged in, in id order."""
    ports = []
    occupied = set()
    for device_id in await peripheral_ids(qmp):
        path = f"{PERIPHERAL}/{device_id}"
        try:
            device_type = await qmp.qom_get(path, "type")
            parent_bus = await qmp.qom_get(path, "parent_bus")
        except MonitorCommandError:
            continue
        if device_type == "pcie-root-port":
            ports.append(device_id)
        occupied.add(str(parent_bus).rsplit("/", 1)[-1])
    return sorted(p for p in ports if p not in occupied)


async def attach_standby(
    qmp: Monitor,
    *,
    device_id: str,
    socket_path: str | Path,
    mac: str,
    bus: str | None = None,
    queues: int = 1,
    legacy_interrupts: bool = False,
    mtu: int = DEFAULT_MTU,
) -> str:
    """Hot-plug a failover standby served by the vhost-user backend on ``socket_path``.

    Returns the root port it went to. A primary added earlier with
    ``failover_pair_id=device_id`` pairs with it when the guest negotiates; without one,
    QEMU warns "Primary device not found" then (see
    :class:`~failover_backend.controller.FailoverController`).

    :raise PrimaryError: When there is no free root port.
    :raise MonitorCommandError: When QEMU refuses a step (earlier steps are undone).
    """
    if bus is None:
        free = await free_root_ports(qmp)
        if not free:
            raise PrimaryError("no free pcie-root-port for the standby")
        bus = free[0]
    existing_primary = await find_primary(qmp, device_id)
    standby = StandbyDevice(
        socket_path=str(socket_path),
        mac=mac,
        queues=queues,
        device_id=device_id,
        bus=bus,
        legacy_interrupts=legacy_interrupts,
        mtu=mtu,
    )
    undo: list[tuple[str, dict[str, Any]]] = []
    try:
        await qmp.execute("chardev-add", standby.chardev_add())
        undo.append(("chardev-remove", {"id": standby.chardev_id}))
        await qmp.execute("netdev_add", standby.netdev_add())
        undo.append(("netdev_del", {"id": device_id}))
        await qmp.execute("device_add", standby.device_add())
    except MonitorCommandError:
        for command, arguments in reversed(undo):
            try:
                await qmp.execute(command, arguments)
            except MonitorCommandError as err:
                logger.warning("undoing %s: %s", command, err.description)
        raise
    if existing_primary is None:
        logger.info(
            "standby %s has no primary yet: QEMU will warn 'Primary device not found' when "
            "the guest negotiates, until one is plugged",
            device_id,
        )
    else:
        logger.info("standby %s pairs with the existing primary %s", device_id, existing_primary)
    return bus


async def detach_standby(qmp: Monitor, device_id: str, deadline: float = 10.0) -> None:
    """Unplug the standby (waiting for the guest to release it), then its netdev and
    chardev."""
    mark = qmp.mark()
    await qmp.execute("device_del", {"id": device_id})
    try:
        await qmp.wait_device_deleted(device_id, since=mark, timeout=deadline)
    except TimeoutError:
        raise PrimaryError(
            f"the guest did not release standby {device_id} within {deadline:.0f} s"
        ) from None
    await qmp.execute("netdev_del", {"id": device_id})
    try:
        await qmp.execute("chardev-remove", {"id": chardev_id(device_id)})
    except MonitorCommandError as err:
        # Deleting a vhost-user netdev takes its chardev with it.
        if "not found" not in err.description:
            raise
