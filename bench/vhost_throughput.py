"""Throughput of the standby backend next to DPDK's own vhost PMD, in one run.

The load is the same for both: DPDK testpmd with a virtio-user port (the "guest").
What changes is the vhost-user backend it talks to:

- ``standby``: ``python -m failover_backend serve`` (port ``sink``, ``gen``, ``loop`` or
  ``tap``);
- ``dpdk-vhost``: testpmd with ``--vdev net_vhost0`` (rxonly, txonly, io forwarding back,
  or io forwarding to a ``net_tap`` port).

Modes, each at every frame size and queue-pair count asked for:

- ``guest-to-host``: virtio-user txonly → the backend reads every frame and drops it
  (``sink`` / rxonly, which copies each frame into an mbuf);
- ``host-to-guest``: the backend sends (``gen:SIZE`` / txonly) → virtio-user rxonly;
- ``loopback-1024`` and ``loopback-32``: virtio-user mac forwarding after
  ``start tx_first 32`` (1024 frames in flight) or ``start tx_first`` (32) ↔ the
  backend sends every frame back (``loop`` / io forwarding);
- ``guest-to-tap``: virtio-user txonly → a TAP device (``tap:NAME`` / io forwarding to
  ``net_tap``); the kernel drops what arrives there.

Rates are read on the virtio-user side over a fixed window after a warm-up, so both
backends are measured the same way; rounds alternate the backends (and which goes
first), and each run waits for a quiet machine. The ratio of medians within one run is
the number to compare; where the two ranges overlap, the run cannot tell the backends
apart. The backend's CPU (this process's utime + stime, as % of one CPU) is taken
connected and idle, and over the load window.

Run: ``.venv/bin/python bench/vhost_throughput.py [--seconds 5] [--rounds 5]
[--modes ...] [--sizes 64 1518] [--queues 1 2] [--output bench/results/DATE-matrix]``
(needs dpdk-testpmd; writes PREFIX.md, PREFIX.json and PREFIX.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from testpmd import Testpmd, virtio_user_vdev, wait_for  # the tests' testpmd driver

#: Frontend testpmd: main lcore on CPU 0, forwarding lcore on CPU 1.
FRONTEND_LCORES = "0@0,1@1"
#: The backend gets CPU 0 for its datapath (DPDK's forwarding lcore, or our workers).
BACKEND_CPU = 0
#: A run starts once both CPUs were this idle over half a second (or after 10 s).
QUIET_IDLE = 0.85
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Mode:
    name: str
    #: The standby's port (``{size}`` and ``{tap}`` filled in).
    standby_port: str
    #: DPDK vhost testpmd: forwarding mode, and whether a net_tap port goes beside it.
    dpdk_forward: str
    dpdk_tap: bool
    #: Frontend testpmd: forwarding mode, start command, and the counter read.
    frontend_forward: str
    start: str
    field: str


MODES = {
    m.name: m
    for m in (
        Mode("guest-to-host", "sink", "rxonly", False, "txonly", "start", "TX-packets"),
        Mode("host-to-guest", "gen:{size}", "txonly", False, "rxonly", "start", "RX-packets"),
        Mode("loopback-1024", "loop", "io", False, "mac", "start tx_first 32", "RX-packets"),
        Mode("loopback-32", "loop", "io", False, "mac", "start tx_first", "RX-packets"),
        Mode("guest-to-tap", "tap:{tap}", "io", True, "txonly", "start", "TX-packets"),
    )
}


@dataclass(frozen=True)
class Case:
    mode: str
    size: int
    queues: int
    #: "split" or "packed": the ring layout virtio-user asks both backends for.
    ring: str = "split"

    @property
    def name(self) -> str:
        packed = " packed" if self.ring == "packed" else ""
        return f"{self.mode} {self.size} B {self.queues}q{packed}"


@dataclass(frozen=True)
class Result:
    case: str
    mode: str
    size: int
    queues: int
    ring: str
    backend: str
    round: int
    mpps: float
    cpu_idle_pct: float
    cpu_load_pct: float
    rss_idle_kib: int | None = None
    rss_load_start_kib: int | None = None
    rss_load_end_kib: int | None = None


def rss_kib(pid: int) -> int:
    """The process's own resident memory (RssAnon). VmRSS would also count every page
    of the guest's shared memory the datapath has touched, which grows with the number
    of guest buffers in use, not with anything the backend keeps."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError(f"no RssAnon for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_quiet(limit: float = 10.0) -> None:
    """Until both CPUs were mostly idle for half a second (processes of the last run
    exiting, anything else on the machine), at most ``limit`` seconds."""

    def idle_and_total() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return values[3] + values[4], sum(values)

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        idle0, total0 = idle_and_total()
        time.sleep(0.5)
        idle1, total1 = idle_and_total()
        if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= QUIET_IDLE:
            return


@contextlib.contextmanager
def standby_backend(
    socket: Path, port: str, queues: int, poll_us: int = 50
) -> Iterator[subprocess.Popen[str]]:
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
            "--queues",
            str(queues),
            "--poll-us",
            str(poll_us),
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
def dpdk_vhost(binary: str, socket: Path, mode: Mode, case: Case, tap: str) -> Iterator[Testpmd]:
    vdevs = [f"net_vhost0,iface={socket},queues={case.queues}"]
    if mode.dpdk_tap:
        vdevs.append(f"net_tap0,iface={tap}")
    pmd = Testpmd(
        binary,
        vdevs,
        [
            f"--forward-mode={mode.dpdk_forward}",
            f"--txpkts={case.size}",
            f"--rxq={case.queues}",
            f"--txq={case.queues}",
            "--nb-cores=1",
            "--auto-start",
        ],
        lcores=f"0@{1 - BACKEND_CPU},1@{BACKEND_CPU}",
    )
    pmd.start()
    try:
        yield pmd
    finally:
        pmd.kill()


def frontend(binary: str, socket: Path, mode: Mode, case: Case, in_order: int) -> Testpmd:
    """The load (not started yet): testpmd with a virtio-user port on ``socket``."""
    app = [
        f"--forward-mode={mode.frontend_forward}",
        f"--txpkts={case.size}",
        f"--rxq={case.queues}",
        f"--txq={case.queues}",
        "--nb-cores=1",
    ]
    packed_vq = int(case.ring == "packed")
    vdev = virtio_user_vdev(str(socket), queues=case.queues, in_order=in_order, packed_vq=packed_vq)
    return Testpmd(binary, [vdev], app, lcores=FRONTEND_LCORES)


def run_frontend(
    binary: str,
    socket: Path,
    mode: Mode,
    case: Case,
    seconds: float,
    backend_pid: int,
    warmup: float,
    in_order: int,
    sample_rss: Callable[[], None] = lambda: None,
    idle_seconds: float = 1.0,
) -> tuple[float, float, float]:
    """Drive the load; returns (Mpps, backend CPU % connected and idle over
    ``idle_seconds``, under load)."""
    with frontend(binary, socket, mode, case, in_order) as pmd:
        time.sleep(0.5)
        sample_rss()
        cpu0, t0 = cpu_seconds(backend_pid), time.monotonic()
        time.sleep(idle_seconds)
        idle_pct = 100 * (cpu_seconds(backend_pid) - cpu0) / (time.monotonic() - t0)
        pmd.cmd(mode.start)
        time.sleep(warmup)
        sample_rss()
        first, cpu0, t0 = pmd.port_stats(0)[mode.field], cpu_seconds(backend_pid), time.monotonic()
        time.sleep(seconds)
        last, cpu1, t1 = pmd.port_stats(0)[mode.field], cpu_seconds(backend_pid), time.monotonic()
        sample_rss()
        pmd.cmd("stop")
        return (last - first) / (t1 - t0) / 1e6, idle_pct, 100 * (cpu1 - cpu0) / (t1 - t0)


def bench(
    binary: str,
    cases: list[Case],
    seconds: float,
    rounds: int,
    warmup: float,
    in_order: int,
    poll_us: int = 50,
    progress: Callable[[str], None] = lambda line: None,
    idle_seconds: float = 1.0,
) -> list[Result]:
    """Every case ``rounds`` times, alternating the two backends."""
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="fbb-", dir="/tmp"))
    tap = f"fbb{os.getpid() % 100000}"
    try:
        for round_no in range(rounds):
            for case_no, case in enumerate(cases):
                mode = MODES[case.mode]
                order = ["standby", "dpdk-vhost"]
                if round_no % 2:
                    order.reverse()
                for backend in order:
                    wait_quiet()
                    # A fresh path each run: a killed testpmd leaves its socket behind.
                    socket = workdir / f"{round_no}-{case_no}-{backend}.sock"
                    rss: list[int] = []
                    if backend == "standby":
                        port = mode.standby_port.format(size=case.size, tap=tap)
                        with standby_backend(socket, port, case.queues, poll_us) as proc:

                            def sample(pid: int = proc.pid, into: list[int] = rss) -> None:
                                into.append(rss_kib(pid))

                            mpps, idle, load = run_frontend(
                                binary,
                                socket,
                                mode,
                                case,
                                seconds,
                                proc.pid,
                                warmup,
                                in_order,
                                sample,
                                idle_seconds,
                            )
                    else:
                        with dpdk_vhost(binary, socket, mode, case, tap) as pmd:
                            mpps, idle, load = run_frontend(
                                binary,
                                socket,
                                mode,
                                case,
                                seconds,
                                pmd.pid,
                                warmup,
                                in_order,
                                idle_seconds=idle_seconds,
                            )
                    # DPDK's RSS is not sampled: its fields stay None.
                    result = Result(
                        case.name,
                        case.mode,
                        case.size,
                        case.queues,
                        case.ring,
                        backend,
                        round_no + 1,
                        mpps,
                        idle,
                        load,
                        *rss,
                    )
                    results.append(result)
                    progress(
                        f"round {round_no + 1} {case.name} {backend}: {mpps:.2f} Mpps,"
                        f" CPU {idle:.1f} % idle / {load:.0f} % load"
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        subprocess.run(["ip", "link", "del", tap], capture_output=True, check=False)
    return results


@dataclass(frozen=True)
class Row:
    case: str
    standby: list[float]
    dpdk: list[float]
    standby_cpu_idle: float
    standby_cpu_load: float
    dpdk_cpu_load: float

    @property
    def ratio(self) -> float:
        anchor = statistics.median(self.dpdk)
        return statistics.median(self.standby) / anchor if anchor else float("nan")

    @property
    def overlap(self) -> bool:
        return max(self.standby) >= min(self.dpdk) and max(self.dpdk) >= min(self.standby)


def rows(results: list[Result], cases: list[Case]) -> list[Row]:
    out = []
    for case in cases:
        ours = [r for r in results if (r.case, r.backend) == (case.name, "standby")]
        anchor = [r for r in results if (r.case, r.backend) == (case.name, "dpdk-vhost")]
        out.append(
            Row(
                case.name,
                [r.mpps for r in ours],
                [r.mpps for r in anchor],
                statistics.median(r.cpu_idle_pct for r in ours),
                statistics.median(r.cpu_load_pct for r in ours),
                statistics.median(r.cpu_load_pct for r in anchor),
            )
        )
    return out


def report(table: list[Row], results: list[Result], args: argparse.Namespace) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    lines = [
        f"# vhost-user throughput, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()};"
        f" {args.rounds} round(s) of {args.seconds:g} s windows after {args.warmup:g} s"
        " warm-up, backends alternating, each run after a quiet second;"
        f" {' and '.join(args.rings)} rings,"
        f" virtio-user in_order={args.in_order}, standby --poll-us {args.poll_us}."
        " Median (min-max) in Mpps, ratio of"
        " medians. Where the two ranges overlap, the run cannot tell the backends apart."
        " CPU: the backend process, % of one CPU (DPDK's forwarding lcore always spins);"
        f" idle: connected, the load not started, over {args.idle_seconds:g} s.",
        "",
        "| case | standby | DPDK vhost PMD | ratio | ranges overlap"
        " | standby CPU idle / load | DPDK CPU load |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for row in table:
        lines.append(
            f"| {row.case} | {cell(row.standby)} | {cell(row.dpdk)} | {row.ratio:.2f}"
            f" | {'yes' if row.overlap else 'no'}"
            f" | {row.standby_cpu_idle:.1f} % / {row.standby_cpu_load:.0f} %"
            f" | {row.dpdk_cpu_load:.0f} % |"
        )
    growth = [
        r.rss_load_end_kib - r.rss_load_start_kib
        for r in results
        if r.rss_load_end_kib is not None and r.rss_load_start_kib is not None
    ]
    if growth:
        lines += [
            "",
            "Private resident memory (RssAnon) of `serve` over each load window"
            " (end - start): at most"
            f" {max(growth)} KiB; connected and idle"
            f" {min(r.rss_idle_kib or 0 for r in results if r.backend == 'standby')}-"
            f"{max(r.rss_idle_kib or 0 for r in results if r.backend == 'standby')} KiB.",
        ]
    lines += [
        "",
        "Not like for like, on purpose: in `loopback-*` DPDK copies each frame twice"
        " (into an mbuf and out again) where the standby's `loop` copies it once, buffer"
        " to buffer; in `guest-to-tap` DPDK copies into an mbuf before writing it to the"
        " TAP (one system call per frame), the standby writes the TAP straight from guest"
        " memory (a batch of writes per io_uring submission). In `guest-to-host` both"
        " read every frame (`sink` / rxonly).",
    ]
    return "\n".join(lines) + "\n"


def plot(table: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(table) + 1.5))
    names = [row.case for row in table][::-1]
    ratios = [row.ratio for row in table][::-1]
    colors = ["#bbbbbb" if row.overlap else "#3b75af" for row in table][::-1]
    ax.barh(names, ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(1.2, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("standby ÷ DPDK vhost PMD (ratio of medians; grey: ranges overlap)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each case")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 512, 1518])
    parser.add_argument("--queues", nargs="+", type=int, choices=(1, 2), default=[1, 2])
    parser.add_argument(
        "--rings",
        nargs="+",
        choices=("split", "packed"),
        default=["split"],
        help="ring layouts to run each case with (virtio-user's packed_vq; default split)",
    )
    parser.add_argument(
        "--in-order",
        type=int,
        choices=(0, 1),
        default=1,
        help="virtio-user's in_order devarg (1, its default: both backends grant it)",
    )
    parser.add_argument(
        "--poll-us", type=int, default=50, help="the standby's serve --poll-us (default 50)"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=1.0,
        help="how long the backend's CPU is read connected and idle, before each window"
        " (in 10 ms ticks: 1 s reads in steps of 1 %%)",
    )
    parser.add_argument("--output", type=Path, help="write PREFIX.md, PREFIX.json and PREFIX.png")
    args = parser.parse_args()
    binary = shutil.which("dpdk-testpmd")
    if binary is None:
        print("dpdk-testpmd not found (apt-get install dpdk-dev)", file=sys.stderr)
        return 1
    cases = [
        Case(m, s, q, r)
        for r in args.rings
        for q in args.queues
        for m in args.modes
        for s in args.sizes
    ]
    results = bench(
        binary,
        cases,
        args.seconds,
        args.rounds,
        args.warmup,
        args.in_order,
        args.poll_us,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        idle_seconds=args.idle_seconds,
    )
    table = rows(results, cases)
    text = report(table, results, args)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(text)
        args.output.with_suffix(".json").write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "machine": {"arch": platform.machine(), "cpus": os.cpu_count()},
                    "seconds": args.seconds,
                    "rounds": args.rounds,
                    "warmup": args.warmup,
                    "in_order": args.in_order,
                    "rings": args.rings,
                    "poll_us": args.poll_us,
                    "idle_seconds": args.idle_seconds,
                    "results": [asdict(r) for r in results],
                    "summary": [
                        {"case": row.case, "ratio": row.ratio, "overlap": row.overlap}
                        for row in table
                    ],
                },
                indent=1,
            )
        )
        plot(
            table,
            args.output.with_suffix(".png"),
            f"vhost-user throughput, {time.strftime('%Y-%m-%d')}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
