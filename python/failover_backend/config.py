"""The configuration ``python -m failover_backend run --config VM.toml`` reads: one VM,
and the failover pairs of it this process serves.

One pair::

    # The standby's backend (this process serves it).
    [backend]
    socket = "/run/failover-backend/vm1.sock"
    port = "tap:fbtap0"           # null | loop | tap:NAME | gen:SIZE[,rate=FPS][,count=N]
    mac = "52:54:00:12:34:56"     # the guest's MAC: the standby's and the primary's
    queues = 1
    client = false                # true: QEMU listens (chardev server=on)
    socket_mode = 0o600           # who may connect (the default)
    # socket_group = "kvm"        # QEMU's group, when QEMU runs as another user

    # The VM.
    [qemu]
    qmp = "/run/vm1/qmp.sock"     # a QMP socket of its own (QEMU takes one client per socket)
    standby = "standby0"          # the virtio-net-pci id (the primary's failover_pair_id)

    # Optional: the primary this controller plugs (QEMU hides it until negotiation).
    [primary]
    id = "hostdev0"
    driver = "vfio-pci"
    bus = "root1"
    properties = { host = "0000:3b:00.1" }
    # netdev = { type = "tap", id = "hostnet0", ifname = "prim0", script = "no", downscript = "no" }

    [timeouts]
    qmp = 60                      # wait this long for QEMU's QMP socket
    negotiation = 120             # for the guest to negotiate STANDBY
    unplug = 10                   # for the guest to release the primary (repair)
    wait_unplug = 30              # cancel an outgoing migration held up longer

Several pairs of one VM: no ``[backend]``, ``[primary]`` or ``qemu.standby``, one
``[[pair]]`` each instead::

    [qemu]
    qmp = "/run/vm1/qmp.sock"

    [[pair]]
    standby = "standby0"
    backend = { socket = "/run/fb/vm1-0.sock", port = "tap:fb0", mac = "52:54:00:12:34:56" }
    [pair.primary]
    id = "hostdev0"
    bus = "root1"
    properties = { host = "0000:3b:00.1" }

    [[pair]]
    standby = "standby1"
    backend = { socket = "/run/fb/vm1-1.sock", port = "tap:fb1", mac = "52:54:00:12:34:57" }

Every error names the file, the field and what to write instead.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

from . import _native
from .errors import ConfigError
from .pairing import PrimaryConfig

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "a table",
    list: "an array",
}


@dataclass(frozen=True)
class BackendSection:
    socket: Path
    port: str
    mac: str
    queues: int = 1
    client: bool = False
    socket_mode: int = 0o600
    socket_group: str | int | None = None
    handshake_timeout: float = 5.0
    poll_us: int = 50


@dataclass(frozen=True)
class QemuSection:
    qmp: Path


@dataclass(frozen=True)
class Timeouts:
    qmp: float = 60.0
    negotiation: float = 120.0
    unplug: float = 10.0
    wait_unplug: float = 30.0


@dataclass(frozen=True)
class PairSection:
    """One failover pair: the standby this process serves, and its primary."""

    standby: str
    backend: BackendSection
    primary: PrimaryConfig | None = None
    primary_netdev: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunConfig:
    source: Path
    qemu: QemuSection
    pairs: tuple[PairSection, ...]
    timeouts: Timeouts = field(default_factory=Timeouts)


class _Reader:
    """Typed access to one table, with errors that point at the field."""

    def __init__(self, source: Path, table: dict[str, Any], prefix: str) -> None:
        self.source = source
        self.table = table
        self.prefix = prefix
        self.seen: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.prefix}.{key}", message, str(self.source))

    def get(self, key: str, kind: type, default: Any = ..., example: str = "") -> Any:
        """The value of ``key``, checked to be a ``kind``.

        :raise ConfigError: When it is missing (and has no default) or of another type.
        """
        self.seen.add(key)
        if key not in self.table:
            if default is ...:
                hint = f" (for example {key} = {example})" if example else ""
                raise self.error(key, f"missing; add it to [{self.prefix}]{hint}")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(
                key,
                f"expected {_KIND_NAMES.get(kind, kind.__name__)}, "
                f"got {_KIND_NAMES.get(type(value), type(value).__name__)} {value!r}",
            )
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.error(unknown[0], f"unknown key; [{self.prefix}] takes {sorted(self.seen)}")


def _table(source: Path, data: dict[str, Any], name: str, required: bool) -> dict[str, Any] | None:
    table = data.get(name)
    if table is None:
        if required:
            raise ConfigError(name, f"missing table; add a [{name}] section", str(source))
        return None
    if not isinstance(table, dict):
        raise ConfigError(name, f"must be a table ([{name}])", str(source))
    return table


def parse_port(spec: str) -> str:
    """The host port ``spec`` in its canonical spelling. ``ValueError`` when it is not
    one, with the core's rule and words, without its own field prefix (callers name
    the field as the user wrote it)."""
    try:
        return _native.parse_port(spec)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("port: ")) from None


def _backend(source: Path, table: dict[str, Any], prefix: str) -> BackendSection:
    b = _Reader(source, table, prefix)
    socket = Path(b.get("socket", str, example='"/run/failover-backend/vm1.sock"'))
    port = b.get("port", str, "null")
    try:
        port = parse_port(port)
    except ValueError as e:
        raise b.error("port", str(e)) from None
    mac = b.get("mac", str, example='"52:54:00:12:34:56"')
    if not _MAC.match(mac) or int(mac[:2], 16) & 1:
        raise b.error("mac", f"expected a unicast MAC like 52:54:00:12:34:56, got {mac!r}")
    queues = b.get("queues", int, 1)
    if not 1 <= queues <= 16:
        raise b.error("queues", f"must be between 1 and 16, got {queues}")
    client = b.get("client", bool, False)
    mode = b.get("socket_mode", object, 0o600)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise b.error(
                "socket_mode", f'expected octal bits like "0660" or 0o660, got {mode!r}'
            ) from None
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
        raise b.error("socket_mode", f'expected permission bits like 0o660 or "0660", got {mode!r}')
    group = b.get("socket_group", object, None)
    if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
        raise b.error("socket_group", f'expected a group name or id like "kvm", got {group!r}')
    handshake = b.get("handshake_timeout", float, 5.0)
    if not 0 < handshake <= 3600:
        raise b.error("handshake_timeout", f"must be 0 to 3600 seconds, got {handshake}")
    poll_us = b.get("poll_us", int, 50)
    if not 0 <= poll_us <= 1_000_000:
        raise b.error("poll_us", f"must be between 0 and 1000000, got {poll_us}")
    b.reject_unknown()
    return BackendSection(
        socket, port, mac.lower(), queues, client, mode, group, handshake, poll_us
    )


def _primary(
    source: Path, table: dict[str, Any], prefix: str, standby: str, mac: str
) -> tuple[PrimaryConfig, dict[str, Any] | None]:
    p = _Reader(source, table, prefix)
    properties = p.get("properties", dict, {})
    netdev = p.get("netdev", dict, None)
    primary = PrimaryConfig(
        device_id=p.get("id", str, example='"hostdev0"'),
        driver=p.get("driver", str, "vfio-pci"),
        bus=p.get("bus", str, example='"root1"'),
        pair_id=standby,
        mac=p.get("mac", str, mac),
        properties=properties,
    )
    if netdev is not None and "id" not in netdev:
        raise p.error("netdev", 'needs an id (netdev = { type = "tap", id = "hostnet0", ... })')
    p.reject_unknown()
    return primary, netdev


def _pair(
    source: Path,
    standby: str,
    backend_table: dict[str, Any],
    backend_prefix: str,
    primary_table: dict[str, Any] | None,
    primary_prefix: str,
) -> PairSection:
    backend = _backend(source, backend_table, backend_prefix)
    if primary_table is None:
        return PairSection(standby, backend)
    primary, netdev = _primary(source, primary_table, primary_prefix, standby, backend.mac)
    return PairSection(standby, backend, primary, netdev)


def _pairs(source: Path, data: dict[str, Any], qemu_table: dict[str, Any]) -> list[PairSection]:
    listed = data.get("pair")
    if listed is None:
        backend_table = _table(source, data, "backend", required=True)
        assert backend_table is not None
        standby = qemu_table.get("standby", "standby0")
        if not isinstance(standby, str):
            raise ConfigError("qemu.standby", f"expected a string, got {standby!r}", str(source))
        primary_table = _table(source, data, "primary", required=False)
        return [_pair(source, standby, backend_table, "backend", primary_table, "primary")]
    for single in ("backend", "primary"):
        if single in data:
            raise ConfigError(
                single,
                f"[{single}] and [[pair]] do not mix; put it in each pair "
                f"({single} = {{ ... }} under [[pair]])",
                str(source),
            )
    if "standby" in qemu_table:
        raise ConfigError(
            "qemu.standby", 'with [[pair]], give each pair its standby = "..."', str(source)
        )
    if not isinstance(listed, list) or not listed:
        raise ConfigError("pair", "expected one or more [[pair]] tables", str(source))
    pairs = []
    for index, entry in enumerate(listed):
        prefix = f"pair[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(prefix, "must be a table ([[pair]])", str(source))
        reader = _Reader(source, entry, prefix)
        standby = reader.get("standby", str, example='"standby0"')
        backend_table = reader.get("backend", dict, example='{ socket = "...", port = "..." }')
        primary_table = reader.get("primary", dict, None)
        reader.reject_unknown()
        pairs.append(
            _pair(
                source,
                standby,
                backend_table,
                f"{prefix}.backend",
                primary_table,
                f"{prefix}.primary",
            )
        )
    _check_distinct(source, pairs)
    return pairs


def _check_distinct(source: Path, pairs: list[PairSection]) -> None:
    """Two pairs cannot share a standby, a socket or a TAP."""
    for what, key in (
        ("standby", lambda p: p.standby),
        ("backend.socket", lambda p: str(p.backend.socket)),
        ("backend.port", lambda p: p.backend.port if p.backend.port.startswith("tap:") else None),
    ):
        seen: dict[str, int] = {}
        for index, pair in enumerate(pairs):
            value = key(pair)
            if value is None:
                continue
            if value in seen:
                raise ConfigError(
                    f"pair[{index}].{what}",
                    f"{value!r} is already pair[{seen[value]}]'s; each pair needs its own",
                    str(source),
                )
            seen[value] = index


def parse_config(source: Path, data: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(data) - {"backend", "qemu", "primary", "pair", "timeouts"})
    if unknown:
        raise ConfigError(
            unknown[0],
            "unknown table; the file takes [backend], [qemu], [primary], [[pair]], [timeouts]",
            str(source),
        )
    qemu_table = _table(source, data, "qemu", required=True)
    assert qemu_table is not None
    q = _Reader(source, qemu_table, "qemu")
    qemu = QemuSection(qmp=Path(q.get("qmp", str, example='"/run/vm1/qmp.sock"')))
    q.seen.add("standby")
    q.reject_unknown()
    pairs = _pairs(source, data, qemu_table)

    timeouts = Timeouts()
    timeouts_table = _table(source, data, "timeouts", required=False)
    if timeouts_table is not None:
        t = _Reader(source, timeouts_table, "timeouts")
        timeouts = Timeouts(
            qmp=t.get("qmp", float, timeouts.qmp),
            negotiation=t.get("negotiation", float, timeouts.negotiation),
            unplug=t.get("unplug", float, timeouts.unplug),
            wait_unplug=t.get("wait_unplug", float, timeouts.wait_unplug),
        )
        for name in ("qmp", "negotiation", "unplug", "wait_unplug"):
            if getattr(timeouts, name) <= 0:
                raise t.error(name, "must be a positive number of seconds")
        t.reject_unknown()
    return RunConfig(source, qemu, tuple(pairs), timeouts)


def load_config(path: Path) -> RunConfig:
    """Read and check a ``run`` configuration.

    :raise ConfigError: Naming the file, the field and the fix.
    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config", "no such file", str(path)) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config", f"not valid TOML: {err}", str(path)) from None
    return parse_config(path, data)
