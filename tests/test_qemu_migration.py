"""Live migration of a failover pair on one host: two QEMU processes, each with its
own standby backend (steered by a controller, as ``run`` does) and its own emulated
primary, one bridge between them.

The tests assert QEMU's event order and migration states, where the primary is (in
QEMU and in the guest), and the traffic: the host pinging the guest (inbound, the
direction that shows steering faults) or, in one test, the guest pinging the host.
Every loss window must have a cause on the timeline and stay within the guest's own
window plus 0.3 s.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from conftest import run
from continuity import analyse, assert_bounded
from failover_backend.errors import UnplugTimeout
from failover_backend.lab.continuity import PRIMARY_LEAVING
from failover_backend.lab.scenario import Lab, LabVM
from failover_backend.lab.traffic import (
    EchoListener,
    HostPinger,
    read_pings,
    start_pinging,
    stop_pinging,
)
from failover_backend.migration import MigrationError
from failover_backend.pairing import PrimaryConfig
from failover_backend.primary import Primary
from failover_backend.vm_devices import visible_device_ids
from guest import netdevs, wait_primary_enslaved
from lab_migration import migration

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_lab")]


async def booted_pair(lab: Lab, **machine: Any) -> tuple[LabVM, LabVM]:
    """A running source with its primary enslaved, and a target waiting for it
    (same machine options: a mismatch breaks the migration stream)."""
    src = await lab.vm("source", **machine)
    dst = await lab.vm("target", incoming=True, **machine)
    await src.boot()
    if machine.get("guest_ignores_unplug"):
        # This guest misses hot-added devices too: look for the primary by hand.
        await src.console.check("echo 1 > /sys/bus/pci/rescan")
    await wait_primary_enslaved(src.console)
    return src, dst


async def wait_steering_path(vm: LabVM, path: str, timeout: float) -> None:
    """Until the standby's steering points the host's switch at ``path``."""
    assert vm.backend is not None
    deadline = time.monotonic() + timeout
    while (steering := vm.backend.steering()) is None or steering.path != path:
        if time.monotonic() > deadline:
            raise AssertionError(f"steering not on the {path} after {timeout:g} s: {steering}")
        await asyncio.sleep(0.1)


async def kill_when_active(source: LabVM, victim: LabVM, since: int) -> None:
    """Kill ``victim``'s QEMU once the source's migration is copying memory."""
    await source.qmp.wait_event(
        "MIGRATION",
        since=since,
        match=lambda e: e.data.get("status") == "active",
        timeout=60,
    )
    await victim.vm.kill()


def states(vm: LabVM) -> list[str]:
    """MIGRATION states and UNPLUG_PRIMARY, in the order QEMU sent them."""
    return [
        str(e.data["status"]) if e.name == "MIGRATION" else e.name
        for e in vm.qmp.events
        if e.name in ("MIGRATION", "UNPLUG_PRIMARY")
    ]


def test_migration_moves_the_primary_and_the_guests_own_traffic_follows() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            src, dst = await booted_pair(lab)
            # Guest -> host, heard on the host's clock.
            listener = EchoListener(lab.guest_address)
            await listener.start()
            await start_pinging(src.console, lab.host_address)
            await asyncio.sleep(1.5)
            before = await read_pings(src.console)
            assert before.last_seq >= 20 and before.windows() == [], "steady before migrating"

            start = time.time()
            report = await migration(lab, src, dst).run()

            assert report.completed, report.summary()
            assert states(src) == ["setup", "UNPLUG_PRIMARY", "wait-unplug", "active", "completed"]
            assert report.total_time_ms and report.total_time_ms > 0
            assert report.downtime_ms is not None and report.wait_unplug_s is not None
            target_events = [
                e.name for e in dst.qmp.events if e.name in ("FAILOVER_NEGOTIATED", "RESUME")
            ]
            assert target_events[:2] == ["FAILOVER_NEGOTIATED", "RESUME"]
            assert report.primary_plugged_before_resume
            assert "primary0" in await visible_device_ids(dst.qmp)
            assert lab.timeline.find("controller", "announce-self") is not None

            # The guest, now on the target, enslaves the target's primary again.
            await wait_primary_enslaved(dst.console, timeout=30)
            await asyncio.sleep(2)
            record = await stop_pinging(dst.console)
            trace = await listener.stop()
            lab.backend_events_to_timeline()
            result = analyse(trace, lab.timeline, [src.console, dst.console], start=start)
            print(lab.timeline.table())
            print(result.report())
            assert record.last_seq >= before.last_seq + 60, "replies resumed and kept coming"
            assert_bounded(result)
            assert src.backend is not None and dst.backend is not None
            assert [e.kind for e in src.backend.events()].count("announced") >= 0
            src_steering, dst_steering = src.backend.steering(), dst.backend.steering()
            assert src_steering is not None and src_steering.mode == "off", src_steering
            assert dst_steering is not None and dst_steering.path == "primary", dst_steering

    run(scenario(), timeout=300)


def test_a_guest_slow_to_release_the_primary_keeps_it_until_it_does() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            # Native PCIe hotplug: the guest ejects 5 s after the request. The primary
            # carries the traffic until then: steering waits for the guest, not QEMU.
            src, dst = await booted_pair(lab, acpi_hotplug=False)
            pinger = HostPinger(lab.guest_address)
            await pinger.start()
            await asyncio.sleep(1)
            start = time.time()
            report = await migration(lab, src, dst).run()
            assert report.completed, report.summary()
            assert report.wait_unplug_s is not None and report.wait_unplug_s > 4
            await wait_primary_enslaved(dst.console, timeout=30)
            await asyncio.sleep(2)
            trace = await pinger.stop()
            lab.backend_events_to_timeline()
            result = analyse(trace, lab.timeline, [src.console, dst.console], start=start)
            print(lab.timeline.table())
            print(result.report())
            assert_bounded(result)
            unplug = lab.timeline.find("source", "UNPLUG_PRIMARY")
            assert unplug is not None
            early = [w for w in result.windows if w.gap.end < unplug.time + 4]
            assert early == [], f"lost before the guest let the primary go: {result.report()}"
            leaving = [w for w in result.windows if PRIMARY_LEAVING in w.cause]
            assert all(w.gap.seconds <= 0.3 for w in leaving), result.report()

    run(scenario(), timeout=300)


def test_migration_cancelled_in_wait_unplug_gives_the_primary_back() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            # Native PCIe hotplug: the guest ejects 5 s after the request, so the
            # controller's 1.5 s deadline cancels while QEMU is in wait-unplug.
            src, dst = await booted_pair(lab, acpi_hotplug=False)
            pinger = HostPinger(lab.guest_address)
            await pinger.start()
            start = time.time()
            with pytest.raises(MigrationError) as raised:
                await migration(lab, src, dst, wait_unplug_timeout=1.5).run()
            report = raised.value.report
            assert report is not None
            assert report.status == "cancelled", report.summary()
            assert states(src) == [
                "setup",
                "UNPLUG_PRIMARY",
                "wait-unplug",
                "cancelling",
                "cancelled",
            ]
            assert any("did not release the primary" in p for p in report.problems)
            assert report.source_primary_back is True
            assert await src.qmp.run_state() == "running"
            # And in the guest, the primary is still (again) enslaved with its link up.
            await wait_primary_enslaved(src.console, timeout=30)
            await asyncio.sleep(2)
            trace = await pinger.stop()
            lab.backend_events_to_timeline()
            result = analyse(trace, lab.timeline, [src.console], start=start)
            print(lab.timeline.table())
            print(result.report())
            assert_bounded(result)

    run(scenario())


def test_a_guest_that_never_releases_the_primary_cannot_stall_the_migration() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            # The guest ignores hotplug requests (no ACPI hotplug driver): QEMU alone
            # would sit in wait-unplug forever.
            src, dst = await booted_pair(lab, guest_ignores_unplug=True)
            # This guest finds its primary only by the rescan above; until steering's
            # probe is answered through it, the standby is announced (by design).
            # Nothing may be lost from the moment steering settled on the primary.
            await wait_steering_path(src, "primary", timeout=30)
            pinger = HostPinger(lab.guest_address)
            await pinger.start()
            await asyncio.sleep(1)
            assert src.backend is not None
            src.backend.events()  # from here on
            with pytest.raises(MigrationError) as raised:
                await migration(lab, src, dst, wait_unplug_timeout=2, cancel_timeout=45).run()
            report = raised.value.report
            assert report is not None
            assert report.status == "cancelled", report.summary()
            assert report.wait_unplug_s is not None and 2 <= report.wait_unplug_s < 10
            assert any("did not release the primary within 2 s" in p for p in report.problems)
            assert report.source_primary_back is True
            assert await src.qmp.run_state() == "running"
            await wait_primary_enslaved(src.console)
            # The guest kept its primary all along: nothing was lost, nothing steered
            # to the standby.
            trace = await pinger.stop()
            gaps = trace.gaps()
            if gaps:
                # Where on the timeline (the backend's own events too, read only now:
                # the check below reads them).
                lab.backend_events_to_timeline()
                origin = lab.timeline.entries[0].time
                at = ", ".join(f"t={g.start - origin:.3f} s ({g.lost} lost)" for g in gaps)
                raise AssertionError(f"pings lost at {at}:\n{lab.timeline.table()}")
            steering = src.backend.steering()
            assert steering is not None and steering.mode == "primary", steering
            assert not any(
                "to the standby" in e.message
                for e in src.backend.events()
                if e.kind == "path_changed"
            )
            # Plain unplugs get the same deadline.
            with pytest.raises(UnplugTimeout, match="did not release primary0 within 2 s"):
                await Primary(src.qmp, _primary_config()).unplug(deadline=2)

    run(scenario(), timeout=300)


def test_target_killed_mid_migration_leaves_the_source_running_with_its_primary() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            src, dst = await booted_pair(lab)
            mark = src.qmp.mark()

            killer = asyncio.create_task(kill_when_active(src, dst, since=mark))
            with pytest.raises(MigrationError) as raised:
                await migration(lab, src, dst).run()
            await killer
            report = raised.value.report
            assert report is not None
            assert report.status == "failed", report.summary()
            assert report.source_primary_back is True
            assert await src.qmp.run_state() == "running"
            await wait_primary_enslaved(src.console, timeout=30)

    run(scenario())


def test_source_killed_mid_migration_is_reported_not_waited_for() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            src, dst = await booted_pair(lab)
            mark = src.qmp.mark()

            killer = asyncio.create_task(kill_when_active(src, src, since=mark))
            started = asyncio.get_running_loop().time()
            with pytest.raises(MigrationError, match="source") as raised:
                await migration(lab, src, dst).run()
            await killer
            assert asyncio.get_running_loop().time() - started < 60
            report = raised.value.report
            assert report is not None
            assert "the source QEMU is gone" in report.problems

    run(scenario())


def test_a_target_whose_backend_is_not_running_is_refused_before_anything_moves() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            src, dst = await booted_pair(lab)
            assert dst.backend is not None
            await asyncio.to_thread(dst.backend.stop)
            mark = src.qmp.mark()
            with pytest.raises(MigrationError, match="standby backend is not connected") as raised:
                await migration(lab, src, dst).run()
            report = raised.value.report
            assert report is not None and report.status == "not-started"
            assert src.qmp.events_named("MIGRATION", mark) == [], "nothing was started"
            assert await src.qmp.run_state() == "running"
            primary = Primary(src.qmp, config=_primary_config())
            assert await primary.visible()
            slaves = {d.driver for d in (await netdevs(src.console)).values() if d.master}
            assert slaves == {"virtio_net", "e1000e"}

    run(scenario())


def _primary_config() -> PrimaryConfig:
    return PrimaryConfig("primary0", "e1000e", "root1", "standby0")


def test_a_guest_on_packed_rings_migrates_and_its_standby_goes_on() -> None:
    """virtio-net with ``packed=on``: QEMU reads each ring's position and wrap
    counter from the source's backend (GET_VRING_BASE) and hands them to the target's
    (SET_VRING_BASE). Standby only, so every frame crosses the backends: after more
    frames than a ring holds (the wrap counters have flipped), a migration, then
    traffic both ways on the target."""

    async def scenario() -> None:
        async with Lab() as lab:
            packed = ["-global", "virtio-net-pci.packed=on"]
            src = await lab.vm("source", primary=False, extra_args=packed)
            dst = await lab.vm("target", primary=False, incoming=True, extra_args=packed)
            await src.boot()
            (controller,) = src.controllers
            await controller.wait_negotiated(timeout=30)
            assert src.backend is not None and dst.backend is not None
            assert "RING_PACKED" in src.backend.features.acked_names
            out = await src.console.check(f"ping -c 300 -i 0.01 -W 2 {lab.host_address}")
            assert "300 packets received" in out, out
            before = src.backend.stats()
            assert before.tx_packets >= 300 and before.rx_packets >= 300, before

            pinger = HostPinger(lab.guest_address)
            await pinger.start()
            ram: list[str] = []
            report = await migration(lab, src, dst, ram_progress=ram.append).run()
            assert report.completed, report.summary()
            assert "RING_PACKED" in dst.backend.features.acked_names
            # While QEMU copied memory, the live line: 1 GiB of guest RAM (and QEMU's
            # own few blocks), more of it sent each time.
            parsed = [re.match(r"RAM (\d+) MiB sent, \d+ of (\d+) MiB left", line) for line in ram]
            assert ram and all(p is not None and int(p[2]) >= 1024 for p in parsed), ram
            sent = [int(p[1]) for p in parsed if p is not None]
            assert sent == sorted(sent), ram
            await asyncio.sleep(2)
            trace = await pinger.stop()
            out = await dst.console.check(f"ping -c 20 -i 0.05 -W 2 {lab.host_address}")
            assert "20 packets received" in out, out
            after = dst.backend.stats()
            assert after.tx_packets >= 20 and after.rx_packets >= 20, after
            # Inbound, on the target: the last 1.5 s of the host's pings all answered.
            end = max(trace.sent.values())
            last = {seq for seq, at in trace.sent.items() if end - 1.5 < at < end - 0.2}
            assert last and last <= trace.answered, trace.gaps()

    run(scenario(), timeout=300)
