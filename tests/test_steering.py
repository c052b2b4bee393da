"""Steering in the datapath, frame by frame: dpdk-testpmd's virtio-user port is the
guest (its pcap port says what the guest sends and records what it receives), a raw
socket on the TAP is the host's switch.

What a user relies on: while the primary carries the traffic, the standby's own IPv6
chatter never reaches the switch and everything else does; the guest never gets its
own frames back; probes are answered and their answers go no further; the standby is
announced only once the guest answers through it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from conftest import BackendFactory
from failover_backend import StandbyBackend
from netdev import quiet_tap, raw_socket, unique_name
from pcap import read_pcap, write_pcap
from testpmd import Testpmd, virtio_user_vdev
from tools import require_root

pytestmark = [pytest.mark.dpdk, pytest.mark.root]

GUEST = bytes.fromhex("525400fb0042")
HOST = bytes.fromhex("0200000000aa")
PACKET_OUTGOING = 4
ETH_IPV6 = b"\x86\xdd"


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ipv6(dst_mac: bytes, src_ip: bytes, dst_ip: bytes, icmp_type: int, index: int) -> bytes:
    icmp = bytes([icmp_type, 0, 0, 0]) + struct.pack(">I", index) + bytes(16)
    header = b"\x60\x00\x00\x00" + struct.pack(">H", len(icmp)) + bytes([58, 255]) + src_ip + dst_ip
    return dst_mac + GUEST + ETH_IPV6 + header + icmp


LINK_LOCAL = bytes.fromhex("fe80000000000000505400fffefb0042")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
SOLICITED = bytes.fromhex("ff0200000000000000000001fffb0042")


def chatter(index: int) -> bytes:
    """A router solicitation from the guest's link-local address (what a slave sends)."""
    return ipv6(mac("33:33:00:00:00:02"), LINK_LOCAL, ALL_ROUTERS, 133, index)


def dad_probe(index: int) -> bytes:
    """Duplicate address detection: a solicitation from ::."""
    return ipv6(mac("33:33:ff:fb:00:42"), bytes(16), SOLICITED, 135, index)


def traffic(index: int) -> bytes:
    return HOST + GUEST + b"\x88\xb6" + struct.pack(">I", index) + bytes(60)


def arp_reply_to(probe_mac: bytes) -> bytes:
    """The guest answering an ARP probe for 10.0.0.2."""
    arp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 2) + GUEST + bytes([10, 0, 0, 2]) + probe_mac
    return probe_mac + GUEST + b"\x08\x06" + arp + bytes(4) + bytes(18)


def host_frames(sock: socket.socket, seconds: float) -> list[bytes]:
    """What the backend put on the TAP within ``seconds``."""
    frames: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, address = sock.recvfrom(65536)
        except TimeoutError:
            break
        if address[2] != PACKET_OUTGOING:
            frames.append(data)
    return frames


def run_guest(
    testpmd: str,
    backend: StandbyBackend,
    guest_sends: list[bytes],
    sockdir: Path,
    *,
    host_sends: Sequence[bytes] = (),
    watch: float = 1.0,
) -> tuple[list[bytes], list[bytes]]:
    """The guest sends ``guest_sends`` (and the host ``host_sends``); returns what the
    host saw on the TAP and what the guest received."""
    sent, received = sockdir / "sent.pcap", sockdir / "received.pcap"
    write_pcap(sent, guest_sends)
    tap = backend.port.removeprefix("tap:")
    vdevs = [
        f"net_pcap0,rx_pcap={sent},tx_pcap={received}",
        virtio_user_vdev(backend.socket_path),
    ]
    with raw_socket(tap) as host, Testpmd(testpmd, vdevs, ["--no-flush-rx"]) as pmd:
        asyncio.run(backend.wait_features_acked(15))
        pmd.cmd("set fwd io retry")
        pmd.cmd("start")
        for frame in host_sends:
            host.send(frame)
        seen = host_frames(host, watch)
        pmd.cmd("stop")
        pmd.quit()
    return seen, read_pcap(received)


def steered(make_backend: BackendFactory, tap: str) -> StandbyBackend:
    return make_backend(port=f"tap:{tap}", mac=":".join(f"{b:02x}" for b in GUEST))


def test_while_the_primary_carries_traffic_the_standby_chatter_stays_home(
    testpmd_binary: str, make_backend: BackendFactory, sockdir: Path
) -> None:
    require_root("a TAP device")
    with quiet_tap(unique_name("fbt")) as tap:
        backend = steered(make_backend, tap)
        backend.steer("primary", "test")
        status = backend.steering()
        assert status is not None
        probe = mac(status.probe_mac)
        guest_sends = [chatter(i) for i in range(20)] + [dad_probe(i) for i in range(5)]
        guest_sends += [traffic(i) for i in range(10)]
        # The switch hands the guest its own frames back (through the primary), other
        # hosts' frames, and an answer to a probe.
        looped = b"\xff" * 6 + GUEST + b"\x88\xb6" + bytes(60)
        others = [
            b"\xff" * 6 + HOST + b"\x88\xb6" + struct.pack(">I", i) + bytes(56) for i in range(7)
        ]
        seen, received = run_guest(
            testpmd_binary,
            backend,
            guest_sends,
            sockdir,
            host_sends=[looped] * 3 + others + [arp_reply_to(probe)],
        )

    status = backend.steering()
    assert status is not None
    # What the device went through, for a failure's message (a reconnection, say).
    story = f"{status}; " + "; ".join(f"{e.kind}: {e.message}" for e in backend.events())
    from_guest = [f for f in seen if f[6:12] == GUEST]
    assert from_guest == [traffic(i) for i in range(10)], f"only the guest's own traffic; {story}"
    assert received == others, f"no frame of the guest's own, no answer to a probe; {story}"
    assert status.held_back == 25 and status.looped == 3 and status.answers == 1, story
    # The guest's traffic through the standby (its primary lost carrier) made steering
    # probe the switch; probes leave from the probe's own MAC.
    probes = [f for f in seen if f[6:12] == probe]
    assert probes and all(f[:6] in (b"\xff" * 6, mac("33:33:ff:fb:00:42")) for f in probes)


def test_releasing_becomes_standby_when_the_guest_answers_through_it(
    testpmd_binary: str, make_backend: BackendFactory, sockdir: Path
) -> None:
    require_root("a TAP device")
    with quiet_tap(unique_name("fbt")) as tap:
        backend = steered(make_backend, tap)
        status = backend.steering()
        assert status is not None
        probe = mac(status.probe_mac)
        backend.steer("releasing", "test")
        # The guest still holds its primary: its chatter is held, nothing announced.
        seen, received = run_guest(testpmd_binary, backend, [chatter(0)], sockdir, watch=0.5)
        assert [f for f in seen if f[6:12] == GUEST] == []
        # Probes went into the guest: neighbour solicitations for its link-local
        # address, from the probe's MAC, about every 20 ms.
        solicitations = [f for f in received if f[6:12] == probe and f[12:14] == ETH_IPV6]
        assert len(solicitations) >= 10, len(solicitations)
        assert all(f[14 + 40 + 8 : 14 + 40 + 24] == LINK_LOCAL for f in solicitations)
        assert backend.steering().mode == "releasing"  # type: ignore[union-attr]

        # Now it answers through the standby: released. The answer goes no further;
        # the standby is announced.
        seen, _ = run_guest(testpmd_binary, backend, [arp_reply_to(probe)], sockdir)
    status = backend.steering()
    assert status is not None and status.mode == "standby" and status.path == "standby"
    assert not any(f[:6] == probe for f in seen), "the answer stayed in the backend"
    rarps = [f for f in seen if f[12:14] == b"\x80\x35" and f[6:12] == GUEST]
    assert len(rarps) >= 5, len(rarps)
    kinds = [e.kind for e in backend.events()]
    assert "path_changed" in kinds and "announced" in kinds
