"""What an idle standby costs a hypervisor: memory and CPU per standby, served by one
``serve --config`` process for many VMs, or one ``serve`` process per VM.

Every standby is idle and unconnected (no QEMU yet), as most of a host's standbys are
most of the time. Rounds alternate the layouts; each layout's processes settle, then
their resident memory (VmRSS, summed) and CPU time (utime + stime, summed) are read
over a window. The report gives medians and min-max per standby.

    .venv/bin/python bench/idle_density.py --standbys 100 --separate 20 --rounds 5 \\
        --output bench/results/DATE-idle-density
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    layout: str
    standbys: int
    processes: int
    rss_kib: int
    threads: int
    cpu_s: float
    window_s: float

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / self.window_s


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_s(pid: int) -> float:
    # The fields after the command name (which may hold spaces) start at "state".
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _backend_table(workdir: Path, index: int, port: str) -> str:
    tap = f"fbd{uuid.uuid4().hex[:8]}" if port == "tap" else None
    return (
        "[[backend]]\n"
        f'name = "vm{index}"\n'
        f'socket = "{workdir}/vm{index}.sock"\n'
        f'port = "{f"tap:{tap}" if tap else "null"}"\n'
        f'mac = "52:54:00:00:{index // 256:02x}:{index % 256:02x}"\n\n'
    )


def _start(workdir: Path, name: str, first: int, count: int, port: str) -> subprocess.Popen[bytes]:
    config = workdir / f"{name}.toml"
    config.write_text(
        "".join(_backend_table(workdir, index, port) for index in range(first, first + count))
    )
    return subprocess.Popen(
        [sys.executable, "-m", "failover_backend", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _measure(
    layout: str, standbys: int, per_process: int, port: str, settle: float, window: float
) -> Sample:
    workdir = Path(tempfile.mkdtemp(prefix="fbd-", dir="/tmp"))
    processes = [
        _start(workdir, f"p{first}", first, per_process, port)
        for first in range(0, standbys, per_process)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(workdir.glob("*.sock"))) < standbys:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise SystemExit(f"{layout}: the backends did not all start")
            time.sleep(0.1)
        time.sleep(settle)
        before = sum(_cpu_s(p.pid) for p in processes)
        started = time.monotonic()
        time.sleep(window)
        cpu = sum(_cpu_s(p.pid) for p in processes) - before
        elapsed = time.monotonic() - started
        return Sample(
            layout,
            standbys,
            len(processes),
            sum(_status(p.pid, "VmRSS") for p in processes),
            sum(_status(p.pid, "Threads") for p in processes),
            cpu,
            elapsed,
        )
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            p.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(samples: list[Sample], args: argparse.Namespace, seconds: float) -> str:
    by_layout: dict[str, list[Sample]] = {}
    for s in samples:
        by_layout.setdefault(s.layout, []).append(s)
    lines = [
        "# Idle density",
        "",
        f"Command: `.venv/bin/python bench/idle_density.py {' '.join(sys.argv[1:])}`",
        f"Machine: {os.uname().nodename}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}; {seconds:.0f} s.",
        "",
        f"Idle, unconnected standbys on `{args.port}` ports; {args.rounds} alternating "
        f"rounds, CPU over {args.window:g} s windows after {args.settle:g} s of settling. "
        "Medians (min-max).",
        "",
        "| layout | standbys | processes | resident, all (MiB) | per standby (MiB) "
        "| threads | CPU, all (% of one) | CPU per standby (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for layout, group in by_layout.items():
        n = group[0].standbys
        lines.append(
            f"| {layout} | {n} | {group[0].processes} "
            f"| {_spread([s.rss_kib / 1024 for s in group], '.1f')} "
            f"| {_spread([s.rss_kib / 1024 / n for s in group], '.2f')} "
            f"| {group[0].threads} "
            f"| {_spread([s.cpu_percent for s in group], '.2f')} "
            f"| {_spread([s.cpu_percent / n for s in group], '.3f')} |"
        )
    one = by_layout.get("one process, 1 standby")
    many = by_layout.get(f"one process, {args.standbys} standbys")
    if one and many:
        marginal = [
            (m.rss_kib - o.rss_kib) / 1024 / (args.standbys - 1)
            for m, o in zip(many, one, strict=True)
        ]
        lines += [
            "",
            f"Each standby beyond the first in one process adds {_spread(marginal, '.2f')} MiB "
            "resident (same round's difference, divided by the added standbys).",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--standbys", type=int, default=100, help="in one process (default 100)")
    parser.add_argument(
        "--separate", type=int, default=20, help="one process each, for comparison (default 20)"
    )
    parser.add_argument("--port", choices=["null", "tap"], default="tap", help="(default tap)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=10.0, help="CPU window (s)")
    parser.add_argument("--output", type=Path, help="write PREFIX.md and PREFIX.json")
    args = parser.parse_args()
    layouts = [
        (f"one process, {args.standbys} standbys", args.standbys, args.standbys),
        ("one process, 1 standby", 1, 1),
        (f"one process each, {args.separate} standbys", args.separate, 1),
    ]
    samples = []
    started = time.monotonic()
    for round_index in range(args.rounds):
        order = layouts if round_index % 2 == 0 else list(reversed(layouts))
        for layout, standbys, per_process in order:
            sample = _measure(layout, standbys, per_process, args.port, args.settle, args.window)
            print(
                f"round {round_index + 1}: {layout}: {sample.rss_kib / 1024:.1f} MiB, "
                f"{sample.threads} threads, {sample.cpu_percent:.2f} % CPU",
                flush=True,
            )
            samples.append(sample)
    samples.sort(key=lambda s: [layout for layout, _, _ in layouts].index(s.layout))
    text = report(samples, args, time.monotonic() - started)
    print(text)
    if args.output is not None:
        Path(f"{args.output}.md").write_text(text)
        Path(f"{args.output}.json").write_text(
            json.dumps([asdict(s) for s in samples], indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
