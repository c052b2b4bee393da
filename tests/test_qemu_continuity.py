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
from failover_backend.migration import Migration, MigrationOptions
from guest import wait_primary_enslaved

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


def test_inbound_traffic_survives_a_migration() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            src = await lab.vm("source")
            dst = await lab.vm("target", incoming=True)
            await src.boot()
            await wait_primary_enslaved(src.console, timeout=60)
            pinger = HostPinger(lab.guest_address)
            await pinger.start()
            await asyncio.sleep(2)
            start = time.time()
            report = await Migration(
                src.qmp,
                dst.qmp,
                f"unix:{lab.workdir}/migration.sock",
                MigrationOptions(),
                timeline=lab.timeline,
            ).run()
            assert report.completed, report.summary()
            await wait_primary_enslaved(dst.console, timeout=30)
            await asyncio.sleep(3)
            trace = await pinger.stop()
            lab.backend_events_to_timeline()
            result = analyse(trace, lab.timeline, [src.console, dst.console], start=start - 2)
            print(lab.timeline.table())
            print(result.report())
            assert_bounded(result)
            assert result.inherent > 0, "the guest registered its new primary before its link"

    run(scenario(), timeout=300)
