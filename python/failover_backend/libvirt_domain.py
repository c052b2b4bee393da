"""A libvirt domain's failover pairs, read from its XML, and the rules they must keep
before anything runs.

libvirt models the pair itself: the standby is an ``<interface type='vhostuser'>`` with
``<teaming type='persistent'/>`` and an ``<alias name='ua-...'/>`` (QEMU's device id),
the primary a VF, ``<interface type='hostdev'>`` with ``<teaming type='transient'
persistent='ALIAS'/>``. libvirt accepts a transient teaming member only on a hostdev,
so an emulated primary (what the tests use) is an interface whose
``failover_pair_id`` a ``<qemu:override>`` sets, or a ``-device ...,
failover_pair_id=ALIAS`` in ``<qemu:commandline>``: both are read as primaries too.

===========================  =====================================================
rule                         why
===========================  =====================================================
``standby-has-alias``        QEMU's ``failover_pair_id`` and this controller name
                             the standby by its alias
``primary-names-a-standby``  a primary's ``persistent=`` (or ``failover_pair_id``)
                             must be a standby's alias
``one-primary-per-standby``  QEMU: "Cannot attach more than one primary device"
``same-mac``                 net_failover pairs the two netdevs by MAC
``shared-memory``            vhost-user maps guest RAM: memfd or file, shared
===========================  =====================================================
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, PairingError, Violation

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@dataclass(frozen=True)
class DomainStandby:
    """A vhost-user standby of the domain."""

    alias: str
    """QEMU's device id (the ``<alias>``; the primary's ``failover_pair_id``)."""
    socket: Path
    mac: str | None
    libvirt_mode: str
    """``client``: QEMU connects to a backend that listens (``serve``'s default)."""


@dataclass(frozen=True)
class DomainPrimary:
    pair: str
    """The standby's alias it is paired with."""
    mac: str | None
    how: str
    """``hostdev`` (a VF, libvirt's teaming), ``qemu:override`` or ``qemu:commandline``
    (emulated)."""


@dataclass(frozen=True)
class DomainPairs:
    name: str
    standbys: tuple[DomainStandby, ...]
    primaries: tuple[DomainPrimary, ...]
    shared_memory: bool

    def violations(self) -> list[Violation]:
        found: list[Violation] = []
        by_alias = {s.alias: s for s in self.standbys}
        for standby in self.standbys:
            if not standby.alias:
                found.append(
                    Violation(
                        "standby-has-alias",
                        f"the vhostuser interface on {standby.socket} needs "
                        "<alias name='ua-...'/> (QEMU's id for it)",
                    )
                )
        for primary in self.primaries:
            paired = by_alias.get(primary.pair)
            if paired is None:
                found.append(
                    Violation(
                        "primary-names-a-standby",
                        f"a primary ({primary.how}) is paired with {primary.pair!r}, which is "
                        f"no standby's alias (standbys: {sorted(by_alias) or 'none'})",
                    )
                )
                continue
            if paired.mac and primary.mac and paired.mac.lower() != primary.mac.lower():
                found.append(
                    Violation(
                        "same-mac",
                        f"{primary.pair}: standby MAC {paired.mac} but primary MAC "
                        f"{primary.mac}; net_failover pairs them by MAC",
                    )
                )
        pairs = [p.pair for p in self.primaries]
        for alias in sorted({p for p in pairs if pairs.count(p) > 1}):
            found.append(
                Violation("one-primary-per-standby", f"{alias} has {pairs.count(alias)} primaries")
            )
        if self.standbys and not self.shared_memory:
            found.append(
                Violation(
                    "shared-memory",
                    "vhost-user needs guest RAM it can map: <memoryBacking><source "
                    "type='memfd'/><access mode='shared'/></memoryBacking>",
                )
            )
        return found

    def require(self) -> None:
        """:raise PairingError: With every rule the domain breaks."""
        violations = self.violations()
        if not self.standbys:
            violations.insert(
                0,
                Violation(
                    "standby-exists",
                    f"domain {self.name} has no <interface type='vhostuser'> with "
                    "<teaming type='persistent'/>",
                ),
            )
        if violations:
            raise PairingError(violations)


def _mac(element: ET.Element) -> str | None:
    mac = element.find("mac")
    return None if mac is None else mac.get("address")


def _device_args(text: str) -> dict[str, str]:
    """``e1000e,id=p0,failover_pair_id=ua-net1`` → its ``key=value`` properties."""
    props = {}
    for part in text.split(",")[1:]:
        key, _, value = part.partition("=")
        props[key] = value
    return props


def read_domain(xml: str) -> DomainPairs:
    """The failover pairs of a domain XML (``virsh dumpxml``, or a file to define).

    :raise ConfigError: When it is not a domain's XML.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise ConfigError("domain", f"not valid XML: {err}") from None
    if root.tag != "domain":
        raise ConfigError("domain", f"expected a <domain>, got <{root.tag}>")
    name = root.findtext("name", default="")
    standbys: list[DomainStandby] = []
    primaries: list[DomainPrimary] = []
    paired_by_override = {
        device.get("alias", ""): prop.get("value", "")
        for device in root.iterfind(f"{{{QEMU_NS}}}override/{{{QEMU_NS}}}device")
        for prop in device.iterfind(f"{{{QEMU_NS}}}frontend/{{{QEMU_NS}}}property")
        if prop.get("name") == "failover_pair_id"
    }
    for interface in root.iterfind("devices/interface"):
        teaming = interface.find("teaming")
        alias_element = interface.find("alias")
        own_alias = "" if alias_element is None else alias_element.get("name", "")
        if own_alias in paired_by_override:
            primaries.append(
                DomainPrimary(paired_by_override[own_alias], _mac(interface), "qemu:override")
            )
            continue
        if teaming is None:
            continue
        kind, role = interface.get("type"), teaming.get("type")
        if kind == "vhostuser" and role == "persistent":
            source = interface.find("source")
            alias = interface.find("alias")
            standbys.append(
                DomainStandby(
                    alias="" if alias is None else alias.get("name", ""),
                    socket=Path("" if source is None else source.get("path", "")),
                    mac=_mac(interface),
                    libvirt_mode="" if source is None else source.get("mode", ""),
                )
            )
        elif role == "transient":
            primaries.append(
                DomainPrimary(teaming.get("persistent", ""), _mac(interface), "hostdev")
            )
    arguments = [
        a.get("value", "") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")
    ]
    for flag, value in itertools.pairwise(arguments):
        if flag == "-device" and "failover_pair_id=" in value:
            props = _device_args(value)
            primaries.append(
                DomainPrimary(props["failover_pair_id"], props.get("mac"), "qemu:commandline")
            )
    source = root.find("memoryBacking/source")
    shared = (
        root.find("memoryBacking/access[@mode='shared']") is not None
        and source is not None
        and source.get("type") in ("memfd", "file")
    )
    shared = shared or any(
        cell.get("memAccess") == "shared" for cell in root.iterfind("cpu/numa/cell")
    )
    return DomainPairs(name, tuple(standbys), tuple(primaries), shared)
