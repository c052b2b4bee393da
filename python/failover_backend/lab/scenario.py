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
from ..controller import FailoverController
from ..qmp import QmpSession
from ..timeline import Timeline
from ..vm_life import enable_migration_events
from .console import GuestConsole
from .guest import GuestImage, build_guest_image
from .hostnet import HostNetwork, unique_name
from .qemu import PrimarySpec, QemuVM, StandbySpec, VmConfig

logger = logging.getLogger(__name__)

#: The guest's MAC: the standby's and the primary's (the guest pairs them by it).
GUEST_MAC = "52:54:00:fb:00:01"


def pair_mac(index: int, guest: int = 0) -> str:
    """The MAC of failover pair ``index`` of guest ``guest`` (the first pair of the
    first guest: :data:`GUEST_MAC`)."""
    return f"52:54:00:fb:{guest:02x}:{index + 1:02x}"


@dataclass
class LabVM:
    name: str
    vm: QemuVM
    qmp: QmpSession
    backends: list[StandbyBackend]
    primaries: list[PrimarySpec]
    #: One per backend: keeps its steering in step with QEMU (as ``run`` does).
    controllers: list[FailoverController] = field(default_factory=list)
    master: str = ""
    extra_tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def console(self) -> GuestConsole:
        return self.vm.console

    @property
    def backend(self) -> StandbyBackend | None:
        """The first pair's standby backend (run by the lab)."""
        return self.backends[0] if self.backends else None

    @property
    def primary(self) -> PrimarySpec | None:
        return self.primaries[0] if self.primaries else None

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
        """The (first) guest's address (it keeps it across migrations)."""
        return self.network.address(2)

    def pair_address(self, index: int, guest: int = 0) -> str:
        """The address of failover master ``index`` of guest ``guest`` (each master in
        a subnet of its own, so it is reached through its own pair)."""
        if index == 0:
            return self.network.address(2 + guest)
        while len(self.network.extra_subnets) < index:
            self.network.add_subnet()
        subnet = self.network.extra_subnets[index - 1]
        return f"{subnet.network_address + 2 + guest}/{subnet.prefixlen}"

    def pair_host_address(self, index: int) -> str:
        if index == 0:
            return self.host_address
        self.pair_address(index)
        return str(self.network.extra_subnets[index - 1].network_address + 1)

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
        pairs: int = 1,
        guest: int = 0,
        failover: bool = True,
        incoming: bool = False,
        acpi_hotplug: bool = True,
        guest_ignores_unplug: bool = False,
        primary_kwargs: dict[str, Any] | None = None,
        extra_args: list[str] | None = None,
        kernel_args: list[str] | None = None,
        standby_socket: Path | None = None,
        standby_sockets: list[Path] | None = None,
        standby_listens: bool = False,
        connect_qmp: bool = True,
        steer: bool = True,
        standby_mtu: int = 1500,
    ) -> LabVM:
        """Start a QEMU (and its standby backends) and connect to its QMP.

        :param pairs: Failover pairs: pair ``i`` is standby ``standby<i>`` on root port
            ``2i+2`` and primary ``primary<i>`` on ``2i+1``, with MAC :func:`pair_mac`.
        :param guest: Which guest this QEMU runs (its MACs and addresses): the source
            and the target of one guest share it; two guests differ.
        :param standby_socket: Serve the (single) standby from a backend that already
            listens there (``run`` in another process) instead of one of the lab's.
        :param standby_sockets: The same, one socket per pair.
        :param standby_listens: QEMU listens on the standby's socket (``server=on``)
            and the backend connects (``serve --client``).
        :param connect_qmp: Leave the first two QMP sockets to others (``run`` on the
            first, ``migrate``/``status`` on the second): the VM's session then
            watches events on the third, and no lab controller steers.
        :param steer: Keep each lab backend's steering in step with QEMU, as ``run``
            does (a controller per pair on the VM's QMP session).
        :param standby_mtu: The standbys' MTU (their backends' ``mtu``, QEMU's
            ``host_mtu``).
        """
        assert self.image is not None
        backends: list[StandbyBackend] = []
        standbys: list[StandbySpec] = []
        primaries: list[PrimarySpec] = []
        addresses: dict[str, str] = {}
        for index in range(pairs):
            mac = pair_mac(index, guest)
            if standby:
                socket = standby_sockets[index] if standby_sockets else standby_socket
                if socket is None:
                    backend = self.backend(f"{name}-{index}", mac=mac, mtu=standby_mtu)
                    backends.append(backend)
                    socket = Path(backend.socket_path)
                standbys.append(
                    StandbySpec(
                        socket,
                        mac,
                        device_id=f"standby{index}",
                        bus=f"root{2 * index + 2}",
                        failover=failover,
                        backend_is_client=standby_listens,
                        mtu=standby_mtu,
                    )
                )
            if primary:
                kwargs: dict[str, Any] = {
                    "device_id": f"primary{index}",
                    "netdev_id": f"hostnet{index}",
                    "bus": f"root{2 * index + 1}",
                    "pair_id": f"standby{index}",
                }
                kwargs.update(primary_kwargs or {})
                primaries.append(self.primary(mac=mac, **kwargs))
            if index > 0:
                addresses[mac] = self.pair_address(index, guest)
        config = VmConfig(
            name=name,
            workdir=self.workdir,
            image=self.image,
            guest_address=self.pair_address(0, guest),
            standbys=standbys,
            primaries=primaries,
            extra_addresses=addresses,
            incoming=incoming,
            acpi_hotplug=acpi_hotplug,
            guest_ignores_unplug=guest_ignores_unplug,
            accel=self.accel,
            kernel_args=kernel_args or [],
            extra_args=extra_args or [],
        )
        vm = QemuVM(config)
        qmp = QmpSession(name, self.timeline)
        lab_vm = LabVM(name, vm, qmp, backends, primaries)
        self.vms.append(lab_vm)
        await vm.start()
        if not connect_qmp:
            await qmp.connect(config.observer_qmp_path)
        else:
            await qmp.connect(config.qmp_path)
            await enable_migration_events(qmp)
            if steer:
                for index, backend in enumerate(backends):
                    controller = FailoverController(
                        qmp, f"standby{index}", backend=backend, timeline=self.timeline
                    )
                    await controller.start()
                    lab_vm.controllers.append(controller)
        return lab_vm

    def backend_events_to_timeline(self) -> None:
        """Add what each VM's standby backend saw (connects, features, dirty logging,
        announcements) to the timeline."""
        for lab_vm in self.vms:
            for index, backend in enumerate(lab_vm.backends):
                label = f"{lab_vm.name}-backend" + (str(index) if index else "")
                for event in backend.events():
                    self.timeline.add(label, event.kind, event.message, at=event.time)

    async def close(self) -> None:
        for lab_vm in self.vms:
            for task in lab_vm.extra_tasks:
                task.cancel()
            for controller in lab_vm.controllers:
                with contextlib.suppress(Exception):
                    await controller.stop()
            with contextlib.suppress(Exception):
                await lab_vm.qmp.close()
            with contextlib.suppress(Exception):
                await lab_vm.vm.stop()
        for backend in self.backends:
            await asyncio.to_thread(backend.stop)
        self.network.close()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
