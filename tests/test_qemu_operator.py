"""What an operator's tools do when things go wrong around a migration: the tool
that started it dies, the guest never lets go, QEMU exits first, the standby's
backend restarts under a running VM. Real QEMU, a real guest, the real commands."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import run
from failover_backend.lab.scenario import GUEST_MAC, Lab, LabVM
from failover_backend.migration import Migration, MigrationError, MigrationOptions
from failover_backend.pairing import PrimaryConfig
from failover_backend.primary import Primary
from failover_backend.vm_devices import visible_device_ids
from guest import wait_primary_enslaved, wait_primary_gone
from runproc import RunProcess, cli, start_cli, start_run

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_lab")]


async def scrape(url: str) -> dict[tuple[str, str], float]:
    """Every sample at ``url``, by name and the value of its one label ("" if none)."""
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            label = next(iter(sample.labels.values()), "")
            samples[(sample.name, label)] = sample.value
    return samples


def migrate_args(lab: Lab, source: LabVM, target: LabVM, *extra: str) -> list[str]:
    return [
        "migrate",
        "--source-qmp",
        str(source.vm.config.control_qmp_path),
        "--target-qmp",
        str(target.vm.config.control_qmp_path),
        "--uri",
        f"unix:{lab.workdir}/migration.sock",
        *extra,
    ]


async def wait_status(vm: LabVM, status: str, timeout: float = 60) -> None:
    await vm.qmp.wait_event(
        "MIGRATION", match=lambda e: e.data.get("status") == status, timeout=timeout
    )


async def vm_for(lab: Lab, name: str, process: RunProcess, **machine: object) -> LabVM:
    return await lab.vm(
        name,
        primary=False,
        standby_socket=process.socket,
        connect_qmp=False,
        **machine,  # type: ignore[arg-type]
    )


def test_run_cancels_a_migration_whose_tool_died_in_wait_unplug_and_ends_with_qemu() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            src_run = await start_run(lab, "source", wait_unplug=3, metrics=True)
            try:
                # A guest that never releases its primary (it ignores hotplug requests,
                # and misses hot-added devices: it is shown its primary by hand).
                source = await vm_for(lab, "source", src_run, guest_ignores_unplug=True)
                target = await lab.vm("target", incoming=True, guest_ignores_unplug=True)
                await source.boot()
                await source.qmp.wait_event("FAILOVER_NEGOTIATED", timeout=60)
                await source.console.check("echo 1 > /sys/bus/pci/rescan")
                await wait_primary_enslaved(source.console, timeout=60)

                tool = await start_cli(
                    *migrate_args(lab, source, target, "--wait-unplug-timeout", "600")
                )
                await wait_status(source, "wait-unplug")
                tool.send_signal(signal.SIGKILL)
                await tool.wait()

                # Trying again says what QEMU is doing and what to do about it.
                retry = await cli(*migrate_args(lab, source, target))
                assert retry.returncode == 1, retry
                assert "a migration is already in progress on the source (state wait-unplug" in (
                    retry.stderr
                )
                assert "python -m failover_backend cancel --qmp" in retry.stderr

                # `run` saw the same events: it cancels at its deadline, and says so
                # while QEMU waits (up to 30 s) for an eject that never comes.
                started = time.monotonic()
                await src_run.wait_for("did not release its primary within 3 s", timeout=15)
                await src_run.wait_for("migration cancelled", timeout=45)
                assert "still cancelling after" in src_run.output
                assert time.monotonic() - started < 45
                assert (await source.qmp.execute("query-migrate"))["status"] == "cancelled"
                assert await source.qmp.run_state() == "running"
                assert "primary0" in await visible_device_ids(source.qmp)
                await wait_primary_enslaved(source.console, timeout=30)

                # And its metrics say so.
                scraped = await scrape(await src_run.metrics_url())
                assert scraped[("failover_backend_standby_negotiated", "standby0")] == 1
                assert scraped[("failover_backend_primary_present", "standby0")] == 1
                assert scraped[("failover_backend_migrations_total", "cancelled")] == 1
                assert scraped[("failover_backend_migrations_total", "completed")] == 0
                assert scraped[("failover_backend_wait_unplug_cancels_total", "")] == 1
                held = scraped[("failover_backend_last_migration_wait_unplug_seconds", "")]
                assert 3 <= held < 10, held
                assert ("failover_backend_last_migration_downtime_seconds", "") not in scraped
                # Steering announced the guest's MAC when its primary came and went.
                assert scraped[("failover_backend_announcements_total", "standby0")] >= 1
                modes = [key for key in scraped if key[0] == "failover_backend_steering_mode"]
                assert len(modes) == 1, modes

                # QEMU quits: `run` ends with it, cleanly.
                await source.qmp.execute("quit")
                assert await src_run.exit_code() == 0, src_run.output
            finally:
                await src_run.stop()
            assert "the VM shut down (host-qmp-quit)" in src_run.output
            assert "tx0" in src_run.output, "the counters were printed"
            assert "Traceback" not in src_run.output
            assert not src_run.socket.exists()

    run(scenario(), timeout=300)


def test_cancel_follows_qemu_until_the_primary_is_back() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            # Native PCIe hotplug: the guest ejects 5 s after it is asked to.
            source = await lab.vm("source", acpi_hotplug=False)
            target = await lab.vm("target", incoming=True, acpi_hotplug=False)
            await source.boot()
            await wait_primary_enslaved(source.console, timeout=60)
            tool = await start_cli(
                *migrate_args(lab, source, target, "--wait-unplug-timeout", "600")
            )
            await wait_status(source, "wait-unplug")
            tool.send_signal(signal.SIGKILL)
            await tool.wait()

            result = await cli("cancel", "--qmp", str(source.vm.config.control_qmp_path))
            assert result.returncode == 0, result.stdout + result.stderr
            assert "cancelling the migration (state wait-unplug)" in result.stdout
            assert "migration cancelled" in result.stdout
            assert "standby0: primary primary0 visible to the guest: yes" in result.stdout
            await wait_primary_enslaved(source.console, timeout=30)
            again = await cli("cancel", "--qmp", str(source.vm.config.control_qmp_path))
            assert again.returncode == 0 and "no migration in progress" in again.stdout

    run(scenario(), timeout=300)


def test_a_migration_deadline_shows_the_cancel_and_the_target_exit() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            source = await lab.vm("source", guest_ignores_unplug=True)
            target = await lab.vm("target", incoming=True, guest_ignores_unplug=True)
            await source.boot()
            await source.console.check("echo 1 > /sys/bus/pci/rescan")
            await wait_primary_enslaved(source.console, timeout=60)
            started = time.monotonic()
            result = await cli(*migrate_args(lab, source, target, "--wait-unplug-timeout", "5"))
            elapsed = time.monotonic() - started
            out = result.stdout
            assert result.returncode == 1, out + result.stderr
            assert "the guest did not release the primary within 5 s" in out
            # QEMU waits 30 s for the eject after the cancel: the wait is visible.
            assert out.count("still cancelling after") >= 4, out
            assert "target-exited" in out and "target QEMU exited at t=" in out, out
            assert "migration cancelled" in out
            assert 30 < elapsed < 60
            assert "source primary back: yes" in out

    run(scenario(), timeout=300)


def test_run_ends_when_qemu_goes_first() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            runs = {name: await start_run(lab, name) for name in ("source", "target")}
            try:
                source = await vm_for(lab, "source", runs["source"])
                target = await vm_for(lab, "target", runs["target"], incoming=True)
                await source.boot()
                await wait_primary_enslaved(source.console, timeout=60)
                await source.qmp.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
                migration = asyncio.create_task(
                    Migration(
                        source.qmp, target.qmp, f"unix:{lab.workdir}/m.sock", MigrationOptions()
                    ).run()
                )
                await wait_status(source, "active")
                await source.vm.kill()
                with pytest.raises(MigrationError):
                    await migration
                # The target's incoming migration failed: its QEMU exits, and so does
                # its `run`, saying why; the killed source's `run` fails.
                assert await runs["target"].exit_code(60) == 3, runs["target"].output
                assert await runs["source"].exit_code(60) == 1, runs["source"].output
            finally:
                for process in runs.values():
                    await process.stop()
            assert "the incoming migration failed" in runs["target"].output
            assert "QEMU exited without shutting down" in runs["source"].output
            for process in runs.values():
                assert "Traceback" not in process.output, process.output
                assert "tx0" in process.output
                assert not process.socket.exists()

    run(scenario(), timeout=300)


def test_a_restarted_backend_gets_its_qemu_back() -> None:
    async def scenario() -> None:
        async with Lab() as lab:
            socket = lab.workdir / "serve.sock"
            # A persistent TAP on the bridge, as a host's network setup gives it: it
            # keeps its bridge port when the backend restarts.
            tap = lab.network.add_tap("fbsb")
            serve_args = (
                "serve",
                "--socket",
                str(socket),
                "--port",
                f"tap:{tap}",
                "--mac",
                GUEST_MAC,
            )
            serve = await start_cli(*serve_args)
            for _ in range(100):
                if socket.exists():
                    break
                await asyncio.sleep(0.05)
            source = await lab.vm("source", standby_socket=socket)
            target = await lab.vm("target", incoming=True)
            await source.boot()
            await wait_primary_enslaved(source.console, timeout=60)
            qmp2 = str(source.vm.config.control_qmp_path)
            status = await cli("status", "--qmp", qmp2)
            assert status.returncode == 0 and "backend:   connected" in status.stdout, status

            serve.send_signal(signal.SIGKILL)
            await serve.wait()
            for _ in range(50):
                status = await cli("status", "--qmp", qmp2)
                if status.returncode != 0:
                    break
                await asyncio.sleep(0.2)
            assert status.returncode == 1, status
            assert (
                f"backend:   disconnected (QEMU's side): no backend listens on {socket}; "
                "no failover path"
            ) in status.stdout, status.stdout
            refused = await cli(*migrate_args(lab, source, target))
            assert refused.returncode == 1
            assert "its backend is disconnected, so this migration has no failover path" in (
                refused.stderr
            )
            assert "--force" in refused.stderr
            assert (await source.qmp.execute("query-migrate")).get("status") in (None, "none")

            # The backend comes back: QEMU reconnects by itself (reconnect=1).
            serve = await start_cli(*serve_args)
            try:
                for _ in range(100):
                    status = await cli("status", "--qmp", qmp2)
                    if status.returncode == 0:
                        break
                    await asyncio.sleep(0.2)
                assert "backend:   connected" in status.stdout, status
                # And the standby carries the guest's traffic once the primary is gone.
                config = PrimaryConfig("primary0", "e1000e", "root1", "standby0")
                await Primary(source.qmp, config).unplug(deadline=20)
                await wait_primary_gone(source.console)
                out = await source.console.check(f"ping -c 5 -i 0.1 -W 2 {lab.host_address}")
                assert "5 packets received" in out
            finally:
                serve.send_signal(signal.SIGTERM)
                out_bytes, _ = await asyncio.wait_for(serve.communicate(), 30)
            out = out_bytes.decode()
            assert "frontend connected" in out and "features negotiated" in out, out

    run(scenario(), timeout=300)
