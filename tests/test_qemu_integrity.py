"""Nothing corrupted by a migration: every guest write the backend makes is in the
dirty log.

While the guest's primary is gone (from its release on the source to the target's
primary link), the standby carries the host's traffic into the guest, and the
backend writes it into guest memory while QEMU copies that memory to the target. A
page the dirty log missed would reach the target stale, and the guest would read old
bytes where a frame was: with checksum offload negotiated the guest does not verify
checksums of what the host sends, so that shows as wrong content, not as a drop.

The host sends numbered datagrams to the guest throughout; each repeats its sequence
number, so the guest (``udp-sink``, then ``awk``) can check every one after the
migration. A stale buffer shows as a datagram seen twice (an old one where a new one
should be) or as a payload that does not match its number; losses are counted apart.
(Over TCP a whole stale frame is an old segment the guest drops and has resent: it
would hide what this looks for.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from conftest import run
from failover_backend.lab.scenario import Lab
from guest import wait_primary_enslaved
from lab_migration import migrate

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_lab")]

PORT = 5000
REPEAT = 60
#: Datagrams every 5 ms: about 4000 a second.
BURST = 20


def record(seq: int) -> bytes:
    """The number, then its zero-padded form repeated (no leading zeros in the first
    field: busybox awk may read those as octal)."""
    return f"{seq} {f'{seq:08d}' * REPEAT}\n".encode()


#: Prints datagrams received, distinct ones, seen twice, whose payload is wrong.
CHECK = (
    "awk '{ n++; if (seen[$1]++) twice++; else distinct++; "
    f'want = ""; s = sprintf("%08d", $1); for (i = 0; i < {REPEAT}; i++) want = want s; '
    "if ($2 != want) bad++ } "
    "END { print n + 0, distinct + 0, twice + 0, bad + 0 }' /tmp/stream"
)


def test_datagrams_through_the_standby_arrive_intact_after_the_migration() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            source = await lab.vm("source")
            target = await lab.vm("target", incoming=True)
            await source.boot()
            await wait_primary_enslaved(source.console, timeout=60)
            await source.console.check(f"udp-sink {PORT} /tmp/stream > /dev/null 2>&1 &")
            address = lab.guest_address.split("/")[0]
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sent = 0
            stop = asyncio.Event()

            async def stream() -> None:
                nonlocal sent
                while not stop.is_set():
                    for _ in range(BURST):
                        with contextlib.suppress(OSError):
                            sender.sendto(record(sent), (address, PORT))
                        sent += 1
                    await asyncio.sleep(0.005)

            streaming = asyncio.create_task(stream())
            await asyncio.sleep(1)
            assert source.backend is not None
            before = source.backend.stats().rx_packets
            report = await migrate(lab, source, target)
            assert report.completed, report.summary()
            # The standby carried the stream while the migration copied memory.
            carried = source.backend.stats().rx_packets - before
            await wait_primary_enslaved(target.console, timeout=60)
            await asyncio.sleep(1)
            stop.set()
            await streaming
            sender.close()
            await asyncio.sleep(1)
            await target.console.check("killall udp-sink")
            out = await target.console.check(CHECK, timeout=120)
            received, distinct, twice, bad = (int(v) for v in out.split())
            print(
                f"{sent} datagrams sent, {received} received ({sent - distinct} lost), "
                f"{twice} seen twice, {bad} with a wrong payload; the source standby "
                f"carried {carried} frames during the migration"
            )
            assert carried > 100, f"the standby carried only {carried} frames"
            assert distinct > sent // 2, "most datagrams arrive"
            assert (twice, bad) == (0, 0)

    run(scenario(), timeout=300)
