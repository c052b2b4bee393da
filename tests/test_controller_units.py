"""The controller's pieces that need no QEMU: config files, traffic analysis,
timelines, and the repair of a half-unplugged primary against a fake monitor that
injects the state a real QEMU reaches only in rare failures."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import failover_backend.errors
from failover_backend import StandbyBackend
from failover_backend.config import load_config
from failover_backend.controller import PairStatus
from failover_backend.errors import ConfigError, MonitorCommandError, MonitorUnavailable
from failover_backend.lab.traffic import parse_ping
from failover_backend.migrate_command import ProgressLines
from failover_backend.migration import MigrationReport, ram_line
from failover_backend.pairing import PrimaryConfig
from failover_backend.primary import Primary
from failover_backend.qemu_args import StandbyDevice
from failover_backend.qmp import QmpEvent, QmpSession
from failover_backend.standby import BackendLink, unix_socket_listens
from failover_backend.timeline import Timeline
from failover_backend.waiting import Changes, within

GOOD = """
[backend]
socket = "/run/fb/vm1.sock"
port = "tap:fbtap0"
mac = "52:54:00:12:34:56"

[qemu]
qmp = "/run/vm1/qmp.sock"
standby = "net1"

[primary]
id = "hostdev0"
driver = "vfio-pci"
bus = "root1"
properties = { host = "0000:3b:00.1" }

[timeouts]
negotiation = 30
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pair.toml"
    path.write_text(text)
    return path


def test_a_good_config_reads_into_its_sections(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    (pair,) = config.pairs
    assert pair.backend.port == "tap:fbtap0" and pair.backend.queues == 1
    assert pair.standby == "net1"
    assert pair.primary is not None
    assert pair.primary.device_add_args() == {
        "driver": "vfio-pci",
        "id": "hostdev0",
        "bus": "root1",
        "failover_pair_id": "net1",
        "mac": "52:54:00:12:34:56",
        "host": "0000:3b:00.1",
    }
    assert config.timeouts.negotiation == 30.0 and config.timeouts.unplug == 10.0
    assert config.timeouts.wait_unplug == 30.0


PAIRS = """
[qemu]
qmp = "/run/vm1/qmp.sock"

[[pair]]
standby = "standby0"
backend = { socket = "/run/fb/vm1-0.sock", port = "tap:fb0", mac = "52:54:00:12:34:56" }
primary = { id = "hostdev0", bus = "root1", properties = { host = "0000:3b:00.1" } }

[[pair]]
standby = "standby1"
backend = { socket = "/run/fb/vm1-1.sock", port = "tap:fb1", mac = "52:54:00:12:34:57" }

[timeouts]
wait_unplug = 5
"""


def test_several_pairs_of_one_vm(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, PAIRS))
    assert [p.standby for p in config.pairs] == ["standby0", "standby1"]
    first, second = config.pairs
    assert first.primary is not None and first.primary.pair_id == "standby0"
    assert first.primary.mac == "52:54:00:12:34:56", "the pair's MAC"
    assert second.primary is None and second.backend.port == "tap:fb1"
    assert config.timeouts.wait_unplug == 5.0


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (('port = "tap:fb1"', 'port = "tap:fb0"'), "pair[1].backend.port", "already pair[0]"),
        (('"standby1"', '"standby0"'), "pair[1].standby", "already pair[0]"),
        (("[[pair]]", "[backend]\nsocket = 'x'\n[[pair]]"), "backend", "do not mix"),
        (('mac = "52:54:00:12:34:57"', 'mac = "nope"'), "pair[1].backend.mac", "six hex octets"),
        (('standby = "standby1"\n', ""), "pair[1].standby", "missing"),
    ],
)
def test_pair_errors_name_the_pair_and_the_field(
    tmp_path: Path, change: tuple[str, str], field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, PAIRS.replace(*change, 1)))
    assert raised.value.field == field, raised.value
    assert says in str(raised.value)


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (('port = "tap:fbtap0"', 'port = "udp:1"'), "backend.port", "tap:NAME or gen:SIZE"),
        (('port = "tap:fbtap0"', 'port = "gen:10"'), "backend.port", "expected 60 to 9018 bytes"),
        (('mac = "52:54:00:12:34:56"', 'mac = "01:00:5e:00:00:01"'), "backend.mac", "unicast"),
        (('socket = "/run/fb/vm1.sock"\n', ""), "backend.socket", "missing; add it"),
        (('standby = "net1"', "standby = 3"), "qemu.standby", "expected a string"),
        (("negotiation = 30", "negotiation = true"), "timeouts.negotiation", "a number"),
        (("negotiation = 30", "negotiation = -1"), "timeouts.negotiation", "positive"),
        (('bus = "root1"', 'bus = "root1"\nbsu = "x"'), "primary.bsu", "unknown key"),
        (("[timeouts]", "[timeout]"), "timeout", "unknown table"),
    ],
)
def test_config_errors_name_the_file_the_field_and_the_fix(
    tmp_path: Path, change: tuple[str, str], field: str, says: str
) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.field == field
    assert raised.value.source == str(path)
    assert says in str(raised.value)


def test_a_config_that_is_not_toml_or_not_there(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[backend\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_run_with_a_bad_config_exits_1_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('port = "tap:fbtap0"', 'port = "udp:1"'))
    result = subprocess.run(
        [sys.executable, "-m", "failover_backend", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"{path}: backend.port:" in result.stderr


def test_ping_log_shows_loss_windows() -> None:
    lines = [f"64 bytes from 10.0.0.1: seq={n} ttl=64 time=0.5 ms" for n in range(100)]
    lost = set(range(10, 12)) | set(range(40, 60))
    record = parse_ping("\n".join(line for n, line in enumerate(lines) if n not in lost), 0.05)
    windows = record.windows()
    assert [(w.first_seq, w.last_seq, w.lost) for w in windows] == [(10, 11, 2), (40, 59, 20)]
    assert windows[1].seconds == pytest.approx(21 * 0.05)
    assert windows[1].starts_at == pytest.approx(2.0)
    assert record.longest_gap == pytest.approx(1.05)
    assert parse_ping("", 0.05).windows() == []


def test_timeline_orders_entries_by_time() -> None:
    timeline = Timeline()
    timeline.add("target", "RESUME", at=10.5)
    timeline.add("source", "MIGRATION", "setup", at=10.0)
    table = timeline.table().splitlines()
    assert "source" in table[1] and "setup" in table[1]
    assert table[2].split()[0] == "0.500"
    assert timeline.find("target", "RESUME") is not None


class FakeMonitor:
    """Just enough of QmpSession for Primary: a primary realized but off the bus."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, dict[str, Any] | None]] = []
        self.events: list[QmpEvent] = []
        self.realized = True
        self.on_bus = False

    def mark(self) -> int:
        return len(self.events)

    async def qom_get(self, path: str, prop: str) -> Any:
        if path.endswith("/primary0") and self.realized:
            return "e1000e"
        if path.endswith("/standby0") and prop == "type":
            return "virtio-net-pci"
        if path.endswith("/standby0") and prop == "mac":
            return "52:54:00:12:34:56"
        if path.endswith("/root1") and prop == "type":
            return "pcie-root-port"
        if path.endswith("/root1") and prop == "hotplug":
            return True
        if path.endswith("/standby0") and prop == "failover":
            return True
        raise MonitorCommandError("qom-get", {"path": path}, "DeviceNotFound", "not found")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.commands.append((command, arguments))
        if command == "device_del":
            self.realized = False
            self.events.append(QmpEvent(0.0, "DEVICE_DELETED", {"device": "primary0"}))
        elif command == "device_add":
            self.realized = self.on_bus = True
        elif command == "qom-list":
            ids = ["standby0", "root1"] + (["primary0"] if self.realized else [])
            return [{"name": i, "type": "child<x>"} for i in ids]
        elif command == "x-query-virtio-status":
            return {"guest-features": {"dev-features": ["VIRTIO_NET_F_STANDBY: standby"]}}
        elif command == "device-list-properties":
            return [{"name": "netdev"}]
        elif command == "query-pci":
            devices = [{"qdev_id": "standby0", "class_info": {"class": 0x0200}}]
            if self.on_bus:
                devices.append({"qdev_id": "primary0", "class_info": {"class": 0x0200}})
            return [{"bus": 0, "devices": devices}]
        return {}

    async def wait_device_deleted(self, device_id: str, *, since: int, timeout: float) -> QmpEvent:
        for event in self.events[since:]:
            if event.name == "DEVICE_DELETED" and event.data.get("device") == device_id:
                return event
        raise TimeoutError(device_id)


def test_a_half_unplugged_primary_is_deleted_and_added_again_with_the_same_id() -> None:
    monitor = FakeMonitor()
    config = PrimaryConfig(
        "primary0",
        "e1000e",
        "root1",
        "standby0",
        mac="52:54:00:12:34:56",
        properties={"netdev": "hostnet0"},
    )
    primary = Primary(monitor, config)  # type: ignore[arg-type]
    assert asyncio.run(primary.state()) == "unplugging"
    assert asyncio.run(primary.repair()) is True
    sent = [c for c, _ in monitor.commands if c in ("device_del", "device_add")]
    assert sent == ["device_del", "device_add"]
    added = [args for command, args in monitor.commands if command == "device_add"]
    assert added == [config.device_add_args()], "the same id and properties"
    assert asyncio.run(primary.state()) == "visible"
    assert asyncio.run(primary.repair()) is False, "nothing left to repair"


def test_a_qmp_socket_that_does_not_exist_fails_fast_and_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "no-qemu-here.sock"

    async def connect() -> None:
        await QmpSession("vm").connect(missing, timeout=0.5)

    with pytest.raises(MonitorUnavailable, match=str(missing)):
        asyncio.run(asyncio.wait_for(connect(), 10))
    for argv in (
        ["status", "--qmp", str(missing)],
        ["migrate", "--source-qmp", str(missing), "--target-qmp", str(missing), "--uri", "unix:x"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "failover_backend", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result
        assert "cannot connect to QMP" in result.stderr and str(missing) in result.stderr


def test_socket_access_handshake_deadline_and_polling_in_the_config(tmp_path: Path) -> None:
    text = GOOD.replace(
        'mac = "52:54:00:12:34:56"',
        'mac = "52:54:00:12:34:56"\nsocket_mode = 0o660\nsocket_group = "kvm"\n'
        "handshake_timeout = 2\npoll_us = 0",
    )
    (pair,) = load_config(write(tmp_path, text)).pairs
    assert (pair.backend.socket_mode, pair.backend.socket_group) == (0o660, "kvm")
    assert pair.backend.handshake_timeout == 2.0
    assert pair.backend.poll_us == 0
    octal = load_config(write(tmp_path, text.replace("0o660", '"0640"'))).pairs[0]
    assert octal.backend.socket_mode == 0o640
    for bad, field in (
        ('socket_mode = "rw"', "backend.socket_mode"),
        ("socket_mode = 0o1777", "backend.socket_mode"),
        ("handshake_timeout = 0", "backend.handshake_timeout"),
        ("poll_us = -1", "backend.poll_us"),
        ("poll_us = 1000001", "backend.poll_us"),
    ):
        line = bad.split(" = ")[0]
        broken = "\n".join(bad if row.startswith(line) else row for row in text.splitlines())
        with pytest.raises(ConfigError) as raised:
            load_config(write(tmp_path, broken))
        assert raised.value.field == field


def test_status_as_json_carries_every_fact_of_the_text() -> None:
    status = PairStatus(
        run_state="running",
        standby_id="standby0",
        standby_negotiated=True,
        primary_id="primary0",
        primary_state="unplugging",
        migration="wait-unplug",
        backend_link=BackendLink("disconnected", "/nonexistent/vm1.sock"),
        backend_state=None,
    )
    assert status.to_json() == {
        "vm": "running",
        "standby": "standby0",
        "standby_negotiated": True,
        "primary": {"id": "primary0", "state": "unplugging"},
        "migration": "wait-unplug",
        "backend": {
            "qemu_side": "disconnected",
            "socket": "/nonexistent/vm1.sock",
            "listening": False,
            "backend_side": None,
        },
        "steering": None,
        "healthy": False,
    }
    assert json.loads(json.dumps(status.to_json())) == status.to_json()


def test_migration_report_as_json_carries_the_timeline_relative_to_its_start() -> None:
    timeline = Timeline()
    timeline.add("source", "MIGRATION", "wait-unplug", at=100.0)
    timeline.add("source", "UNPLUG_PRIMARY", "primary0", at=100.25)
    report = MigrationReport(
        status="completed",
        timeline=timeline,
        pairs={"standby0": "primary0"},
        total_time_ms=1800,
        downtime_ms=42,
        wait_unplug_s=0.25,
        primary_plugged_before_resume=True,
        target_exited_at=101.5,
    )
    document = json.loads(json.dumps(report.to_json()))
    assert document["status"] == "completed" and document["downtime_ms"] == 42
    assert document["pairs"] == {"standby0": "primary0"}
    assert document["target_exited_s"] == 1.5
    assert document["timeline"] == [
        {"t": 0.0, "source": "source", "what": "MIGRATION", "detail": "wait-unplug"},
        {"t": 0.25, "source": "source", "what": "UNPLUG_PRIMARY", "detail": "primary0"},
    ]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"queues": 2},
        {"queues": 2, "legacy_interrupts": True},
        {"mtu": 9000, "bus": "root2", "failover": False},
        {"backend_is_client": True, "device_id": "standby1"},
    ],
)
def test_the_command_line_and_the_hot_plug_describe_the_same_standby(
    changes: dict[str, Any],
) -> None:
    """``serve`` prints the command line, ``attach_standby`` sends the QMP
    arguments: both come from one description, option for option."""
    fields: dict[str, Any] = {"socket_path": "/run/fb/vm1.sock", "mac": "52:54:00:12:34:56"}
    standby = StandbyDevice(**fields, **changes)
    line = standby.command_line()
    assert line[0::2] == ["-chardev", "-netdev", "-device"]

    def options(text: str) -> dict[str, str]:
        first, *rest = text.split(",")
        return {"type": first, **dict(item.split("=", 1) for item in rest)}

    def rendered(args: dict[str, Any]) -> dict[str, str]:
        return {
            key: ("on" if v else "off") if isinstance(v, bool) else str(v)
            for key, v in args.items()
        }

    device = standby.device_add()
    assert options(line[5]) == rendered({"type": device.pop("driver"), **device})
    assert options(line[3]) == rendered(standby.netdev_add())
    chardev = standby.chardev_add()
    assert options(line[1])["id"] == chardev["id"] == f"chr-{standby.device_id}"
    server = chardev["backend"]["data"]["server"]
    assert server == standby.backend_is_client
    assert ("server" in options(line[1])) == server
    assert standby.device_add().get("mq") == (True if standby.queues > 1 else None)
    assert standby.device_add().get("host_mtu") == (9000 if "mtu" in changes else None)


def test_the_live_ram_line_reads_query_migrate_and_rewrites_itself_on_a_terminal() -> None:
    info = {
        "status": "active",
        "expected-downtime": 300,
        "ram": {
            "transferred": 512 * 2**20,
            "remaining": 256 * 2**20,
            "total": 1024 * 2**20,
            "dirty-pages-rate": 2560,
            "page-size": 4096,
        },
    }
    assert ram_line(info) == (
        "RAM 512 MiB sent, 256 of 1024 MiB left, guest dirtying 10.0 MiB/s,"
        " expected downtime 300 ms"
    )
    assert ram_line({"status": "setup"}) is None

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    lines = ProgressLines(screen)
    assert lines.live
    lines.step("source: active")
    lines.ram("RAM 10 MiB sent")
    lines.ram("RAM 9 MiB")
    lines.step("source: completed")
    assert screen.getvalue() == (
        "  source: active\n\r  RAM 10 MiB sent\r  RAM 9 MiB      \n  source: completed\n"
    )
    assert not ProgressLines(io.StringIO()).live, "no live line into a pipe or a file"


def test_a_long_lived_session_keeps_only_the_latest_events_and_positions_still_count() -> None:
    session = QmpSession("vm")
    session.keep_events = 4
    for number in range(20):
        session._remember(QmpEvent(float(number), "MIGRATION", {"n": number}))
    assert len(session.events) <= 8, "at most twice keep_events"
    assert session.mark() == 20, "positions count every event ever received"
    last = session.events[-1]
    assert session.index_after(last) == 20
    assert [e.data["n"] for e in session.events_named("MIGRATION", since=18)] == [18, 19]
    # A position from before the forgotten ones starts at the oldest kept.
    oldest = session.events[0].data["n"]
    assert session.events_named("MIGRATION", since=0)[0].data["n"] == oldest
    found = asyncio.run(session.wait_event("MIGRATION", since=0, timeout=0.1))
    assert found.data["n"] == oldest
    with pytest.raises(TimeoutError):
        asyncio.run(session.wait_event("MIGRATION", since=session.mark(), timeout=0.05))


def test_a_task_cancelled_as_its_bounded_wait_ends_is_still_cancelled() -> None:
    """The shape of a hang ``run`` had at the end of a migration: its controller's
    watcher was cancelled in the same loop turn as QEMU's answer arrived, ran on, and
    ``run`` waited for it forever."""

    async def scenario() -> None:
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(within(answer, 10))
        await asyncio.sleep(0)
        answer.set_result(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        slow: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await within(slow, 0.01)
        assert slow.cancelled(), "what timed out is cancelled"

    asyncio.run(scenario())


def test_a_change_wakes_every_waiter_and_a_cancelled_waiter_leaves_the_others() -> None:
    async def scenario() -> None:
        changes = Changes()
        waiters = [asyncio.create_task(changes.wait(None)) for _ in range(3)]
        await asyncio.sleep(0)
        waiters[0].cancel()
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters[1:]), "the others still wait"
        changes.notify()
        await asyncio.wait_for(asyncio.gather(*waiters[1:]), 1)
        assert waiters[0].cancelled()
        started = asyncio.get_running_loop().time()
        await changes.wait(0.05)  # no change: returns after the timeout, no error
        assert asyncio.get_running_loop().time() - started >= 0.04

    asyncio.run(scenario())
    # A second event loop (asyncio.run again) waits on a future of its own.
    asyncio.run(asyncio.wait_for(Changes().wait(0.01), 1))


def test_the_command_line_starts_without_the_lab_and_errors_import_nothing_of_ours() -> None:
    """Module boundaries that keep start-up light and imports acyclic."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, failover_backend.cli; "
            "print(' '.join(m for m in sys.modules if m.startswith('failover_backend')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "failover_backend.cli" in loaded
    assert not [m for m in loaded if m.startswith("failover_backend.lab")], loaded
    errors = Path(failover_backend.errors.__file__).read_text()
    imports = [
        node
        for node in ast.walk(ast.parse(errors))
        if isinstance(node, ast.ImportFrom)
        and (node.level > 0 or "failover_backend" in (node.module or ""))
    ]
    assert imports == [], "errors.py imports nothing from the package"


def test_a_listening_backend_is_found_without_connecting_to_it(tmp_path: Path) -> None:
    """The backend binds under a temporary name and renames the socket into place; the
    kernel lists it by the first name, which the check knows."""
    path = tmp_path / "standby.sock"
    backend = StandbyBackend(path)
    backend.start()
    try:
        assert unix_socket_listens(path)
        assert not unix_socket_listens(tmp_path / "other.sock")
        assert backend.features.connections == 0, "no probe connection was made"
    finally:
        backend.stop()
    assert not unix_socket_listens(path)
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))
    leftover.close()
    assert not unix_socket_listens(path), "a socket file nobody listens on"


def test_a_libvirt_run_file_names_the_domain_and_the_standby_alias(tmp_path: Path) -> None:
    good = tmp_path / "vm1.toml"
    good.write_text(
        '[libvirt]\nuri = "qemu:///system"\ndomain = "vm1"\nstandby = "ua-standby0"\n\n'
        '[backend]\nsocket = "/run/fb/vm1.sock"\nport = "tap:vm1sb"\nmac = "52:54:00:12:34:56"\n'
    )
    config = load_config(good)
    assert config.qemu is None
    assert config.libvirt is not None and config.libvirt.domain == "vm1"
    assert [p.standby for p in config.pairs] == ["ua-standby0"]
    for text, field in (
        (good.read_text().replace('standby = "ua-standby0"\n', ""), "libvirt.standby"),
        (good.read_text() + '\n[qemu]\nqmp = "/run/q.sock"\n', "libvirt"),
        (good.read_text() + '\n[primary]\nid = "p0"\nbus = "root1"\n', "primary"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config(bad)
        assert raised.value.field == field, raised.value


def test_a_guest_kernel_oops_is_shown_from_its_first_line_when_the_console_closes(
    tmp_path: Path,
) -> None:
    # A panicking guest prints far more than the last lines can hold: the error must
    # show where it started (what failed and the call trace), not the panic's tail.
    from failover_backend.lab.console import ConsoleError, GuestConsole

    boot = [f"[    1.{i:06d}] booting {i}" for i in range(40)]
    oops = [
        "[   14.880000] BUG: unable to handle page fault for address: 4d809898a43cebb4",
        "[   14.880100] Call Trace:",
        "[   14.880200]  virtqueue_get_buf_ctx+0x1f/0x40 [virtio_ring]",
    ]
    tail = [f"[   14.9{i:05d}] register dump {i}" for i in range(120)]
    path = tmp_path / "serial.sock"

    async def scenario() -> str:
        async def speak(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write("".join(line + "\r\n" for line in boot + oops + tail).encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(speak, path=str(path))
        console = GuestConsole(path, name="target")
        await console.connect()
        try:
            await console.wait_for("^never printed$", timeout=10)
        except ConsoleError as err:
            return str(err)
        finally:
            await console.close()
            server.close()
        raise AssertionError("no ConsoleError")

    message = asyncio.run(asyncio.wait_for(scenario(), 20))
    shown = message.splitlines()
    assert shown[0] == "target: '^never printed$' console closed; the guest kernel failed:"
    assert shown[1:] == (boot[-5:] + oops + tail)[:80]
