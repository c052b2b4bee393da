"""The throughput benchmark still runs: every scenario, both backends, a report.

A smoke run only (a fraction of a second per window): it checks that the benchmark
works, never how fast anything is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dpdk

BENCH = Path(__file__).resolve().parent.parent / "bench" / "vhost_throughput.py"


def test_throughput_benchmark_reports_every_scenario_for_both_backends(
    testpmd_binary: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.md"
    args = ["--seconds", "0.5", "--rounds", "1", "--warmup", "0.5", "--report", str(report)]
    done = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line
        for line in report.read_text().splitlines()
        if line.startswith("| ") and "(" in line and line.count("|") == 6
    }
    assert set(rows) == {"guest-to-host", "host-to-guest", "loopback"}, report.read_text()
    for scenario, row in rows.items():
        cells = [cell.strip() for cell in row.split("|")[2:5]]
        ours, anchor = (float(cell.split()[0]) for cell in cells[:2])
        assert ours > 0 and anchor > 0, f"{scenario}: no frames moved: {row}"
