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
    # mtu = 1500                  # the guest's MTU (QEMU's host_mtu), the TAP's too
    # queue_size = 1024           # largest ring the frontend may pick
    # poll_us = 50                # keep polling this long after the last frame
    # handshake_timeout = 5       # seconds a frontend gets for each request

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

A libvirt domain instead of a QMP socket: ``[libvirt]`` in place of ``[qemu]``, each
standby named by its alias in the domain, no ``[primary]`` (libvirt plugs the ones
the domain describes)::

    [libvirt]
    uri = "qemu:///system"
    domain = "vm1"
    standby = "ua-standby0"       # with [[pair]]: standby = "..." in each pair

Every error names the file, the field and what to write instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

from .errors import ConfigError
from .pairing import PrimaryConfig
from .settings import SettingError, check_backend_settings, setting_and_rule, toml_key

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
    """One standby backend's settings: a ``[backend]`` table, or ``serve``'s options.
    The fields are :class:`~failover_backend.StandbyBackend`'s arguments."""

    socket: Path
    port: str = "null"
    mac: str | None = None
    queues: int = 1
    client: bool = False
    socket_mode: int = 0o600
    socket_group: str | int | None = None
    handshake_timeout: float = 5.0
    poll_us: int = 50
    queue_size: int = 1024
    mtu: int = 1500

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~failover_backend.StandbyBackend` (all but
        the socket)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "socket"}

    def checked(self) -> BackendSection:
        """These settings after the core's rules, the port and MAC spelled canonically
        (``socket_group`` must be an id or ``None`` here: a name is looked up only when
        the backend starts).

        :raise SettingError: ``args`` are ``(setting, rule)``.
        """
        port, mac = check_backend_settings(self.socket, **self.keywords())
        return replace(self, port=port, mac=mac or self.mac)


@dataclass(frozen=True)
class QemuSection:
    qmp: Path


@dataclass(frozen=True)
class LibvirtSection:
    """The VM as a libvirt domain (instead of a QMP socket of its own)."""

    uri: str
    domain: str


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
    #: Exactly one of the two: how ``run`` reaches the VM.
    qemu: QemuSection | None
    pairs: tuple[PairSection, ...]
    timeouts: Timeouts = field(default_factory=Timeouts)
    libvirt: LibvirtSection | None = None


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


def _backend(source: Path, table: dict[str, Any], prefix: str) -> BackendSection:
    """Read the backend's keys with their TOML types; the rules of their values are
    the core's (:mod:`failover_backend.settings`), named ``backend.KEY``."""
    b = _Reader(source, table, prefix)
    socket = Path(b.get("socket", str, example='"/run/failover-backend/vm1.sock"'))
    port = b.get("port", str, "null")
    mac = b.get("mac", str, example='"52:54:00:12:34:56"')
    queues = b.get("queues", int, 1)
    client = b.get("client", bool, False)
    mode = b.get("socket_mode", object, 0o600)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise b.error(
                "socket_mode", f'expected octal bits like "0660" or 0o660, got {mode!r}'
            ) from None
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise b.error("socket_mode", f'expected permission bits like 0o660 or "0660", got {mode!r}')
    group = b.get("socket_group", object, None)
    if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
        raise b.error("socket_group", f'expected a group name or id like "kvm", got {group!r}')
    handshake = b.get("handshake_timeout", float, 5.0)
    poll_us = b.get("poll_us", int, 50)
    queue_size = b.get("queue_size", int, 1024)
    mtu = b.get("mtu", int, 1500)
    b.reject_unknown()
    unchecked = BackendSection(
        socket,
        port=port,
        mac=mac,
        queues=queues,
        client=client,
        socket_mode=mode,
        handshake_timeout=handshake,
        poll_us=poll_us,
        queue_size=queue_size,
        mtu=mtu,
    )
    try:
        checked = unchecked.checked()
    except SettingError as err:
        setting, rule = setting_and_rule(err)
        raise b.error(toml_key(setting), rule) from None
    # A group name is looked up only when the backend starts.
    return replace(checked, socket_group=group)


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
    assert backend.mac is not None  # a [backend] table requires its MAC
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
    prefixes = [f"pair[{index}]" for index in range(len(pairs))]
    for what, values in (
        ("standby", [p.standby for p in pairs]),
        ("backend.socket", [str(p.backend.socket) for p in pairs]),
        ("backend.port", [_own_tap(p.backend) for p in pairs]),
    ):
        _check_distinct(source, what, list(zip(prefixes, values, strict=True)))
    return pairs


def _check_distinct(source: Path, what: str, values: list[tuple[str, str | None]]) -> None:
    """No two entries share a value of ``what`` (``None``: nothing to share).

    :param values: Each entry's prefix (``pair[1]``) and value.
    """
    seen: dict[str, str] = {}
    for prefix, value in values:
        if value is None:
            continue
        if value in seen:
            raise ConfigError(
                f"{prefix}.{what}",
                f"{value!r} is already {seen[value]}'s; each needs its own",
                str(source),
            )
        seen[value] = prefix


def _own_tap(backend: BackendSection) -> str | None:
    return backend.port if backend.port.startswith("tap:") else None


def parse_config(source: Path, data: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(data) - {"backend", "qemu", "libvirt", "primary", "pair", "timeouts"})
    if unknown:
        raise ConfigError(
            unknown[0],
            "unknown table; the file takes [backend], [qemu] or [libvirt], [primary], "
            "[[pair]], [timeouts]",
            str(source),
        )
    qemu: QemuSection | None = None
    libvirt: LibvirtSection | None = None
    qemu_table: dict[str, Any]  # where a single pair's standby id is
    libvirt_table = _table(source, data, "libvirt", required=False)
    if libvirt_table is not None:
        if "qemu" in data:
            raise ConfigError(
                "libvirt",
                "[qemu] and [libvirt] do not mix: run reaches the VM through one of them",
                str(source),
            )
        lv = _Reader(source, libvirt_table, "libvirt")
        libvirt = LibvirtSection(
            uri=lv.get("uri", str, example='"qemu:///system"'),
            domain=lv.get("domain", str, example='"vm1"'),
        )
        if "pair" not in data:
            # The standby's id is its alias in the domain.
            lv.get("standby", str, example='"ua-standby0"')
        lv.seen.add("standby")
        lv.reject_unknown()
        qemu_table = libvirt_table
    else:
        found = _table(source, data, "qemu", required=True)
        assert found is not None
        qemu_table = found
        q = _Reader(source, qemu_table, "qemu")
        qemu = QemuSection(qmp=Path(q.get("qmp", str, example='"/run/vm1/qmp.sock"')))
        q.seen.add("standby")
        q.reject_unknown()
    pairs = _pairs(source, data, qemu_table)
    if libvirt is not None:
        for index, pair in enumerate(pairs):
            if pair.primary is not None:
                where = (
                    "primary"
                    if len(pairs) == 1 and "pair" not in data
                    else f"pair[{index}].primary"
                )
                raise ConfigError(
                    where,
                    "libvirt plugs the primaries the domain describes (<interface "
                    "type='hostdev'> with <teaming type='transient'/>); leave it out",
                    str(source),
                )

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
    return RunConfig(source, qemu, tuple(pairs), timeouts, libvirt)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
            return data
    except FileNotFoundError:
        raise ConfigError("config", "no such file", str(path)) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config", f"not valid TOML: {err}", str(path)) from None


def load_config(path: Path) -> RunConfig:
    """Read and check a ``run`` configuration.

    :raise ConfigError: Naming the file, the field and the fix.
    """
    return parse_config(path, _read_toml(path))


@dataclass(frozen=True)
class ServeConfig:
    """What ``serve --config`` reads: standby backends of any number of VMs, served
    by one process (see :data:`SERVE_EXAMPLE`)."""

    source: Path
    #: Each backend with its name (its messages', counters' and metrics' label).
    backends: tuple[tuple[str, BackendSection], ...]


#: A ``serve --config`` file.
SERVE_EXAMPLE = """\
# One [[backend]] per standby; the keys are run's [backend] keys, and a name.
[[backend]]
name = "vm1"                  # labels its messages and metrics (default: the socket)
socket = "/run/failover-backend/vm1.sock"
port = "tap:vm1sb"
mac = "52:54:00:12:34:56"

[[backend]]
name = "vm2"
socket = "/run/failover-backend/vm2.sock"
port = "tap:vm2sb"
mac = "52:54:00:12:34:57"
"""


def parse_serve_config(source: Path, data: dict[str, Any]) -> ServeConfig:
    unknown = sorted(set(data) - {"backend"})
    if unknown:
        raise ConfigError(
            unknown[0], "unknown table; the file takes [[backend]] tables only", str(source)
        )
    listed = data.get("backend")
    if not isinstance(listed, list) or not listed:
        raise ConfigError(
            "backend", "expected one or more [[backend]] tables (socket, port, mac...)", str(source)
        )
    backends = []
    for index, entry in enumerate(listed):
        prefix = f"backend[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(prefix, "must be a table ([[backend]])", str(source))
        table = dict(entry)
        name = table.pop("name", None)
        section = _backend(source, table, prefix)
        if name is None:
            name = str(section.socket)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{prefix}.name", f"expected a name, got {name!r}", str(source))
        backends.append((name, section))
    prefixes = [f"backend[{index}]" for index in range(len(backends))]
    for what, values in (
        ("name", [name for name, _ in backends]),
        ("socket", [str(b.socket) for _, b in backends]),
        ("port", [_own_tap(b) for _, b in backends]),
    ):
        _check_distinct(source, what, list(zip(prefixes, values, strict=True)))
    return ServeConfig(source, tuple(backends))


def load_serve_config(path: Path) -> ServeConfig:
    """Read and check a ``serve --config`` file.

    :raise ConfigError: Naming the file, the field and the fix.
    """
    return parse_serve_config(path, _read_toml(path))
