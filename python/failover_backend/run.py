"""``run``: serve the standby backends of one VM and manage its failover pairs for as
long as the VM lives on this host (see :mod:`failover_backend.lifecycle` for how
that ends, and the exit codes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal
import sys
from typing import Any

from .backend import StandbyBackend
from .config import PairSection, RunConfig
from .controller import FailoverController
from .errors import FailoverError, NegotiationTimeout
from .lifecycle import EXIT_FAILURE, EXIT_OK, VmEnd, enable_migration_events, follow_vm
from .metrics import Served, serve_metrics
from .primary import Primary
from .qmp import QmpSession
from .serve import log_events

logger = logging.getLogger("failover_backend.run")


async def _manage(controller: FailoverController, pair: PairSection, config: RunConfig) -> None:
    """Plug the primary, wait for the negotiation, repair a half-unplugged primary."""
    if controller.primary is not None and not await controller.primary.exists():
        state = await controller.plug_primary()
        logger.info("primary %s plugged (%s)", controller.primary.device_id, state)
    try:
        await controller.wait_negotiated(config.timeouts.negotiation)
        logger.info("the guest negotiated STANDBY on %s", pair.standby)
    except NegotiationTimeout as err:
        logger.warning("%s", err)
    if controller.primary is not None and await controller.primary.repair(config.timeouts.unplug):
        logger.info("primary %s repaired", controller.primary.device_id)


def _backend(pair: PairSection) -> StandbyBackend:
    b = pair.backend
    return StandbyBackend(
        b.socket,
        port=b.port,
        mac=b.mac,
        queues=b.queues,
        client=b.client,
        socket_mode=b.socket_mode,
        socket_group=b.socket_group,
        handshake_timeout=b.handshake_timeout,
        poll_us=b.poll_us,
    )


async def _until_first(*awaitables: asyncio.Future[Any]) -> None:
    await asyncio.wait(set(awaitables), return_when=asyncio.FIRST_COMPLETED)


async def _first_failure(pairs: tuple[PairSection, ...], backends: list[StandbyBackend]) -> VmEnd:
    """A backend that cannot serve any more ends ``run`` (1), so a supervisor restarts it."""
    waits = {
        asyncio.ensure_future(backend.wait_failed()): pair.standby
        for pair, backend in zip(pairs, backends)
    }
    try:
        done, _ = await asyncio.wait(set(waits), return_when=asyncio.FIRST_COMPLETED)
        task = done.pop()
        return VmEnd(
            EXIT_FAILURE,
            f"error: {waits[task]}: the backend cannot serve any more: {task.result()}",
        )
    finally:
        for task in waits:
            task.cancel()


async def run_vm(config: RunConfig, metrics: str | None = None) -> int:
    """Serve and manage until the VM's life here ends or a stop signal comes;
    ``metrics``: ``HOST:PORT`` of a Prometheus endpoint for every pair's backend.

    :raise FailoverError: When a backend cannot start (nothing was left running).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    backends: list[StandbyBackend] = []
    watchers: list[asyncio.Task[None]] = []
    qmp = QmpSession("vm")
    controllers: list[FailoverController] = []
    managers: list[asyncio.Task[None]] = []
    end = VmEnd(EXIT_OK, "stopped by a signal")
    stopped: asyncio.Future[Any] | None = None
    try:
        for pair in config.pairs:
            backend = _backend(pair)
            backend.start()
            backends.append(backend)
            watchers.append(asyncio.create_task(log_events(backend, pair.standby)))
            print(
                f"QEMU arguments for {pair.standby}: "
                + shlex.join(backend.qemu_args(pair.standby)),
                flush=True,
            )
        if metrics is not None:
            served = [Served(pair.standby, b) for pair, b in zip(config.pairs, backends)]
            serve_metrics(metrics, served)
        logger.info("waiting for QEMU's QMP socket %s", config.qemu.qmp)
        stopped = stop_signal = asyncio.ensure_future(stop.wait())
        connect = asyncio.ensure_future(qmp.connect(config.qemu.qmp, config.timeouts.qmp))
        await _until_first(connect, stop_signal)
        if stop.is_set():
            connect.cancel()
            return EXIT_OK
        connect.result()
        for pair, backend in zip(config.pairs, backends):
            primary = Primary(qmp, pair.primary, pair.primary_netdev) if pair.primary else None
            controllers.append(
                FailoverController(qmp, pair.standby, backend=backend, primary=primary)
            )
        for controller in controllers:
            await controller.check()
        await enable_migration_events(qmp)
        for controller in controllers:
            await controller.start()
        for controller, pair in zip(controllers, config.pairs):
            managers.append(asyncio.create_task(_manage(controller, pair, config)))
        life = asyncio.ensure_future(
            follow_vm(qmp, wait_unplug_timeout=config.timeouts.wait_unplug)
        )
        failed = asyncio.ensure_future(_first_failure(config.pairs, backends))
        await _until_first(life, failed, stop_signal)
        if life.done():
            end = life.result()
        elif failed.done():
            end = failed.result()
        life.cancel()
        failed.cancel()
    except FailoverError as err:
        end = VmEnd(EXIT_FAILURE, f"error: {err}")
    finally:
        if stopped is not None:
            stopped.cancel()
        for task in managers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, FailoverError):
                await task
        for controller in controllers:
            await controller.stop()
        await qmp.close()
        for backend in backends:
            await loop.run_in_executor(None, backend.stop)
        await asyncio.sleep(0.2)  # the watchers log the backends' last events
        for task in watchers:
            task.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        for pair, backend in zip(config.pairs, backends):
            print(f"{pair.standby} ({backend.socket_path}):", flush=True)
            print(backend.stats().table(), flush=True)
    stream = sys.stdout if end.code == EXIT_OK else sys.stderr
    print(end.message, file=stream, flush=True)
    return end.code
