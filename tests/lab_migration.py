"""A migration between two lab VMs, driven as the tests drive it."""

from __future__ import annotations

from typing import Any

from failover_backend.lab.scenario import Lab, LabVM
from failover_backend.migration import Migration, MigrationOptions, MigrationReport


def migration(lab: Lab, source: LabVM, target: LabVM, **options: Any) -> Migration:
    """From ``source`` to ``target`` over a socket of the source's own, so several
    migrations can run at once; the lab's controllers steer each side, as ``run``
    would."""
    return Migration(
        source.qmp,
        target.qmp,
        f"unix:{lab.workdir}/migration-{source.name}.sock",
        MigrationOptions(**options),
        timeline=lab.timeline,
    )


async def migrate(lab: Lab, source: LabVM, target: LabVM) -> MigrationReport:
    return await migration(lab, source, target).run()
