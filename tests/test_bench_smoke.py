"""The throughput benchmarks still run: the matrix (every mode, both ring layouts, both
backends, all three outputs) and the second-by-second trace.

Smoke runs only (a second or less per window, one size, one queue pair): they check
that the benchmarks work, never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dpdk, pytest.mark.root]

BENCH = Path(__file__).resolve().parent.parent / "bench" / "vhost_throughput.py"
MODES = {"guest-to-host", "host-to-guest", "loopback-1024", "loopback-32", "guest-to-tap"}


@pytest.mark.timeout(600)
def test_throughput_benchmark_reports_every_mode_for_both_backends(
    testpmd_binary: str, tmp_path: Path
) -> None:
    prefix = tmp_path / "smoke"
    args = ["--seconds", "0.5", "--rounds", "1", "--warmup", "0.5"]
    args += ["--sizes", "64", "--queues", "1", "--rings", "split", "packed"]
    args += ["--output", str(prefix)]
    done = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=540
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = prefix.with_suffix(".md").read_text()
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| ") and " B 1q" in line
    }
    expected = {f"{mode} 64 B 1q{ring}" for mode in MODES for ring in ("", " packed")}
    assert set(rows) == expected, text
    data = json.loads(prefix.with_suffix(".json").read_text())
    for mode in MODES:
        for ring in ("split", "packed"):
            runs = [r for r in data["results"] if r["mode"] == mode and r["ring"] == ring]
            assert {r["backend"] for r in runs} == {"standby", "dpdk-vhost"}, runs
            assert all(r["mpps"] > 0 for r in runs), f"{mode} {ring}: no frames moved: {runs}"
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TRACE = BENCH.with_name("rate_trace.py")


@pytest.mark.timeout(300)
def test_rate_trace_prints_a_rate_per_second_for_each_backend(
    testpmd_binary: str, tmp_path: Path
) -> None:
    prefix = tmp_path / "trace"
    args = ["--mode", "guest-to-host", "--size", "64", "--runs", "1", "--seconds", "2"]
    args += ["--backends", "standby:null", "dpdk", "--output", str(prefix)]
    done = subprocess.run(
        [sys.executable, str(TRACE), *args], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = prefix.with_suffix(".md").read_text()
    traces = {
        line.split()[0]: [float(rate) for rate in line.split()[2:]]
        for line in text.splitlines()
        if line.startswith(("standby:null ", "dpdk "))
    }
    assert set(traces) == {"standby:null", "dpdk"}, text
    for backend, rates in traces.items():
        assert len(rates) == 2 and all(rate > 0 for rate in rates), f"{backend}: {rates}"
    assert "| dpdk |" in text and "| standby:null |" in text, text
