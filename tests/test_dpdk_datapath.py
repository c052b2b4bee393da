"""The standby backend against a real vhost-user frontend: DPDK's virtio-user port.

testpmd plays the guest driver. Counts are compared exactly with what testpmd
says it sent and received; payloads are compared byte for byte through DPDK's
pcap port (pcap file → virtio-user → backend → virtio-user → pcap file).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from conftest import BackendFactory
from failover_backend import StandbyBackend, _native
from pcap import numbered_frames, read_pcap, write_pcap
from testpmd import Testpmd, prompt_count, virtio_user_vdev, wait_for

pytestmark = pytest.mark.dpdk

F_PROTOCOL_FEATURES = 1 << 30
GEN_SOURCE_MAC = bytes.fromhex("0267656e0001")
VIRTIO_DEBUG_LOGS = [
    "--log-level=pmd.net.virtio.init:debug",
    "--log-level=pmd.net.virtio.driver:info",
]


def wait_negotiated(backend: StandbyBackend, timeout: float = 15.0) -> int:
    features = asyncio.run(backend.wait_features_acked(timeout))
    assert features.acked is not None
    return features.acked


def test_negotiated_features_are_what_both_sides_offered(
    testpmd_binary: str, make_backend: BackendFactory
) -> None:
    backend = make_backend(port="null")
    vdev = virtio_user_vdev(backend.socket_path)
    with Testpmd(testpmd_binary, [vdev], eal_args=VIRTIO_DEBUG_LOGS) as pmd:
        acked = wait_negotiated(backend)
        logged = pmd.negotiated_features()

    offered = backend.features.offered
    # virtio-user sends what the driver and device agreed, minus the features it
    # emulates itself, plus the vhost-user protocol bit.
    assert logged["agreed"] == logged["driver"] & logged["device"]
    assert acked == logged["sent_to_backend"] | F_PROTOCOL_FEATURES
    assert acked & ~F_PROTOCOL_FEATURES == logged["agreed"] & offered
    assert acked & ~offered == 0
    names = backend.features.acked_names
    assert {"VERSION_1", "MRG_RXBUF", "RING_INDIRECT_DESC", "PROTOCOL_FEATURES"} <= set(names)
    # virtio-user asks for in-order use by default, as DPDK's vhost PMD grants it.
    assert "IN_ORDER" in names
    # Dirty logging is a migration thing: acked only while QEMU migrates.
    assert "LOG_ALL" not in names
    assert offered & _native.F_LOG_ALL
    assert {"MQ", "LOG_SHMFD", "REPLY_ACK"} <= set(backend.features.protocol_offered_names)


@pytest.mark.parametrize(
    ("port", "frame_len", "poll_us", "packed_vq", "in_order"),
    [
        ("null", 64, 50, 0, 1),
        ("null", 1518, 50, 0, 1),
        ("null", 64, 0, 0, 1),
        ("sink", 1518, 50, 0, 1),
        # Packed and in order: each batch goes back as one used descriptor.
        ("null", 64, 50, 1, 1),
        ("sink", 1518, 0, 1, 1),
        ("sink", 64, 50, 1, 0),
    ],
)
def test_null_and_sink_ports_count_every_frame_the_guest_sends(
    testpmd_binary: str,
    make_backend: BackendFactory,
    port: str,
    frame_len: int,
    poll_us: int,
    packed_vq: int,
    in_order: int,
) -> None:
    backend = make_backend(port=port, poll_us=poll_us)
    vdev = virtio_user_vdev(backend.socket_path, packed_vq=packed_vq, in_order=in_order)
    app = ["--forward-mode=txonly", f"--txpkts={frame_len}", "--nb-cores=1"]
    with Testpmd(testpmd_binary, [vdev], app) as pmd:
        acked = wait_negotiated(backend)
        assert ("RING_PACKED" in _native.feature_names(acked)) == bool(packed_vq)
        assert ("IN_ORDER" in _native.feature_names(acked)) == bool(in_order)
        pmd.cmd("start")
        time.sleep(3)
        pmd.cmd("stop")
        sent = pmd.port_stats(0)

    assert sent["TX-packets"] > 1000, sent
    wait_for(
        lambda: backend.stats().tx_packets == sent["TX-packets"],
        10,
        f"backend to count {sent['TX-packets']} frames (has {backend.stats().tx_packets})",
    )
    stats = backend.stats()
    assert stats.tx_bytes == sent["TX-bytes"] == sent["TX-packets"] * frame_len
    assert (stats.rx_packets, stats.drops, stats.errors) == (0, 0, 0)


def loop_pcap_through_guest(pmd: Testpmd, count: int) -> None:
    """io forwarding between the pcap port (0) and virtio-user (1) until all ``count``
    frames came back into the pcap port; "retry" makes testpmd wait for ring space
    instead of dropping, so every frame makes the round trip."""
    pmd.cmd("set fwd io retry")
    pmd.cmd("set burst tx delay 100 retry 10000")
    pmd.cmd("start")
    wait_for(
        lambda: pmd.port_stats(0)["TX-packets"] == count,
        30,
        f"{count} frames back through the guest into the pcap port",
    )
    pmd.cmd("stop")


@pytest.mark.parametrize(
    ("queue_size", "mrg_rxbuf", "in_order", "poll_us", "packed_vq"),
    [
        (256, 0, 1, 50, 0),
        (256, 1, 1, 50, 0),
        (1024, 0, 1, 50, 0),
        (1024, 1, 1, 50, 0),
        (256, 1, 0, 50, 0),
        (1024, 0, 0, 50, 0),
        (256, 1, 1, 0, 0),
        # Packed rings, in order or not, with and without polling.
        (256, 1, 1, 50, 1),
        (1024, 0, 1, 50, 1),
        (256, 1, 0, 50, 1),
        (1024, 1, 0, 0, 1),
    ],
)
def test_loop_port_returns_every_frame_unchanged(
    testpmd_binary: str,
    make_backend: BackendFactory,
    sockdir: Path,
    mrg_rxbuf: int,
    queue_size: int,
    in_order: int,
    poll_us: int,
    packed_vq: int,
) -> None:
    frames = numbered_frames(700, (64, 1518, 590))
    sent_pcap, returned_pcap = sockdir / "sent.pcap", sockdir / "returned.pcap"
    write_pcap(sent_pcap, frames)
    backend = make_backend(port="loop", poll_us=poll_us)
    vdevs = [
        f"net_pcap0,rx_pcap={sent_pcap},tx_pcap={returned_pcap}",
        virtio_user_vdev(
            backend.socket_path,
            queue_size=queue_size,
            mrg_rxbuf=mrg_rxbuf,
            in_order=in_order,
            packed_vq=packed_vq,
        ),
    ]
    app = ["--no-flush-rx", f"--rxd={queue_size}", f"--txd={queue_size}", "--nb-cores=1"]
    with Testpmd(testpmd_binary, vdevs, app) as pmd:
        acked = wait_negotiated(backend)
        assert bool(acked & _native.F_MRG_RXBUF) == bool(mrg_rxbuf)
        assert ("IN_ORDER" in _native.feature_names(acked)) == bool(in_order)
        assert ("RING_PACKED" in _native.feature_names(acked)) == bool(packed_vq)
        loop_pcap_through_guest(pmd, len(frames))
        virtio = pmd.port_stats(1)
        pmd.quit()  # closes the pcap port, which flushes its file

    assert virtio["TX-packets"] == virtio["RX-packets"] == len(frames)
    assert read_pcap(returned_pcap) == frames
    stats = backend.stats()
    payload = sum(len(f) for f in frames)
    assert (stats.tx_packets, stats.rx_packets) == (len(frames), len(frames))
    assert (stats.tx_bytes, stats.rx_bytes) == (payload, payload)
    assert (stats.drops, stats.errors) == (0, 0)


@pytest.mark.parametrize("mrg_rxbuf", [0, 1])
def test_frames_up_to_a_9000_mtu_loop_back_whole(
    testpmd_binary: str, make_backend: BackendFactory, sockdir: Path, mrg_rxbuf: int
) -> None:
    """9014-byte frames (a 9000-byte MTU) round trip byte for byte, with either
    virtio-net header. (testpmd's pcap port needs mbufs that hold a whole frame, so the
    guest's buffers do too: a real guest merges a jumbo frame over small buffers in
    ``test_qemu_pairing.py``.)"""
    frames = numbered_frames(300, (9014, 64, 1518))
    sent_pcap, returned_pcap = sockdir / "sent.pcap", sockdir / "returned.pcap"
    write_pcap(sent_pcap, frames)
    backend = make_backend(port="loop", mtu=9000)
    vdevs = [
        f"net_pcap0,rx_pcap={sent_pcap},tx_pcap={returned_pcap}",
        virtio_user_vdev(backend.socket_path, mrg_rxbuf=mrg_rxbuf),
    ]
    app = ["--no-flush-rx", "--nb-cores=1", "--max-pkt-len=9018", "--mbuf-size=10240"]
    with Testpmd(testpmd_binary, vdevs, app) as pmd:
        acked = wait_negotiated(backend)
        assert bool(acked & _native.F_MRG_RXBUF) == bool(mrg_rxbuf)
        loop_pcap_through_guest(pmd, len(frames))
        pmd.quit()

    assert read_pcap(returned_pcap) == frames
    stats = backend.stats()
    assert (stats.tx_packets, stats.rx_packets) == (len(frames), len(frames))
    assert (stats.drops, stats.errors) == (0, 0)


def test_the_worker_stops_polling_when_traffic_stops(
    testpmd_binary: str, make_backend: BackendFactory
) -> None:
    """Polling holds a CPU only while frames move: connected and idle, the backend's
    threads (this process: pytest itself sleeps) use under 1 % of a CPU."""
    backend = make_backend(port="loop", poll_us=1000)
    vdev = virtio_user_vdev(backend.socket_path)
    app = ["--forward-mode=mac", "--nb-cores=1"]
    with Testpmd(testpmd_binary, [vdev], app) as pmd:
        wait_negotiated(backend)
        pmd.cmd("start tx_first 4")
        time.sleep(2)
        pmd.cmd("stop")
        moved = backend.stats().rx_packets
        assert moved > 10_000, f"only {moved} frames looped"
        time.sleep(0.5)
        cpu_before, wall_before = time.process_time(), time.monotonic()
        time.sleep(3)
        cpu = time.process_time() - cpu_before
        wall = time.monotonic() - wall_before
        assert cpu / wall < 0.01, f"{cpu:.3f} s of CPU in {wall:.1f} s idle"


def generated_frame(number: int, size: int, destination: str) -> bytes:
    """What `gen:SIZE` sends, as the README documents it."""
    header = bytes.fromhex(destination.replace(":", "")) + GEN_SOURCE_MAC
    body = number.to_bytes(8, "big") + bytes(i & 0xFF for i in range(size - 22))
    return header + (0x88B5).to_bytes(2, "big") + body


@pytest.mark.parametrize(("mrg_rxbuf", "packed_vq"), [(0, 0), (1, 0), (1, 1)])
def test_gen_port_sends_exactly_count_numbered_frames_to_the_guest(
    testpmd_binary: str,
    make_backend: BackendFactory,
    sockdir: Path,
    mrg_rxbuf: int,
    packed_vq: int,
) -> None:
    """The device hands the guest frames 0..count-1, in order, byte for byte.

    The guest may not see the first few: DPDK's virtio PMD fills its receive ring and
    then, still starting the port, discards whatever the device already put in it
    (``virtio_dev_start``: ``virtqueue_rxvq_flush``). The gen port starts on connection,
    so on a loaded machine up to a ring of frames lands in that window (seen: 156 and
    256 of 500). What reaches testpmd must then be exactly the frames after them.
    """
    count, size, ring = 500, 1518, 256
    empty_pcap, received_pcap = sockdir / "empty.pcap", sockdir / "received.pcap"
    write_pcap(empty_pcap, [])
    backend = make_backend(port=f"gen:{size},count={count}")
    vdevs = [
        f"net_pcap0,rx_pcap={empty_pcap},tx_pcap={received_pcap}",
        virtio_user_vdev(
            backend.socket_path, queue_size=ring, mrg_rxbuf=mrg_rxbuf, packed_vq=packed_vq
        ),
    ]
    # io forwarding: what the guest (virtio-user) receives goes into the pcap file.
    with Testpmd(testpmd_binary, vdevs, ["--no-flush-rx", "--nb-cores=1"]) as pmd:
        acked = wait_negotiated(backend)
        assert ("RING_PACKED" in _native.feature_names(acked)) == bool(packed_vq)
        pmd.cmd("set fwd io retry")
        pmd.cmd("start")
        wait_for(
            lambda: backend.stats().rx_packets == count,
            30,
            f"the device handing {count} generated frames to the guest",
        )

        def guest_done() -> bool:
            # Forwarded all it received, and received nothing more for half a second.
            forwarded, received = pmd.port_stats(0)["TX-packets"], pmd.port_stats(1)["RX-packets"]
            time.sleep(0.5)
            return forwarded == received == pmd.port_stats(1)["RX-packets"] > 0

        wait_for(guest_done, 30, "the guest forwarding all it received to the pcap port")
        time.sleep(1)  # nothing beyond the count
        pmd.cmd("stop")
        guest = pmd.port_stats(1)
        pmd.quit()  # closes the pcap port, which flushes its file

    received = read_pcap(received_pcap)
    discarded_at_start = count - len(received)
    assert 0 <= discarded_at_start <= ring, len(received)
    expected = [generated_frame(n, size, backend.mac) for n in range(count)]
    assert received == expected[discarded_at_start:]
    assert (guest["RX-packets"], guest["RX-bytes"]) == (len(received), len(received) * size)
    stats = backend.stats()
    assert (stats.rx_packets, stats.rx_bytes) == (count, count * size)
    assert (stats.tx_packets, stats.drops, stats.errors) == (0, 0, 0)


def test_gen_port_holds_its_rate(testpmd_binary: str, make_backend: BackendFactory) -> None:
    rate = 2000
    backend = make_backend(port=f"gen:64,rate={rate}")
    vdev = virtio_user_vdev(backend.socket_path)
    with Testpmd(testpmd_binary, [vdev], ["--forward-mode=rxonly", "--nb-cores=1"]) as pmd:
        wait_negotiated(backend)
        pmd.cmd("start")
        time.sleep(1)
        before, started = backend.stats().rx_packets, time.monotonic()
        time.sleep(3)
        after, elapsed = backend.stats().rx_packets, time.monotonic() - started
        pmd.cmd("stop")
        guest = pmd.port_stats(0)

    measured = (after - before) / elapsed
    # Paced on a millisecond timer: within 10 % however busy the machine is.
    assert 0.9 * rate <= measured <= 1.1 * rate, measured
    assert guest["RX-packets"] <= backend.stats().rx_packets


def test_two_queue_pairs_each_carry_their_own_traffic(
    testpmd_binary: str, make_backend: BackendFactory
) -> None:
    backend = make_backend(port="null", queues=2)
    vdev = virtio_user_vdev(backend.socket_path, queues=2)
    app = ["--forward-mode=txonly", "--rxq=2", "--txq=2", "--nb-cores=1"]
    with Testpmd(testpmd_binary, [vdev], app) as pmd:
        acked = wait_negotiated(backend)
        assert acked & _native.F_MQ
        pmd.cmd("start")
        time.sleep(3)
        pmd.cmd("stop")
        xstats = pmd.xstats(0)

    per_queue = [xstats["tx_q0_good_packets"], xstats["tx_q1_good_packets"]]
    assert min(per_queue) > 1000, xstats

    def backend_per_queue() -> list[int]:
        stats = backend.stats()
        return [q.packets for q in stats.queues if q.direction == "tx"]

    wait_for(lambda: backend_per_queue() == per_queue, 10, f"per-queue counts {per_queue}")
    assert [q.queue for q in backend.stats().queues] == [0, 1, 2, 3]


def test_loop_port_answers_on_every_queue_pair(
    testpmd_binary: str, make_backend: BackendFactory
) -> None:
    backend = make_backend(port="loop", queues=2)
    vdev = virtio_user_vdev(backend.socket_path, queues=2)
    app = ["--forward-mode=rxonly", "--rxq=2", "--txq=2", "--nb-cores=1"]
    with Testpmd(testpmd_binary, [vdev], app) as pmd:
        wait_negotiated(backend)
        # Four bursts of 32 on each queue first, then receive what comes back.
        pmd.cmd("start tx_first 4")
        wait_for(lambda: backend.stats().rx_packets == 256, 10, "256 frames back")
        pmd.cmd("stop")
        xstats = pmd.xstats(0)

    assert [xstats["tx_q0_good_packets"], xstats["tx_q1_good_packets"]] == [128, 128]
    assert [xstats["rx_q0_good_packets"], xstats["rx_q1_good_packets"]] == [128, 128]
    assert [q.packets for q in backend.stats().queues] == [128, 128, 128, 128]


def test_traffic_flows_again_after_the_frontend_reconnects(
    testpmd_binary: str, make_backend: BackendFactory
) -> None:
    backend = make_backend(port="null")
    vdev = virtio_user_vdev(backend.socket_path)
    total = 0
    for connection in (1, 2):
        with Testpmd(testpmd_binary, [vdev], ["--forward-mode=txonly", "--nb-cores=1"]) as pmd:
            wait_negotiated(backend)
            assert backend.features.connections == connection
            pmd.cmd("start")
            time.sleep(1)
            pmd.cmd("stop")
            sent = pmd.port_stats(0)["TX-packets"]
            assert sent > 0
            pmd.quit()
        total += sent
        wait_for(
            lambda expected=total: backend.stats().tx_packets == expected,
            10,
            f"{total} frames counted",
        )
        asyncio.run(backend.wait_state(["listening"], 10))

    kinds = [e.kind for e in backend.events() if e.kind in ("connected", "disconnected")]
    assert kinds == ["connected", "disconnected", "connected", "disconnected"]


def test_client_mode_waits_for_the_frontend_socket_and_reconnects(
    testpmd_binary: str, make_backend: BackendFactory
) -> None:
    # The backend starts first and retries until testpmd listens (virtio-user server=1).
    backend = make_backend(port="loop", client=True)
    asyncio.run(backend.wait_state(["connecting"], 5))
    for connection in (1, 2):
        vdev = virtio_user_vdev(backend.socket_path, server=1)
        with Testpmd(testpmd_binary, [vdev], ["--forward-mode=rxonly", "--nb-cores=1"]) as pmd:
            wait_negotiated(backend)
            assert backend.features.connections == connection
            pmd.cmd("start tx_first 2")
            wait_for(lambda: pmd.port_stats(0)["RX-packets"] == 64, 15, "64 frames back")
            pmd.quit()
        asyncio.run(backend.wait_state(["connecting"], 10))
    stats = backend.stats()
    assert (stats.tx_packets, stats.rx_packets) == (128, 128)


def test_a_prompt_broken_by_a_reconnect_notice_still_ends_the_answer() -> None:
    """testpmd writes its prompt a character at a time; a reconnect seen by its interrupt
    thread can print inside it (as a CI run of the restart test below recorded)."""
    answer = (
        "testpmd> start tx_first 1\nrxonly packet forwarding\n"
        "tvirtio_user_dev_server_reconnect(): server mode virtio-user reconnection succeeds!\n"
        "\nPort 0: link state change event\nestpmd> "
    )
    assert prompt_count(answer) == 2
    assert prompt_count("testpmd> start\nPort 0: link state change event\n") == 1


def test_a_hundred_backend_restarts_under_a_running_frontend_keep_exact_counts(
    testpmd_binary: str, sockdir: Path
) -> None:
    """testpmd's virtio-user listens (server=1) and stays up; the backend connects
    (client mode), carries one burst back, and is stopped, a hundred times: every frame
    of every burst comes back, none twice."""
    socket = sockdir / "vu.sock"
    vdev = virtio_user_vdev(str(socket), server=1)
    restarts = 100
    # The first backend starts before testpmd, which waits for it before its prompt.
    backend = StandbyBackend(socket, port="loop", client=True)
    backend.start()
    try:
        with Testpmd(testpmd_binary, [vdev], ["--forward-mode=rxonly", "--nb-cores=1"]) as pmd:
            for restart in range(1, restarts + 1):
                if restart > 1:
                    backend = StandbyBackend(socket, port="loop", client=True)
                    backend.start()
                wait_negotiated(backend)
                pmd.cmd("start tx_first 1")
                wait_for(
                    lambda expected=32 * restart: pmd.port_stats(0)["RX-packets"] == expected,
                    15,
                    f"burst {restart} back",
                )
                pmd.cmd("stop")
                stats = backend.stats()
                assert (stats.tx_packets, stats.rx_packets, stats.drops) == (32, 32, 0), stats
                backend.stop()
            totals = pmd.port_stats(0)
            pmd.quit()
    finally:
        backend.stop()
    assert (totals["TX-packets"], totals["RX-packets"]) == (32 * restarts, 32 * restarts)


@pytest.mark.dpdk
def test_one_event_loop_waits_on_many_backends_without_a_thread_each(
    make_backend: BackendFactory, testpmd_binary: str
) -> None:
    """An embedder serving a host's standbys from one asyncio loop: 20 pending waits
    hold no thread (they watch each device's eventfd), and a frontend connecting to
    one wakes that one only."""
    backends = [
        make_backend(f"s{index}.sock", port="loop", mac=f"52:54:00:00:01:{index:02x}")
        for index in range(20)
    ]

    def connect_testpmd() -> None:
        vdev = virtio_user_vdev(backends[7].socket_path)
        with Testpmd(testpmd_binary, [vdev], ["--forward-mode=rxonly"]) as pmd:
            pmd.cmd("start tx_first 1")
            wait_for(lambda: pmd.port_stats(0)["RX-packets"] == 32, 15, "32 frames back")
            pmd.quit()

    async def scenario() -> None:
        threads = threading.active_count()
        waits = [asyncio.create_task(b.wait_connected(60)) for b in backends]
        await asyncio.sleep(0.3)
        assert threading.active_count() == threads, "no thread per pending wait"
        assert not any(w.done() for w in waits)
        await asyncio.to_thread(connect_testpmd)
        await asyncio.wait_for(waits[7], 5)
        assert [index for index, w in enumerate(waits) if w.done()] == [7]
        for w in waits:
            w.cancel()

    asyncio.run(scenario())
    assert backends[7].stats().rx_packets == backends[7].stats().tx_packets == 32
    assert all(b.stats().tx_packets == 0 for b in backends if b is not backends[7])
