"""Second-by-second rates of backends taking turns on one case.

`vhost_throughput.py` gives one rate per run. This prints a rate for every second of a
run, so two things can be read off: where the load generator itself tops out, and
whether the machine changed speed during a run.

- **The ceiling.** `standby:null` completes every frame without reading it. No backend
  that reads the frames can go faster with this load, so `null` ÷ DPDK is the most any
  backend can reach over DPDK in that case.
- **Machine states.** On a shared 2-CPU machine the rate of one backend can jump
  between two levels, say 9 and 19 Mpps, mid-run and for both backends alike. Runs then
  differ by a factor of two for reasons outside the code. The per-second lines show it;
  a single window per run does not.

Backends: `standby:PORT` (`serve --port PORT`: `null`, `sink`, `loop`, `gen:SIZE`...)
or `dpdk` (DPDK's vhost PMD in the mode's forwarding). They take turns, in the order
given, `--runs` times. The summary gives, per backend, the median and the 90th
percentile of all its one-second rates, and each as a ratio to DPDK's.

Run: ``.venv/bin/python bench/rate_trace.py --mode guest-to-host --size 64
--backends standby:null standby:sink dpdk --runs 5 [--ring packed] [--output PREFIX]``
(needs dpdk-testpmd; writes PREFIX.md).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_throughput as throughput  # the backends and the load, as the matrix runs them


@contextlib.contextmanager
def backend_running(
    binary: str, backend: str, socket: Path, mode: throughput.Mode, case: throughput.Case
) -> Iterator[None]:
    if backend == "dpdk":
        with throughput.dpdk_vhost(binary, socket, mode, case, tap="fbbtrace0"):
            yield
    else:
        _, _, port = backend.partition(":")
        port = port or mode.standby_port.format(size=case.size, tap="fbbtrace0")
        with throughput.standby_backend(socket, port, case.queues):
            yield


def trace(
    binary: str,
    backend: str,
    socket: Path,
    mode: throughput.Mode,
    case: throughput.Case,
    seconds: int,
    warmup: float,
) -> list[float]:
    """One run: the rate (Mpps) in each second of the window."""
    with (
        backend_running(binary, backend, socket, mode, case),
        throughput.frontend(binary, socket, mode, case, in_order=1) as pmd,
    ):
        time.sleep(0.5)
        pmd.cmd(mode.start)
        time.sleep(warmup)
        rates = []
        count, t0 = pmd.port_stats(0)[mode.field], time.monotonic()
        for _ in range(seconds):
            time.sleep(1.0)
            now, t1 = pmd.port_stats(0)[mode.field], time.monotonic()
            rates.append((now - count) / (t1 - t0) / 1e6)
            count, t0 = now, t1
        pmd.cmd("stop")
        return rates


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(args: argparse.Namespace, traces: dict[str, list[list[float]]]) -> str:
    lines = [
        f"# Rate every second: {args.mode} {args.size} B {args.ring}",
        "",
        f"`{' '.join(sys.argv)}`",
        "",
        "Each line is one run, one rate (Mpps) per second, in the order they ran.",
        "",
        "```",
    ]
    for run in range(args.runs):
        for backend in args.backends:
            samples = " ".join(f"{r:5.1f}" for r in traces[backend][run])
            lines.append(f"{backend:<14} {run + 1}  {samples}")
    lines += ["```", "", "| backend | median | 90th percentile | ÷ DPDK (median) | ÷ DPDK (90th) |"]
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    pooled = {b: [r for run in runs for r in run] for b, runs in traces.items()}
    reference = pooled.get("dpdk")
    for backend, rates in pooled.items():
        median, high = statistics.median(rates), percentile(rates, 0.9)
        if reference:
            ratios = (
                f"{median / statistics.median(reference):.2f} | "
                f"{high / percentile(reference, 0.9):.2f}"
            )
        else:
            ratios = "- | -"
        lines.append(f"| {backend} | {median:.2f} | {high:.2f} | {ratios} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(throughput.MODES), default="guest-to-host")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--ring", choices=("split", "packed"), default="split")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["standby:null", "standby", "dpdk"],
        help="`dpdk`, `standby` (the mode's port) or `standby:PORT`",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10, help="one-second samples per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--output", type=Path, help="write PREFIX.md")
    args = parser.parse_args()
    if args.mode == "guest-to-tap":
        parser.error("guest-to-tap needs a TAP device: use vhost_throughput.py")
    binary = shutil.which("dpdk-testpmd")
    if binary is None:
        print("dpdk-testpmd not found (apt-get install dpdk-dev)", file=sys.stderr)
        return 1
    mode = throughput.MODES[args.mode]
    case = throughput.Case(args.mode, args.size, 1, args.ring)
    traces: dict[str, list[list[float]]] = {b: [] for b in args.backends}
    workdir = Path(tempfile.mkdtemp(prefix="fbt-", dir="/tmp"))
    try:
        for run in range(args.runs):
            for backend in args.backends:
                throughput.wait_quiet()
                # A fresh path each run: a killed testpmd leaves its socket behind.
                socket = workdir / f"{run}-{len(traces[backend])}-{backend.replace(':', '-')}.sock"
                rates = trace(binary, backend, socket, mode, case, args.seconds, args.warmup)
                traces[backend].append(rates)
                print(
                    f"{backend:<14} {run + 1}  " + " ".join(f"{r:5.1f}" for r in rates),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, traces)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
