"""Live migration of a VM with failover pairs, choreographed end to end.

What QEMU does on its own: at ``migrate`` it asks the guest to unplug every primary
(one UNPLUG_PRIMARY each: the request, not its completion), enters ``wait-unplug``
and waits *forever* until the guest ejected them all, then copies memory
(``active``), stops the VM and completes. The target plugs each hidden primary when
the incoming stream says the guest negotiated STANDBY, before RESUME.
``migrate_cancel`` in ``wait-unplug`` goes to ``cancelling``, waits up to 30 s for
the eject, then ``cancelled``, and the primaries are plugged back.

What this adds: a preflight that catches what would fail or hang late (a migration
already in progress, events capability, a running source, an incoming target, every
standby's backend connected on both sides, dirty logging); a deadline on
``wait-unplug`` after which the migration is cancelled and the source checked to
have its primaries back; progress while QEMU waits for a cancel; the check that the
target plugged every primary before RESUME; ``announce-self`` on the target's
standbys; and a timeline of every event and state, with timestamps. Steering the
host's switch is the job of each side's controller (``run``), which sees the same
events on its own QMP socket.

::

    report = await Migration(source_qmp, target_qmp, "unix:/run/mig.sock").run()
    print(report.timeline.table())
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import FailoverError, MonitorCommandError, MonitorError
from .qmp import Monitor
from .standby import backend_link
from .standby_negotiation import standby_negotiated
from .timeline import Timeline
from .vm_devices import failover_pairs, primaries_visible_within, visible_device_ids

logger = logging.getLogger(__name__)

#: Migration states after which nothing more happens.
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
#: States in which QEMU refuses to start another migration.
IN_PROGRESS_STATES = frozenset(
    {
        "setup",
        "wait-unplug",
        "active",
        "pre-switchover",
        "device",
        "cancelling",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
    }
)
#: How long QEMU itself waits for the guest's eject after a cancel in wait-unplug.
QEMU_CANCEL_WAIT = 30.0
#: Seconds between progress lines while a cancel is pending.
CANCEL_PROGRESS_EVERY = 5.0

Progress = Callable[[str], None]


@dataclass
class MigrationReport:
    """What happened, whatever the outcome."""

    status: str
    """The last migration state on the source (``completed``, ``cancelled``...)."""
    timeline: Timeline
    pairs: dict[str, str | None] = field(default_factory=dict)
    """The source's failover pairs: standby id -> primary id."""
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    wait_unplug_s: float | None = None
    primary_plugged_before_resume: bool | None = None
    """On the target: every primary was plugged before the VM resumed."""
    source_primary_back: bool | None = None
    """After a cancelled migration: every source primary is visible to the guest again."""
    target_exited_at: float | None = None
    """When the target QEMU exited (wall clock), if it did."""
    problems: list[str] = field(default_factory=list)
    job_statistics: dict[str, Any] | None = None
    """libvirt's JOB_COMPLETED statistics (``migrate --libvirt``)."""

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def summary(self) -> str:
        lines = [f"migration {self.status}"]
        if self.pairs:
            pairs = ", ".join(f"{s}+{p or '-'}" for s, p in self.pairs.items())
            lines.append(f"  failover pairs: {pairs}")
        if self.total_time_ms is not None:
            lines.append(f"  total {self.total_time_ms} ms, downtime {self.downtime_ms} ms")
        if self.wait_unplug_s is not None:
            lines.append(f"  wait-unplug {self.wait_unplug_s:.3f} s")
        if self.primary_plugged_before_resume is not None:
            lines.append(
                "  target primary plugged before RESUME: "
                + ("yes" if self.primary_plugged_before_resume else "NO")
            )
        if self.source_primary_back is not None:
            lines.append("  source primary back: " + ("yes" if self.source_primary_back else "NO"))
        if self.target_exited_at is not None:
            start = self.timeline.entries[0].time if self.timeline.entries else 0.0
            lines.append(f"  target QEMU exited at t={self.target_exited_at - start:.3f} s")
        if self.job_statistics:
            shown = ("memory_total", "memory_processed", "memory_iteration", "setup_time")
            stats = ", ".join(
                f"{key} {self.job_statistics[key]}" for key in shown if key in self.job_statistics
            )
            lines.append(f"  libvirt job: {stats}")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The report and its timeline for scripts (``migrate --json``); times are
        seconds since the first entry."""
        start = self.timeline.entries[0].time if self.timeline.entries else 0.0
        return {
            "status": self.status,
            "pairs": self.pairs,
            "total_time_ms": self.total_time_ms,
            "downtime_ms": self.downtime_ms,
            "wait_unplug_s": self.wait_unplug_s,
            "primary_plugged_before_resume": self.primary_plugged_before_resume,
            "source_primary_back": self.source_primary_back,
            "target_exited_s": None
            if self.target_exited_at is None
            else round(self.target_exited_at - start, 3),
            "problems": self.problems,
            "job_statistics": self.job_statistics,
            "timeline": [
                {
                    "t": round(entry.time - start, 3),
                    "source": entry.source,
                    "what": entry.what,
                    "detail": entry.detail,
                }
                for entry in self.timeline.entries
            ],
        }


class MigrationError(FailoverError):
    """A migration could not start, failed, or was cancelled.

    :param report: What happened until then (preflight problems included).
    """

    def __init__(self, message: str, report: MigrationReport) -> None:
        self.report = report
        super().__init__(message)


async def check_target_primaries(
    target: Monitor,
    since: int,
    pairs: dict[str, str | None],
    visible_primaries: set[str],
    report: MigrationReport,
) -> bool:
    """After a completed migration: did the target plug every primary the guest had
    (FAILOVER_NEGOTIATED before RESUME, a primary paired on the target)? Sets
    ``report.primary_plugged_before_resume``; ``False`` when the target never resumed.

    :param pairs: The source's pairs; ``visible_primaries``: those the guest could see.
    """
    try:
        resume = await target.wait_event("RESUME", since=since, timeout=30)
    except TimeoutError:
        report.problems.append("the target did not resume within 30 s")
        return False
    target_pairs = await failover_pairs(target)
    plugged_in_time = True
    for standby, source_primary in pairs.items():
        if source_primary is None or source_primary not in visible_primaries:
            continue  # nothing to plug: the guest had no primary there
        negotiated = [
            e
            for e in target.events_named("FAILOVER_NEGOTIATED", since)
            if e.data.get("device-id") == standby
        ]
        if not negotiated:
            plugged_in_time = False
            if await standby_negotiated(target, standby):
                report.problems.append(
                    f"the target did not announce FAILOVER_NEGOTIATED for {standby}: "
                    "its primary stays hidden"
                )
        elif negotiated[0].time > resume.time:
            plugged_in_time = False
        if target_pairs.get(standby) is None:
            plugged_in_time = False
            report.problems.append(f"the target has no primary for {standby}")
    report.primary_plugged_before_resume = plugged_in_time
    return True


@dataclass
class MigrationOptions:
    wait_unplug_timeout: float = 30.0
    """Cancel when the guest has not released the primaries after this long."""
    timeout: float = 600.0
    """Bound on the whole migration."""
    cancel_timeout: float = 45.0
    """How long a cancel may take (QEMU itself waits up to 30 s for the eject)."""
    announce: bool = True
    """``announce-self`` on the target's standbys after RESUME."""
    force: bool = False
    """Migrate even when a source standby's backend is disconnected (no failover path)."""


def in_progress_problem(status: str, qmp_path: object = "SOURCE_QMP") -> str:
    """What to tell someone who wants to migrate while QEMU is still busy with one."""
    what = (
        "waiting for the guest to release its primary"
        if status == "wait-unplug"
        else "cancelling it"
        if status == "cancelling"
        else "copying memory"
    )
    return (
        f"a migration is already in progress on the source (state {status}: {what}); "
        f"wait for it to end, or cancel it: python -m failover_backend cancel --qmp {qmp_path}"
    )


async def cancel_migration(
    qmp: Monitor,
    *,
    since: int,
    timeout: float = 45.0,
    progress: Progress | None = None,
) -> str:
    """``migrate_cancel`` and wait for the final state, telling ``progress`` every few
    seconds while QEMU waits for the guest (in ``wait-unplug`` it gives the guest up
    to 30 s to eject the primary it was asked to release).

    Returns the final state, or ``cancelling`` when ``timeout`` passed first.
    """
    say = progress or (lambda line: logger.info("%s", line))
    await qmp.execute("migrate_cancel")
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        try:
            event = await qmp.wait_event(
                "MIGRATION",
                since=since,
                match=lambda e: e.data.get("status") in FINAL_STATES,
                timeout=max(0.0, min(CANCEL_PROGRESS_EVERY, timeout - waited)),
            )
            return str(event.data["status"])
        except TimeoutError:
            waited = time.monotonic() - started
            if waited >= timeout:
                return "cancelling"
            say(
                f"{qmp.name}: still cancelling after {waited:.0f} s: QEMU waits for the "
                f"guest to release its primary (it gives up after {QEMU_CANCEL_WAIT:.0f} s "
                "and plugs the primary back)"
            )


#: Seconds between ``query-migrate`` polls for the live RAM line.
RAM_POLL_S = 0.5


def ram_line(info: dict[str, Any]) -> str | None:
    """One line of RAM progress from ``query-migrate``'s answer (``None`` before
    QEMU has RAM figures): sent, left, the guest's dirty rate, expected downtime."""
    ram = info.get("ram")
    if not isinstance(ram, dict) or "total" not in ram:
        return None
    mib = 1024 * 1024
    line = (
        f"RAM {ram.get('transferred', 0) / mib:.0f} MiB sent, "
        f"{ram.get('remaining', 0) / mib:.0f} of {ram['total'] / mib:.0f} MiB left"
    )
    if "dirty-pages-rate" in ram:
        dirty = ram["dirty-pages-rate"] * ram.get("page-size", 4096) / mib
        line += f", guest dirtying {dirty:.1f} MiB/s"
    if "expected-downtime" in info:
        line += f", expected downtime {info['expected-downtime']} ms"
    return line


class Migration:
    """One migration from ``source`` to ``target`` (both connected sessions).

    :param progress: Told each step, as a line.
    :param ram_progress: Told the RAM progress (:func:`ram_line`) every
        :data:`RAM_POLL_S` while QEMU copies memory (``active``).
    """

    def __init__(
        self,
        source: Monitor,
        target: Monitor,
        uri: str,
        options: MigrationOptions | None = None,
        *,
        timeline: Timeline | None = None,
        progress: Progress | None = None,
        ram_progress: Progress | None = None,
    ) -> None:
        self.source = source
        self.ram_progress = ram_progress
        self.target = target
        self.uri = uri
        self.options = options or MigrationOptions()
        self.timeline = timeline or Timeline()
        for session in (source, target):
            if session.timeline is None:
                session.timeline = self.timeline
        self.progress = progress or (lambda line: logger.info("%s", line))
        #: The source's pairs (standby -> primary) when the migration started.
        self.pairs: dict[str, str | None] = {}
        #: The primaries the guest could see when the migration started.
        self._visible_primaries: set[str] = set()
        self.warnings: list[str] = []

    def _note(self, what: str, detail: str = "") -> None:
        self.timeline.add("controller", what, detail)
        self.progress(f"{what} {detail}".strip())

    # -- preflight ------------------------------------------------------------------

    async def preflight(self) -> list[str]:
        """Everything that would make the migration fail or hang, found before starting."""
        problems: list[str] = []
        status = (await self.source.execute("query-migrate")).get("status")
        if status in IN_PROGRESS_STATES:
            problems.append(in_progress_problem(str(status), self.source.path or "SOURCE_QMP"))
            return problems
        for session, role in ((self.source, "source"), (self.target, "target")):
            try:
                await session.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
            except MonitorCommandError as err:
                problems.append(f"{role}: cannot enable migration events: {err.description}")
        source_state = await self.source.run_state()
        if source_state != "running":
            problems.append(f"source VM is {source_state}, not running")
        target_state = await self.target.run_state()
        if target_state != "inmigrate":
            problems.append(
                f"target QEMU is {target_state}, not waiting for a migration "
                "(start it with -incoming defer)"
            )
        blocked = (await self.source.execute("query-migrate")).get("blocked-reasons") or []
        problems += [f"source: migration blocked: {reason}" for reason in blocked]

        self.pairs = await failover_pairs(self.source)
        visible = await visible_device_ids(self.source)
        self._visible_primaries = {p for p in self.pairs.values() if p and p in visible}
        target_pairs = await failover_pairs(self.target)
        for standby in self.pairs:
            link = await backend_link(self.source, standby)
            if link.state == "disconnected":
                problem = (
                    f"source standby {standby}: its backend is disconnected, so this "
                    "migration has no failover path (traffic stops while the primary is "
                    "away); start the backend (QEMU reconnects) or pass --force"
                )
                if self.options.force:
                    self.warnings.append(problem)
                else:
                    problems.append(problem)
            if standby not in target_pairs:
                problems.append(f"target has no failover standby {standby!r}")
            elif (await backend_link(self.target, standby)).state == "disconnected":
                problems.append(
                    f"target's standby backend is not connected (standby {standby}); "
                    "is the target's backend running?"
                )
        return problems

    # -- the migration ------------------------------------------------------------------

    async def run(self) -> MigrationReport:
        """Migrate, and report. A migration that did not complete raises
        :class:`MigrationError` carrying the report.

        :raise MigrationError: Preflight problems (nothing was started), a failed,
            cancelled or timed-out migration, or a QEMU that went away.
        """
        report = MigrationReport(status="not-started", timeline=self.timeline)
        problems = await self.preflight()
        report.pairs = dict(self.pairs)
        if problems:
            report.problems = problems
            raise MigrationError("preflight failed:\n  " + "\n  ".join(problems), report)
        for warning in self.warnings:
            self._note("warning", warning)
        self._note("preflight", "ok")
        watch_target = asyncio.create_task(self._watch_target(report))
        try:
            await self._migrate(report)
        except MonitorError as err:
            report.problems.append(str(err))
            await self._verify_source_after_failure(report)
            raise MigrationError(f"migration aborted: {err}", report) from err
        finally:
            watch_target.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch_target
            if self.target.gone_at is not None and report.target_exited_at is None:
                self._target_exited(report)
        if not report.completed:
            raise MigrationError(f"migration {report.status}", report)
        return report

    async def _watch_target(self, report: MigrationReport) -> None:
        """Say at once when the target QEMU exits (it does when its incoming migration
        fails or is cancelled)."""
        await self.target.wait_closed()
        self._target_exited(report)

    def _target_exited(self, report: MigrationReport) -> None:
        report.target_exited_at = self.target.gone_at
        self._note(
            "target-exited",
            "the target QEMU exited (it does by itself when its incoming migration fails "
            "or is cancelled)",
        )

    async def _migrate(self, report: MigrationReport) -> None:
        source_mark, target_mark = self.source.mark(), self.target.mark()
        await self.target.execute("migrate-incoming", {"uri": self.uri})
        self._note("migrate-incoming", self.uri)
        await self.source.execute("migrate", {"uri": self.uri})
        self._note("migrate", self.uri)
        status = await self._follow_source(source_mark, report)
        report.status = status
        await self._read_stats(report)
        if status == "completed":
            await self._finish_on_target(target_mark, report)
        else:
            await self._verify_source_after_failure(report)

    async def _poll_ram(self) -> None:
        """Tell ``ram_progress`` how the copy goes until cancelled."""
        assert self.ram_progress is not None
        while True:
            try:
                line = ram_line(await self.source.execute("query-migrate"))
            except MonitorError:
                return
            if line is not None:
                self.ram_progress(line)
            await asyncio.sleep(RAM_POLL_S)

    async def _follow_source(self, since: int, report: MigrationReport) -> str:
        """Follow the source's MIGRATION events to a final state (see
        :meth:`_follow_source_events`), with the RAM line while memory is copied."""
        poller: asyncio.Task[None] | None = None

        def on_status(status: str) -> None:
            nonlocal poller
            if status == "active" and self.ram_progress is not None and poller is None:
                poller = asyncio.create_task(self._poll_ram())
            elif status != "active" and poller is not None:
                poller.cancel()
                poller = None

        try:
            return await self._follow_source_events(since, report, on_status)
        finally:
            if poller is not None:
                poller.cancel()

    async def _follow_source_events(
        self, since: int, report: MigrationReport, on_status: Callable[[str], None]
    ) -> str:
        """Follow the source's MIGRATION events to a final state; cancel when the guest
        holds a primary past the deadline."""
        deadline = time.monotonic() + self.options.timeout
        index = since
        wait_unplug_started: float | None = None
        status = "setup"
        while True:
            timeout = deadline - time.monotonic()
            if wait_unplug_started is not None and status == "wait-unplug":
                timeout = min(
                    timeout,
                    wait_unplug_started + self.options.wait_unplug_timeout - time.monotonic(),
                )
            try:
                event = await self.source.wait_event(
                    "MIGRATION", since=index, timeout=max(timeout, 0.0)
                )
            except TimeoutError:
                if status == "wait-unplug" and wait_unplug_started is not None:
                    report.wait_unplug_s = time.monotonic() - wait_unplug_started
                    return await self._cancel(
                        index,
                        f"the guest did not release the primary within "
                        f"{self.options.wait_unplug_timeout:g} s",
                        report,
                    )
                report.problems.append(
                    f"migration still {status} after {self.options.timeout:.0f} s"
                )
                return await self._cancel(index, "overall timeout", report)
            index = self.source.index_after(event, index)
            status = str(event.data.get("status"))
            on_status(status)
            self.progress(f"source: {status}")
            unreleased = self._unreleased_primaries(since)
            if status == "active" and unreleased:
                return await self._cancel(
                    index,
                    f"QEMU did not ask the guest to release primary {', '.join(unreleased)} "
                    "(QEMU's log says why, e.g. 'Hot-unplug failed: guest is busy'); the "
                    "target could not take it",
                    report,
                )
            if status == "wait-unplug":
                wait_unplug_started = time.monotonic()
            elif wait_unplug_started is not None and report.wait_unplug_s is None:
                report.wait_unplug_s = time.monotonic() - wait_unplug_started
            if status in FINAL_STATES:
                return status

    def _unreleased_primaries(self, since: int) -> list[str]:
        asked = {
            str(e.data.get("device-id")) for e in self.source.events_named("UNPLUG_PRIMARY", since)
        }
        return sorted(self._visible_primaries - asked)

    async def _cancel(self, since: int, why: str, report: MigrationReport) -> str:
        self._note("migrate_cancel", why)
        report.problems.append(why)
        status = await cancel_migration(
            self.source,
            since=since,
            timeout=self.options.cancel_timeout,
            progress=self.progress,
        )
        if status == "cancelling":
            report.problems.append(
                f"source still cancelling after {self.options.cancel_timeout:.0f} s"
            )
        return status

    async def _read_stats(self, report: MigrationReport) -> None:
        # Read right at `completed`, the times can still be zero: read again.
        for _ in range(10):
            info = await self.source.execute("query-migrate")
            report.total_time_ms = info.get("total-time")
            report.downtime_ms = info.get("downtime")
            if report.status != "completed" or report.total_time_ms:
                return
            await asyncio.sleep(0.05)

    async def _finish_on_target(self, since: int, report: MigrationReport) -> None:
        if not await check_target_primaries(
            self.target, since, self.pairs, self._visible_primaries, report
        ):
            return
        if self.options.announce and self.pairs:
            standbys = sorted(self.pairs)
            await self.target.execute("announce-self", _announce_args(standbys))
            self._note("announce-self", " ".join(standbys))

    async def _verify_source_after_failure(self, report: MigrationReport) -> None:
        """After a cancel (or a failure), the source should run with its primaries."""
        if self.source.gone:
            report.problems.append("the source QEMU is gone")
            return
        pairs = await failover_pairs(self.source)
        primaries = [p for p in pairs.values() if p is not None]
        if not primaries:
            report.source_primary_back = False if self._visible_primaries else None
            return
        visible = await primaries_visible_within(self.source, primaries, timeout=10)
        report.source_primary_back = visible
        state = await self.source.run_state()
        if state != "running":
            report.problems.append(f"the source VM is {state} after the failed migration")
        self._note(
            "source-after-failure", f"primaries {' '.join(primaries)} visible={visible}, vm {state}"
        )


def _announce_args(standbys: list[str]) -> dict[str, Any]:
    """QEMU's default announce timing, limited to the standbys."""
    return {
        "initial": 50,
        "max": 550,
        "rounds": 5,
        "step": 100,
        "interfaces": standbys,
    }
