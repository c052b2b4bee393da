"""QEMU processes for lab runs: a q35 guest with a failover pair.

The shape (see the README's example): guest RAM from ``memory-backend-memfd,share=on``
(vhost-user needs it), PCIe root ports for the standby and the primary, the standby
``virtio-net-pci,failover=on`` on a vhost-user netdev, and an emulated ``e1000e``
with ``failover_pair_id`` and a TAP netdev standing in for a vfio-pci primary.

TCG by default: nested KVM on these machines hangs the guest at boot. Under TCG,
QEMU 7.2 crashes in the vhost-user MSI-X path, so the standby gets ``vectors=0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..qemu_args import shared_memory_args, standby_qemu_args
from .console import GuestConsole
from .guest import GuestImage

QEMU_BINARY = "qemu-system-x86_64"


class QemuError(RuntimeError):
    """QEMU did not start, or exited; the message carries the end of its log."""


@dataclass(frozen=True)
class StandbySpec:
    """The standby: a failover virtio-net on vhost-user."""

    socket: Path
    mac: str
    device_id: str = "standby0"
    bus: str = "root2"
    failover: bool = True
    queues: int = 1
    backend_is_client: bool = False
    mtu: int = 1500


@dataclass(frozen=True)
class PrimarySpec:
    """An emulated primary on a TAP (what vfio-pci is in production)."""

    tap: str
    mac: str
    device_id: str = "primary0"
    netdev_id: str = "hostnet0"
    bus: str = "root1"
    pair_id: str | None = "standby0"
    driver: str = "e1000e"

    def netdev_args(self) -> dict[str, object]:
        """``netdev_add`` arguments."""
        return {
            "type": "tap",
            "id": self.netdev_id,
            "ifname": self.tap,
            "script": "no",
            "downscript": "no",
        }

    def device_args(self) -> dict[str, object]:
        """``device_add`` arguments. ``romfile`` is empty: an option ROM would be a
        RAM block the migration target does not have."""
        args: dict[str, object] = {
            "driver": self.driver,
            "netdev": self.netdev_id,
            "id": self.device_id,
            "mac": self.mac,
            "bus": self.bus,
            "romfile": "",
        }
        if self.pair_id is not None:
            args["failover_pair_id"] = self.pair_id
        return args

    def command_line(self) -> list[str]:
        netdev = f"tap,id={self.netdev_id},ifname={self.tap},script=no,downscript=no"
        device = ",".join(f"{key}={value}" for key, value in self.device_args().items())
        return ["-netdev", netdev, "-device", device]


@dataclass
class VmConfig:
    name: str
    workdir: Path
    image: GuestImage
    guest_address: str
    """The first failover master's address (``A.B.C.D/N``)."""
    standbys: list[StandbySpec] = field(default_factory=list)
    primaries: list[PrimarySpec] = field(default_factory=list)
    #: Addresses of further failover masters, by their MAC.
    extra_addresses: dict[str, str] = field(default_factory=dict)
    memory_mb: int = 1024
    root_ports: int = 4
    incoming: bool = False
    #: ACPI PCI hotplug (QEMU's default on q35): the guest ejects an unplugged
    #: primary in about 0.2 s. False selects native PCIe hotplug, whose attention
    #: button delays the eject by 5 s.
    acpi_hotplug: bool = True
    #: The guest ignores hotplug requests (its ACPI hotplug driver is disabled): a
    #: primary that never leaves. It does not see a hot-added device either, until
    #: it rescans its PCI buses.
    guest_ignores_unplug: bool = False
    accel: str = "tcg"
    #: The guest reports changes of its failover slaves on the console
    #: (:meth:`GuestConsole.slave_changes`): when it registered a primary, when its
    #: link came up.
    watch_slaves: bool = True
    #: Extra guest kernel parameters (``module_blacklist=...``).
    kernel_args: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"{self.name}-qmp.sock"

    @property
    def control_qmp_path(self) -> Path:
        """A second QMP monitor, for tools while the first one is in use."""
        return self.workdir / f"{self.name}-qmp2.sock"

    @property
    def observer_qmp_path(self) -> Path:
        """A third QMP monitor: the lab watches events there while ``run`` and the
        tools use the other two."""
        return self.workdir / f"{self.name}-qmp3.sock"

    @property
    def serial_path(self) -> Path:
        return self.workdir / f"{self.name}-serial.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-qemu.log"


def qemu_argv(config: VmConfig) -> list[str]:
    kernel_args = [
        "console=ttyS0",
        "net.ifnames=0",
        "panic=-1",
        "quiet",
        f"fb.ip={config.guest_address}",
    ]
    if config.guest_ignores_unplug:
        kernel_args.append("acpiphp.disable=1")
    if config.watch_slaves:
        kernel_args.append("fb.watch=1")
    for mac, address in config.extra_addresses.items():
        kernel_args.append(f"fb.ip.{mac.replace(':', '')}={address}")
    if len(config.standbys) > 1:
        kernel_args.append(f"fb.masters={len(config.standbys)}")
    kernel_args += config.kernel_args
    argv = [
        QEMU_BINARY,
        "-name",
        config.name,
        "-machine",
        "q35",
        "-accel",
        config.accel,
        "-cpu",
        "host" if config.accel == "kvm" else "qemu64",
        "-smp",
        "1",
        "-m",
        f"{config.memory_mb}M",
        *shared_memory_args(f"{config.memory_mb}M"),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-msg",
        "timestamp=on",
        "-kernel",
        str(config.image.kernel),
        "-initrd",
        str(config.image.initrd),
        "-append",
        " ".join(kernel_args),
        "-chardev",
        f"socket,id=serial0,path={config.serial_path},server=on,wait=off",
        "-serial",
        "chardev:serial0",
        "-qmp",
        f"unix:{config.qmp_path},server=on,wait=off",
        "-qmp",
        f"unix:{config.control_qmp_path},server=on,wait=off",
        "-qmp",
        f"unix:{config.observer_qmp_path},server=on,wait=off",
    ]
    if not config.acpi_hotplug:
        argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    for port in range(1, config.root_ports + 1):
        argv += ["-device", f"pcie-root-port,id=root{port},chassis={port},slot={port}"]
    for standby in config.standbys:
        argv += standby_qemu_args(
            socket_path=str(standby.socket),
            mac=standby.mac,
            queues=standby.queues,
            backend_is_client=standby.backend_is_client,
            device_id=standby.device_id,
            bus=standby.bus,
            failover=standby.failover,
            legacy_interrupts=config.accel == "tcg",
            mtu=standby.mtu,
        )
    for primary in config.primaries:
        argv += primary.command_line()
    if config.incoming:
        argv += ["-incoming", "defer"]
    return argv + config.extra_args


class QemuVM:
    """One QEMU process; its log (with QEMU's warnings) goes to ``config.log_path``."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.console = GuestConsole(config.serial_path, config.name)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def log_text(self) -> str:
        try:
            return self.config.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def warnings(self) -> list[str]:
        """QEMU's own warnings so far (``-msg timestamp=on`` prefixes each line)."""
        return [line for line in self.log_text().splitlines() if "warning:" in line]

    async def start(self, timeout: float = 20.0) -> None:
        """Start QEMU and wait until its QMP socket exists.

        :raise QemuError: When QEMU exits first or the socket does not appear.
        """
        self.config.workdir.mkdir(parents=True, exist_ok=True)
        argv = qemu_argv(self.config)
        with self.config.log_path.open("wb") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while not self.config.qmp_path.exists():
            if self.process.returncode is not None:
                raise QemuError(f"{self.config.name}: QEMU exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"{self.config.name}: no QMP socket after {timeout:.0f} s")
            await asyncio.sleep(0.05)
        await self.console.connect()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def wait_boot(self, timeout: float = 90.0) -> str:
        """Wait for the guest's network to come up; returns the failover master's name
        (empty when the guest found none)."""
        match = await self.console.wait_for(r"^(FB-NET-UP (\S+)|FB-NO-FAILOVER-MASTER)$", timeout)
        await self.console.wait_for(r"^FB-CONSOLE-READY$", timeout)
        return match.group(2) or ""

    async def kill(self) -> None:
        """Kill QEMU at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self, timeout: float = 10.0) -> None:
        """Terminate QEMU (SIGTERM, then SIGKILL) and close the console."""
        await self.console.close()
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except asyncio.TimeoutError:
                await self.kill()
        for path in (
            self.config.qmp_path,
            self.config.control_qmp_path,
            self.config.observer_qmp_path,
            self.config.serial_path,
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
