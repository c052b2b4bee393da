"""``demo``: the whole failover story on this machine, in about a minute.

Builds a tiny Linux guest (cached), puts a bridge with a host address on the host,
starts a standby backend and a source QEMU whose primary (an emulated e1000e) stays
hidden until the guest negotiates STANDBY, starts a target QEMU waiting for the
guest, has the guest ping the host every 50 ms, migrates the guest with its primary
unplugged on the source and plugged on the target, and shows the timeline and the
traffic gap. Everything is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import time

from .lab.console import GuestConsole
from .lab.scenario import Lab, LabVM
from .lab.traffic import read_pings, start_pinging, stop_pinging
from .migration import Migration, MigrationOptions
from .negotiation import wait_negotiated
from .steering import announce_burst


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


async def demo(keep: bool = False, accel: str = "tcg") -> int:
    if os.geteuid() != 0:
        print("error: the demo needs root (TAP devices and a bridge)", flush=True)
        return 1
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
        say(f"primary created by QEMU yet? {'primary0' in await source.qmp.visible_device_ids()}")
        event = await wait_negotiated(source.qmp, "standby0", timeout=120)
        say(f"FAILOVER_NEGOTIATED {event.data if event else ''}: QEMU plugs the hidden primary")
        await source.boot()
        features = await source.backend.wait_negotiated(30)
        say(f"the backend negotiated: {' '.join(features.acked_names)}")
        say(f"guest: {await _wait_primary_up(source)}")
        for driver, where in (await _slaves(source.console)).items():
            say(f"guest slave: {driver:<10} {where}")

        step("target: its own standby backend + QEMU -incoming defer")
        target = await lab.vm("target", incoming=True)
        say(f"target backend on {target.backend.socket_path if target.backend else '-'}")

        step("traffic: the guest pings the host every 50 ms")
        await start_pinging(source.console, lab.host_address)
        await asyncio.sleep(2)
        before = await read_pings(source.console)
        say(f"{before.last_seq + 1} requests, {len(before.replies)} replies")

        step("live migration: primary unplugged on the source, plugged on the target")
        for vm in (source, target):
            assert vm.backend is not None
            vm.backend.events()  # the timeline shows the backends from here on

        async def steer_source() -> None:
            assert source.backend is not None
            await announce_burst(source.backend, timeline=lab.timeline, label="source-backend")

        async def steer_target() -> None:
            assert target.backend is not None
            await announce_burst(target.backend, timeline=lab.timeline, label="target-backend")

        migration = Migration(
            source.qmp,
            target.qmp,
            f"unix:{lab.workdir}/migration.sock",
            MigrationOptions(wait_unplug_timeout=30),
            timeline=lab.timeline,
            on_primary_unplug=steer_source,
            on_target_resume=steer_target,
            progress=say,
        )
        report = await migration.run()
        say(f"guest on the target: {await _wait_primary_up(target)}")
        lab.timeline.add("guest", "primary enslaved", "on the target, link up")
        settled = (await read_pings(target.console)).last_seq
        await asyncio.sleep(2)
        record = await stop_pinging(target.console)

        step("timeline (QEMU events, backend events, controller actions)")
        lab.backend_events_to_timeline()
        print(lab.timeline.table(), flush=True)
        print(report.summary(), flush=True)

        step("traffic through the migration")
        windows = record.windows()
        say(f"{record.last_seq + 1} requests, {len(record.replies)} replies")
        for window in windows:
            say(
                f"lost {window.lost} replies ({window.seconds:.2f} s) "
                f"from t={window.starts_at:.2f} s"
            )
        say(
            f"longest gap {record.longest_gap:.2f} s; no loss before the migration or after "
            f"the guest re-enslaved its primary: {all(w.last_seq < settled for w in windows)}"
        )
        say("the longest window is the guest's: net_failover drops what arrives on the")
        say("standby once the new primary is registered, until the primary's link is up")

        step("cleaning up" + (f" (keeping {lab.workdir})" if keep else ""))
    return 0
