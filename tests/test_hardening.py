"""A frontend or a guest that misbehaves on purpose: the standby neither crashes, nor
leaks, nor locks the next frontend out, nor answers what it does not do.

The peer is the small fake frontend (tests/vhost_user_client.py), since no real
frontend sends any of this; each test ends with the next frontend served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import BackendFactory
from failover_backend import StandbyBackend
from testpmd import wait_for
from vhost_user_client import (
    ADD_MEM_REG,
    GET_FEATURES,
    SET_LOG_BASE,
    SET_VRING_BASE,
    SET_VRING_NUM,
    SharedMemory,
    SplitRings,
    VhostUserClient,
)

MIB = 1 << 20
DEADLINE = 0.5
RX, TX = 0, 1


@pytest.fixture
def backend(make_backend: BackendFactory) -> StandbyBackend:
    return make_backend(port="null", handshake_timeout=DEADLINE)


@pytest.fixture
def memory() -> Iterator[SharedMemory]:
    shm = SharedMemory(MIB)
    yield shm
    shm.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def disconnect_reasons(backend: StandbyBackend, count: int = 1) -> list[str | None]:
    """The reasons of the next ``count`` disconnects."""
    reasons: list[str | None] = []
    deadline = time.monotonic() + 10
    while len(reasons) < count and time.monotonic() < deadline:
        for event in backend.events():
            if event.kind == "disconnected":
                reason = event.details["reason"]
                reasons.append(None if reason is None else str(reason))
        time.sleep(0.02)
    assert len(reasons) >= count, f"{len(reasons)} disconnects, not {count}"
    return reasons


def assert_serves_next_frontend(backend: StandbyBackend) -> None:
    asyncio.run(backend.wait_state(["listening"], 10))
    with VhostUserClient(backend.socket_path) as client:
        assert client.handshake() == backend.features.offered
    asyncio.run(backend.wait_state(["listening"], 10))


def test_connections_leave_no_descriptor_behind(
    backend: StandbyBackend, memory: SharedMemory
) -> None:
    def cycles(count: int, set_up: bool) -> None:
        for _ in range(count):
            with VhostUserClient(backend.socket_path) as client:
                if set_up:
                    client.handshake()
                    assert (
                        client.set_mem_table([(0, MIB, SharedMemory.USER_ADDR, 0)], [memory.fd])
                        == 0
                    )
            asyncio.run(backend.wait_state(["listening"], 10))

    cycles(5, set_up=True)  # warm up: threads, sockets made once
    before = open_fds()
    cycles(200, set_up=False)
    cycles(50, set_up=True)
    after = open_fds()
    assert after - before <= 2, f"descriptors {before} -> {after}"
    assert backend.features.connections == 255
    assert backend.state == "listening" and backend.failure is None


@pytest.mark.parametrize(
    ("what", "sends", "says"),
    [
        ("nothing", b"", "sent no request within 0.5 s of connecting"),
        ("half a header", struct.pack("<I", GET_FEATURES), "left a request unfinished for 0.5 s"),
        (
            "half a body",
            struct.pack("<III", SET_VRING_NUM, 1, 8) + b"\x00" * 4,
            "left a request unfinished for 0.5 s",
        ),
    ],
)
def test_a_silent_peer_cannot_lock_the_next_frontend_out(
    backend: StandbyBackend, what: str, sends: bytes, says: str
) -> None:
    with VhostUserClient(backend.socket_path) as client:
        if sends:
            client.send_raw(sends)
        started = time.monotonic()
        assert client.is_closed_by_peer(), what
        assert DEADLINE <= time.monotonic() - started < DEADLINE + 2
    assert disconnect_reasons(backend) == [f"the frontend {says}"], what
    assert_serves_next_frontend(backend)


def test_an_idle_frontend_stays_connected(backend: StandbyBackend) -> None:
    with VhostUserClient(backend.socket_path) as client:
        client.handshake()
        time.sleep(4 * DEADLINE)
        assert client.get_u64(GET_FEATURES) == backend.features.offered
    assert disconnect_reasons(backend) == [None]


def test_a_second_frontend_is_turned_away_at_once_while_one_is_served(
    backend: StandbyBackend,
) -> None:
    with VhostUserClient(backend.socket_path) as first:
        first.handshake()
        with VhostUserClient(backend.socket_path) as second:
            started = time.monotonic()
            assert second.is_closed_by_peer()
            assert time.monotonic() - started < 1
        assert first.get_u64(GET_FEATURES) == backend.features.offered, "first unharmed"
    refused = [e for e in backend.events() if e.kind == "refused"]
    assert len(refused) == 1 and "one at a time" in refused[0].message


@pytest.mark.parametrize(
    ("request_code", "body", "says"),
    [
        (SET_VRING_NUM, struct.pack("<II", 0, 3), "SET_VRING_NUM 3 for ring 0"),
        (SET_VRING_NUM, struct.pack("<II", 0, 4096), "SET_VRING_NUM 4096 for ring 0"),
        (SET_VRING_NUM, struct.pack("<II", 7, 16), "SET_VRING_NUM for ring 7 of 2"),
        (SET_VRING_BASE, struct.pack("<II", 1, 70000), "SET_VRING_BASE 70000 for ring 1"),
        (ADD_MEM_REG, bytes(40), "memory slots were not negotiated"),
    ],
)
def test_what_the_device_cannot_do_is_refused_not_acked(
    backend: StandbyBackend,
    caplog: pytest.LogCaptureFixture,
    request_code: int,
    body: bytes,
    says: str,
) -> None:
    with caplog.at_level(logging.WARNING), VhostUserClient(backend.socket_path) as client:
        client.handshake()
        # Asked for a reply: a NACK, and the connection goes on.
        client.send(request_code, body, flags=0x8)
        assert client.get_ack(request_code) != 0
        assert client.get_u64(GET_FEATURES) == backend.features.offered
        # Not asked: closed, with the reason.
        client.send(request_code, body)
        assert client.is_closed_by_peer()
    assert any(says in r.getMessage() for r in caplog.records), caplog.text
    (reason,) = disconnect_reasons(backend)
    assert reason is not None and says in reason
    assert_serves_next_frontend(backend)


def test_too_many_descriptors_with_one_message_close_with_a_reason(backend: StandbyBackend) -> None:
    pipes = [os.pipe() for _ in range(17)]
    fds = [fd for pair in pipes for fd in pair][:33]
    try:
        with VhostUserClient(backend.socket_path) as client:
            client.send(SET_VRING_NUM, struct.pack("<II", 0, 16), fds)
            assert client.is_closed_by_peer()
    finally:
        for pair in pipes:
            for fd in pair:
                os.close(fd)
    assert disconnect_reasons(backend) == [
        "the frontend sent more than 32 file descriptors with one request"
    ]
    assert_serves_next_frontend(backend)


def test_a_dirty_log_shorter_than_its_mapping_is_refused(backend: StandbyBackend) -> None:
    log = os.memfd_create("fake-log")
    os.ftruncate(log, 4096)
    try:
        with VhostUserClient(backend.socket_path) as client:
            client.handshake()
            client.send(SET_LOG_BASE, struct.pack("<QQ", 2 * 4096, 0), [log])
            assert client.is_closed_by_peer()
    finally:
        os.close(log)
    (reason,) = disconnect_reasons(backend)
    assert reason is not None and "SET_LOG_BASE refused: dirty log: 0x2000 bytes" in reason
    assert_serves_next_frontend(backend)


def rings_with_traffic(
    backend: StandbyBackend, memory: SharedMemory, client: VhostUserClient
) -> SplitRings:
    client.handshake()
    assert client.set_mem_table([(0, memory.size, SharedMemory.USER_ADDR, 0)], [memory.fd]) == 0
    rings = SplitRings(memory, {RX: 0x1000, TX: 0x4000})
    rings.set_up(client)
    return rings


def test_guest_memory_that_shrinks_under_the_backend_closes_the_connection(
    backend: StandbyBackend,
) -> None:
    # A memfd that takes no seals (as DPDK's): the frontend can shrink it.
    memory = SharedMemory(MIB)
    try:
        with VhostUserClient(backend.socket_path) as client:
            rings = rings_with_traffic(backend, memory, client)
            os.ftruncate(memory.fd, 4096)  # the rings now lie past the end of the file
            rings.kick(TX)
            assert client.is_closed_by_peer()
            rings.close()
    finally:
        memory.map.close()
        os.close(memory.fd)
    (reason,) = disconnect_reasons(backend)
    assert reason is not None and "a guest memory file shrank under its mapping" in reason
    assert_serves_next_frontend(backend)


def test_guest_memory_that_takes_seals_is_sealed_against_shrinking(
    backend: StandbyBackend,
) -> None:
    memory = SharedMemory(MIB, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with VhostUserClient(backend.socket_path) as client:
            rings_with_traffic(backend, memory, client).close()
            with pytest.raises(PermissionError):
                os.ftruncate(memory.fd, 4096)
    finally:
        memory.close()


def test_a_bad_ring_is_reported_once_not_per_kick(
    backend: StandbyBackend, memory: SharedMemory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG), VhostUserClient(backend.socket_path) as client:
        rings = rings_with_traffic(backend, memory, client)
        # The used ring runs past the end of guest memory.
        end = SharedMemory.USER_ADDR + MIB
        assert client.set_vring_addr(TX, end - 0x1000, end - 0x10, end - 0x800) == 0
        for _ in range(1000):
            rings.kick(TX)
        time.sleep(0.5)
        assert backend.state == "connected"
        rings.close()
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1, "\n".join(r.getMessage() for r in problems)
    message = problems[0].getMessage()
    assert message.count("virtqueue 1") == 1 and "outside guest memory" in message, message


def test_malformed_transmit_chains_are_counted_not_forwarded(
    backend: StandbyBackend, memory: SharedMemory
) -> None:
    with VhostUserClient(backend.socket_path) as client:
        rings = rings_with_traffic(backend, memory, client)
        # A loop: descriptor 0 -> 1 -> 0.
        rings.descriptor(TX, 0, 0x10000, 40, writable=False, next=1)
        rings.descriptor(TX, 1, 0x10100, 40, writable=False, next=0)
        rings.make_available(TX, 0)
        # A next index past the ring.
        rings.descriptor(TX, 2, 0x10000, 40, writable=False, next=200)
        rings.make_available(TX, 2)
        # Frames of 12 and 13 bytes after the 12-byte header.
        rings.add_chain(TX, 3, 0x10000, 12 + 12, writable=False)
        rings.add_chain(TX, 4, 0x10000, 12 + 13, writable=False)
        # And one real frame.
        rings.add_chain(TX, 5, 0x10000, 12 + 60, writable=False)
        rings.kick(TX)
        wait_for(lambda: rings.used_idx(TX) == 5, 10, "every chain completed")
        assert [rings.used_entry(TX, i) for i in range(5)] == [
            (0, 0),
            (2, 0),
            (3, 0),
            (4, 0),
            (5, 0),
        ]
        rings.close()
    stats = backend.stats()
    assert (stats.tx_packets, stats.errors) == (1, 4), stats


def test_the_socket_path_is_never_deleted_and_the_socket_is_private(
    make_backend: BackendFactory, sockdir: Path
) -> None:
    precious = sockdir / "passwd"
    precious.write_text("root:x:0:0\n")
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    datagram.bind(str(sockdir / "dgram"))
    os.mkfifo(sockdir / "fifo")
    (sockdir / "link").symlink_to(precious)
    try:
        for name, says in (
            ("passwd", "a regular file is there"),
            ("dgram", "a socket of another kind"),
            ("fifo", "a FIFO is there"),
            ("link", "a symbolic link is there"),
        ):
            with pytest.raises(Exception, match=says):
                make_backend(name)
    finally:
        datagram.close()
    assert precious.read_text() == "root:x:0:0\n"
    assert (sockdir / "link").is_symlink() and (sockdir / "fifo").exists()

    old = os.umask(0)
    try:
        private = make_backend("private.sock")
        shared = make_backend("shared.sock", socket_mode=0o660, socket_group=os.getgid())
    finally:
        os.umask(old)
    assert os.stat(private.socket_path).st_mode & 0o777 == 0o600
    assert os.stat(shared.socket_path).st_mode & 0o777 == 0o660
    assert os.stat(shared.socket_path).st_gid == os.getgid()
