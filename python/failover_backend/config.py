"""The pair configuration ``python -m failover_backend run --config PAIR.toml`` reads.

::

    # The standby's backend (this process serves it).
    [backend]
    socket = "/run/failover-backend/vm1.sock"
    port = "tap:fbtap0"           # null | loop | tap:NAME
    mac = "52:54:00:12:34:56"     # the guest's MAC: the standby's and the primary's
    queues = 1
    client = false                # true: QEMU listens (chardev server=on)

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
    unplug = 10                   # for the guest to release the primary

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

from .errors import ConfigError
from .pairing import PrimaryConfig

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_PORT = re.compile(r"^(null|loop|tap:[^/\s]{1,15})$")


@dataclass(frozen=True)
class BackendSection:
    socket: Path
    port: str
    mac: str
    queues: int = 1
    client: bool = False


@dataclass(frozen=True)
class QemuSection:
    qmp: Path
    standby: str = "standby0"


@dataclass(frozen=True)
class Timeouts:
    qmp: float = 60.0
    negotiation: float = 120.0
    unplug: float = 10.0


@dataclass(frozen=True)
class PairConfig:
    source: Path
    backend: BackendSection
    qemu: QemuSection
    primary: PrimaryConfig | None = None
    primary_netdev: dict[str, Any] | None = None
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
                key, f"expected a {kind.__name__}, got {type(value).__name__} {value!r}"
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
        raise ConfigError(name, "must be a table ([{name}])", str(source))
    return table


def parse_config(source: Path, data: dict[str, Any]) -> PairConfig:
    unknown = sorted(set(data) - {"backend", "qemu", "primary", "timeouts"})
    if unknown:
        raise ConfigError(
            unknown[0],
            "unknown table; the file takes [backend], [qemu], [primary], [timeouts]",
            str(source),
        )
    backend_table = _table(source, data, "backend", required=True)
    assert backend_table is not None
    b = _Reader(source, backend_table, "backend")
    socket = Path(b.get("socket", str, example='"/run/failover-backend/vm1.sock"'))
    port = b.get("port", str, "null")
    if not _PORT.match(port):
        raise b.error("port", f'expected "null", "loop" or "tap:NAME", got {port!r}')
    mac = b.get("mac", str, example='"52:54:00:12:34:56"')
    if not _MAC.match(mac) or int(mac[:2], 16) & 1:
        raise b.error("mac", f"expected a unicast MAC like 52:54:00:12:34:56, got {mac!r}")
    queues = b.get("queues", int, 1)
    if not 1 <= queues <= 16:
        raise b.error("queues", f"must be between 1 and 16, got {queues}")
    client = b.get("client", bool, False)
    b.reject_unknown()
    backend = BackendSection(socket, port, mac.lower(), queues, client)

    qemu_table = _table(source, data, "qemu", required=True)
    assert qemu_table is not None
    q = _Reader(source, qemu_table, "qemu")
    qemu = QemuSection(
        qmp=Path(q.get("qmp", str, example='"/run/vm1/qmp.sock"')),
        standby=q.get("standby", str, "standby0"),
    )
    q.reject_unknown()

    primary = None
    netdev = None
    primary_table = _table(source, data, "primary", required=False)
    if primary_table is not None:
        p = _Reader(source, primary_table, "primary")
        properties = p.get("properties", dict, {})
        netdev = p.get("netdev", dict, None)
        primary = PrimaryConfig(
            device_id=p.get("id", str, example='"hostdev0"'),
            driver=p.get("driver", str, "vfio-pci"),
            bus=p.get("bus", str, example='"root1"'),
            pair_id=qemu.standby,
            mac=p.get("mac", str, backend.mac),
            properties=properties,
        )
        if netdev is not None and "id" not in netdev:
            raise p.error("netdev", 'needs an id (netdev = { type = "tap", id = "hostnet0", ... })')
        p.reject_unknown()

    timeouts = Timeouts()
    timeouts_table = _table(source, data, "timeouts", required=False)
    if timeouts_table is not None:
        t = _Reader(source, timeouts_table, "timeouts")
        timeouts = Timeouts(
            qmp=t.get("qmp", float, timeouts.qmp),
            negotiation=t.get("negotiation", float, timeouts.negotiation),
            unplug=t.get("unplug", float, timeouts.unplug),
        )
        for name in ("qmp", "negotiation", "unplug"):
            if getattr(timeouts, name) <= 0:
                raise t.error(name, "must be a positive number of seconds")
        t.reject_unknown()
    return PairConfig(source, backend, qemu, primary, netdev, timeouts)


def load_config(path: Path) -> PairConfig:
    """Read and check a pair configuration.

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
