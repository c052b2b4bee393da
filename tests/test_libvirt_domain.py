"""The failover pairs of a libvirt domain, read from its XML, and the rules checked
before anything runs (no libvirtd needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from failover_backend.errors import ConfigError, PairingError
from failover_backend.libvirt_domain import DomainPrimary, DomainStandby, read_domain

EXAMPLE = Path(__file__).resolve().parent.parent / "contrib" / "libvirt" / "vm1.xml"

PRIMARY = "e1000e,id=primary0,netdev=hostnet0,bus=root1,failover_pair_id=ua-standby0"
EMULATED = f"""
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>tiny</name>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <devices>
    <interface type='vhostuser'>
      <mac address='52:54:00:00:00:01'/>
      <source type='unix' path='/tmp/fb/tiny.sock' mode='client'/>
      <model type='virtio'/>
      <teaming type='persistent'/>
      <alias name='ua-standby0'/>
    </interface>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='{PRIMARY},mac=52:54:00:00:00:01'/>
  </qemu:commandline>
</domain>
"""


def test_the_example_domain_is_one_pair_of_a_vf_and_a_vhost_user_standby() -> None:
    domain = read_domain(EXAMPLE.read_text())
    assert domain.name == "vm1"
    assert domain.standbys == (
        DomainStandby(
            "ua-standby0",
            Path("/run/failover-backend/vm1/standby0.sock"),
            "52:54:00:12:34:56",
            "client",
        ),
    )
    assert domain.primaries == (DomainPrimary("ua-standby0", "52:54:00:12:34:56", "hostdev"),)
    assert domain.shared_memory
    domain.require()


def test_an_emulated_primary_on_qemu_s_command_line_is_a_primary_too() -> None:
    domain = read_domain(EMULATED)
    assert domain.primaries == (
        DomainPrimary("ua-standby0", "52:54:00:00:00:01", "qemu:commandline"),
    )
    assert domain.violations() == []


@pytest.mark.parametrize(
    ("edit", "rules"),
    [
        (("<alias name='ua-standby0'/>", ""), ["standby-has-alias", "primary-names-a-standby"]),
        (("mac=52:54:00:00:00:01'", "mac=52:54:00:00:00:02'"), ["same-mac"]),
        (("<access mode='shared'/>", ""), ["shared-memory"]),
        (("<source type='memfd'/>", ""), ["shared-memory"]),
        (
            ("</qemu:commandline>", EMULATED.split("<qemu:commandline>")[1].split("</domain>")[0]),
            ["one-primary-per-standby"],
        ),
        (("<teaming type='persistent'/>", ""), ["standby-exists", "primary-names-a-standby"]),
    ],
)
def test_every_broken_rule_is_named(edit: tuple[str, str], rules: list[str]) -> None:
    domain = read_domain(EMULATED.replace(*edit))
    with pytest.raises(PairingError) as raised:
        domain.require()
    assert [v.rule for v in raised.value.violations] == rules


def test_what_is_not_a_domain_s_xml_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="domain: not valid XML"):
        read_domain("<domain>")
    with pytest.raises(ConfigError, match="expected a <domain>, got <network>"):
        read_domain("<network/>")


def test_an_interface_paired_by_a_qemu_override_is_a_primary() -> None:
    """How the tests' libvirt domains give the emulated e1000e its pair."""
    from failover_backend.lab.guest import GuestImage
    from libvirt_lab import tiny_domain

    image = GuestImage(Path("/k"), Path("/i"), "6.1")
    xml = tiny_domain(
        "tiny",
        image,
        standby_socket=Path("/tmp/s.sock"),
        mac="52:54:00:00:00:07",
        serial=Path("/tmp/serial"),
    )
    domain = read_domain(xml)
    assert [s.alias for s in domain.standbys] == ["ua-standby0"]
    assert domain.primaries == (DomainPrimary("ua-standby0", "52:54:00:00:00:07", "qemu:override"),)
    assert domain.violations() == []
