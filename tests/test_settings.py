"""One rule per backend setting, the same on every surface: the command line, the
TOML file ``run`` reads, and the Python API each hand their values to the native
core, show its rule word for word, and name the setting as their user wrote it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from failover_backend import StandbyBackend
from failover_backend.config import load_config
from failover_backend.errors import ConfigError

TOML = """
[backend]
socket = "{socket}"
mac = "52:54:00:12:34:56"
{line}

[qemu]
qmp = "/run/vm1/qmp.sock"
standby = "standby0"
"""

#: (setting, command-line value, TOML value, Python value, the rule as the core says it)
CASES = [
    ("port", "udp:1", '"udp:1"', "udp:1", "expected null, sink, loop, tap:NAME or gen:SIZE"),
    ("port", "tap:a/b", '"tap:a/b"', "tap:a/b", 'TAP name "a/b" must be 1 to 15 characters'),
    ("port", "tap:" + "x" * 16, f'"tap:{"x" * 16}"', "tap:" + "x" * 16, "1 to 15 characters"),
    ("port", "gen:10", '"gen:10"', "gen:10", "gen frame size: expected 60 to 9018 bytes"),
    ("mac", "01:00:5e:00:00:01", '"01:00:5e:00:00:01"', "01:00:5e:00:00:01", "multicast"),
    ("mac", "52:54:00:12:34", '"52:54:00:12:34"', "52:54:00:12:34", "expected six hex octets"),
    ("queues", "17", "17", 17, "must be between 1 and 16, got 17"),
    ("queue_size", "1000", "1000", 1000, "must be a power of two between 64 and 32768, got 1000"),
    ("mtu", "70000", "70000", 70000, "must be between 68 and 65535, got 70000"),
    ("mtu", "67", "67", 67, "must be between 68 and 65535, got 67"),
    ("poll_us", "-1", "-1", -1, "must be between 0 (never poll) and 1000000, got -1"),
    ("socket_mode", "1000", "0o1000", 0o1000, "expected permission bits up to 0o777, got 0o1000"),
    ("handshake_timeout", "0", "0", 0, "must be more than 0 and at most 3600 seconds, got 0"),
    ("handshake_timeout", "4000", "4000", 4000, "at most 3600 seconds, got 4000"),
]
IDS = [f"{case[0]}={case[3]}" for case in CASES]


def cli_rule(setting: str, value: str, socket: Path) -> str:
    option = "--" + setting.replace("_", "-")
    args = ["--socket", str(socket), "--mac", "52:54:00:12:34:56", option, value]
    if setting == "mac":
        args = ["--socket", str(socket), option, value]
    done = subprocess.run(
        [sys.executable, "-m", "failover_backend", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith("usage: "), done.stderr
    assert " serve " in done.stderr.splitlines()[0], "the command's own usage"
    last = done.stderr.strip().splitlines()[-1]
    prefix = f"serve: error: argument {option}: "
    assert prefix in last, last
    assert not socket.exists(), "nothing opened"
    return last.split(prefix, 1)[1]


def toml_rule(setting: str, value: str, tmp_path: Path) -> str:
    key = "socket" if setting == "socket_path" else setting
    line = "" if setting == "mac" else f"{key} = {value}"
    text = TOML.format(socket=tmp_path / "s.sock", line=line)
    if setting == "mac":
        text = text.replace('"52:54:00:12:34:56"', value)
    path = tmp_path / "vm.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.field == f"backend.{key}", raised.value
    assert raised.value.source == str(path)
    return raised.value.message


def python_rule(setting: str, value: object, tmp_path: Path) -> str:
    kwargs: dict[str, object] = {"mac": "52:54:00:12:34:56", setting: value}
    with pytest.raises(ConfigError) as raised:
        StandbyBackend(tmp_path / "s.sock", **kwargs)  # type: ignore[arg-type]
    assert raised.value.field == f"{setting}=", raised.value
    return raised.value.message


@pytest.mark.parametrize(("setting", "cli", "toml", "python", "rule"), CASES, ids=IDS)
def test_a_bad_setting_reads_the_same_on_every_surface(
    tmp_path: Path, setting: str, cli: str, toml: str, python: object, rule: str
) -> None:
    said = {
        "command line": cli_rule(setting, cli, tmp_path / "s.sock"),
        "TOML": toml_rule(setting, toml, tmp_path),
        "Python": python_rule(setting, python, tmp_path),
    }
    assert len(set(said.values())) == 1, said
    assert rule in said["Python"], said


def test_good_settings_come_back_canonical(tmp_path: Path) -> None:
    text = TOML.format(
        socket=tmp_path / "s.sock",
        line='port = "gen:64,count=5,rate=7"\nmtu = 9000\nqueue_size = 256',
    ).replace("52:54:00:12:34:56", "52:54:00:AB:CD:EF")
    path = tmp_path / "vm.toml"
    path.write_text(text)
    (pair,) = load_config(path).pairs
    assert (pair.backend.port, pair.backend.mac) == ("gen:64,rate=7,count=5", "52:54:00:ab:cd:ef")
    assert (pair.backend.mtu, pair.backend.queue_size) == (9000, 256)
