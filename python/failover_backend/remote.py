"""``migrate`` and ``status``: commands that talk to running QEMUs over QMP only.

Steering (announcing the guest's MAC from the standby backends) is done by the
``run`` processes that serve those backends: they see UNPLUG_PRIMARY and RESUME on
their own QMP sockets. QEMU takes one client per QMP socket, so give each VM a
second ``-qmp`` socket for these commands.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from .controller import FailoverController
from .errors import MigrationError, MonitorError
from .migration import Migration, MigrationOptions, MigrationReport
from .qmp import QmpSession
from .timeline import Timeline


@dataclass(frozen=True)
class MigrateArgs:
    source_qmp: Path
    target_qmp: Path
    uri: str
    standby: str = "standby0"
    wait_unplug_timeout: float = 30.0
    timeout: float = 600.0
    announce: bool = True


def _progress(line: str) -> None:
    print(f"  {line}", flush=True)


def print_report(report: MigrationReport | None) -> None:
    if report is None:
        return
    print("\n" + report.timeline.table())
    print("\n" + report.summary(), flush=True)


async def migrate_command(args: MigrateArgs) -> int:
    """Migrate, with live progress; 0 only when the migration completed."""
    timeline = Timeline()
    source = QmpSession("source", timeline)
    target = QmpSession("target", timeline)
    try:
        await source.connect(args.source_qmp)
        await target.connect(args.target_qmp)
        migration = Migration(
            source,
            target,
            args.uri,
            MigrationOptions(
                standby_id=args.standby,
                wait_unplug_timeout=args.wait_unplug_timeout,
                timeout=args.timeout,
                announce=args.announce,
            ),
            timeline=timeline,
            progress=_progress,
        )
        print(f"migrating to {args.uri}", flush=True)
        report = await migration.run()
        print_report(report)
        return 0
    except MigrationError as err:
        print_report(err.report)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except MonitorError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        for session in (source, target):
            with contextlib.suppress(Exception):
                await session.close()


async def status_command(qmp_path: Path, standby: str) -> int:
    qmp = QmpSession("vm")
    try:
        await qmp.connect(qmp_path)
        status = await FailoverController(qmp, standby).status()
        print("\n".join(status.lines()), flush=True)
        return 0
    except MonitorError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        await qmp.close()
