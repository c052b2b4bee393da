"""The TAP port: guest frames come out of a real TAP, host frames go into the guest.

testpmd's pcap port feeds virtio-user with known frames and records what virtio-user
receives; a raw socket on the TAP records what the host sees and injects frames
towards the guest. Both directions are compared byte for byte.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest

from conftest import BackendFactory
from failover_backend import _native
from netdev import quiet_tap, raw_socket, unique_name
from pcap import numbered_frames, read_pcap, write_pcap
from testpmd import Testpmd, virtio_user_vdev, wait_for
from tools import require_root

pytestmark = [pytest.mark.dpdk, pytest.mark.root]

PACKET_OUTGOING = 4


def host_frames(count: int) -> list[bytes]:
    """Frames the host sends to the guest: broadcast, with their index in the payload."""
    frames: list[bytes] = []
    for index in range(count):
        header = b"\xff" * 6 + bytes.fromhex("0200000000aa") + b"\x88\xb6"
        payload = struct.pack(">I", index) + bytes((index + j) & 0xFF for j in range(200))
        frames.append(header + payload)
    return frames


def capture(sock: socket.socket, count: int) -> list[bytes]:
    """The next ``count`` frames that arrived on the interface (not the ones sent on it)."""
    frames: list[bytes] = []
    while len(frames) < count:
        data, address = sock.recvfrom(65536)
        if address[2] != PACKET_OUTGOING:
            frames.append(data)
    return frames


def test_frames_cross_the_tap_both_ways_unchanged(
    testpmd_binary: str, make_backend: BackendFactory, sockdir: Path
) -> None:
    require_root("a TAP device")
    guest_to_host = numbered_frames(300, (64, 1518, 700))
    host_to_guest = host_frames(200)
    sent_pcap, received_pcap = sockdir / "sent.pcap", sockdir / "received.pcap"
    write_pcap(sent_pcap, guest_to_host)

    with quiet_tap(unique_name("fbt")) as tap:
        backend = make_backend(port=f"tap:{tap}")
        assert backend.features.offered & _native.F_MRG_RXBUF
        assert {"CSUM", "GUEST_CSUM", "HOST_TSO4", "GUEST_TSO4"} <= set(
            backend.features.offered_names
        ), "a TAP that takes offloads gets them offered"
        vdevs = [
            f"net_pcap0,rx_pcap={sent_pcap},tx_pcap={received_pcap}",
            virtio_user_vdev(backend.socket_path),
        ]
        app = ["--no-flush-rx", "--nb-cores=1"]
        with raw_socket(tap) as host, Testpmd(testpmd_binary, vdevs, app) as pmd:
            asyncio.run(backend.wait_features_acked(15))
            pmd.cmd("set fwd io retry")
            pmd.cmd("set burst tx delay 100 retry 10000")
            pmd.cmd("start")
            seen_by_host = capture(host, len(guest_to_host))
            for frame in host_to_guest:
                host.send(frame)
            # Delivered to the guest, then forwarded by testpmd into the pcap file.
            wait_for(
                lambda: pmd.port_stats(0)["TX-packets"] == len(host_to_guest),
                15,
                f"{len(host_to_guest)} frames through the guest into the pcap port",
            )
            pmd.cmd("stop")
            pmd.quit()

    assert seen_by_host == guest_to_host
    assert read_pcap(received_pcap) == host_to_guest
    stats = backend.stats()
    assert (stats.tx_packets, stats.rx_packets) == (len(guest_to_host), len(host_to_guest))
    assert (stats.drops, stats.errors) == (0, 0)


def test_announce_sends_rarp_from_the_guest_mac_on_the_tap(make_backend: BackendFactory) -> None:
    require_root("a TAP device")
    with quiet_tap(unique_name("fbt")) as tap:
        backend = make_backend(port=f"tap:{tap}", mac="52:54:00:12:34:56")
        with raw_socket(tap) as host:
            assert backend.announce(3) == 3
            frames = capture(host, 3)
    mac = bytes.fromhex("525400123456")
    for frame in frames:
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac
        assert frame[12:14] == b"\x80\x35", "RARP"
        assert frame[22:28] == mac and frame[32:38] == mac
    assert [e.kind for e in backend.events()].count("announced") == 1
