"""The QEMU side of a vhost-user standby, described once.

A standby is three QEMU objects: the chardev that reaches the backend's socket, the
vhost-user netdev on it, and the ``virtio-net-pci`` with ``failover=on``.
:class:`StandbyDevice` describes them once and renders them both ways: as command-line
arguments (:meth:`StandbyDevice.command_line`, what ``serve`` prints) and as the QMP
arguments of a hot-plug (``chardev-add``, ``netdev_add``, ``device_add``; see
:mod:`failover_backend.standby`), so the two can never disagree.

The standby runs on vhost-user, so QEMU also needs guest RAM it can share with the
backend (``memory-backend-memfd,share=on``); :func:`shared_memory_args` gives that part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The MTU a virtio-net device has when QEMU is not told one.
DEFAULT_MTU = 1500


def chardev_id(device_id: str) -> str:
    """The id of the chardev behind standby ``device_id``."""
    return f"chr-{device_id}"


@dataclass(frozen=True)
class StandbyDevice:
    """A ``failover=on`` virtio-net on a vhost-user backend.

    :param backend_is_client: The backend connects to QEMU, so QEMU listens. Otherwise
        QEMU connects, and reconnects every second when the backend restarts
        (without ``reconnect`` the standby would stay disconnected for good).
    :param bus: PCIe root port to put the device on (``None``: QEMU picks).
    :param legacy_interrupts: ``vectors=0``: needed by QEMU 7.2 under TCG, whose
        vhost-user + MSI-X path crashes without KVM.
    :param mtu: The MTU the guest is told (``host_mtu``, VIRTIO_NET_F_MTU); left out at
        the default 1500, which a guest assumes anyway.
    """

    socket_path: str
    mac: str
    queues: int = 1
    backend_is_client: bool = False
    device_id: str = "standby0"
    bus: str | None = None
    failover: bool = True
    legacy_interrupts: bool = False
    mtu: int = DEFAULT_MTU

    @property
    def chardev_id(self) -> str:
        return chardev_id(self.device_id)

    def chardev_add(self) -> dict[str, Any]:
        """``chardev-add`` arguments."""
        data: dict[str, Any] = {
            "addr": {"type": "unix", "data": {"path": self.socket_path}},
            "server": self.backend_is_client,
        }
        if self.backend_is_client:
            data["wait"] = False
        else:
            data["reconnect"] = 1  # seconds between attempts
        return {"id": self.chardev_id, "backend": {"type": "socket", "data": data}}

    def netdev_add(self) -> dict[str, Any]:
        """``netdev_add`` arguments."""
        netdev: dict[str, Any] = {
            "type": "vhost-user",
            "id": self.device_id,
            "chardev": self.chardev_id,
        }
        if self.queues > 1:
            netdev["queues"] = self.queues
        return netdev

    def device_add(self) -> dict[str, Any]:
        """``device_add`` arguments."""
        device: dict[str, Any] = {
            "driver": "virtio-net-pci",
            "netdev": self.device_id,
            "id": self.device_id,
            "mac": self.mac,
        }
        if self.bus:
            device["bus"] = self.bus
        if self.queues > 1:
            device["mq"] = True
        if self.legacy_interrupts:
            device["vectors"] = 0
        elif self.queues > 1:
            device["vectors"] = 2 * self.queues + 2
        device["failover"] = self.failover
        if self.mtu != DEFAULT_MTU:
            device["host_mtu"] = self.mtu
        return device

    def command_line(self) -> list[str]:
        """``-chardev``/``-netdev``/``-device`` arguments."""
        chardev = f"socket,id={self.chardev_id},path={self.socket_path}"
        if self.backend_is_client:
            chardev += ",server=on,wait=off"
        else:
            chardev += ",reconnect=1"
        netdev = _options(self.netdev_add())
        device = self.device_add()
        driver = device.pop("driver")
        return ["-chardev", chardev, "-netdev", netdev, "-device", f"{driver},{_options(device)}"]


def _options(args: dict[str, Any]) -> str:
    """QMP arguments as a command-line option list (``type`` first, booleans on/off)."""

    def value(v: Any) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else str(v)

    first = [str(args["type"])] if "type" in args else []
    rest = [f"{key}={value(v)}" for key, v in args.items() if key != "type"]
    return ",".join(first + rest)


def standby_qemu_args(
    *,
    socket_path: str,
    mac: str,
    queues: int = 1,
    backend_is_client: bool = False,
    device_id: str = "standby0",
    bus: str | None = None,
    failover: bool = True,
    legacy_interrupts: bool = False,
    mtu: int = DEFAULT_MTU,
) -> list[str]:
    """``-chardev``/``-netdev``/``-device`` arguments for a vhost-user standby (see
    :class:`StandbyDevice` for the parameters)."""
    return StandbyDevice(
        socket_path=socket_path,
        mac=mac,
        queues=queues,
        backend_is_client=backend_is_client,
        device_id=device_id,
        bus=bus,
        failover=failover,
        legacy_interrupts=legacy_interrupts,
        mtu=mtu,
    ).command_line()


def shared_memory_args(size: str, mem_id: str = "mem0") -> list[str]:
    """Guest RAM the vhost-user backend can map (required for any vhost-user device)."""
    return [
        "-object",
        f"memory-backend-memfd,id={mem_id},size={size},share=on",
        "-numa",
        f"node,memdev={mem_id}",
    ]
