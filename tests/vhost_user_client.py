"""A tiny vhost-user frontend for fault injection.

It exists only to send what no real frontend sends: truncated and oversized
messages, unknown requests, rings outside the memory table, unmappable memory.
Real traffic in the tests comes from DPDK and QEMU, not from here.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from pathlib import Path
from types import TracebackType

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
SET_VRING_KICK = 12
SET_VRING_CALL = 13
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
SET_VRING_ENABLE = 18
ADD_MEM_REG = 37

VERSION = 0x1
REPLY = 0x4
NEED_REPLY = 0x8

F_VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_LOG_SHMFD = 1 << 1

_HEADER = struct.Struct("<III")


class VhostUserClient:
    """One connection to a vhost-user backend."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> VhostUserClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- framing -------------------------------------------------------------

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def send(
        self, request: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 0
    ) -> None:
        self.send_raw(_HEADER.pack(request, VERSION | flags, len(payload)) + payload, fds)

    def recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def reply(self, request: int) -> bytes:
        code, flags, size = _HEADER.unpack(self.recv_exact(_HEADER.size))
        assert code == request and flags & REPLY, (code, flags)
        return self.recv_exact(size)

    def is_closed_by_peer(self) -> bool:
        """True when the backend closed this connection (reads EOF or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- requests ------------------------------------------------------------

    def get_u64(self, request: int) -> int:
        self.send(request)
        value: int = struct.unpack("<Q", self.reply(request))[0]
        return value

    def set_u64(self, request: int, value: int, *, ack: bool = False) -> int | None:
        self.send(request, struct.pack("<Q", value), flags=NEED_REPLY if ack else 0)
        return self.get_ack(request) if ack else None

    def get_ack(self, request: int) -> int:
        value: int = struct.unpack("<Q", self.reply(request))[0]
        return value

    def handshake(self) -> int:
        """SET_OWNER, features and REPLY_ACK; returns the offered features."""
        self.send(SET_OWNER)
        features = self.get_u64(GET_FEATURES)
        self.get_u64(GET_PROTOCOL_FEATURES)
        self.set_u64(SET_PROTOCOL_FEATURES, PROTOCOL_F_REPLY_ACK)
        acked = self.set_u64(SET_FEATURES, F_VERSION_1 | F_PROTOCOL_FEATURES, ack=True)
        assert acked == 0
        return features

    def set_mem_table(
        self, regions: list[tuple[int, int, int, int]], fds: list[int], *, ack: bool = True
    ) -> int | None:
        """``regions``: (guest address, size, user address, mmap offset)."""
        body = struct.pack("<II", len(regions), 0)
        for region in regions:
            body += struct.pack("<QQQQ", *region)
        self.send(SET_MEM_TABLE, body, fds, flags=NEED_REPLY if ack else 0)
        return self.get_ack(SET_MEM_TABLE) if ack else None

    def set_vring_num(self, index: int, num: int) -> int:
        self.send(SET_VRING_NUM, struct.pack("<II", index, num), flags=NEED_REPLY)
        return self.get_ack(SET_VRING_NUM)

    def set_vring_base(self, index: int, base: int) -> int:
        self.send(SET_VRING_BASE, struct.pack("<II", index, base), flags=NEED_REPLY)
        return self.get_ack(SET_VRING_BASE)

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> int:
        body = struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0)
        self.send(SET_VRING_ADDR, body, flags=NEED_REPLY)
        return self.get_ack(SET_VRING_ADDR)

    def set_vring_fd(self, request: int, index: int, fd: int) -> int:
        self.send(request, struct.pack("<Q", index), [fd], flags=NEED_REPLY)
        return self.get_ack(request)

    def set_vring_enable(self, index: int, enable: bool) -> int:
        self.send(SET_VRING_ENABLE, struct.pack("<II", index, int(enable)), flags=NEED_REPLY)
        return self.get_ack(SET_VRING_ENABLE)


class SharedMemory:
    """Guest RAM as a memfd both sides map."""

    #: What the fake frontend calls its own address of guest RAM.
    USER_ADDR = 0x7F00_0000_0000

    def __init__(self, size: int, flags: int = os.MFD_CLOEXEC) -> None:
        self.size = size
        self.fd = os.memfd_create("fake-guest-ram", flags)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def write(self, addr: int, data: bytes) -> None:
        self.map[addr : addr + len(data)] = data

    def read(self, addr: int, size: int) -> bytes:
        return self.map[addr : addr + size]

    def u16(self, addr: int) -> int:
        value: int = struct.unpack_from("<H", self.map, addr)[0]
        return value


class SplitRings:
    """Split virtqueues the fake frontend lays out in :class:`SharedMemory` and sets up
    over a connection: descriptor table, then available ring, then used ring."""

    def __init__(self, memory: SharedMemory, bases: dict[int, int], size: int = 16) -> None:
        self.memory = memory
        self.bases = bases
        self.size = size
        self.kicks = {queue: os.eventfd(0) for queue in bases}
        self.calls = {queue: os.eventfd(0) for queue in bases}

    def close(self) -> None:
        for fd in [*self.kicks.values(), *self.calls.values()]:
            os.close(fd)

    def avail(self, queue: int) -> int:
        return self.bases[queue] + 16 * self.size

    def used(self, queue: int) -> int:
        return (self.avail(queue) + 4 + 2 * self.size + 2 + 3) & ~3

    def set_up(self, client: VhostUserClient) -> None:
        """Fresh rings (indexes at 0), then the requests that set them up."""
        for queue, base in self.bases.items():
            self.memory.write(base, bytes(self.used(queue) + 6 + 8 * self.size - base))
        user = SharedMemory.USER_ADDR
        for queue, base in self.bases.items():
            assert client.set_vring_num(queue, self.size) == 0
            assert (
                client.set_vring_addr(
                    queue, user + base, user + self.used(queue), user + self.avail(queue)
                )
                == 0
            )
            assert client.set_vring_base(queue, 0) == 0
            assert client.set_vring_fd(SET_VRING_CALL, queue, self.calls[queue]) == 0
            assert client.set_vring_fd(SET_VRING_KICK, queue, self.kicks[queue]) == 0
            assert client.set_vring_enable(queue, True) == 0

    def descriptor(
        self, queue: int, index: int, addr: int, length: int, *, writable: bool, next: int | None
    ) -> None:
        flags = (2 if writable else 0) | (1 if next is not None else 0)
        self.memory.write(
            self.bases[queue] + 16 * index, struct.pack("<QIHH", addr, length, flags, next or 0)
        )

    def make_available(self, queue: int, head: int) -> None:
        avail = self.avail(queue)
        idx = self.memory.u16(avail + 2)
        self.memory.write(avail + 4 + 2 * (idx % self.size), struct.pack("<H", head))
        self.memory.write(avail + 2, struct.pack("<H", (idx + 1) & 0xFFFF))

    def add_chain(self, queue: int, index: int, addr: int, length: int, *, writable: bool) -> None:
        """One descriptor, made available."""
        self.descriptor(queue, index, addr, length, writable=writable, next=None)
        self.make_available(queue, index)

    def kick(self, queue: int) -> None:
        os.eventfd_write(self.kicks[queue], 1)

    def used_idx(self, queue: int) -> int:
        return self.memory.u16(self.used(queue) + 2)

    def used_entry(self, queue: int, i: int) -> tuple[int, int]:
        entry: tuple[int, int] = struct.unpack(
            "<II", self.memory.read(self.used(queue) + 4 + 8 * i, 8)
        )
        return entry
