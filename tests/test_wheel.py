"""The wheel users install, tested as they would use it: ``./dev wheel`` builds it
(manylinux, through zig), and installs it with its dependencies into a venv of its
own; here ``auditwheel`` accepts its tag, and the installed ``failover-backend serve``
(not the checkout's) carries testpmd's frames."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testpmd import two_bursts_looped_back, wait_for
from tools import STRICT

ROOT = Path(__file__).resolve().parent.parent


def wheel_venv() -> Path:
    path = os.environ.get("FAILOVER_BACKEND_WHEEL_VENV")
    if path:
        return Path(path)
    message = "no installed wheel: run ./dev wheel first (./dev test does)"
    if STRICT:
        pytest.fail(message)
    pytest.skip(message)


def test_the_wheel_has_a_manylinux_tag_auditwheel_accepts() -> None:
    wheel_venv()
    (wheel,) = (ROOT / "target" / "wheels").glob("failover_backend-*.whl")
    # One wheel for every CPython from 3.10 on (the stable ABI), for glibc 2.17 and up.
    assert "-cp310-abi3-" in wheel.name and "manylinux_2_17_x86_64" in wheel.name, wheel.name
    auditwheel = Path(sys.executable).parent / "auditwheel"
    shown = subprocess.run(
        [str(auditwheel), "show", str(wheel)], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown
    text = " ".join(shown.stdout.split())
    assert 'consistent with the following platform tag: "manylinux_2_17_x86_64"' in text, text


@pytest.mark.dpdk
def test_the_installed_wheel_serves_testpmd(testpmd_binary: str, tmp_path: Path) -> None:
    venv = wheel_venv()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import failover_backend; print(failover_backend.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=env,
    )
    assert where.returncode == 0, where
    assert Path(where.stdout.strip()).is_relative_to(venv), "the wheel's copy, not the checkout"
    socket = tmp_path / "standby.sock"
    serve = subprocess.Popen(
        [
            str(venv / "bin" / "failover-backend"),
            "serve",
            "--socket",
            str(socket),
            "--port",
            "loop",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        wait_for(socket.exists, 15, "the installed backend's socket")
        stats = two_bursts_looped_back(testpmd_binary, socket)
        assert stats["TX-packets"] == stats["RX-packets"] == 64
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=15)
    assert serve.returncode == 0, err
    counters = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert counters["rx0"][0] == counters["tx0"][0] == "64"
