"""``migrate``, ``status`` and ``cancel``: commands that talk to running QEMUs over QMP
only.

Steering (keeping the host's switch on the path the guest uses) is done by the
``run`` processes that serve the standby backends: they see the primary's events on
their own QMP sockets. QEMU takes one client per QMP socket, so give each VM a
second ``-qmp`` socket for these commands.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .controller import FailoverController
from .errors import MigrationError, MonitorError
from .migration import (
    IN_PROGRESS_STATES,
    Migration,
    MigrationOptions,
    MigrationReport,
    cancel_migration,
)
from .pairing import failover_pairs
from .qmp import QmpSession
from .timeline import Timeline


@dataclass(frozen=True)
class MigrateArgs:
    source_qmp: Path
    target_qmp: Path
    uri: str
    wait_unplug_timeout: float = 30.0
    timeout: float = 600.0
    announce: bool = True
    force: bool = False
    as_json: bool = False
    """The report as one JSON object on stdout; progress goes to stderr."""


def _progress(line: str) -> None:
    print(f"  {line}", flush=True)


def _progress_to_stderr(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def print_report(report: MigrationReport | None, as_json: bool = False) -> None:
    if report is None:
        return
    if as_json:
        print(json.dumps(report.to_json(), indent=2), flush=True)
        return
    print("\n" + report.timeline.table())
    print("\n" + report.summary(), flush=True)


async def migrate_command(args: MigrateArgs) -> int:
    """Migrate every failover pair of the VM, with live progress; 0 only when the
    migration completed."""
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
                wait_unplug_timeout=args.wait_unplug_timeout,
                timeout=args.timeout,
                announce=args.announce,
                force=args.force,
            ),
            timeline=timeline,
            progress=_progress_to_stderr if args.as_json else _progress,
        )
        print(f"migrating to {args.uri}", file=sys.stderr if args.as_json else sys.stdout)
        report = await migration.run()
        print_report(report, args.as_json)
        return 0
    except MigrationError as err:
        print_report(err.report, args.as_json)
        _error(str(err))
        return 1
    except MonitorError as err:
        _error(str(err))
        return 1
    finally:
        for session in (source, target):
            await session.close()


async def status_command(
    qmp_path: Path, standby: str | None, timeout: float = 5.0, as_json: bool = False
) -> int:
    """Every failover pair of the VM (or just ``standby``), as text or as one JSON
    object; 1 when a pair cannot fail over (its standby's backend is disconnected)."""
    qmp = QmpSession("vm")
    try:
        await qmp.connect(qmp_path, timeout)
        standbys = [standby] if standby else sorted(await failover_pairs(qmp))
        pairs = [await FailoverController(qmp, standby_id).status() for standby_id in standbys]
        healthy = all(pair.healthy for pair in pairs)
        if as_json:
            document = {"pairs": [pair.to_json() for pair in pairs], "healthy": healthy}
            print(json.dumps(document, indent=2), flush=True)
        elif not pairs:
            print("VM has no failover standby (virtio-net-pci with failover=on)")
        else:
            for index, pair in enumerate(pairs):
                lines = pair.lines()
                print("\n".join(lines if index == 0 else lines[1:]), flush=True)
        return 0 if healthy else 1
    except MonitorError as err:
        _error(str(err))
        return 1
    finally:
        await qmp.close()


async def cancel_command(qmp_path: Path, timeout: float = 45.0) -> int:
    """Cancel the VM's outgoing migration, following QEMU until it gave up; 0 when
    it ended cancelled (or there was none), 1 otherwise."""
    qmp = QmpSession("source")
    try:
        await qmp.connect(qmp_path)
        with contextlib.suppress(MonitorError):
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]},
            )
        status = (await qmp.execute("query-migrate")).get("status")
        if status not in IN_PROGRESS_STATES:
            print(f"no migration in progress (last state: {status or 'none'})", flush=True)
            return 0
        print(f"cancelling the migration (state {status})", flush=True)
        final = await cancel_migration(qmp, since=qmp.mark(), timeout=timeout, progress=_progress)
        if final == "cancelling":
            # QEMU may have cancelled without an event (events were off): ask it.
            final = str((await qmp.execute("query-migrate")).get("status"))
        print(f"migration {final}", flush=True)
        pairs = await failover_pairs(qmp)
        visible = await qmp.visible_device_ids()
        for standby_id, primary in sorted(pairs.items()):
            if primary is not None:
                back = "yes" if primary in visible else "NO"
                print(f"  {standby_id}: primary {primary} visible to the guest: {back}")
        return 0 if final == "cancelled" else 1
    except MonitorError as err:
        _error(str(err))
        return 1
    finally:
        await qmp.close()
