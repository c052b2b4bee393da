"""``serve``: run standby backends in the foreground until SIGINT/SIGTERM: one from the
command line, or many from a file (one process for every VM of a host)."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
from collections.abc import Sequence

from .backend import StandbyBackend
from .metrics import Served, serve_metrics
from .service_notify import notify_ready, notify_stopping
from .serving import ServedBackends, stop_signals

logger = logging.getLogger("failover_backend.serve")


async def serve(named: Sequence[tuple[str, StandbyBackend]], metrics: str | None = None) -> int:
    """Serve until a stop signal (0) or until a backend cannot serve any more (1, with
    the cause, so a supervisor restarts the process); prints the QEMU arguments first
    and the counters last. ``named``: each backend under its label (empty for a single
    one). ``metrics``: ``HOST:PORT`` of a Prometheus endpoint to serve."""
    failure = ""
    async with stop_signals() as stop, ServedBackends(named) as served:
        try:
            if metrics is not None:
                serve_metrics(
                    metrics,
                    [Served(label or backend.socket_path, backend) for label, backend in named],
                )
            for label, backend in named:
                prefix = f"QEMU arguments for {label}: " if label else "QEMU arguments: "
                print(prefix + shlex.join(backend.qemu_args()), flush=True)
                logger.info(
                    "%sserving %s (port %s, mac %s, %d queue pair(s))",
                    f"{label}: " if label else "",
                    backend.socket_path,
                    backend.port,
                    backend.mac,
                    backend.queues,
                )
            logger.info("guest RAM must be shared: -object memory-backend-memfd,...,share=on")
            notify_ready(
                f"serving {named[0][1].socket_path}"
                if len(named) == 1
                else f"serving {len(named)} standby backends"
            )
            stopped = asyncio.ensure_future(stop.wait())
            failed = asyncio.ensure_future(served.first_failure())
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
            for task in (stopped, failed):
                task.cancel()
            if failed.done() and not failed.cancelled():
                label, reason = failed.result()
                failure = f"{label}: {reason}" if label else reason
                logger.error("the backend cannot serve any more: %s", failure)
            else:
                logger.info("stopping")
        finally:
            notify_stopping()
    if failure:
        print(f"error: the backend cannot serve any more: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0
