"""Write the seed corpus of both fuzz targets: a few well-formed inputs the fuzzer
mutates from (it rarely builds a valid ring or session from nothing).

Run: ``python3 fuzz/seeds.py`` (rewrites fuzz/corpus/*/seed-*).
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUEUE_SIZE = 16
RX, TX = 0x0, 0x800
NEXT, WRITE, INDIRECT = 1, 2, 4


def descriptor(addr: int, length: int, flags: int, next_index: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, next_index)


def ring(chains: list[list[tuple[int, int, int]]]) -> bytes:
    """A descriptor table with ``chains`` (addr, len, flags) and an available ring
    offering each chain's head."""
    table = b""
    heads = []
    for chain in chains:
        first = len(table) // 16
        heads.append(first)
        for i, (addr, length, flags) in enumerate(chain):
            last = i == len(chain) - 1
            table += descriptor(addr, length, flags | (0 if last else NEXT), first + i + 1)
    table = table.ljust(16 * QUEUE_SIZE, b"\0")
    avail = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    return table + avail.ljust(6 + 2 * QUEUE_SIZE, b"\0")


PACKED_AVAIL = 1 << 7  # available in the driver's round 1
PACKED = 16 | 32  # option bits: packed rings, starting in round 1


def packed_ring(chains: list[list[tuple[int, int, int]]]) -> bytes:
    """A packed descriptor ring with ``chains`` (addr, len, flags) made available
    one after the other, each descriptor carrying its chain's id."""
    table = b""
    for chain_id, chain in enumerate(chains):
        for i, (addr, length, flags) in enumerate(chain):
            last = i == len(chain) - 1
            flags |= PACKED_AVAIL | (0 if last else NEXT)
            table += struct.pack("<QIHH", addr, length, chain_id, flags)
    return table.ljust(16 * QUEUE_SIZE, b"\0")


def memory(rx: bytes, tx: bytes, buffers: dict[int, bytes]) -> bytes:
    image = bytearray(0x4000)
    image[RX : RX + len(rx)] = rx
    image[TX : TX + len(tx)] = tx
    for addr, data in buffers.items():
        image[addr : addr + len(data)] = data
    return bytes(image)


def frame(length: int) -> bytes:
    return bytes(12) + bytes(i & 0xFF for i in range(length))


def walk_rings_seeds() -> list[bytes]:
    seeds = []
    # One frame out, one buffer in; mergeable, header 12, event index.
    seeds.append(
        bytes([7])
        + memory(
            ring([[(0x2000, 2048, WRITE)]]),
            ring([[(0x3000, 72, 0)]]),
            {0x3000: frame(60)},
        )
    )
    # A frame over three descriptors, two receive chains of small buffers.
    seeds.append(
        bytes([6])
        + memory(
            ring([[(0x2000, 40, WRITE)], [(0x2100, 40, WRITE), (0x2200, 40, WRITE)]]),
            ring([[(0x3000, 12, 0), (0x3100, 30, 0), (0x3200, 30, 0)]]),
            {0x3000: bytes(12), 0x3100: bytes(range(30)), 0x3200: bytes(range(30))},
        )
    )
    # An indirect table for the frame.
    indirect = descriptor(0x3000, 12, NEXT, 1) + descriptor(0x3100, 60, 0)
    seeds.append(
        bytes([5])
        + memory(
            ring([[(0x2000, 2048, WRITE)]]),
            ring([[(0x3800, len(indirect), INDIRECT)]]),
            {0x3800: indirect, 0x3000: bytes(12), 0x3100: bytes(range(60))},
        )
    )
    # The same three on packed rings.
    seeds.append(
        bytes([7 | PACKED])
        + memory(
            packed_ring([[(0x2000, 2048, WRITE)]]),
            packed_ring([[(0x3000, 72, 0)]]),
            {0x3000: frame(60)},
        )
    )
    seeds.append(
        bytes([6 | PACKED])
        + memory(
            packed_ring([[(0x2000, 40, WRITE)], [(0x2100, 40, WRITE), (0x2200, 40, WRITE)]]),
            packed_ring([[(0x3000, 12, 0), (0x3100, 30, 0), (0x3200, 30, 0)]]),
            {0x3000: bytes(12), 0x3100: bytes(range(30)), 0x3200: bytes(range(30))},
        )
    )
    packed_indirect = struct.pack("<QIHH", 0x3000, 12, 0, 0) + struct.pack(
        "<QIHH", 0x3100, 60, 0, 0
    )
    seeds.append(
        bytes([5 | PACKED])
        + memory(
            packed_ring([[(0x2000, 2048, WRITE)]]),
            packed_ring([[(0x3800, len(packed_indirect), INDIRECT)]]),
            {0x3800: packed_indirect, 0x3000: bytes(12), 0x3100: bytes(range(60))},
        )
    )
    return seeds


def request(code: int, body: bytes = b"", flags: int = 1) -> bytes:
    return struct.pack("<III", code, flags, len(body)) + body


def session_seeds() -> list[bytes]:
    return session(packed=False) + session(packed=True)[:1]


def session(packed: bool) -> list[bytes]:
    user = 0x7F00_0000_0000
    features = (1 << 32) | (1 << 30) | (1 << 34 if packed else 0)  # VERSION_1, RING_PACKED
    ring_base = 0x8000_8000 if packed else 0  # QEMU's packed base: both halves at round 1
    setup = [
        request(3),  # SET_OWNER
        request(1),  # GET_FEATURES
        request(15),  # GET_PROTOCOL_FEATURES
        request(16, struct.pack("<Q", 1 << 3)),  # SET_PROTOCOL_FEATURES: REPLY_ACK
        request(2, struct.pack("<Q", features)),  # SET_FEATURES
        request(5, struct.pack("<IIQQQQ", 1, 0, 0, 0x10000, user, 0), flags=1 | 8),
    ]
    for queue, base in ((0, 0x0), (1, 0x800)):
        avail = base + 16 * QUEUE_SIZE
        used = (avail + 6 + 2 * QUEUE_SIZE + 3) & ~3
        setup += [
            request(8, struct.pack("<II", queue, QUEUE_SIZE)),  # SET_VRING_NUM
            request(9, struct.pack("<IIQQQQ", queue, 0, user + base, user + used, user + avail, 0)),
            request(10, struct.pack("<II", queue, ring_base)),  # SET_VRING_BASE
            request(13, struct.pack("<Q", queue)),  # SET_VRING_CALL
            request(12, struct.pack("<Q", queue)),  # SET_VRING_KICK
            request(18, struct.pack("<II", queue, 1)),  # SET_VRING_ENABLE
        ]
    full = b"".join(setup)
    return [full, full + request(11, struct.pack("<II", 0, 0)), b"".join(setup[:5])]


def main() -> None:
    for target, seeds in (
        ("walk_rings", walk_rings_seeds()),
        ("vhost_user_session", session_seeds()),
    ):
        directory = HERE / "corpus" / target
        directory.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seeds):
            (directory / f"seed-{index}").write_bytes(seed)


if __name__ == "__main__":
    main()
