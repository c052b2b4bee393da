"""``migrate --libvirt``: a live migration through libvirt's own API, with the
wait-unplug deadline libvirt does not have.

libvirt migrates a failover pair (QEMU unplugs the primary, waits in ``wait-unplug``
for the guest to release it, and the target plugs it back), but waits in
``wait-unplug`` as long as QEMU does: forever, for a guest that never releases it.
This follows the source QEMU's MIGRATION events (libvirt's QMP passthrough) while
libvirt migrates, aborts libvirt's job (``virDomainAbortJob``) at the deadline, and
then checks the primary is back on the source. The report is the QMP path's, with
libvirt's JOB_COMPLETED statistics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import libvirt

from .errors import FailoverError, MonitorError, PairingError
from .libvirt_domain import read_domain
from .libvirt_monitor import LibvirtMonitor, describe_libvirt_error
from .migrate_command import LibvirtMigrateArgs
from .migration import MigrationError, MigrationReport, check_target_primaries
from .standby import unix_socket_listens
from .timeline import Timeline
from .vm_devices import failover_pairs, primaries_visible_within, visible_device_ids
from .waiting import within

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


def destination_xml(xml: str, dest_sockets: dict[str, Path]) -> str:
    """The domain's migratable XML with each standby's socket moved as asked.

    :raise FailoverError: When an alias names no vhostuser interface.
    """
    root = ET.fromstring(xml)
    moved = set()
    for interface in root.iterfind("devices/interface[@type='vhostuser']"):
        alias = interface.find("alias")
        name = "" if alias is None else alias.get("name", "")
        source = interface.find("source")
        if name in dest_sockets and source is not None:
            source.set("path", str(dest_sockets[name]))
            moved.add(name)
    missing = sorted(set(dest_sockets) - moved)
    if missing:
        raise FailoverError(f"--dest-socket names no vhostuser standby of the domain: {missing}")
    ET.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")
    return ET.tostring(root, encoding="unicode")


def _local(uri: str) -> bool:
    """The destination libvirtd runs on this host (its sockets are ours to look at)."""
    host = urlparse(uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1")


class LibvirtMigration:
    """One migration of ``args.domain`` from ``args.source_uri`` to ``args.dest_uri``."""

    def __init__(self, args: LibvirtMigrateArgs, progress: Progress | None = None) -> None:
        self.args = args
        self.timeline = Timeline()
        self.progress = progress or (lambda line: logger.info("%s", line))
        self.report = MigrationReport(status="preflight", timeline=self.timeline)
        self.source = LibvirtMonitor("source", args.source_uri, args.domain, self.timeline)
        #: The domain on the destination, once libvirt starts it there for the migration.
        self.target = LibvirtMonitor("target", args.dest_uri, args.domain, self.timeline)
        self._aborted = False
        self._visible_primaries: set[str] = set()

    def _say(self, what: str, detail: str = "") -> None:
        self.timeline.add("controller", what, detail)
        self.progress(f"{what} {detail}".strip())

    async def run(self) -> MigrationReport:
        """Migrate; returns the report of a completed migration.

        :raise MigrationError: Preflight problems (nothing moved), or a migration
            that failed or was aborted at the deadline (its report says how it ended).
        """
        try:
            await self.source.connect(10)
        except MonitorError as err:
            self.report.problems.append(str(err))
            raise MigrationError(f"preflight failed: {err}", self.report) from err
        try:
            xml = await self._preflight()
            return await self._migrate(xml)
        finally:
            await self.source.close()
            await self.target.close()

    async def _preflight(self) -> str:
        args, report = self.args, self.report
        assert self.source.domain is not None
        xml = str(
            await asyncio.to_thread(self.source.domain.XMLDesc, libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        )
        domain = read_domain(xml)
        try:
            domain.require()
        except PairingError as err:
            report.problems += [f"{v.rule}: {v.message}" for v in err.violations]
        report.pairs = await failover_pairs(self.source)
        visible = await visible_device_ids(self.source)
        self._visible_primaries = {p for p in report.pairs.values() if p and p in visible}
        if _local(args.dest_uri):
            for standby in domain.standbys:
                socket = args.dest_sockets.get(standby.alias, standby.socket)
                if not unix_socket_listens(socket):
                    report.problems.append(
                        f"{standby.alias}: no standby backend listens on {socket} for the "
                        f"destination (start it there first: the destination QEMU would "
                        "wait for it, and the migration with it)"
                    )
        try:
            dest_xml = destination_xml(xml, args.dest_sockets)
        except FailoverError as err:
            report.problems.append(str(err))
            dest_xml = xml
        if report.problems:
            raise MigrationError(
                f"domain {args.domain} on {args.source_uri}: preflight failed:\n  "
                + "\n  ".join(report.problems),
                report,
            )
        return dest_xml

    def _params(self, dest_xml: str) -> dict[str, Any]:
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml}
        if self.args.migrate_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = self.args.migrate_uri
        if self.args.listen_address:
            params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = self.args.listen_address
        return params

    def _libvirt_migrate(self, dest_xml: str) -> None:
        """libvirt's migration call (blocks until it ends)."""
        domain = self.source.domain
        assert domain is not None
        flags = libvirt.VIR_MIGRATE_LIVE
        if self.args.p2p:
            domain.migrateToURI3(
                self.args.dest_uri, self._params(dest_xml), flags | libvirt.VIR_MIGRATE_PEER2PEER
            )
            return
        destination = libvirt.open(self.args.dest_uri)
        try:
            domain.migrate3(destination, self._params(dest_xml), flags)
        finally:
            destination.close()

    async def _migrate(self, dest_xml: str) -> MigrationReport:
        args, report = self.args, self.report
        stats: dict[str, Any] = {}
        self.source.on_job_completed(stats.update)
        mark = self.source.mark()
        started = time.monotonic()
        mode = "peer to peer" if args.p2p else "direct"
        self._say("migrate", f"{args.domain}: {args.source_uri} -> {args.dest_uri} ({mode})")
        migrating = asyncio.ensure_future(asyncio.to_thread(self._libvirt_migrate, dest_xml))
        deadline = asyncio.ensure_future(self._enforce_deadline(mark))
        # The target's events (FAILOVER_NEGOTIATED, RESUME) from when libvirt starts it.
        following = asyncio.ensure_future(self.target.connect(args.timeout))
        try:
            await asyncio.wait({migrating}, timeout=args.timeout)
            if not migrating.done():
                self._say("timeout", f"the migration took longer than {args.timeout:g} s")
                await self._abort()
                await asyncio.wait({migrating}, timeout=60)
        finally:
            deadline.cancel()
        error = None if not migrating.done() else migrating.exception()
        if migrating.done() and error is None:
            report.status = "completed"
            await self._job_statistics(stats)
            await self._check_target(following)
            self._say("completed", report.summary().splitlines()[0])
            return report
        following.cancel()
        if isinstance(error, libvirt.libvirtError):
            why = describe_libvirt_error(error)
        else:
            why = str(error or "libvirt's migration call did not return")
        report.status = "cancelled" if self._aborted else "failed"
        report.problems.append(why)
        self._say(report.status, why)
        if report.pairs:
            report.source_primary_back = await self._primaries_back(timeout=60)
        report.total_time_ms = int((time.monotonic() - started) * 1000)
        raise MigrationError(f"migration {report.status}: {why}", report)

    async def _check_target(self, following: asyncio.Future[None]) -> None:
        """Every primary plugged on the target before the guest resumed there."""
        try:
            await within(following, 30)
        except (asyncio.TimeoutError, MonitorError) as err:
            self.report.problems.append(f"cannot follow the target: {err}")
            return
        await check_target_primaries(
            self.target, 0, self.report.pairs, self._visible_primaries, self.report
        )

    async def _enforce_deadline(self, since: int) -> None:
        """Follow the source's MIGRATION events; abort libvirt's job when the guest
        holds its primary in ``wait-unplug`` past the deadline."""
        index = since
        entered: float | None = None
        while True:
            timeout = None
            if entered is not None:
                timeout = max(0.0, entered + self.args.wait_unplug_timeout - time.monotonic())
            try:
                event = await self.source.wait_event("MIGRATION", since=index, timeout=timeout)
            except TimeoutError:
                self.report.wait_unplug_s = time.monotonic() - (entered or time.monotonic())
                self._say(
                    "deadline",
                    f"the guest did not release its primary within "
                    f"{self.args.wait_unplug_timeout:g} s; aborting libvirt's migration job",
                )
                await self._abort()
                return
            index = self.source.index_after(event, index)
            status = event.data.get("status")
            if status == "wait-unplug":
                entered = time.monotonic()
            elif entered is not None:
                self.report.wait_unplug_s = time.monotonic() - entered
                entered = None

    async def _abort(self) -> None:
        domain = self.source.domain
        assert domain is not None
        self._aborted = True
        try:
            await asyncio.to_thread(domain.abortJob)
        except libvirt.libvirtError as err:
            self._say("abort", f"libvirt refused: {describe_libvirt_error(err)}")

    async def _primaries_back(self, timeout: float) -> bool:
        """Every source primary visible to the guest again, said on the timeline."""
        primaries = sorted(p for p in self.report.pairs.values() if p)
        back = await primaries_visible_within(self.source, primaries, timeout, poll=0.5)
        self._say("primary back" if back else "primary NOT back", ", ".join(primaries))
        return back

    async def _job_statistics(self, stats: dict[str, Any]) -> None:
        """libvirt's JOB_COMPLETED statistics (they come with an event just after the
        call returns)."""
        for _ in range(50):
            if stats:
                break
            await asyncio.sleep(0.1)
        self.report.job_statistics = dict(stats)
        if "time_elapsed" in stats:
            self.report.total_time_ms = int(stats["time_elapsed"])
        if "downtime" in stats:
            self.report.downtime_ms = int(stats["downtime"])
