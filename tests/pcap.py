"""Minimal pcap files: frames in for DPDK's pcap PMD, frames out to compare."""

from __future__ import annotations

import struct
from pathlib import Path

_GLOBAL_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")
_MAGIC = 0xA1B2C3D4
_MAGIC_NANOSECONDS = 0xA1B23C4D  # what DPDK's pcap port writes
_LINKTYPE_ETHERNET = 1


def write_pcap(path: Path, frames: list[bytes]) -> None:
    with path.open("wb") as f:
        f.write(_GLOBAL_HEADER.pack(_MAGIC, 2, 4, 0, 0, 65535, _LINKTYPE_ETHERNET))
        for index, frame in enumerate(frames):
            f.write(
                _RECORD_HEADER.pack(index // 1_000_000, index % 1_000_000, len(frame), len(frame))
            )
            f.write(frame)


def read_pcap(path: Path) -> list[bytes]:
    data = path.read_bytes()
    magic = _GLOBAL_HEADER.unpack_from(data)[0]
    if magic not in (_MAGIC, _MAGIC_NANOSECONDS):
        raise ValueError(f"{path}: not a little-endian pcap (magic {magic:#x})")
    frames = []
    offset = _GLOBAL_HEADER.size
    while offset < len(data):
        _, _, captured, _ = _RECORD_HEADER.unpack_from(data, offset)
        offset += _RECORD_HEADER.size
        frames.append(data[offset : offset + captured])
        offset += captured
    return frames


def numbered_frames(count: int, sizes: tuple[int, ...]) -> list[bytes]:
    """``count`` distinct Ethernet frames cycling through ``sizes``: each carries its
    index and a payload pattern derived from it, so reordering or corruption shows."""
    frames = []
    for index in range(count):
        size = sizes[index % len(sizes)]
        header = bytes.fromhex("02000000000202000000000188b5") + struct.pack(">I", index)
        payload = bytes((index * 7 + j) & 0xFF for j in range(size - len(header)))
        frames.append(header + payload)
    return frames
