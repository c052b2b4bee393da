"""``demo``: the whole failover story on this machine, in about two minutes.

Builds a tiny Linux guest (cached), puts a bridge with a host address on the host,
starts a standby backend and a source QEMU whose primary (an emulated e1000e) stays
hidden until the guest negotiates STANDBY, starts a target QEMU waiting for the
guest, and migrates the guest there and back: the first time with the host pinging
the guest every 50 ms (inbound traffic, which the guest only answers), the second
with the guest pinging the host. Each loss window is shown with its cause.
Everything is removed at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from .lab.console import GuestConsole
from .lab.continuity import Window, explain
from .lab.scenario import Lab, LabVM
from .lab.traffic import EchoListener, HostPinger, PingTrace, start_pinging, stop_pinging
from .migration import Migration, MigrationOptions
from .standby_negotiation import wait_negotiated
from .vm_devices import visible_device_ids


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def say(text: str) -> None:
    print(f"    {text}", flush=True)


async def _slaves(console: GuestConsole) -> dict[str, str]:
    """Enslaved netdevs by driver, as the guest sees them."""
    out = await console.check(
        'for d in /sys/class/net/*; do m=$(readlink "$d/master") || continue; '
        'echo "$(basename "$(readlink "$d/device/driver")") $(basename "$d") '
        '$(basename "$m") $(cat "$d/carrier")"; done'
    )
    found = {}
    for line in out.splitlines():
        driver, name, master, carrier = line.split()
        found[driver] = f"{name} under {master}, link {'up' if carrier == '1' else 'down'}"
    return found


async def _wait_primary_up(vm: LabVM, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        slaves = await _slaves(vm.console)
        if "e1000e" in slaves and slaves["e1000e"].endswith("up"):
            return slaves["e1000e"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest did not enslave the primary: {slaves}")
        await asyncio.sleep(0.3)


async def _wait_steered_to_primary(vm: LabVM, timeout: float = 10.0) -> None:
    assert vm.backend is not None
    deadline = time.monotonic() + timeout
    while (steering := vm.backend.steering()) is None or steering.path != "primary":
        if time.monotonic() > deadline:
            raise TimeoutError(f"steering did not reach the primary: {steering}")
        await asyncio.sleep(0.1)


def _guest_to_timeline(lab: Lab, vms: list[LabVM]) -> None:
    """What the guest reported of its failover slaves, where it ran."""
    for vm in vms:
        for change in vm.console.slave_changes():
            slaves = " ".join(
                f"{s.name}({s.driver or 'leaving'}, link {'up' if s.carrier else 'down'})"
                for s in change.slaves
            )
            lab.timeline.add(f"{vm.name}-guest", "slaves", slaves, at=change.time)


def _windows_to_timeline(lab: Lab, label: str, windows: list[Window]) -> None:
    for window in windows:
        lab.timeline.add(
            label, "lost", f"{window.gap.seconds:.2f} s: {window.cause}", at=window.gap.start
        )


def _show(trace: PingTrace, windows: list[Window], origin: float) -> None:
    say(f"{len(trace.sent)} requests, {trace.lost} lost")
    for window in windows:
        say(window.describe(origin))
    if not windows:
        say("nothing lost")


async def _migrate(lab: Lab, source: LabVM, target: LabVM) -> None:
    for vm in (source, target):
        for backend in vm.backends:
            backend.events()  # the timeline shows the backends from here on
    report = await Migration(
        source.qmp,
        target.qmp,
        f"unix:{lab.workdir}/migration-{source.name}.sock",
        MigrationOptions(wait_unplug_timeout=30),
        timeline=lab.timeline,
        progress=say,
    ).run()
    say(f"guest on {target.name}: {await _wait_primary_up(target)}")
    await _wait_steered_to_primary(target)
    print(report.summary(), flush=True)


async def demo(keep: bool = False, accel: str = "tcg", verbose: bool = False) -> int:
    if os.geteuid() != 0:
        print("error: the demo needs root (TAP devices and a bridge)", flush=True)
        return 1
    if not verbose:
        # The story is told below; the controller's own log would repeat it.
        logging.getLogger("failover_backend").setLevel(logging.WARNING)
    step("building the guest (Debian kernel + busybox initramfs; cached after the first run)")
    async with Lab(keep=keep, accel=accel) as lab:
        assert lab.image is not None
        say(f"kernel {lab.image.kernel_version}, initramfs {lab.image.initrd}")
        say(f"host bridge {lab.network.bridge} at {lab.host_address}, guest at {lab.guest_address}")

        step(
            "source: standby backend + QEMU (virtio-net failover=on on vhost-user, e1000e primary)"
        )
        source = await lab.vm("source")
        assert source.backend is not None
        say(f"standby backend on {source.backend.socket_path} ({source.backend.port})")
        say(f"primary created by QEMU yet? {'primary0' in await visible_device_ids(source.qmp)}")
        event = await wait_negotiated(source.qmp, "standby0", timeout=120)
        say(f"FAILOVER_NEGOTIATED {event.data if event else ''}: QEMU plugs the hidden primary")
        await source.boot()
        features = await source.backend.wait_features_acked(30)
        say(f"the backend negotiated: {' '.join(features.acked_names)}")
        say(f"guest: {await _wait_primary_up(source)}")
        for driver, where in (await _slaves(source.console)).items():
            say(f"guest slave: {driver:<10} {where}")
        await _wait_steered_to_primary(source)
        say("steering: the guest answered through its primary; the switch points there")

        step("target: its own standby backend + QEMU -incoming defer")
        target = await lab.vm("target", incoming=True)
        say(f"target backend on {target.backend.socket_path if target.backend else '-'}")

        step("host -> guest: the host pings the guest every 50 ms (the guest only answers)")
        pinger = HostPinger(lab.guest_address)
        await pinger.start()
        steady = time.time()
        await asyncio.sleep(3)
        _show(pinger.trace(), [], steady)

        step("live migration there: primary unplugged on the source, plugged on the target")
        there = time.time()
        await _migrate(lab, source, target)
        await asyncio.sleep(2)
        inbound = await pinger.stop()
        lab.backend_events_to_timeline()

        step("the other way: the guest pings the host every 50 ms, and migrates back")
        back = await lab.vm("back", incoming=True)
        await source.vm.stop()
        listener = EchoListener(lab.guest_address)
        await listener.start()
        await start_pinging(target.console, lab.host_address)
        await asyncio.sleep(2)
        back_start = time.time()
        await _migrate(lab, target, back)
        await asyncio.sleep(2)
        await stop_pinging(back.console)
        outbound = await listener.stop()
        lab.backend_events_to_timeline()

        vms = [source, target, back]
        _guest_to_timeline(lab, vms)
        consoles = [vm.console for vm in vms]
        inbound_windows = explain(inbound.gaps(steady), lab.timeline, consoles)
        outbound_windows = explain(outbound.gaps(), lab.timeline, consoles)
        _windows_to_timeline(lab, "host-ping", inbound_windows)
        _windows_to_timeline(lab, "guest-ping", outbound_windows)

        step("timeline (QEMU events, backends, controllers, the guest, traffic lost)")
        print(lab.timeline.table(), flush=True)

        step("host -> guest, steady and through the migration there")
        _show(inbound, inbound_windows, there)
        step("guest -> host, through the migration back")
        _show(outbound, outbound_windows, back_start)
        say("'primary registered, link down' is the guest's: net_failover drops what")
        say("arrives on the standby once a primary is registered, until its link is up")

        step("cleaning up" + (f" (keeping {lab.workdir})" if keep else ""))
    return 0
