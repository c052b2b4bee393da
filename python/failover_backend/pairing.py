"""Failover pairing rules, checked against a running QEMU before touching it.

QEMU enforces some of these only when it realizes the primary, which for a hidden
primary is when the guest negotiates STANDBY, long after ``device_add`` returned;
the guest enforces the MAC rule silently (no pairing, no error). Checking up front
reports every broken rule at once, each by name:

===========================  =====================================================
rule                         why
===========================  =====================================================
``standby-exists``           ``failover_pair_id`` names the standby's device id
``standby-is-virtio-net``    only virtio-net has the failover machinery
``standby-failover-on``      without ``failover=on`` QEMU pairs nothing
``primary-has-id``           QEMU: "Device with failover_pair_id needs to have id"
``primary-pair-id``          the primary must name this standby
``primary-on-hotplug-port``  QEMU unplugs the primary for migration: it needs a
                             hot-pluggable PCIe port, not ``pcie.0``
``primary-is-ethernet``      the guest pairs network devices only
``primary-function-0``       a hot-plugged device sits alone at function 0
``primary-slot-free``        one device per root port slot
``one-primary-per-standby``  QEMU: "Cannot attach more than one primary device"
``same-mac``                 net_failover pairs the two netdevs by MAC
===========================  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MonitorCommandError, PairingError, Violation
from .qmp import Monitor
from .vm_devices import PERIPHERAL, find_primary, peripherals_where, qom_property

#: Ports a hot-pluggable primary may sit on.
HOTPLUG_PORT_TYPES = frozenset({"pcie-root-port", "ioh3420", "xio3130-downstream"})
#: Primaries whose class is known only once realized (a passed-through function).
PASSTHROUGH_DRIVERS = frozenset({"vfio-pci"})


@dataclass(frozen=True)
class PrimaryConfig:
    """The primary as ``device_add`` will create it.

    :param properties: Driver properties besides the ones named here (``netdev`` for an
        emulated NIC, ``host`` for vfio-pci, ``romfile``...).
    """

    device_id: str
    driver: str
    bus: str
    pair_id: str
    mac: str | None = None
    addr: str | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)

    def device_add_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "driver": self.driver,
            "id": self.device_id,
            "bus": self.bus,
            "failover_pair_id": self.pair_id,
        }
        if self.mac is not None:
            args["mac"] = self.mac
        if self.addr is not None:
            args["addr"] = self.addr
        args.update(self.properties)
        return args


async def _devices_on_port(qmp: Monitor, port: str) -> list[str]:
    return await peripherals_where(qmp, "parent_bus", f"{PERIPHERAL}/{port}/{port}")


async def _is_network_driver(qmp: Monitor, driver: str) -> bool:
    """Network devices are the ones with a ``netdev`` property."""
    try:
        props = await qmp.execute("device-list-properties", {"typename": driver})
    except MonitorCommandError:
        return False
    return any(p.get("name") == "netdev" for p in props)


async def check_standby(qmp: Monitor, standby_id: str) -> list[Violation]:
    path = f"{PERIPHERAL}/{standby_id}"
    device_type = await qom_property(qmp, path, "type")
    if device_type is None:
        return [Violation("standby-exists", f"QEMU has no device {standby_id!r}")]
    violations = []
    if device_type != "virtio-net-pci":
        violations.append(
            Violation("standby-is-virtio-net", f"{standby_id} is {device_type}, not virtio-net-pci")
        )
    elif not await qom_property(qmp, path, "failover"):
        violations.append(
            Violation("standby-failover-on", f"{standby_id} has failover=off; set failover=on")
        )
    return violations


async def check_pairing(
    qmp: Monitor, standby_id: str, primary: PrimaryConfig | None = None
) -> list[Violation]:
    """Every rule the pair breaks in this QEMU (empty: the pair is sound)."""
    violations = await check_standby(qmp, standby_id)
    if primary is None:
        return violations

    if not primary.device_id:
        violations.append(
            Violation("primary-has-id", "the primary needs an id (QEMU refuses it without one)")
        )
    if primary.pair_id != standby_id:
        violations.append(
            Violation(
                "primary-pair-id",
                f"failover_pair_id is {primary.pair_id!r}, the standby is {standby_id!r}",
            )
        )

    if primary.bus in ("pcie.0", ""):
        violations.append(
            Violation(
                "primary-on-hotplug-port",
                "pcie.0 is the root complex: devices on it cannot be hot-unplugged, and QEMU "
                "unplugs the primary for migration; put it on a pcie-root-port",
            )
        )
    else:
        port_type = await qom_property(qmp, f"{PERIPHERAL}/{primary.bus}", "type")
        if port_type is None:
            violations.append(
                Violation("primary-on-hotplug-port", f"QEMU has no PCIe port {primary.bus!r}")
            )
        elif port_type not in HOTPLUG_PORT_TYPES:
            violations.append(
                Violation(
                    "primary-on-hotplug-port",
                    f"{primary.bus} is a {port_type}, not a hot-pluggable PCIe port",
                )
            )
        elif await qom_property(qmp, f"{PERIPHERAL}/{primary.bus}", "hotplug") is False:
            violations.append(
                Violation("primary-on-hotplug-port", f"{primary.bus} has hotplug=off")
            )
        else:
            others = [d for d in await _devices_on_port(qmp, primary.bus) if d != primary.device_id]
            if others:
                violations.append(
                    Violation(
                        "primary-slot-free", f"{primary.bus} already holds {', '.join(others)}"
                    )
                )

    if primary.driver not in PASSTHROUGH_DRIVERS and not await _is_network_driver(
        qmp, primary.driver
    ):
        violations.append(
            Violation("primary-is-ethernet", f"{primary.driver} is not a network device")
        )
    if primary.addr is not None:
        function = primary.addr.split(".")[1] if "." in primary.addr else "0"
        if int(function, 16) != 0:
            violations.append(
                Violation("primary-function-0", f"addr {primary.addr} is not function 0")
            )

    existing = await find_primary(qmp, standby_id)
    if existing is not None and existing != primary.device_id:
        violations.append(
            Violation("one-primary-per-standby", f"{standby_id} already has primary {existing!r}")
        )

    standby_mac = await qom_property(qmp, f"{PERIPHERAL}/{standby_id}", "mac")
    if standby_mac is not None and (primary.mac or "").lower() != str(standby_mac).lower():
        violations.append(
            Violation(
                "same-mac",
                f"the primary's MAC {primary.mac or '(unset)'} differs from the standby's "
                f"{standby_mac}: the guest pairs them by MAC",
            )
        )
    return violations


async def require_pairing(
    qmp: Monitor, standby_id: str, primary: PrimaryConfig | None = None
) -> None:
    """:raise PairingError: With every violated rule, when there is any."""
    violations = await check_pairing(qmp, standby_id, primary)
    if violations:
        raise PairingError(violations)
