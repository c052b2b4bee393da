"""The controller's pieces that need no QEMU: config files, traffic analysis,
timelines, and the repair of a half-unplugged primary against a fake monitor that
injects the state a real QEMU reaches only in rare failures."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from failover_backend.config import load_config
from failover_backend.controller import PairStatus
from failover_backend.errors import ConfigError, MonitorCommandError, MonitorUnavailable
from failover_backend.lab.traffic import parse_ping
from failover_backend.migration import MigrationReport
from failover_backend.pairing import PrimaryConfig
from failover_backend.primary import Primary
from failover_backend.qmp import QmpEvent, QmpSession
from failover_backend.standby import BackendLink
from failover_backend.timeline import Timeline

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
        (('mac = "52:54:00:12:34:57"', 'mac = "nope"'), "pair[1].backend.mac", "unicast"),
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

    async def visible_device_ids(self) -> set[str]:
        return {"standby0", "primary0"} if self.on_bus else {"standby0"}

    async def pci_devices(self) -> list[dict[str, Any]]:
        return [{"qdev_id": "primary0", "class_info": {"class": 0x0200}}] if self.on_bus else []

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
