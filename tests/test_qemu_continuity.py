"""Failover continuity seen from the network, on a stock guest (IPv6 on).

The host pings the guest every 50 ms from the bridge: inbound traffic, which the
guest only answers, so nothing the guest sends on its own re-teaches the host's
switch where it is. (The guest pinging the host would, and hide every steering
fault; ``test_qemu_migration`` measures that direction.) Every loss must have a
cause on the timeline, and none may outlast the guest's own window (its new
primary registered, link not up yet) by more than 0.3 s.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import run
from continuity import analyse, assert_bounded
from failover_backend.lab.scenario import Lab
from failover_backend.lab.traffic import HostPinger
from failover_backend.migration import MigrationError
from failover_backend.vm_devices import visible_device_ids
from guest import netdevs, wait_primary_enslaved
from lab_migration import migrate
from runproc import start_run

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_lab")]


def test_a_stock_guest_loses_nothing_without_migration() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm")
            await vm.boot()
            pinger = HostPinger(lab.guest_address)
            await pinger.start()
            # From the guest's boot on: its virtio-net slave sends router
            # solicitations, DAD and MLD reports with the guest's MAC meanwhile.
            await wait_primary_enslaved(vm.console, timeout=60)
            settled = time.time()
            await asyncio.sleep(30)
            trace = await pinger.stop()
            result = analyse(trace, lab.timeline, [vm.console], start=settled)
            assert len(trace.gaps(settled)) == 0, result.report()
            assert len([s for s in trace.sent.values() if s >= settled]) >= 500
            assert vm.backend is not None
            steering = vm.backend.steering()
            assert steering is not None and steering.path == "primary", steering
            # The slave's own chatter was kept from the switch.
            assert steering.held_back > 0, steering

    run(scenario(), timeout=300)


async def pinged(lab: Lab, *addresses: str) -> list[HostPinger]:
    pingers = [HostPinger(address) for address in addresses]
    for pinger in pingers:
        await pinger.start()
    await asyncio.sleep(1)
    return pingers


def test_two_guests_migrated_at_once_stay_reachable() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            guests = []
            for guest in (0, 1):
                source = await lab.vm(f"s{guest}", guest=guest)
                target = await lab.vm(f"t{guest}", guest=guest, incoming=True)
                guests.append((source, target))
            for source, _ in guests:
                await source.boot()
            for source, _ in guests:
                await wait_primary_enslaved(source.console, timeout=90)
            pingers = await pinged(lab, *(lab.pair_address(0, guest) for guest in (0, 1)))
            start = time.time()
            reports = await asyncio.gather(*(migrate(lab, s, t) for s, t in guests))
            assert all(r.completed for r in reports), [r.summary() for r in reports]
            for _, target in guests:
                await wait_primary_enslaved(target.console, timeout=60)
            await asyncio.sleep(2)
            lab.backend_events_to_timeline()
            print(lab.timeline.table())
            for guest, ((source, target), pinger) in enumerate(zip(guests, pingers, strict=True)):
                trace = await pinger.stop()
                result = analyse(
                    trace,
                    lab.timeline,
                    [source.console, target.console],
                    start=start,
                    vms=(source.name, target.name),
                )
                print(f"guest {guest}: {result.report()}")
                assert_bounded(result)

    run(scenario(), timeout=420)


def test_a_guest_with_two_pairs_keeps_both_through_a_migration() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            # One `run` per side serves both standbys ([[pair]]) and plugs both primaries.
            runs = {name: await start_run(lab, name, pairs=2) for name in ("source", "target")}
            try:
                vms = {
                    name: await lab.vm(
                        name,
                        pairs=2,
                        primary=False,
                        incoming=name == "target",
                        standby_sockets=runs[name].sockets,
                        connect_qmp=False,
                    )
                    for name in ("source", "target")
                }
                source, target = vms["source"], vms["target"]
                await source.boot()
                for _ in range(120):
                    devs = await netdevs(source.console)
                    if sum(1 for d in devs.values() if d.driver == "e1000e" and d.carrier) == 2:
                        break
                    await asyncio.sleep(0.5)
                else:
                    raise AssertionError(f"both primaries not up: {devs}")
                for index in range(2):
                    await runs["source"].wait_for(
                        f"standby{index}: steering to the primary", timeout=30
                    )
                pingers = await pinged(lab, lab.pair_address(0), lab.pair_address(1))
                start = time.time()
                mark = target.qmp.mark()
                report = await migrate(lab, source, target)
                assert report.completed, report.summary()
                assert report.pairs == {"standby0": "primary0", "standby1": "primary1"}
                assert await runs["source"].exit_code() == 0, runs["source"].output
                # Both primaries asked out before QEMU left wait-unplug, both back in
                # on the target before the guest resumed there.
                order = [
                    f"{e.name}:{e.data.get('device-id') or e.data.get('status')}"
                    for e in source.qmp.events
                    if e.name in ("UNPLUG_PRIMARY", "MIGRATION")
                ]
                assert order[0] == "MIGRATION:setup", order
                assert sorted(order[1:3]) == ["UNPLUG_PRIMARY:primary0", "UNPLUG_PRIMARY:primary1"]
                assert order[3:] == [
                    "MIGRATION:wait-unplug",
                    "MIGRATION:active",
                    "MIGRATION:completed",
                ], order
                negotiated = [
                    e.data["device-id"]
                    for e in target.qmp.events[mark:]
                    if e.name == "FAILOVER_NEGOTIATED"
                ]
                assert sorted(negotiated) == ["standby0", "standby1"]
                assert report.primary_plugged_before_resume
                assert {"primary0", "primary1"} <= await visible_device_ids(target.qmp)
                for index in range(2):
                    await runs["target"].wait_for(
                        f"standby{index}: steering to the primary", timeout=30
                    )
                await asyncio.sleep(2)
            finally:
                for process in runs.values():
                    await process.stop()
            print(lab.timeline.table())
            for index, pinger in enumerate(pingers):
                trace = await pinger.stop()
                result = analyse(trace, lab.timeline, [source.console, target.console], start=start)
                print(f"pair {index}: {result.report()}")
                assert_bounded(result)

    run(scenario(), timeout=400)


def test_a_migration_cancelled_after_the_release_plugs_the_primary_back() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            source = await lab.vm("source")
            target = await lab.vm("target", incoming=True)
            await source.boot()
            await wait_primary_enslaved(source.console, timeout=60)
            # Slow enough to cancel once memory is being copied, after the release.
            await source.qmp.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
            (pinger,) = await pinged(lab, lab.guest_address)
            start = time.time()
            mark = source.qmp.mark()

            async def cancel_when_copying() -> None:
                await source.qmp.wait_event(
                    "MIGRATION",
                    since=mark,
                    match=lambda e: e.data["status"] == "active",
                    timeout=60,
                )
                await asyncio.sleep(0.5)
                await source.qmp.execute("migrate_cancel")

            canceller = asyncio.create_task(cancel_when_copying())
            with pytest.raises(MigrationError) as raised:
                await migrate(lab, source, target)
            await canceller
            report = raised.value.report
            assert report is not None and report.status == "cancelled", report
            assert [
                str(e.data["status"]) if e.name == "MIGRATION" else e.name
                for e in source.qmp.events[mark:]
                if e.name in ("MIGRATION", "UNPLUG_PRIMARY")
            ] == ["setup", "UNPLUG_PRIMARY", "wait-unplug", "active", "cancelling", "cancelled"]
            # QEMU plugs the primary back; the guest takes it again.
            assert report.source_primary_back is True
            await wait_primary_enslaved(source.console, timeout=30)
            await asyncio.sleep(2)
            trace = await pinger.stop()
            lab.backend_events_to_timeline()
            result = analyse(trace, lab.timeline, [source.console], start=start)
            print(lab.timeline.table())
            print(result.report())
            assert_bounded(result)
            assert result.inherent > 0, "the guest registered the primary again"

    run(scenario(), timeout=300)
