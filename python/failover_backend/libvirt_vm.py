"""``run`` on a libvirt domain: its monitor through libvirt, and the check that the
domain pairs what the configuration serves, before any step touches it."""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

from .config import LibvirtSection, PairSection
from .errors import PairingError, Violation
from .libvirt_domain import read_domain
from .libvirt_monitor import LibvirtMonitor

logger = logging.getLogger(__name__)


def connect_domain(
    section: LibvirtSection, pairs: tuple[PairSection, ...], timeout: float
) -> tuple[LibvirtMonitor, Coroutine[Any, Any, None]]:
    """The domain's monitor, and the coroutine that connects it once the domain runs
    (up to ``timeout`` seconds) and checks its pairs."""
    monitor = LibvirtMonitor("vm", section.uri, section.domain)

    async def connect() -> None:
        logger.info("waiting for domain %s on %s to run", section.domain, section.uri)
        await monitor.connect(timeout)
        require_served_pairs(await monitor.xml(), pairs)

    return monitor, connect()


def require_served_pairs(xml: str, pairs: tuple[PairSection, ...]) -> None:
    """The domain keeps the failover rules, and each pair this process serves is a
    standby of it, on the socket its backend listens on.

    :raise PairingError: With every rule broken.
    """
    domain = read_domain(xml)
    violations = domain.violations()
    standbys = {s.alias: s for s in domain.standbys}
    for pair in pairs:
        standby = standbys.get(pair.standby)
        if standby is None:
            violations.append(
                Violation(
                    "standby-in-domain",
                    f"domain {domain.name} has no vhostuser standby with alias "
                    f"{pair.standby!r} (its standbys: {sorted(standbys) or 'none'})",
                )
            )
        elif standby.socket != pair.backend.socket:
            violations.append(
                Violation(
                    "standby-socket",
                    f"{pair.standby}: the domain connects to {standby.socket}, this "
                    f"backend listens on {pair.backend.socket}",
                )
            )
    if violations:
        raise PairingError(violations)
