"""The commands as an operator runs them next to QEMU: ``run`` per VM (serving the
standby backend and managing the pair), ``status`` and ``migrate`` over each QEMU's
second QMP socket. Real QEMU processes, a real guest."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run
from failover_backend.lab.hostnet import unique_name
from failover_backend.lab.scenario import GUEST_MAC, Lab
from guest import wait_primary_enslaved

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_lab")]

CONFIG = """
[backend]
socket = "{socket}"
port = "tap:{tap}"
mac = "{mac}"

[qemu]
qmp = "{qmp}"
standby = "standby0"

[primary]
id = "primary0"
driver = "e1000e"
bus = "root1"
properties = {{ netdev = "hostnet0", romfile = "" }}

[primary.netdev]
type = "tap"
id = "hostnet0"
ifname = "{primary_tap}"
script = "no"
downscript = "no"

[timeouts]
qmp = 30
negotiation = 60
"""


async def start_run(lab: Lab, name: str) -> tuple[asyncio.subprocess.Process, Path, str]:
    """A ``run`` process for VM ``name``: its backend listens before QEMU starts."""
    socket = lab.workdir / f"{name}-run.sock"
    tap = unique_name("fbsb")
    config = lab.workdir / f"{name}.toml"
    config.write_text(
        CONFIG.format(
            socket=socket,
            tap=tap,
            mac=GUEST_MAC,
            qmp=lab.workdir / f"{name}-qmp.sock",
            primary_tap=lab.network.add_tap("fbpr"),
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "failover_backend",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    for _ in range(200):
        if socket.exists():
            break
        await asyncio.sleep(0.05)
    assert socket.exists(), f"{name}: run did not start its backend"
    lab.network.attach(tap)
    return process, socket, tap


async def stop_run(process: asyncio.subprocess.Process) -> str:
    process.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, out.decode()
    return out.decode()


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "failover_backend", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_plugs_the_primary_and_migrate_moves_the_vm() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            src_run, src_socket, _ = await start_run(lab, "source")
            dst_run, dst_socket, _ = await start_run(lab, "target")
            try:
                source = await lab.vm(
                    "source", primary=False, standby_socket=src_socket, connect_qmp=False
                )
                target = await lab.vm(
                    "target",
                    primary=False,
                    incoming=True,
                    standby_socket=dst_socket,
                    connect_qmp=False,
                )
                await source.boot()
                # `run` plugged the primary; QEMU showed it once the guest negotiated.
                await wait_primary_enslaved(source.console, timeout=60)

                status = await cli("status", "--qmp", str(source.vm.config.control_qmp_path))
                assert status.returncode == 0, status.stderr
                assert "standby0 (STANDBY negotiated)" in status.stdout
                assert "primary0 (visible)" in status.stdout

                migrate = await cli(
                    "migrate",
                    "--source-qmp",
                    str(source.vm.config.control_qmp_path),
                    "--target-qmp",
                    str(target.vm.config.control_qmp_path),
                    "--uri",
                    f"unix:{lab.workdir}/migration.sock",
                    "--wait-unplug-timeout",
                    "20",
                )
                assert migrate.returncode == 0, migrate.stdout + migrate.stderr
                for line in ("source: wait-unplug", "source: completed", "UNPLUG_PRIMARY"):
                    assert line in migrate.stdout
                assert "target primary plugged before RESUME: yes" in migrate.stdout
                await wait_primary_enslaved(target.console, timeout=30)
            finally:
                src_log = await stop_run(src_run)
                dst_log = await stop_run(dst_run)
            # Each `run` steered its own side: the source when QEMU asked the guest to
            # release the primary, the target when the VM resumed there.
            assert "the guest negotiated STANDBY on standby0" in src_log
            assert "announced guest MAC on host port" in src_log
            assert "announced guest MAC on host port" in dst_log
            assert "frontend connected" in dst_log

    run(scenario(), timeout=300)
