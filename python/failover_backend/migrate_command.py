"""``migrate`` and ``cancel``: the commands that start or stop a VM's outgoing migration,
talking to running QEMUs over QMP only.

Steering (keeping the host's switch on the path the guest uses) is done by the
``run`` processes that serve the standby backends: they see the primary's events on
their own QMP sockets. QEMU takes one client per QMP socket, so give each VM a
second ``-qmp`` socket for these commands.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .errors import MonitorError, libvirt_missing
from .migration import (
    IN_PROGRESS_STATES,
    Migration,
    MigrationError,
    MigrationOptions,
    MigrationReport,
    cancel_migration,
)
from .qmp import QmpSession
from .timeline import Timeline
from .vm_devices import failover_pairs, visible_device_ids
from .vm_life import enable_migration_events


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


@dataclass(frozen=True)
class LibvirtMigrateArgs:
    source_uri: str
    domain: str
    dest_uri: str
    p2p: bool = False
    """Peer to peer: the source libvirtd drives the migration (virsh --p2p); else this
    process talks to both (libvirt's direct, client-managed migration)."""
    migrate_uri: str | None = None
    """Where the destination QEMU listens for the data (``tcp://HOST:PORT``)."""
    listen_address: str | None = None
    dest_sockets: dict[str, Path] = field(default_factory=dict)
    """A standby's socket on the destination, by alias, where it differs."""
    wait_unplug_timeout: float = 30.0
    timeout: float = 600.0
    as_json: bool = False


class ProgressLines:
    """Progress on ``stream``: a line per step, and on a terminal one live line of
    RAM progress, rewritten in place while QEMU copies memory."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._shown = 0

    def step(self, line: str) -> None:
        self._end_live()
        print(f"  {line}", file=self.stream, flush=True)

    def ram(self, line: str) -> None:
        text = f"  {line}"
        self.stream.write("\r" + text.ljust(self._shown))
        self.stream.flush()
        self._shown = len(text)

    def finish(self) -> None:
        """End the live line, if one is shown (before the report)."""
        self._end_live()

    def _end_live(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self._shown = 0


def print_error(message: str) -> None:
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
    lines = ProgressLines(sys.stderr if args.as_json else sys.stdout)
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
            progress=lines.step,
            ram_progress=lines.ram if lines.live else None,
        )
        print(f"migrating to {args.uri}", file=lines.stream)
        report = await migration.run()
        lines.finish()
        print_report(report, args.as_json)
        return 0
    except MigrationError as err:
        lines.finish()
        print_report(err.report, args.as_json)
        print_error(str(err))
        return 1
    except MonitorError as err:
        print_error(str(err))
        return 1
    finally:
        for session in (source, target):
            await session.close()


async def migrate_libvirt_command(args: LibvirtMigrateArgs) -> int:
    """Migrate a libvirt domain through libvirt, with the wait-unplug deadline; 0 only
    when the migration completed."""
    try:
        # libvirt-python is optional (the [libvirt] extra): loaded only when used.
        from .libvirt_migrate import LibvirtMigration
    except ImportError as err:
        print_error(f"--libvirt {libvirt_missing(err)}")
        return 1
    as_json = args.as_json
    lines = ProgressLines(sys.stderr if as_json else sys.stdout)
    migration = LibvirtMigration(
        args,
        progress=lines.step,
    )
    try:
        report = await migration.run()
    except MigrationError as err:
        lines.finish()
        print_report(err.report, as_json)
        print_error(str(err))
        return 1
    except MonitorError as err:
        print_error(str(err))
        return 1
    lines.finish()
    print_report(report, as_json)
    return 0


async def cancel_command(qmp_path: Path, timeout: float = 45.0) -> int:
    """Cancel the VM's outgoing migration, following QEMU until it gave up; 0 when
    it ended cancelled (or there was none), 1 otherwise."""
    qmp = QmpSession("source")
    try:
        await qmp.connect(qmp_path)
        await enable_migration_events(qmp)
        status = (await qmp.execute("query-migrate")).get("status")
        if status not in IN_PROGRESS_STATES:
            print(f"no migration in progress (last state: {status or 'none'})", flush=True)
            return 0
        print(f"cancelling the migration (state {status})", flush=True)
        final = await cancel_migration(
            qmp, since=qmp.mark(), timeout=timeout, progress=ProgressLines(sys.stdout).step
        )
        if final == "cancelling":
            # QEMU may have cancelled without an event (events were off): ask it.
            final = str((await qmp.execute("query-migrate")).get("status"))
        print(f"migration {final}", flush=True)
        pairs = await failover_pairs(qmp)
        visible = await visible_device_ids(qmp)
        for standby_id, primary in sorted(pairs.items()):
            if primary is not None:
                back = "yes" if primary in visible else "NO"
                print(f"  {standby_id}: primary {primary} visible to the guest: {back}")
        return 0 if final == "cancelled" else 1
    except MonitorError as err:
        print_error(str(err))
        return 1
    finally:
        await qmp.close()
