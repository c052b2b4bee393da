"""A lab on this host: a bridge, standby backends, QEMU guests, and their QMP
sessions, all created on demand and all removed on exit, whatever happened.

::

    async with Lab() as lab:
        source = await lab.vm("source")                 # standby + primary, booting
        target = await lab.vm("target", incoming=True)  # waits for a migration
        await source.boot()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ..backend import StandbyBackend
from ..qmp import QmpSession
from ..timeline import Timeline
from .console import GuestConsole
from .guest import GuestImage, build_guest_image
from .hostnet import HostNetwork, unique_name
from .qemu import PrimarySpec, QemuVM, StandbySpec, VmConfig

logger = logging.getLogger(__name__)

#: The guest's MAC: the standby's and the primary's (the guest pairs them by it).
GUEST_MAC = "52:54:00:fb:00:01"


@dataclass
class LabVM:
    name: str
    vm: QemuVM
    qmp: QmpSession
    backend: StandbyBackend | None
    primary: PrimarySpec | None
    master: str = ""
    extra_tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def console(self) -> GuestConsole:
        return self.vm.console

    async def boot(self, timeout: float = 120.0) -> str:
        """Wait until the guest's network is up; returns the failover master's name."""
        self.master = await self.vm.wait_boot(timeout)
        return self.master


class Lab:
    """Everything one failover run needs on this host.

    :param accel: ``tcg`` (default; nested KVM hangs guests on these machines) or ``kvm``.
    :param keep: Leave the work directory (logs, sockets) in place for inspection.
    """

    def __init__(
        self,
        *,
        accel: str = "tcg",
        keep: bool = False,
        image: GuestImage | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        self.accel = accel
        self.keep = keep
        self.image = image
        self.timeline = timeline or Timeline()
        self.workdir = Path(tempfile.mkdtemp(prefix="fblab-", dir="/tmp"))
        self.network = HostNetwork()
        self.vms: list[LabVM] = []
        self.backends: list[StandbyBackend] = []
        self._next_host = 2

    async def __aenter__(self) -> Lab:
        self.network.__enter__()
        try:
            if self.image is None:
                self.image = await asyncio.to_thread(build_guest_image)
        except BaseException:
            self.network.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def guest_address(self) -> str:
        """The guest's address (it keeps it across migrations)."""
        return self.network.address(2)

    @property
    def host_address(self) -> str:
        return self.network.host_address

    def backend(self, name: str, mac: str = GUEST_MAC, **kwargs: object) -> StandbyBackend:
        """A standby backend with a TAP on the bridge, started."""
        tap = unique_name("fbsb")
        backend = StandbyBackend(
            self.workdir / f"{name}-standby.sock",
            port=f"tap:{tap}",
            mac=mac,
            **kwargs,  # type: ignore[arg-type]
        )
        backend.start()
        self.backends.append(backend)
        self.network.attach(tap)
        return backend

    def primary(self, mac: str = GUEST_MAC, **kwargs: Any) -> PrimarySpec:
        """An emulated primary with its own TAP on the bridge."""
        return PrimarySpec(tap=self.network.add_tap("fbpr"), mac=mac, **kwargs)

    async def vm(
        self,
        name: str,
        *,
        standby: bool = True,
        primary: bool = True,
        failover: bool = True,
        incoming: bool = False,
        acpi_hotplug: bool = True,
        guest_ignores_unplug: bool = False,
        primary_kwargs: dict[str, Any] | None = None,
        extra_args: list[str] | None = None,
        kernel_args: list[str] | None = None,
        standby_socket: Path | None = None,
        connect_qmp: bool = True,
    ) -> LabVM:
        """Start a QEMU (and its standby backend) and connect to its QMP.

        :param standby_socket: Serve the standby from a backend that already listens
            there (``run`` in another process) instead of one of the lab's.
        :param connect_qmp: Leave both QMP sockets to others (``run`` on the first,
            ``migrate``/``status`` on the second); the VM's session stays unconnected.
        """
        assert self.image is not None
        backend = self.backend(name) if standby and standby_socket is None else None
        socket = standby_socket or (Path(backend.socket_path) if backend else None)
        primary_spec = self.primary(**(primary_kwargs or {})) if primary else None
        config = VmConfig(
            name=name,
            workdir=self.workdir,
            image=self.image,
            guest_address=self.guest_address,
            standby=StandbySpec(socket, GUEST_MAC, failover=failover)
            if standby and socket is not None
            else None,
            primary=primary_spec,
            incoming=incoming,
            acpi_hotplug=acpi_hotplug,
            guest_ignores_unplug=guest_ignores_unplug,
            accel=self.accel,
            kernel_args=kernel_args or [],
            extra_args=extra_args or [],
        )
        vm = QemuVM(config)
        qmp = QmpSession(name, self.timeline)
        lab_vm = LabVM(name, vm, qmp, backend, primary_spec)
        self.vms.append(lab_vm)
        await vm.start()
        if connect_qmp:
            await qmp.connect(config.qmp_path)
        return lab_vm

    def backend_events_to_timeline(self) -> None:
        """Add what each VM's standby backend saw (connects, features, dirty logging,
        announcements) to the timeline."""
        for lab_vm in self.vms:
            if lab_vm.backend is None:
                continue
            for event in lab_vm.backend.events():
                self.timeline.add(
                    f"{lab_vm.name}-backend", event.kind, event.message, at=event.time
                )

    async def close(self) -> None:
        for lab_vm in self.vms:
            for task in lab_vm.extra_tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await lab_vm.qmp.close()
            with contextlib.suppress(Exception):
                await lab_vm.vm.stop()
        for backend in self.backends:
            await asyncio.to_thread(backend.stop)
        self.network.close()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
