"""What ``run`` watches at the level of the whole VM: the wait-unplug deadline of an
outgoing migration, and how the VM's life on this host ends.

QEMU has no deadline on ``wait-unplug``: a guest that never releases its primary
holds the migration there forever, and the tool that started the migration may be
gone (killed, its host rebooted). ``run`` sees the same MIGRATION events on its own
QMP socket, so it enforces the deadline too: whichever of the two sees it first
cancels.

The VM's life here ends when:

=====================================  ====  ===========================================
what happened                          exit  message
=====================================  ====  ===========================================
the VM shut down (SHUTDOWN)            0     the VM shut down (its reason)
an outgoing migration completed        0     the VM migrated away
QEMU exited while waiting for, or in,  3     the incoming migration failed; the VM runs
an incoming migration                        on where it came from
QEMU exited otherwise                  1     QEMU exited without shutting down
=====================================  ====  ===========================================
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

from .errors import MonitorCommandError, MonitorError, QemuGone
from .migration import Progress, cancel_migration
from .qmp import Monitor

logger = logging.getLogger(__name__)

#: Exit codes of ``run``.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INCOMING_FAILED = 3


@dataclass(frozen=True)
class VmEnd:
    """How the VM's life on this host ended."""

    code: int
    message: str


async def enable_migration_events(qmp: Monitor) -> None:
    """MIGRATION events are off by default; a migration in progress keeps them as set."""
    try:
        await qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events", "state": True}]},
        )
    except MonitorCommandError as err:
        logger.info("migration events left as they are: %s", err.description)


@dataclass
class MigrationRecord:
    """The outgoing migrations ``run`` saw (for its metrics)."""

    #: By how each ended: ``completed``, ``cancelled``, ``failed``.
    ended: dict[str, int] = field(default_factory=dict)
    #: Cancelled by ``run`` because the guest held the primary past the deadline.
    deadline_cancels: int = 0
    #: Of the last migration: seconds in ``wait-unplug``, and QEMU's total time and
    #: downtime in ms (of a completed one).
    wait_unplug_s: float | None = None
    total_time_ms: float | None = None
    downtime_ms: float | None = None

    def end(self, status: str) -> None:
        self.ended[status] = self.ended.get(status, 0) + 1


async def follow_vm(
    qmp: Monitor,
    *,
    wait_unplug_timeout: float,
    progress: Progress | None = None,
    record: MigrationRecord | None = None,
) -> VmEnd:
    """Follow the VM until its life here ends, cancelling an outgoing migration held
    in ``wait-unplug`` longer than ``wait_unplug_timeout`` seconds; ``record`` counts
    what the outgoing migrations did."""
    say = progress or (lambda line: logger.warning("%s", line))
    record = record if record is not None else MigrationRecord()
    index = qmp.mark()
    try:
        incoming = await qmp.run_state() == "inmigrate"
        status = (await qmp.execute("query-migrate")).get("status")
    except QemuGone:
        return VmEnd(EXIT_FAILURE, "QEMU exited before it could be watched")
    migrating_out = status in ("setup", "wait-unplug", "active", "cancelling") and not incoming
    wait_unplug_since = time.monotonic() if status == "wait-unplug" and migrating_out else None
    wait_unplug_entered = wait_unplug_since
    while True:
        timeout = None
        if wait_unplug_since is not None:
            timeout = max(0.0, wait_unplug_since + wait_unplug_timeout - time.monotonic())
        try:
            event = await qmp.wait_event(
                {"MIGRATION", "SHUTDOWN", "RESUME"}, since=index, timeout=timeout
            )
        except TimeoutError:
            wait_unplug_since = None
            say(
                f"the guest did not release its primary within {wait_unplug_timeout:g} s of "
                "QEMU's request; cancelling the migration (QEMU alone would wait forever)"
            )
            if wait_unplug_entered is not None:
                record.wait_unplug_s = time.monotonic() - wait_unplug_entered
            record.deadline_cancels += 1
            try:
                final = await cancel_migration(qmp, since=index, progress=say)
            except MonitorCommandError as err:
                say(f"cannot cancel the migration: {err.description}")
                continue
            say(f"migration {final}")
            continue
        except QemuGone:
            if incoming:
                return VmEnd(
                    EXIT_INCOMING_FAILED,
                    "QEMU exited before the incoming migration completed (it does when the "
                    "migration fails); the VM runs on where it came from",
                )
            return VmEnd(EXIT_FAILURE, "QEMU exited without shutting down (killed or crashed?)")
        index = qmp.index_after(event, index)
        if event.name == "SHUTDOWN":
            reason = event.data.get("reason", "unknown reason")
            return VmEnd(EXIT_OK, f"the VM shut down ({reason})")
        if event.name == "RESUME":
            incoming = False
            continue
        status = event.data.get("status")
        if incoming:
            if status == "failed":
                return VmEnd(
                    EXIT_INCOMING_FAILED,
                    "the incoming migration failed; the VM runs on where it came from",
                )
            continue
        if status == "setup":
            migrating_out = True
            record.wait_unplug_s = record.total_time_ms = record.downtime_ms = None
        if not migrating_out:
            continue  # the end of the incoming migration, reported after RESUME
        if wait_unplug_entered is not None and status != "wait-unplug":
            if wait_unplug_since is not None:  # left it by itself, not by our cancel
                record.wait_unplug_s = time.monotonic() - wait_unplug_entered
            wait_unplug_entered = None
        wait_unplug_since = time.monotonic() if status == "wait-unplug" else None
        if status == "wait-unplug":
            wait_unplug_entered = wait_unplug_since
        if status == "completed":
            record.end(status)
            with contextlib.suppress(MonitorError):
                info = await qmp.execute("query-migrate")
                record.total_time_ms = info.get("total-time")
                record.downtime_ms = info.get("downtime")
            return VmEnd(EXIT_OK, "the VM migrated away; nothing left to serve here")
        if status in ("cancelled", "failed"):
            record.end(status)
            migrating_out = False
