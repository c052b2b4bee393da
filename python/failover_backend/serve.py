"""``serve``: run one standby backend in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import shlex
import signal
import sys

from .backend import StandbyBackend
from .metrics import Served, serve_metrics

logger = logging.getLogger("failover_backend.serve")


async def log_events(backend: StandbyBackend, label: str | None = None) -> None:
    """Log the backend's events as they happen (cancel to stop); ``label`` names the
    backend when a process serves several."""
    prefix = f"{label}: " if label else ""
    async for event in backend.watch():
        level = logging.WARNING if event.details.get("reason") else logging.INFO
        logger.log(level, "%s%s", prefix, event.message)


async def serve(backend: StandbyBackend, metrics: str | None = None) -> int:
    """Serve until a stop signal (0) or until the device cannot serve any more (1, with
    the cause, so a supervisor restarts it); prints the QEMU arguments first and the
    counters last. ``metrics``: ``HOST:PORT`` of a Prometheus endpoint to serve."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    backend.start()
    if metrics is not None:
        try:
            serve_metrics(metrics, [Served(backend.socket_path, backend)])
        except BaseException:
            backend.stop()
            raise
    watcher = asyncio.create_task(log_events(backend))
    code, failure = 0, ""
    try:
        print("QEMU arguments: " + shlex.join(backend.qemu_args()), flush=True)
        logger.info(
            "serving %s (port %s, mac %s, %d queue pair(s)); guest RAM must be shared: "
            "-object memory-backend-memfd,...,share=on",
            backend.socket_path,
            backend.port,
            backend.mac,
            backend.queues,
        )
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(backend.wait_failed())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopped, failed):
            task.cancel()
        if failed.done() and not failed.cancelled():
            code, failure = 1, failed.result()
            logger.error("the backend cannot serve any more: %s", failure)
        else:
            logger.info("stopping")
    finally:
        await loop.run_in_executor(None, backend.stop)
        # Let the watcher print the last events (disconnect, stopped).
        await asyncio.sleep(0.2)
        watcher.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print(backend.stats().table(), file=sys.stdout, flush=True)
    if code:
        print(f"error: the backend cannot serve any more: {failure}", file=sys.stderr, flush=True)
    return code
