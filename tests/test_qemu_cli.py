"""The commands as an operator runs them next to QEMU: ``run`` per VM (serving the
standby backend, managing the pair, steering the host's switch), ``status`` and
``migrate`` over each QEMU's second QMP socket. Real QEMU processes, a real guest,
and the host pinging the guest throughout."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from conftest import run
from continuity import analyse, assert_bounded
from failover_backend.lab.scenario import Lab, LabVM
from failover_backend.lab.traffic import HostPinger
from guest import wait_primary_enslaved
from runproc import RunProcess, cli, start_run

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_lab")]


async def vm_for(lab: Lab, name: str, run_process: RunProcess, incoming: bool = False) -> LabVM:
    """A QEMU whose standby is served by ``run_process`` (which also plugs its primary)."""
    return await lab.vm(
        name,
        primary=False,
        incoming=incoming,
        standby_socket=run_process.socket,
        connect_qmp=False,
    )


async def migrate(lab: Lab, source: LabVM, target: LabVM, *extra: str) -> str:
    result = await cli(
        "migrate",
        *extra,
        "--source-qmp",
        str(source.vm.config.control_qmp_path),
        "--target-qmp",
        str(target.vm.config.control_qmp_path),
        "--uri",
        f"unix:{lab.workdir}/migration-{source.name}.sock",
        "--wait-unplug-timeout",
        "20",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_run_on_each_side_keeps_the_guest_reachable_there_and_back() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            runs = {name: await start_run(lab, name) for name in ("a", "b")}
            try:
                a = await vm_for(lab, "a", runs["a"])
                b = await vm_for(lab, "b", runs["b"], incoming=True)
                await a.boot()
                # `run` plugged the primary; QEMU showed it once the guest negotiated.
                await wait_primary_enslaved(a.console, timeout=60)
                await runs["a"].wait_for("steering to the primary", timeout=30)

                status = await cli("status", "--qmp", str(a.vm.config.control_qmp_path))
                assert status.returncode == 0, status.stderr
                assert "standby0 (STANDBY negotiated)" in status.stdout
                assert "primary0 (visible)" in status.stdout
                assert "backend:   connected (QEMU's side)" in status.stdout
                as_json = await cli("status", "--json", "--qmp", str(a.vm.config.control_qmp_path))
                assert as_json.returncode == 0, as_json.stderr
                (pair,) = json.loads(as_json.stdout)["pairs"]
                assert (pair["standby"], pair["standby_negotiated"]) == ("standby0", True)
                assert pair["primary"] == {"id": "primary0", "state": "visible"}
                assert pair["backend"]["qemu_side"] == "connected" and pair["healthy"]

                pinger = HostPinger(lab.guest_address)
                await pinger.start()
                await asyncio.sleep(2)

                there = time.time()
                out = await migrate(lab, a, b)
                for line in ("source: wait-unplug", "source: completed", "UNPLUG_PRIMARY"):
                    assert line in out
                assert "target primary plugged before RESUME: yes" in out
                # The source's `run` has nothing left to serve: it ends by itself.
                assert await runs["a"].exit_code() == 0, runs["a"].output
                assert "the VM migrated away" in runs["a"].output
                assert "tx0" in runs["a"].output, "the counters were printed"
                assert not runs["a"].socket.exists()
                await wait_primary_enslaved(b.console, timeout=30)
                await runs["b"].wait_for("steering to the primary", timeout=30)

                # And back, to a new QEMU (and its `run`) on the first side.
                runs["a2"] = await start_run(lab, "a2")
                a2 = await vm_for(lab, "a2", runs["a2"], incoming=True)
                await a.vm.stop()
                back = time.time()
                report = json.loads(await migrate(lab, b, a2, "--json"))
                assert report["status"] == "completed" and report["problems"] == []
                assert report["pairs"] == {"standby0": "primary0"}
                assert report["primary_plugged_before_resume"] is True
                assert 0 < report["downtime_ms"] <= report["total_time_ms"]
                events = [entry["what"] for entry in report["timeline"]]
                assert "UNPLUG_PRIMARY" in events, events
                assert await runs["b"].exit_code() == 0, runs["b"].output
                await wait_primary_enslaved(a2.console, timeout=30)
                await asyncio.sleep(3)
                trace = await pinger.stop()
            finally:
                for process in runs.values():
                    await process.stop()
            consoles = [a.console, b.console, a2.console]
            for leg, start, end in (("there", there, back), ("back", back, None)):
                result = analyse(trace, lab.timeline, consoles, start=start, end=end)
                print(f"{leg}: {result.report()}")
                assert_bounded(result)
            print(lab.timeline.table())
            # Each `run` steered its own side.
            log = runs["a"].output
            assert "the guest negotiated STANDBY on standby0" in log
            assert "it released its primary" in log
            assert "steering to the primary: the guest answered through its primary" in (
                runs["b"].output
            )

    run(scenario(), timeout=400)
