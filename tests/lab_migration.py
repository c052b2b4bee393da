"""A migration between two lab VMs, driven as the tests drive it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from failover_backend.lab.scenario import Lab, LabVM
from failover_backend.migration import Migration, MigrationOptions, MigrationReport


def migration(
    lab: Lab,
    source: LabVM,
    target: LabVM,
    ram_progress: Callable[[str], None] | None = None,
    **options: Any,
) -> Migration:
    """From ``source`` to ``target`` over a socket of the source's own, so several
    migrations can run at once; the lab's controllers steer each side, as ``run``
    would."""
    return Migration(
        source.qmp,
        target.qmp,
        f"unix:{lab.workdir}/migration-{source.name}.sock",
        MigrationOptions(**options),
        timeline=lab.timeline,
        ram_progress=ram_progress,
    )


async def migrate(lab: Lab, source: LabVM, target: LabVM) -> MigrationReport:
    return await migration(lab, source, target).run()
