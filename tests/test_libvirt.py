"""``run`` on a libvirt domain: libvirtd started by the test (a mount namespace of its
own), the tiny guest defined and started through it, the standby served by ``run``,
every failover step seen through libvirt's QMP passthrough."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import run
from failover_backend import StandbyBackend
from failover_backend.lab.guest import build_guest_image
from failover_backend.lab.hostnet import unique_name
from libvirt_lab import Libvirtd, tiny_domain
from runproc import RunProcess, cli, launch_run

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt, pytest.mark.usefixtures("libvirt_lab")]

MAC = "52:54:00:4c:56:01"

RUN_CONFIG = """
[libvirt]
uri = "{uri}"
domain = "tiny"
standby = "ua-standby0"

[backend]
socket = "{socket}"
port = "tap:{tap}"
mac = "{mac}"

[timeouts]
qmp = 120
negotiation = 120
"""


@contextlib.asynccontextmanager
async def run_and_domain(
    standby: str = "ua-standby0", *, wait_started: bool = True
) -> AsyncIterator[tuple[Libvirtd, RunProcess]]:
    """One libvirtd; a ``run`` whose file names ``standby``, listening before the
    domain exists (as a unit ordered before libvirt's would); then the tiny domain
    defined and started on the socket it serves (``wait_started``: before the test
    goes on; else the start goes on beside the test, and is ended with the domain)."""
    image = await asyncio.to_thread(build_guest_image)
    root = Path(tempfile.mkdtemp(prefix="fblv-", dir="/tmp"))
    daemon = Libvirtd(root / "a", 0)
    await daemon.start()
    socket = root / "tiny.sock"
    config = root / "tiny.toml"
    config.write_text(
        RUN_CONFIG.format(uri=daemon.uri, socket=socket, tap=unique_name("fblv"), mac=MAC).replace(
            'standby = "ua-standby0"', f'standby = "{standby}"'
        )
    )
    xml = root / "tiny.xml"
    xml.write_text(
        tiny_domain("tiny", image, standby_socket=socket, mac=MAC, serial=root / "tiny.serial")
    )
    runner: RunProcess | None = None
    starting: asyncio.Future[str] | None = None
    try:
        runner = await launch_run(config, [socket], [])
        await asyncio.to_thread(daemon.virsh, "define", str(xml))
        starting = asyncio.ensure_future(
            asyncio.to_thread(daemon.virsh, "start", "tiny", check=wait_started)
        )
        if wait_started:
            await starting
        yield daemon, runner
    finally:
        if runner is not None:
            await runner.stop()
        await daemon.stop()
        if starting is not None:
            await asyncio.gather(starting, return_exceptions=True)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_run_follows_a_libvirt_domain_from_negotiation_to_its_end() -> None:
    async def scenario() -> None:
        async with run_and_domain() as (daemon, runner):
            await runner.wait_for("the guest negotiated STANDBY on ua-standby0", timeout=150)
            pci = await asyncio.to_thread(
                daemon.virsh, "qemu-monitor-command", "tiny", '{"execute":"query-pci"}'
            )
            assert '"qdev_id":"ua-primary0"' in pci, "QEMU plugged the hidden primary"
            await asyncio.to_thread(daemon.virsh, "destroy", "tiny")
            assert await runner.exit_code(60) == 0, runner.output
            assert "the VM shut down (host-signal)" in runner.output
            assert "frontend connected (connection 1)" in runner.output
            assert "Traceback" not in runner.output

    run(scenario(), timeout=360)


def test_run_refuses_a_domain_that_does_not_pair_what_it_serves() -> None:
    """The configuration names a standby the domain does not have: run says which
    rule, with the domain's standbys, and exits 1 before any step touches the VM.

    The domain's start is not waited for: run checks the domain once libvirt has
    launched its QEMU, which may still be connecting to the standby's socket; when
    run leaves, that QEMU (reconnecting every second) waits for a backend that never
    comes back, and its start would not end.
    """

    async def scenario() -> None:
        async with run_and_domain(standby="ua-net7", wait_started=False) as (_, runner):
            assert await runner.exit_code(90) == 1, runner.output
            assert (
                "standby-in-domain: domain tiny has no vhostuser standby with alias "
                "'ua-net7' (its standbys: ['ua-standby0'])"
            ) in runner.output
            assert "primary0" not in runner.output, "nothing was done to the VM"

    run(scenario(), timeout=240)


async def _wait_primary_visible(daemon: Libvirtd, timeout: float) -> None:
    """QEMU plugged the hidden primary: the guest negotiated STANDBY."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        pci = await asyncio.to_thread(
            daemon.virsh, "qemu-monitor-command", "tiny", '{"execute":"query-pci"}', check=False
        )
        if '"qdev_id":"ua-primary0"' in pci:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"no primary after {timeout:g} s:\n{daemon.qemu_log('tiny')[-2000:]}"
            )
        await asyncio.sleep(1)


class TwoHosts:
    """Two libvirtd daemons (two hosts), a standby backend for each, the tiny guest
    defined and started on the first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.a = Libvirtd(root / "a", 0)
        self.b = Libvirtd(root / "b", 1)
        self.sockets = {"a": root / "a.sock", "b": root / "b.sock"}
        self.backends: dict[str, StandbyBackend] = {}

    def serve(self, side: str) -> None:
        backend = StandbyBackend(self.sockets[side], port="null", mac=MAC)
        backend.start()
        self.backends[side] = backend

    async def start(self, *, ignores_unplug: bool = False, daemons_started: bool = False) -> None:
        image = await asyncio.to_thread(build_guest_image)
        if not daemons_started:
            await asyncio.gather(self.a.start(), self.b.start())
        xml = self.root / "tiny.xml"
        xml.write_text(
            tiny_domain(
                "tiny",
                image,
                standby_socket=self.sockets["a"],
                mac=MAC,
                guest_ignores_unplug=ignores_unplug,
            )
        )
        await asyncio.to_thread(self.a.virsh, "define", str(xml))
        await asyncio.to_thread(self.a.virsh, "start", "tiny")
        await _wait_primary_visible(self.a, 150)

    def migrate_args(
        self, source: Libvirtd, dest: Libvirtd, dest_side: str, *, p2p: bool = True
    ) -> list[str]:
        """``migrate --libvirt``: peer to peer (the source libvirtd reaches the
        destination over TCP), or direct (this process talks to both)."""
        port = 49152 + 100 * dest.index + 50
        return [
            "migrate",
            "--libvirt",
            source.uri,
            "--domain",
            "tiny",
            "--to",
            dest.tcp_uri if p2p else dest.uri,
            *(["--p2p"] if p2p else []),
            "--migrate-uri",
            f"tcp://127.0.0.1:{port}",
            "--listen-address",
            "127.0.0.1",
            "--dest-socket",
            f"ua-standby0={self.sockets[dest_side]}",
            "--json",
        ]

    async def stop(self) -> None:
        await asyncio.gather(self.a.stop(), self.b.stop())
        for backend in self.backends.values():
            backend.stop()
        subprocess.run(["rm", "-rf", str(self.root)], check=False)


def _running(daemon: Libvirtd) -> list[str]:
    return daemon.virsh("list", "--name").split()


def test_migrate_through_libvirt_there_and_back_with_the_standby_on_each_side() -> None:
    async def scenario() -> None:
        hosts = TwoHosts(Path(tempfile.mkdtemp(prefix="fblv-", dir="/tmp")))
        try:
            hosts.serve("a")
            hosts.serve("b")
            await hosts.start()
            there = await cli(*hosts.migrate_args(hosts.a, hosts.b, "b"), timeout=300)
            assert there.returncode == 0, there.stderr + there.stdout
            report = json.loads(there.stdout)
            assert report["status"] == "completed"
            assert report["pairs"] == {"ua-standby0": "ua-primary0"}
            states = [
                e["detail"]
                for e in report["timeline"]
                if e["what"] == "MIGRATION" and e["source"] == "source"
            ]
            # libvirt pauses QEMU before the switch-over to hand the devices over.
            assert states == [
                "setup",
                "wait-unplug",
                "active",
                "pre-switchover",
                "device",
                "completed",
            ], states
            assert [e["what"] for e in report["timeline"]].count("UNPLUG_PRIMARY") == 1
            incoming = [
                e["detail"]
                for e in report["timeline"]
                if e["what"] == "MIGRATION" and e["source"] == "target"
            ]
            assert incoming[-1] == "completed", incoming
            assert report["job_statistics"]["memory_total"] > 0
            assert report["downtime_ms"] is not None and report["total_time_ms"] > 0
            assert report["primary_plugged_before_resume"] is True, report["problems"]
            target = [e["what"] for e in report["timeline"] if e["source"] == "target"]
            assert target.index("FAILOVER_NEGOTIATED") < target.index("RESUME"), target
            assert _running(hosts.a) == [] and _running(hosts.b) == ["tiny"]
            await _wait_primary_visible(hosts.b, 120)
            assert hosts.backends["b"].state == "connected"
            # And back, libvirt's direct (client-managed) way.
            back = await cli(*hosts.migrate_args(hosts.b, hosts.a, "a", p2p=False), timeout=300)
            assert back.returncode == 0, back.stderr + back.stdout
            assert json.loads(back.stdout)["status"] == "completed"
            assert _running(hosts.a) == ["tiny"] and _running(hosts.b) == []
            await _wait_primary_visible(hosts.a, 120)
        finally:
            await hosts.stop()

    run(scenario(), timeout=600)


def test_a_guest_that_never_releases_the_primary_is_aborted_at_the_deadline() -> None:
    async def scenario() -> None:
        hosts = TwoHosts(Path(tempfile.mkdtemp(prefix="fblv-", dir="/tmp")))
        try:
            hosts.serve("a")
            hosts.serve("b")
            await hosts.start(ignores_unplug=True)
            started = asyncio.get_running_loop().time()
            result = await cli(
                *hosts.migrate_args(hosts.a, hosts.b, "b"),
                "--wait-unplug-timeout",
                "5",
                timeout=300,
            )
            assert result.returncode == 1, result.stderr + result.stdout
            report = json.loads(result.stdout)
            assert report["status"] == "cancelled"
            assert report["wait_unplug_s"] >= 5
            assert report["source_primary_back"] is True
            whats = [e["what"] for e in report["timeline"]]
            assert "deadline" in whats and "primary back" in whats
            assert "migration cancelled" in result.stderr
            assert asyncio.get_running_loop().time() - started < 120
            assert _running(hosts.a) == ["tiny"] and _running(hosts.b) == []
        finally:
            await hosts.stop()

    run(scenario(), timeout=480)


def test_a_destination_without_its_standby_backend_is_refused_before_anything_moves() -> None:
    async def scenario() -> None:
        hosts = TwoHosts(Path(tempfile.mkdtemp(prefix="fblv-", dir="/tmp")))
        try:
            hosts.serve("a")  # nothing serves b.sock
            await hosts.start()
            result = await cli(*hosts.migrate_args(hosts.a, hosts.b, "b"), timeout=60)
            assert result.returncode == 1
            assert (
                f"ua-standby0: no standby backend listens on {hosts.sockets['b']} for the "
                "destination"
            ) in result.stderr
            assert json.loads(result.stdout)["status"] == "preflight"
            assert _running(hosts.a) == ["tiny"] and _running(hosts.b) == []
        finally:
            await hosts.stop()

    run(scenario(), timeout=300)


def test_a_run_on_each_host_and_one_migrate_between_them() -> None:
    """The operator's setup: ``run`` on each host serves its standby and follows the
    domain through libvirt; ``migrate --libvirt`` from anywhere moves it."""

    async def scenario() -> None:
        hosts = TwoHosts(Path(tempfile.mkdtemp(prefix="fblv-", dir="/tmp")))
        runs: dict[str, RunProcess] = {}
        try:
            for side, daemon in (("a", hosts.a), ("b", hosts.b)):
                config = hosts.root / f"{side}.toml"
                config.write_text(
                    RUN_CONFIG.format(
                        uri=daemon.uri,
                        socket=hosts.sockets[side],
                        tap=unique_name("fblv"),
                        mac=MAC,
                    ).replace("qmp = 120", "qmp = 300")
                )
            await asyncio.gather(hosts.a.start(), hosts.b.start())
            for side in ("a", "b"):
                runs[side] = await launch_run(
                    hosts.root / f"{side}.toml", [hosts.sockets[side]], []
                )
            await hosts.start(daemons_started=True)
            await runs["a"].wait_for("the guest negotiated STANDBY on ua-standby0", timeout=60)
            there = await cli(*hosts.migrate_args(hosts.a, hosts.b, "b"), timeout=300)
            assert there.returncode == 0, there.stderr + there.stdout
            assert await runs["a"].exit_code(60) == 0, runs["a"].output
            assert "the VM migrated away" in runs["a"].output
            await _wait_primary_visible(hosts.b, 120)
            # As after a migration between QMP sockets: the primary is back, steering
            # probes through the switch for it.
            await runs["b"].wait_for("ua-standby0: steering to the primary", timeout=60)
            assert runs["b"].process.returncode is None, "run follows the domain there"
            for process in runs.values():
                assert "stopped watching" not in process.output, process.output
                assert "Traceback" not in process.output, process.output
                assert "libvirt: " not in process.output, "libvirt's errors are ours to say"
        finally:
            for process in runs.values():
                await process.stop()
            await hosts.stop()

    run(scenario(), timeout=600)
