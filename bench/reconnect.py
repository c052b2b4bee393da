"""How fast a standby backend that was SIGKILLed carries the guest's traffic again once
its supervisor restarts it.

A real QEMU guest (the lab's) has only its standby (no primary), served by
``python -m failover_backend serve`` on a persistent TAP on the lab's bridge; the host
pings the guest every 10 ms, with a permanent neighbour entry for it (so the host's
ARP timers, which hold requests back for a second after a failure, are not measured).
Each round SIGKILLs ``serve``, waits as a supervisor would (a random 0.1 to 1.1 s, so
QEMU's once-a-second reconnect timer is met at any phase), starts it again, and
measures from the restart to the first reply from the guest: the first frame that
went into the guest and back. Two ways to connect:

- ``server``: ``serve`` listens, QEMU connects with ``reconnect=1`` (what ``serve``
  prints);
- ``client``: QEMU listens (``server=on``), ``serve --client`` connects.

Run: ``.venv/bin/python bench/reconnect.py [--rounds 10] [--report FILE]`` (root).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from failover_backend.lab.scenario import GUEST_MAC, Lab, LabVM
from failover_backend.lab.traffic import HostPinger

INTERVAL = 0.01


async def start_serve(socket: Path, tap: str, client: bool) -> asyncio.subprocess.Process:
    args = ["serve", "--socket", str(socket), "--port", f"tap:{tap}", "--mac", GUEST_MAC]
    if client:
        args.append("--client")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "failover_backend",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def first_reply_after(pinger: HostPinger, since: float, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = [at for seq, at in pinger.replies.items() if pinger.sent[seq] >= since]
        if replies:
            return min(replies) - since
        await asyncio.sleep(INTERVAL)
    raise TimeoutError("no reply from the guest")


async def measure(mode: str, rounds: int) -> list[float]:
    client = mode == "client"
    async with Lab() as lab:
        socket = lab.workdir / f"{mode}.sock"
        tap = lab.network.add_tap("fbsb")
        serve = await start_serve(socket, tap, client) if not client else None
        if serve is not None:
            while not socket.exists():
                await asyncio.sleep(0.05)
        vm_task = asyncio.create_task(
            lab.vm("vm", primary=False, standby_socket=socket, standby_listens=client)
        )
        if client:
            while not socket.exists():
                await asyncio.sleep(0.05)
            serve = await start_serve(socket, tap, client)
        vm: LabVM = await vm_task
        await vm.boot()
        address = lab.guest_address.split("/")[0]
        subprocess.run(
            [
                "ip",
                "neigh",
                "replace",
                address,
                "lladdr",
                GUEST_MAC,
                "nud",
                "permanent",
                "dev",
                lab.network.bridge,
            ],
            check=True,
        )
        pinger = HostPinger(lab.guest_address, INTERVAL)
        await pinger.start()
        await first_reply_after(pinger, time.time() - 1)
        times = []
        try:
            for _ in range(rounds):
                assert serve is not None
                serve.send_signal(signal.SIGKILL)
                await serve.wait()
                await asyncio.sleep(random.uniform(0.1, 1.1))
                restarted = time.time()
                serve = await start_serve(socket, tap, client)
                times.append(await first_reply_after(pinger, restarted))
                await asyncio.sleep(1)
        finally:
            await pinger.stop()
            if serve is not None and serve.returncode is None:
                serve.send_signal(signal.SIGTERM)
                await serve.wait()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (TAP devices, a bridge)", file=sys.stderr)
        return 1
    results = {mode: asyncio.run(measure(mode, args.rounds)) for mode in ("server", "client")}
    lines = [
        "# Back after a restart",
        "",
        f"Command: `.venv/bin/python bench/reconnect.py --rounds {args.rounds}`",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
        "QEMU under TCG, the lab's guest with its standby only, pinged every 10 ms.",
        "",
        "Seconds from restarting a SIGKILLed `serve` (0.1 to 1.1 s after the kill) to the "
        "first reply from the guest (the host's neighbour entry for the guest permanent):",
        "",
        "| connection | median | min | max | all |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for mode, times in results.items():
        what = (
            "serve listens, QEMU `reconnect=1`"
            if mode == "server"
            else "QEMU listens, `serve --client`"
        )
        lines.append(
            f"| {what} | {statistics.median(times):.3f} | {min(times):.3f} | "
            f"{max(times):.3f} | {' '.join(f'{t:.2f}' for t in times)} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        args.report.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
