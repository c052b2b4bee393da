"""``run``: serve the standby backend and manage the pair of one VM until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal

from .backend import StandbyBackend
from .config import PairConfig
from .controller import FailoverController
from .errors import FailoverError, MonitorError, NegotiationTimeout
from .primary import Primary
from .qmp import QmpSession
from .serve import log_events

logger = logging.getLogger("failover_backend.run")


async def _manage(controller: FailoverController, config: PairConfig) -> None:
    """Negotiation deadline, then the primary."""
    if controller.primary is not None and not await controller.primary.exists():
        state = await controller.plug_primary()
        logger.info("primary %s plugged (%s)", controller.primary.device_id, state)
    try:
        await controller.wait_negotiated(config.timeouts.negotiation)
        logger.info("the guest negotiated STANDBY on %s", config.qemu.standby)
    except NegotiationTimeout as err:
        logger.warning("%s", err)
    if controller.primary is not None and await controller.primary.repair(config.timeouts.unplug):
        logger.info("primary %s repaired", controller.primary.device_id)


async def run_pair(config: PairConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    b = config.backend
    backend = StandbyBackend(b.socket, port=b.port, mac=b.mac, queues=b.queues, client=b.client)
    backend.start()
    watcher = asyncio.create_task(log_events(backend))
    print("QEMU arguments: " + shlex.join(backend.qemu_args(config.qemu.standby)), flush=True)
    qmp = QmpSession("vm")
    controller: FailoverController | None = None
    manager: asyncio.Task[None] | None = None
    rc = 0
    try:
        logger.info("waiting for QEMU's QMP socket %s", config.qemu.qmp)
        connect = asyncio.create_task(qmp.connect(config.qemu.qmp, config.timeouts.qmp))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({connect, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            connect.cancel()
            return 0
        stopped.cancel()
        connect.result()
        primary = Primary(qmp, config.primary, config.primary_netdev) if config.primary else None
        controller = FailoverController(qmp, config.qemu.standby, backend=backend, primary=primary)
        await controller.check()
        await controller.start()
        manager = asyncio.create_task(_manage(controller, config))
        gone = asyncio.create_task(_wait_gone(qmp))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({gone, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (gone, stopped):
            task.cancel()
        if qmp.gone and not stop.is_set():
            logger.info("QEMU went away; stopping")
    except FailoverError as err:
        print(f"error: {err}", flush=True)
        rc = 1
    finally:
        if manager is not None:
            manager.cancel()
            with contextlib.suppress(asyncio.CancelledError, FailoverError):
                await manager
        if controller is not None:
            await controller.stop()
        await qmp.close()
        await loop.run_in_executor(None, backend.stop)
        await asyncio.sleep(0.2)
        watcher.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        print(backend.stats().table(), flush=True)
    return rc


async def _wait_gone(qmp: QmpSession) -> None:
    """Return when QEMU closes the monitor (no event has this name: only that ends it)."""
    with contextlib.suppress(MonitorError):
        await qmp.wait_event("failover-backend-never", timeout=1e12)
