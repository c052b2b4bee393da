"""Throughput of the standby backend next to DPDK's own vhost PMD, in one run.

The load is the same for both: DPDK testpmd with a virtio-user port (the "guest").
What changes is the vhost-user backend it talks to:

- ``standby``: ``python -m failover_backend serve`` (port ``null``, ``gen`` or ``loop``);
- ``dpdk-vhost``: testpmd with ``--vdev net_vhost0`` (rxonly, txonly, or io forwarding
  back).

Scenarios:

- ``guest-to-host``: virtio-user txonly (64 B) → backend drops (null / rxonly);
- ``host-to-guest``: backend sends 64 B frames (gen / txonly) → virtio-user rxonly;
- ``loopback``: virtio-user mac forwarding after ``start tx_first`` ↔ backend sends
  every frame back (loop / io forwarding).

Rates are read from the virtio-user side (``show port stats``) over a fixed window
after a warm-up, so both backends are measured the same way. Machines are noisy: the
ratio of the two rates measured in the same run is the number to compare.

Run: ``.venv/bin/python bench/vhost_throughput.py [--seconds 10] [--rounds 5] [--report FILE]``
(needs dpdk-testpmd).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from testpmd import Testpmd, virtio_user_vdev, wait_for  # the tests' testpmd driver

#: Frontend testpmd: main lcore on CPU 0, forwarding lcore on CPU 1.
FRONTEND_LCORES = "0@0,1@1"
#: The backend gets CPU 0 for its datapath (DPDK's forwarding lcore, or our worker).
BACKEND_CPU = 0


@dataclass(frozen=True)
class Result:
    scenario: str
    backend: str
    mpps: float
    rss_idle_kib: int | None = None
    rss_load_start_kib: int | None = None
    rss_load_end_kib: int | None = None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def standby_backend(socket: Path, port: str) -> Iterator[subprocess.Popen[str]]:
    """The backend under test, pinned to the backend CPU like DPDK's forwarding lcore."""
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(BACKEND_CPU),
            sys.executable,
            "-m",
            "failover_backend",
            "--log-level",
            "warning",
            "serve",
            "--socket",
            str(socket),
            "--port",
            port,
        ],
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for(socket.exists, 20, f"{socket}")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@contextlib.contextmanager
def dpdk_vhost(binary: str, socket: Path, mode: str) -> Iterator[Testpmd]:
    pmd = Testpmd(
        binary,
        [f"net_vhost0,iface={socket},queues=1"],
        [f"--forward-mode={mode}", "--nb-cores=1", "--auto-start"],
        lcores=f"0@{1 - BACKEND_CPU},1@{BACKEND_CPU}",
    )
    pmd.start()
    try:
        yield pmd
    finally:
        pmd.kill()


def measure(
    frontend: Testpmd,
    field: str,
    seconds: float,
    sample: Callable[[], None],
    warmup: float = 2.0,
) -> float:
    """Frames per second (millions) on the virtio-user port over ``seconds``;
    ``sample`` runs at the start and at the end of the window."""
    time.sleep(warmup)
    sample()
    first = frontend.port_stats(0)[field]
    start = time.monotonic()
    time.sleep(seconds)
    last = frontend.port_stats(0)[field]
    elapsed = time.monotonic() - start
    sample()
    return (last - first) / elapsed / 1e6


def run_frontend(
    binary: str,
    socket: Path,
    scenario: str,
    seconds: float,
    sample: Callable[[], None] = lambda: None,
    warmup: float = 2.0,
    in_order: int = 1,
) -> float:
    """Drive the load and return the rate. ``sample`` runs three times: connected but
    idle, at the start and at the end of the measurement window."""
    if scenario == "guest-to-host":
        app = ["--forward-mode=txonly", "--txpkts=64", "--nb-cores=1"]
        start, field = "start", "TX-packets"
    elif scenario == "host-to-guest":
        app = ["--forward-mode=rxonly", "--nb-cores=1"]
        start, field = "start", "RX-packets"
    else:
        app = ["--forward-mode=mac", "--nb-cores=1"]
        start, field = "start tx_first 32", "RX-packets"
    vdev = virtio_user_vdev(str(socket), in_order=in_order)
    with Testpmd(binary, [vdev], app, lcores=FRONTEND_LCORES) as pmd:
        time.sleep(1)
        sample()
        pmd.cmd(start)
        rate = measure(pmd, field, seconds, sample, warmup)
        pmd.cmd("stop")
        return rate


#: Scenario, the standby's port, DPDK vhost's forwarding mode.
SCENARIOS = (
    ("guest-to-host", "null", "rxonly"),
    ("host-to-guest", "gen:64", "txonly"),
    ("loopback", "loop", "io"),
)


def bench(
    binary: str, seconds: float, rounds: int, warmup: float = 2.0, in_order: int = 1
) -> list[Result]:
    """Every scenario ``rounds`` times, alternating the two backends."""
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="fbb-", dir="/tmp"))
    try:
        for round_no in range(rounds):
            for scenario, port, dpdk_mode in SCENARIOS:
                socket = workdir / f"{scenario}-{round_no}-standby.sock"
                with standby_backend(socket, port) as proc:
                    rss: list[int] = []

                    def sample_rss(pid: int = proc.pid, into: list[int] = rss) -> None:
                        into.append(rss_kib(pid))

                    mpps = run_frontend(
                        binary, socket, scenario, seconds, sample_rss, warmup, in_order
                    )
                    results.append(Result(scenario, "standby", mpps, *rss))
                socket = workdir / f"{scenario}-{round_no}-dpdk.sock"
                with dpdk_vhost(binary, socket, dpdk_mode):
                    mpps = run_frontend(
                        binary, socket, scenario, seconds, warmup=warmup, in_order=in_order
                    )
                    results.append(Result(scenario, "dpdk-vhost", mpps))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def report(
    results: list[Result], seconds: float, rounds: int, warmup: float = 2.0, in_order: int = 1
) -> str:
    lines = [
        f"# vhost-user throughput, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()};"
        f" {rounds} round(s) of {seconds:g} s windows after {warmup:g} s warm-up, backends"
        f" alternating; 64-byte frames, 1 queue pair, virtio-user in_order={in_order}."
        " Median (min-max) in Mpps. Where the two ranges overlap, the run cannot tell"
        " the backends apart.",
        "",
        "| scenario | standby | DPDK vhost PMD | ratio of medians | ranges overlap |",
        "| --- | ---: | ---: | ---: | --- |",
    ]

    def rates(scenario: str, backend: str) -> list[float]:
        return [r.mpps for r in results if (r.scenario, r.backend) == (scenario, backend)]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    for scenario, _, _ in SCENARIOS:
        ours, anchor = rates(scenario, "standby"), rates(scenario, "dpdk-vhost")
        ratio = statistics.median(ours) / statistics.median(anchor)
        overlap = "yes" if max(ours) >= min(anchor) and max(anchor) >= min(ours) else "no"
        lines.append(f"| {scenario} | {cell(ours)} | {cell(anchor)} | {ratio:.2f} | {overlap} |")
    lines += [
        "",
        "Resident memory of the standby process (`serve`, Python included), in KiB:",
        "",
        "| scenario | round | connected, idle | load, window start | load, window end |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for scenario, _, _ in SCENARIOS:
        ours_runs = [r for r in results if (r.scenario, r.backend) == (scenario, "standby")]
        for index, r in enumerate(ours_runs):
            lines.append(
                f"| {scenario} | {index + 1} | {r.rss_idle_kib} | {r.rss_load_start_kib}"
                f" | {r.rss_load_end_kib} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    parser.add_argument(
        "--in-order",
        type=int,
        choices=(0, 1),
        default=1,
        help="virtio-user's in_order devarg (1, its default: both backends grant it)",
    )
    parser.add_argument("--report", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    binary = shutil.which("dpdk-testpmd")
    if binary is None:
        print("dpdk-testpmd not found (apt-get install dpdk-dev)", file=sys.stderr)
        return 1
    results = bench(binary, args.seconds, args.rounds, args.warmup, args.in_order)
    text = report(results, args.seconds, args.rounds, args.warmup, args.in_order)
    print(text)
    if args.report:
        args.report.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
