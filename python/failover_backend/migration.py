"""Live migration of a VM with a failover pair, choreographed end to end.

What QEMU does on its own: at ``migrate`` it asks the guest to unplug the primary
(UNPLUG_PRIMARY: the request, not its completion), enters ``wait-unplug`` and waits
*forever* for the guest's eject, then copies memory (``active``), stops the VM and
completes. The target plugs the hidden primary when the incoming stream says the
guest negotiated STANDBY, before RESUME. ``migrate_cancel`` in ``wait-unplug`` goes
to ``cancelling``, waits up to 30 s for the eject, then ``cancelled``, and the primary
is plugged back.

What this adds: a preflight that catches what would fail late (events capability,
a running source, an incoming target, a connected target backend, dirty logging);
a deadline on ``wait-unplug`` after which the migration is cancelled and the source
checked to have its primary back; the check that the target plugged the primary
before RESUME; ``announce-self`` on the target; steering hooks for the standby
backends; and a timeline of every event and state, with timestamps.

::

    report = await Migration(source_qmp, target_qmp, "unix:/run/mig.sock").run()
    print(report.timeline.table())
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .errors import MigrationError, MonitorCommandError, MonitorError
from .negotiation import standby_negotiated
from .pairing import find_primary
from .qmp import QmpSession
from .timeline import Timeline

logger = logging.getLogger(__name__)

#: Migration states after which nothing more happens.
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})

Hook = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class MigrationReport:
    """What happened, whatever the outcome."""

    status: str
    """The last migration state on the source (``completed``, ``cancelled``...)."""
    timeline: Timeline
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    wait_unplug_s: float | None = None
    primary_plugged_before_resume: bool | None = None
    source_primary_back: bool | None = None
    """After a cancelled migration: the source's primary is visible to the guest again."""
    problems: list[str] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def summary(self) -> str:
        lines = [f"migration {self.status}"]
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
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class MigrationOptions:
    standby_id: str = "standby0"
    wait_unplug_timeout: float = 30.0
    """Cancel when the guest has not released the primary after this long."""
    timeout: float = 600.0
    """Bound on the whole migration."""
    cancel_timeout: float = 45.0
    """How long a cancel may take (QEMU itself waits up to 30 s for the eject)."""
    announce: bool = True
    """``announce-self`` on the target after RESUME."""


class Migration:
    """One migration from ``source`` to ``target`` (both connected sessions).

    :param on_primary_unplug: Called when the source asks the guest to release the
        primary: the standby is about to carry the traffic (steer it there).
    :param on_target_resume: Called when the VM runs on the target.
    :param target_backend_ready: Optional extra preflight check of the target's
        standby backend; returns a problem description, or ``None`` when ready.
    """

    def __init__(
        self,
        source: QmpSession,
        target: QmpSession,
        uri: str,
        options: MigrationOptions | None = None,
        *,
        timeline: Timeline | None = None,
        on_primary_unplug: Hook | None = None,
        on_target_resume: Hook | None = None,
        target_backend_ready: Callable[[], str | None] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.uri = uri
        self.options = options or MigrationOptions()
        self.timeline = timeline or Timeline()
        for session in (source, target):
            if session.timeline is None:
                session.timeline = self.timeline
        self.on_primary_unplug = on_primary_unplug
        self.on_target_resume = on_target_resume
        self.target_backend_ready = target_backend_ready
        self.progress = progress or (lambda line: logger.info("%s", line))
        self._hooks: list[asyncio.Task[None]] = []
        #: The primary the guest had when the migration started.
        self._source_primary: str | None = None

    def _note(self, what: str, detail: str = "") -> None:
        self.timeline.add("controller", what, detail)
        self.progress(f"{what} {detail}".strip())

    # -- preflight ------------------------------------------------------------------

    async def preflight(self) -> list[str]:
        """Everything that would make the migration fail or hang, found before starting."""
        problems: list[str] = []
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
        problem = await self._target_standby_problem()
        if problem:
            problems.append(problem)
        primary = await find_primary(self.source, self.options.standby_id)
        if primary is not None and primary in await self.source.visible_device_ids():
            self._source_primary = primary
        if self.target_backend_ready is not None:
            problem = self.target_backend_ready()
            if problem:
                problems.append(problem)
        return problems

    async def _target_standby_problem(self) -> str | None:
        """The target's standby netdev must be connected to its vhost-user backend."""
        standby = self.options.standby_id
        info = await self.target.execute("human-monitor-command", {"command-line": "info network"})
        chardev = None
        for line in str(info).splitlines():
            line = line.strip(" \\")
            if line.startswith(f"{standby}:") and "type=vhost-user" in line and " to " in line:
                chardev = line.rsplit(" to ", 1)[1].strip()
        if chardev is None:
            return f"target has no vhost-user standby {standby!r}"
        for device in await self.target.execute("query-chardev"):
            if device["label"] == chardev and str(device["filename"]).startswith("disconnected"):
                return (
                    f"target's standby backend is not connected (chardev {chardev}: "
                    f"{device['filename']}); is the target's backend running?"
                )
        return None

    # -- the migration ------------------------------------------------------------------

    async def run(self) -> MigrationReport:
        """Migrate, and report. A migration that did not complete raises
        :class:`MigrationError` carrying the report.

        :raise MigrationError: Preflight problems (nothing was started), a failed,
            cancelled or timed-out migration, or a QEMU that went away.
        """
        report = MigrationReport(status="not-started", timeline=self.timeline)
        problems = await self.preflight()
        if problems:
            report.problems = problems
            raise MigrationError("preflight failed:\n  " + "\n  ".join(problems), report)
        self._note("preflight", "ok")
        try:
            await self._migrate(report)
        except MonitorError as err:
            report.problems.append(str(err))
            await self._verify_source_after_failure(report)
            raise MigrationError(f"migration aborted: {err}", report) from err
        if not report.completed:
            raise MigrationError(f"migration {report.status}", report)
        return report

    async def _migrate(self, report: MigrationReport) -> None:
        try:
            await self._migrate_steps(report)
        finally:
            # Steering runs alongside; let it finish (it is short and bounded).
            for task in self._hooks:
                try:
                    await asyncio.wait_for(task, 10)
                except Exception as err:  # a hook's failure must not hide the migration's
                    report.problems.append(f"steering hook failed: {err!r}")

    def _start_hook(self, hook: Hook | None) -> None:
        if hook is not None:
            self._hooks.append(asyncio.create_task(hook()))

    async def _migrate_steps(self, report: MigrationReport) -> None:
        source_mark, target_mark = self.source.mark(), self.target.mark()
        await self.target.execute("migrate-incoming", {"uri": self.uri})
        self._note("migrate-incoming", self.uri)
        await self.source.execute("migrate", {"uri": self.uri})
        self._note("migrate", self.uri)

        unplug_task = asyncio.create_task(self._steer_on_unplug(source_mark))
        try:
            status = await self._follow_source(source_mark, report)
        finally:
            unplug_task.cancel()
        report.status = status
        await self._read_stats(report)
        if status == "completed":
            await self._finish_on_target(target_mark, report)
        else:
            await self._verify_source_after_failure(report)

    async def _steer_on_unplug(self, since: int) -> None:
        await self.source.wait_event("UNPLUG_PRIMARY", since=since, timeout=self.options.timeout)
        self._start_hook(self.on_primary_unplug)

    async def _follow_source(self, since: int, report: MigrationReport) -> str:
        """Follow the source's MIGRATION events to a final state; cancel when the guest
        holds the primary past the deadline."""
        deadline = time.monotonic() + self.options.timeout
        index = since
        wait_unplug_started: float | None = None
        status = "setup"
        while True:
            timeout = deadline - time.monotonic()
            if wait_unplug_started is not None:
                timeout = min(
                    timeout,
                    wait_unplug_started + self.options.wait_unplug_timeout - time.monotonic(),
                )
            try:
                event = await self.source.wait_event(
                    "MIGRATION", since=index, timeout=max(timeout, 0.0)
                )
            except TimeoutError:
                if wait_unplug_started is not None and status == "wait-unplug":
                    report.wait_unplug_s = time.monotonic() - wait_unplug_started
                    return await self._cancel(
                        index,
                        f"the guest did not release the primary within "
                        f"{self.options.wait_unplug_timeout:.0f} s",
                        report,
                    )
                report.problems.append(
                    f"migration still {status} after {self.options.timeout:.0f} s"
                )
                return await self._cancel(index, "overall timeout", report)
            index = self.source.index_after(event, index)
            status = str(event.data.get("status"))
            self.progress(f"source: {status}")
            if status == "active" and self._primary_not_released(since):
                return await self._cancel(
                    index,
                    f"QEMU did not ask the guest to release primary {self._source_primary} "
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

    def _primary_not_released(self, since: int) -> bool:
        return self._source_primary is not None and not self.source.events_named(
            "UNPLUG_PRIMARY", since
        )

    async def _cancel(self, since: int, why: str, report: MigrationReport) -> str:
        self._note("migrate_cancel", why)
        report.problems.append(why)
        await self.source.execute("migrate_cancel")
        try:
            event = await self.source.wait_event(
                "MIGRATION",
                since=since,
                match=lambda e: e.data.get("status") in FINAL_STATES,
                timeout=self.options.cancel_timeout,
            )
        except TimeoutError:
            report.problems.append(
                f"source still cancelling after {self.options.cancel_timeout:.0f} s"
            )
            return "cancelling"
        return str(event.data["status"])

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
        try:
            resume = await self.target.wait_event("RESUME", since=since, timeout=30)
        except TimeoutError:
            report.problems.append("the target did not resume within 30 s")
            return
        standby = self.options.standby_id
        negotiated = [
            e
            for e in self.target.events_named("FAILOVER_NEGOTIATED", since)
            if e.data.get("device-id") == standby
        ]
        if negotiated:
            report.primary_plugged_before_resume = negotiated[0].time <= resume.time
        else:
            report.primary_plugged_before_resume = False
            if await standby_negotiated(self.target, standby):
                report.problems.append(
                    "the target did not announce FAILOVER_NEGOTIATED: its primary stays hidden"
                )
        if (
            report.primary_plugged_before_resume
            and await find_primary(self.target, standby) is None
        ):
            report.primary_plugged_before_resume = False
            report.problems.append("the target has no primary for the standby")
        self._start_hook(self.on_target_resume)
        if self.options.announce:
            await self.target.execute("announce-self", _announce_args(standby))
            self._note("announce-self", standby)

    async def _verify_source_after_failure(self, report: MigrationReport) -> None:
        """After a cancel (or a failure), the source should run with its primary."""
        if self.source.gone:
            report.problems.append("the source QEMU is gone")
            return
        primary = await find_primary(self.source, self.options.standby_id)
        if primary is None:
            report.source_primary_back = False
            return
        deadline = time.monotonic() + 10
        while True:
            visible = primary in await self.source.visible_device_ids()
            if visible or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        report.source_primary_back = visible
        state = await self.source.run_state()
        if state != "running":
            report.problems.append(f"the source VM is {state} after the failed migration")
        self._note("source-after-failure", f"primary {primary} visible={visible}, vm {state}")


def _announce_args(standby_id: str) -> dict[str, Any]:
    """QEMU's default announce timing, limited to the standby's netdev."""
    return {
        "initial": 50,
        "max": 550,
        "rounds": 5,
        "step": 100,
        "interfaces": [standby_id],
    }
