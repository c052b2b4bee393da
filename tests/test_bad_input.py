"""Bad input from a frontend: rejected with a clear reason, nothing lost, next one served.

The malformed messages come from a small fake frontend (tests/vhost_user_client.py),
since no real frontend sends them. After each one the backend must close that
connection (vhost-user has no way to resync a byte stream), say why, and accept the
next frontend; the last test runs real DPDK traffic after a series of them.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Iterator

import pytest

from conftest import BackendFactory
from failover_backend import StandbyBackend
from testpmd import Testpmd, virtio_user_vdev, wait_for
from vhost_user_client import (
    GET_FEATURES,
    SET_FEATURES,
    SET_VRING_CALL,
    SET_VRING_KICK,
    SharedMemory,
    VhostUserClient,
)

MIB = 1 << 20


@pytest.fixture
def backend(make_backend: BackendFactory) -> StandbyBackend:
    return make_backend(port="loop")


@pytest.fixture
def memory() -> Iterator[SharedMemory]:
    shm = SharedMemory(MIB)
    yield shm
    shm.close()


def assert_closed(client: VhostUserClient) -> None:
    assert client.is_closed_by_peer(), "the backend must close a connection it cannot trust"


def assert_serves_next_frontend(backend: StandbyBackend) -> None:
    asyncio.run(backend.wait_state(["listening"], 10))
    with VhostUserClient(backend.socket_path) as client:
        assert client.handshake() == backend.features.offered
    asyncio.run(backend.wait_state(["listening"], 10))


def last_disconnect_reason(backend: StandbyBackend) -> str | None:
    for _ in range(100):
        closed = [e for e in backend.events() if e.kind == "disconnected"]
        if closed:
            reason = closed[-1].details["reason"]
            return None if reason is None else str(reason)
        time.sleep(0.05)
    raise AssertionError("no disconnect event")


def test_truncated_header(backend: StandbyBackend) -> None:
    with VhostUserClient(backend.socket_path) as client:
        client.send_raw(struct.pack("<II", GET_FEATURES, 1))  # 8 of 12 header bytes
    assert_serves_next_frontend(backend)


def test_truncated_body(backend: StandbyBackend) -> None:
    with VhostUserClient(backend.socket_path) as client:
        client.send(SET_FEATURES, b"\x00" * 8)  # fine
        client.send_raw(struct.pack("<III", SET_FEATURES, 1, 8) + b"\x00" * 4)
    assert_serves_next_frontend(backend)


def test_oversized_message(backend: StandbyBackend) -> None:
    with VhostUserClient(backend.socket_path) as client:
        client.send_raw(struct.pack("<III", SET_FEATURES, 1, 64 * MIB) + b"\x00" * 4096)
        assert_closed(client)
    assert last_disconnect_reason(backend)
    assert_serves_next_frontend(backend)


def test_unknown_request_code(backend: StandbyBackend) -> None:
    with VhostUserClient(backend.socket_path) as client:
        client.handshake()
        client.send(9999, b"\x00" * 8)
        assert_closed(client)
    reason = last_disconnect_reason(backend)
    assert reason is not None and "request refused" in reason
    assert_serves_next_frontend(backend)


def test_vring_address_outside_the_memory_table(
    backend: StandbyBackend, memory: SharedMemory
) -> None:
    with VhostUserClient(backend.socket_path) as client:
        client.handshake()
        region = (0, MIB, SharedMemory.USER_ADDR, 0)
        assert client.set_mem_table([region], [memory.fd]) == 0
        assert client.set_vring_num(0, 16) == 0
        outside = SharedMemory.USER_ADDR + 16 * MIB
        assert client.set_vring_addr(0, outside, outside + 0x1000, outside + 0x2000) == 1, "NACK"
        assert_closed(client)
    assert last_disconnect_reason(backend)
    assert_serves_next_frontend(backend)


@pytest.mark.parametrize("kind", ["pipe", "memfd-too-small", "no-fd"])
def test_memory_table_that_cannot_be_mapped(backend: StandbyBackend, kind: str) -> None:
    with VhostUserClient(backend.socket_path) as client:
        client.handshake()
        region = (0, MIB, SharedMemory.USER_ADDR, 0)
        if kind == "pipe":
            read_end, write_end = os.pipe()
            try:
                assert client.set_mem_table([region], [read_end]) == 1, "NACK"
            finally:
                os.close(read_end)
                os.close(write_end)
        elif kind == "memfd-too-small":
            small = SharedMemory(MIB // 2)  # mapping past its end would fault on access
            try:
                assert client.set_mem_table([region], [small.fd]) == 1, "NACK"
            finally:
                small.close()
        else:
            client.set_mem_table([region], [], ack=False)
        assert_closed(client)
    assert last_disconnect_reason(backend)
    assert_serves_next_frontend(backend)


def test_descriptor_outside_guest_memory_is_dropped_and_counted(
    backend: StandbyBackend, memory: SharedMemory
) -> None:
    """A bad descriptor is a bad request, not a bad connection: it is completed empty,
    counted, and the next frame on the same queue goes through."""
    rx_ring, tx_ring, size = 0x1000, 0x4000, 16
    kicks = [os.eventfd(0), os.eventfd(0)]
    calls = [os.eventfd(0), os.eventfd(0)]
    user = SharedMemory.USER_ADDR

    def add_chain(ring: int, index: int, addr: int, length: int, writable: bool) -> None:
        memory.write(ring + 16 * index, struct.pack("<QIHH", addr, length, 2 if writable else 0, 0))
        avail = ring + 16 * size
        idx = memory.u16(avail + 2)
        memory.write(avail + 4 + 2 * (idx % size), struct.pack("<H", index))
        memory.write(avail + 2, struct.pack("<H", idx + 1))

    def used_entry(ring: int, i: int) -> tuple[int, int]:
        used = ring + 16 * size + 4 + 2 * size + 2
        used = (used + 3) & ~3
        entry: tuple[int, int] = struct.unpack("<II", memory.read(used + 4 + 8 * i, 8))
        return entry

    def used_idx(ring: int) -> int:
        used = ((ring + 16 * size + 4 + 2 * size + 2) + 3) & ~3
        return memory.u16(used + 2)

    try:
        with VhostUserClient(backend.socket_path) as client:
            client.handshake()
            assert client.set_mem_table([(0, MIB, user, 0)], [memory.fd]) == 0
            for queue, ring in ((0, rx_ring), (1, tx_ring)):
                avail = ring + 16 * size
                used = ((avail + 4 + 2 * size + 2) + 3) & ~3
                assert client.set_vring_num(queue, size) == 0
                assert client.set_vring_addr(queue, user + ring, user + used, user + avail) == 0
                assert client.set_vring_base(queue, 0) == 0
                assert client.set_vring_fd(SET_VRING_CALL, queue, calls[queue]) == 0
                assert client.set_vring_fd(SET_VRING_KICK, queue, kicks[queue]) == 0
                assert client.set_vring_enable(queue, True) == 0

            add_chain(tx_ring, 0, 64 * MIB, 72, writable=False)  # far outside 1 MiB
            os.eventfd_write(kicks[1], 1)
            wait_for(lambda: used_idx(tx_ring) == 1, 10, "the bad chain completed")
            assert used_entry(tx_ring, 0) == (0, 0)
            stats = backend.stats()
            assert (stats.tx_packets, stats.errors) == (0, 1)

            frame = bytes(12) + bytes(range(60))
            memory.write(0x10000, frame)
            add_chain(rx_ring, 0, 0x20000, 2048, writable=True)
            add_chain(tx_ring, 1, 0x10000, len(frame), writable=False)
            os.eventfd_write(kicks[1], 1)
            wait_for(lambda: used_idx(rx_ring) == 1, 10, "the good frame looped back")
            assert used_entry(rx_ring, 0) == (0, 72)
            assert memory.read(0x20000 + 12, 60) == frame[12:]
            assert backend.state == "connected", "the connection survives a bad descriptor"
    finally:
        for fd in kicks + calls:
            os.close(fd)
    stats = backend.stats()
    assert (stats.tx_packets, stats.rx_packets, stats.errors) == (1, 1, 1)


@pytest.mark.dpdk
def test_real_traffic_after_a_series_of_bad_frontends(
    backend: StandbyBackend, memory: SharedMemory, testpmd_binary: str
) -> None:
    for bad in (b"\x01\x00", struct.pack("<III", 9999, 1, 0), struct.pack("<III", 2, 1, 1 << 30)):
        with VhostUserClient(backend.socket_path) as client:
            client.send_raw(bad)
        asyncio.run(backend.wait_state(["listening"], 10))
    vdev = virtio_user_vdev(backend.socket_path)
    with Testpmd(testpmd_binary, [vdev], ["--forward-mode=rxonly", "--nb-cores=1"]) as pmd:
        pmd.cmd("start tx_first 3")
        wait_for(lambda: pmd.port_stats(0)["RX-packets"] == 96, 15, "96 frames back")
    assert backend.stats().rx_packets == 96
