"""QEMU's failover scenario matrix, on a real guest, migrations included.

The scenarios of QEMU's own failover qtest (tests/qtest/virtio-net-failover.c),
ported to a Linux guest with net_failover, this project's backend as the standby's
datapath and an emulated e1000e as the primary. Each test checks what QEMU says
(events, PCI visibility) and what the guest sees (who is enslaved to the failover
master), and that traffic flows.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from conftest import run
from failover_backend.controller import FailoverController
from failover_backend.errors import MonitorCommandError, NegotiationTimeout, PairingError
from failover_backend.lab.scenario import GUEST_MAC, Lab, LabVM
from failover_backend.lab.traffic import echo_request
from failover_backend.pairing import PrimaryConfig, check_pairing
from failover_backend.primary import Primary
from failover_backend.standby import attach_standby, detach_standby
from failover_backend.standby_negotiation import guest_features, wait_negotiated
from failover_backend.vm_devices import failover_pairs, visible_device_ids
from guest import masters, netdevs, slaves_by_driver, wait_primary_enslaved, wait_primary_gone
from lab_migration import migrate

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_lab")]


def primary_config(bus: str = "root1", **changes: object) -> PrimaryConfig:
    fields: dict[str, object] = {
        "device_id": "primary0",
        "driver": "e1000e",
        "bus": bus,
        "pair_id": "standby0",
        "mac": GUEST_MAC,
        "properties": {"netdev": "hostnet0", "romfile": ""},
    }
    fields.update(changes)
    return PrimaryConfig(**fields)  # type: ignore[arg-type]


async def wait_master(vm: LabVM, timeout: float = 10.0) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := masters(await netdevs(vm.console))):
        assert asyncio.get_running_loop().time() < deadline, "no failover master appeared"
        await asyncio.sleep(0.2)
    (master,) = found
    return master


async def ping_host(lab: Lab, console_vm_name: str = "vm", count: int = 5) -> None:
    vm = next(v for v in lab.vms if v.name == console_vm_name)
    out = await vm.console.check(f"ping -c {count} -i 0.1 -W 2 {lab.host_address}")
    assert f"{count} packets received" in out, out


def test_standby_alone_negotiates_and_carries_traffic() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm", primary=False)
            (controller,) = vm.controllers
            assert await vm.boot() != "", "the guest created a failover master"
            await controller.wait_negotiated(timeout=30)
            devs = await netdevs(vm.console)
            assert set(slaves_by_driver(devs)) == {"virtio_net"}, devs
            assert "VIRTIO_NET_F_STANDBY" in await guest_features(vm.qmp, "standby0")
            assert vm.backend is not None
            # What QEMU passed on from the guest: within the offer, the ring basics in
            # (QEMU 7.2 passes on neither IN_ORDER nor MAC and MTU).
            features = vm.backend.features
            assert features.acked is not None and features.acked & ~features.offered == 0
            assert {"VERSION_1", "MRG_RXBUF", "RING_EVENT_IDX"} <= set(features.acked_names)
            await ping_host(lab)
            stats = vm.backend.stats()
            assert stats.tx_packets >= 5 and stats.rx_packets >= 5, stats
            # QEMU found no primary to plug; the controller says so, and so does QEMU.
            await controller.wait_warning("has no primary", timeout=5)
            assert any("Primary device not found" in w for w in vm.vm.warnings())

    run(scenario())


#: Linux's <netinet/in.h> (Python names them only from 3.12 on).
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2


def host_pings(target: str, count: int, size: int) -> int:
    """ICMP echo requests of ``size`` payload bytes from the host, never fragmented
    (``IP_PMTUDISC_DO``: too big for the path is an error, not two fragments);
    returns how many got their reply within 2 s each."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    sock.settimeout(2)
    ident = os.getpid() & 0xFFFF
    answered = 0
    with sock:
        for seq in range(count):
            sock.sendto(echo_request(ident, seq, bytes(size)), (target, 0))
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                try:
                    packet = sock.recv(65536)
                except TimeoutError:
                    break
                header = (packet[0] & 0x0F) * 4
                kind, _, _, their_ident, their_seq = struct.unpack(
                    "!BBHHH", packet[header : header + 8]
                )
                if kind == 0 and (their_ident, their_seq) == (ident, seq):
                    assert len(packet) - header - 8 == size, "the whole payload came back"
                    answered += 1
                    break
    return answered


@pytest.mark.parametrize("mrg_rxbuf", ["on", "off"])
def test_the_guest_takes_the_standbys_mtu_and_9000_byte_frames_pass_both_ways(
    mrg_rxbuf: str,
) -> None:
    """``mtu=9000`` on the backend: QEMU gets ``host_mtu=9000``, the guest's virtio-net
    takes it (VIRTIO_NET_F_MTU) as its largest MTU, which net_failover passes on to the
    master (a slave's MTU follows its master's: the guest's network setup raises the
    master's, as here), the TAP has it, and 9000-byte IP packets cross the standby both
    ways, whole (not fragmented). Without MRG_RXBUF the guest posts big receive buffers
    of many descriptors instead of merging small ones."""

    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm(
                "vm",
                primary=False,
                standby_mtu=9000,
                extra_args=["-global", f"virtio-net-pci.mrg_rxbuf={mrg_rxbuf}"],
            )
            (controller,) = vm.controllers
            master = await vm.boot()
            await controller.wait_negotiated(timeout=30)
            assert vm.backend is not None and vm.backend.mtu == 9000
            assert ("MRG_RXBUF" in vm.backend.features.acked_names) == (mrg_rxbuf == "on")
            assert "VIRTIO_NET_F_MTU" in await guest_features(vm.qmp, "standby0")
            standby = slaves_by_driver(await netdevs(vm.console))["virtio_net"].name
            too_big = await vm.console.run(f"ip link set dev {master} mtu 9001")
            assert too_big.exit_code != 0, "9000 is the most the standby takes"
            await vm.console.check(f"ip link set dev {master} mtu 9000")
            mtus = await vm.console.check(
                f"cat /sys/class/net/{standby}/mtu /sys/class/net/{master}/mtu"
            )
            assert mtus.split()[:2] == ["9000", "9000"], mtus
            before = vm.backend.stats()
            # 8972 bytes of ICMP payload: a 9000-byte IP packet, a 9014-byte frame.
            out = await vm.console.check(f"ping -c 3 -s 8972 -W 2 {lab.host_address}")
            assert "3 packets received" in out, out
            # The host's side: the bridge takes its ports' MTU (the TAP's, 9000).
            bridge_mtu = Path(f"/sys/class/net/{lab.network.bridge}/mtu").read_text()
            assert bridge_mtu.strip() == "9000"
            answered = await asyncio.to_thread(host_pings, lab.guest_address.split("/")[0], 3, 8972)
            assert answered == 3
            after = vm.backend.stats()
            # At least the six requests and six replies, each one frame of 9014 bytes.
            assert after.tx_bytes - before.tx_bytes >= 6 * 9014, (before, after)
            assert after.rx_bytes - before.rx_bytes >= 6 * 9014, (before, after)

    run(scenario())


def test_primary_at_startup_is_hidden_until_negotiation_then_enslaved() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm")
            primary = Primary(vm.qmp, primary_config())
            # The guest is still booting: QEMU has not even created the primary.
            assert not await primary.exists()
            assert await check_pairing(vm.qmp, "standby0") == []
            event = await wait_negotiated(vm.qmp, "standby0", timeout=60)
            assert event is not None and event.data == {"device-id": "standby0"}
            assert await primary.exists()
            await vm.boot()
            assert await primary.visible()
            slave = await wait_primary_enslaved(vm.console)
            devs = await netdevs(vm.console)
            assert set(slaves_by_driver(devs)) == {"virtio_net", "e1000e"}
            assert masters(devs) == {slave.master}
            await ping_host(lab)

    run(scenario())


def test_primary_hotplugged_after_negotiation_is_enslaved() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm", primary=False)
            await vm.boot()
            await wait_negotiated(vm.qmp, "standby0", timeout=30)
            spec = lab.primary()
            primary = Primary(vm.qmp, primary_config(), netdev=spec.netdev_args())
            assert await primary.plug() == "visible"
            await wait_primary_enslaved(vm.console)
            await ping_host(lab)

            # Unplug waits for the guest's eject; replug brings it back with its id.
            deleted = await primary.unplug(deadline=20)
            assert deleted.data["device"] == "primary0"
            await wait_primary_gone(vm.console)
            await ping_host(lab)  # the standby carries the traffic meanwhile
            assert await primary.plug() == "visible"
            await wait_primary_enslaved(vm.console)
            await ping_host(lab)

    run(scenario())


def test_standby_hotplugged_into_a_running_vm_then_the_primary() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm", standby=False, primary=False)
            assert await vm.boot() == "", "no NIC yet, so no failover master"
            controller = FailoverController(vm.qmp, "standby0")
            await controller.start()
            backend = lab.backend("hotplugged")
            mark = vm.qmp.mark()
            bus = await attach_standby(
                vm.qmp,
                device_id="standby0",
                socket_path=backend.socket_path,
                mac=GUEST_MAC,
                legacy_interrupts=True,
            )
            assert bus == "root1", "the first free root port"
            await wait_negotiated(vm.qmp, "standby0", timeout=30, since=mark)
            await controller.wait_warning("has no primary", timeout=5)
            # The guest's init ran before there was a NIC: bring the new master up.
            master = await wait_master(vm)
            await vm.console.check(f"ip addr add {lab.guest_address} dev {master}")
            await vm.console.check(f"ip link set {master} up")
            await vm.console.check(
                f"for i in $(seq 50); do [ $(cat /sys/class/net/{master}/carrier) = 1 ] && exit 0;"
                " sleep 0.1; done; exit 1"
            )
            await ping_host(lab)

            primary = Primary(
                vm.qmp, primary_config(bus="root2"), netdev=lab.primary().netdev_args()
            )
            assert await primary.plug() == "visible"
            assert (await wait_primary_enslaved(vm.console)).master == master
            await ping_host(lab)

            # And out again: the device, its netdev and chardev; the backend is free.
            await detach_standby(vm.qmp, "standby0")
            assert "standby0" not in await visible_device_ids(vm.qmp)
            assert await backend.wait_state(["listening"], 10) == "listening"
            await controller.stop()

    run(scenario())


def test_a_guest_without_net_failover_never_gets_the_primary() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            # virtio_net needs net_failover: with it refused, nothing negotiates STANDBY.
            vm = await lab.vm("vm", kernel_args=["module_blacklist=net_failover"])
            assert await vm.boot() == ""
            with pytest.raises(NegotiationTimeout, match="no net_failover in the guest"):
                await wait_negotiated(vm.qmp, "standby0", timeout=5)
            assert not await Primary(vm.qmp, primary_config()).exists(), "still hidden"
            assert vm.qmp.events_named("FAILOVER_NEGOTIATED") == []

    run(scenario())


def test_failover_off_shows_both_devices_unpaired() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm", failover=False)
            # Without failover=on nothing hides the primary.
            assert await Primary(vm.qmp, primary_config()).exists()
            assert await vm.boot() == "", "no failover master in the guest"
            assert "primary0" in await visible_device_ids(vm.qmp)
            devs = await netdevs(vm.console)
            drivers = {d.driver for d in devs.values()}
            assert {"virtio_net", "e1000e"} <= drivers, devs
            assert masters(devs) == set()
            violations = await check_pairing(vm.qmp, "standby0", primary_config())
            assert [v.rule for v in violations] == ["standby-failover-on"]

    run(scenario())


def test_pairing_errors_are_reported_by_rule_before_qemu_sees_them() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm", primary=False)
            await vm.qmp.execute("netdev_add", lab.primary().netdev_args())
            bad = primary_config(bus="pcie.0", device_id="", mac="52:54:00:00:00:99")
            rules = {v.rule for v in await check_pairing(vm.qmp, "standby0", bad)}
            assert rules == {"primary-has-id", "primary-on-hotplug-port", "same-mac"}
            with pytest.raises(PairingError) as raised:
                await Primary(vm.qmp, bad).plug()
            assert len(raised.value.violations) == 3
            assert "primary0" not in await visible_device_ids(vm.qmp)

            # The same mistakes, straight to QEMU, are refused there too.
            pcie0 = primary_config(bus="pcie.0").device_add_args()
            with pytest.raises(MonitorCommandError, match="does not support hotplugging"):
                await vm.qmp.execute("device_add", pcie0)
            no_id = primary_config().device_add_args()
            del no_id["id"]
            with pytest.raises(MonitorCommandError, match="needs to have id"):
                await vm.qmp.execute("device_add", no_id)
            not_a_nic = primary_config(driver="virtio-blk-pci", properties={})
            assert "primary-is-ethernet" in {
                v.rule for v in await check_pairing(vm.qmp, "standby0", not_a_nic)
            }
            missing = await check_pairing(vm.qmp, "nosuchstandby", primary_config())
            assert missing[0].rule == "standby-exists"

    run(scenario())


def migration_states(vm: LabVM) -> list[str]:
    return [
        str(e.data["status"]) if e.name == "MIGRATION" else e.name
        for e in vm.qmp.events
        if e.name in ("MIGRATION", "UNPLUG_PRIMARY")
    ]


def test_migration_with_failover_off_unplugs_nothing() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            source = await lab.vm("source", failover=False)
            target = await lab.vm("target", failover=False, incoming=True)
            assert await source.boot() == ""
            report = await migrate(lab, source, target)
            assert report.completed, report.summary()
            assert migration_states(source) == ["setup", "active", "completed"]
            assert report.pairs == {}, "no failover pair to take care of"
            # The e1000e is an ordinary NIC here: it migrates with the VM.
            assert "primary0" in await visible_device_ids(target.qmp)
            drivers = {d.driver for d in (await netdevs(target.console)).values()}
            assert {"virtio_net", "e1000e"} <= drivers

    run(scenario())


def test_migration_of_a_guest_without_standby_leaves_the_primary_hidden() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            blacklist = ["module_blacklist=net_failover"]
            source = await lab.vm("source", kernel_args=blacklist)
            target = await lab.vm("target", kernel_args=blacklist, incoming=True)
            assert await source.boot() == ""
            primary = Primary(source.qmp, primary_config())
            assert not await primary.exists(), "hidden: the guest never negotiated"
            mark = target.qmp.mark()
            report = await migrate(lab, source, target)
            assert report.completed, report.summary()
            assert migration_states(source) == ["setup", "active", "completed"]
            assert target.qmp.events_named("FAILOVER_NEGOTIATED", mark) == []
            assert not await Primary(target.qmp, primary_config()).exists()
            assert "primary0" not in await visible_device_ids(target.qmp)

    run(scenario())


def test_a_primary_added_before_its_standby_pairs_when_the_standby_comes() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm", standby=False, primary=False)
            assert await vm.boot() == ""
            # No standby yet to hide behind: the primary is visible at once.
            spec = lab.primary()
            await vm.qmp.execute("netdev_add", spec.netdev_args())
            await vm.qmp.execute("device_add", primary_config().device_add_args())
            assert "primary0" in await visible_device_ids(vm.qmp)
            for _ in range(50):
                if any(d.driver == "e1000e" for d in (await netdevs(vm.console)).values()):
                    break
                await asyncio.sleep(0.2)
            assert masters(await netdevs(vm.console)) == set()

            backend = lab.backend("late")
            mark = vm.qmp.mark()
            await attach_standby(
                vm.qmp,
                device_id="standby0",
                socket_path=backend.socket_path,
                mac=GUEST_MAC,
                bus="root2",
                legacy_interrupts=True,
            )
            await wait_negotiated(vm.qmp, "standby0", timeout=30, since=mark)
            # net_failover takes the NIC that was there first as the primary.
            master = await wait_master(vm)
            devs = await netdevs(vm.console)
            assert {d.driver for d in devs.values() if d.master == master} == {
                "virtio_net",
                "e1000e",
            }, devs

    run(scenario())


def test_a_primary_naming_a_missing_standby_is_not_hidden_nor_paired_by_qemu() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            vm = await lab.vm("vm", primary_kwargs={"pair_id": "nosuchstandby"})
            # Nothing hides it: QEMU creates it from the start, next to the standby.
            assert await Primary(vm.qmp, primary_config(pair_id="nosuchstandby")).exists()
            (controller,) = vm.controllers
            await vm.boot()
            assert "primary0" in await visible_device_ids(vm.qmp)
            # QEMU does not take it for the standby's primary (it would not unplug it
            # for a migration); the controller says the standby has none.
            assert await failover_pairs(vm.qmp) == {"standby0": None}
            await controller.wait_warning("has no primary", timeout=30)
            violations = await check_pairing(
                vm.qmp, "standby0", primary_config(pair_id="nosuchstandby")
            )
            assert "primary-pair-id" in {v.rule for v in violations}
            # The guest pairs by MAC alone: it enslaves the NIC all the same.
            devs = await netdevs(vm.console)
            assert {d.driver for d in devs.values() if d.master} == {"virtio_net", "e1000e"}

    run(scenario())
