"""Connection churn: does a standby backend stay flat over thousands of frontends?

``python -m failover_backend serve`` runs as its own process; a small fake frontend
(tests/vhost_user_client.py) connects and disconnects in a loop, every ``--setup-every``
th time after a full setup (handshake, memory table, both rings, a frame each way),
and the serve process's open descriptors and resident memory are sampled as it goes.
A leak shows as a slope; flat is the goal.

Run: ``.venv/bin/python bench/connection_churn.py [--cycles 10000] [--report FILE]``
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vhost_user_client import SharedMemory, SplitRings, VhostUserClient

MIB = 1 << 20


@dataclass(frozen=True)
class Sample:
    cycle: int
    fds: int
    rss_kib: int


def sample(pid: int, cycle: int) -> Sample:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Sample(cycle, fds, rss)


def full_setup(socket: Path, memory: SharedMemory) -> None:
    """Handshake, memory, rings, one frame through the loop port and back."""
    with VhostUserClient(socket) as client:
        client.handshake()
        assert client.set_mem_table([(0, MIB, SharedMemory.USER_ADDR, 0)], [memory.fd]) == 0
        rings = SplitRings(memory, {0: 0x1000, 1: 0x4000})
        try:
            rings.set_up(client)
            rx_before, tx_before = rings.used_idx(0), rings.used_idx(1)
            memory.write(0x10000, bytes(12) + bytes(range(60)))
            rings.add_chain(0, 0, 0x20000, 2048, writable=True)
            rings.add_chain(1, 0, 0x10000, 72, writable=False)
            rings.kick(1)
            deadline = time.monotonic() + 5
            while (rings.used_idx(0), rings.used_idx(1)) == (rx_before, tx_before):
                assert time.monotonic() < deadline, "the frame did not come back"
                time.sleep(0.001)
        finally:
            rings.close()


def wait_accepted(socket: Path) -> None:
    """The server is listening again (the previous connection is fully torn down)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            with VhostUserClient(socket) as probe:
                probe.handshake()
            return
        except (ConnectionError, OSError, AssertionError):
            assert time.monotonic() < deadline, "the backend stopped serving"
            time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--setup-every", type=int, default=10)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fb-churn-", dir="/tmp"))
    socket = work / "s.sock"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "failover_backend",
            "serve",
            "--socket",
            str(socket),
            "--port",
            "loop",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    memory = SharedMemory(MIB)
    samples: list[Sample] = []
    full = 0
    started = time.monotonic()
    try:
        while not socket.exists():
            time.sleep(0.05)
        every = max(1, args.cycles // args.samples)
        for cycle in range(args.cycles):
            if cycle % args.setup_every == 0:
                full_setup(socket, memory)
                full += 1
            else:
                with VhostUserClient(socket):
                    pass
            if cycle % every == 0 or cycle == args.cycles - 1:
                wait_accepted(socket)
                time.sleep(0.3)  # the probe's connection torn down: the device is idle
                samples.append(sample(serve.pid, cycle))
    finally:
        elapsed = time.monotonic() - started
        serve.terminate()
        serve.wait(30)
        memory.close()

    first, last = samples[0], samples[-1]
    lines = [
        "# Connection churn",
        "",
        f"Command: `.venv/bin/python bench/connection_churn.py --cycles {args.cycles} "
        f"--setup-every {args.setup_every}`",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
        f"{elapsed:.0f} s.",
        "",
        f"{args.cycles} connections to `serve --port loop`: every {args.setup_every}th "
        f"({full} in all) a full setup (handshake, memory table, both rings, one frame "
        "through the loop port and back), the others connect and close at once.",
        "",
        "| cycle | open descriptors | resident memory (KiB) |",
        "| ---: | ---: | ---: |",
    ]
    lines += [f"| {s.cycle} | {s.fds} | {s.rss_kib} |" for s in samples]
    lines += [
        "",
        f"Descriptors {first.fds} → {last.fds}, resident memory {first.rss_kib} → "
        f"{last.rss_kib} KiB.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        args.report.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
