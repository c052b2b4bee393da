"""``run``: serve the standby backends of one VM and manage its failover pairs for as
long as the VM lives on this host (see :mod:`failover_backend.vm_life` for how
that ends, and the exit codes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import sys
from collections.abc import Coroutine
from typing import Any

from .config import PairSection, RunConfig
from .controller import FailoverController
from .errors import ConfigError, FailoverError, NegotiationTimeout, libvirt_missing
from .metrics import Served, VmCollector, serve_metrics
from .primary import Primary
from .qmp import Monitor, QmpSession
from .service_notify import notify_ready, notify_stopping
from .serving import ServedBackends, standby_backend, stop_signals
from .vm_life import (
    EXIT_FAILURE,
    EXIT_OK,
    MigrationRecord,
    VmEnd,
    enable_migration_events,
    follow_vm,
)

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


async def _until_first(*awaitables: asyncio.Future[Any]) -> None:
    await asyncio.wait(set(awaitables), return_when=asyncio.FIRST_COMPLETED)


async def run_vm(config: RunConfig, metrics: str | None = None) -> int:
    """Serve and manage until the VM's life here ends or a stop signal comes;
    ``metrics``: ``HOST:PORT`` of a Prometheus endpoint for every pair's backend.

    :raise ConfigError: When the core refuses a pair's backend settings.
    """
    backends = [(pair.standby, standby_backend(pair.backend)) for pair in config.pairs]
    record = MigrationRecord()
    vm_metrics = VmCollector(record)
    end = VmEnd(EXIT_OK, "stopped by a signal")
    try:
        async with stop_signals() as stop, ServedBackends(backends) as served:
            if metrics is not None:
                serve_metrics(metrics, [Served(label, b) for label, b in backends], [vm_metrics])
            for label, backend in backends:
                print(
                    f"QEMU arguments for {label}: " + shlex.join(backend.qemu_args(label)),
                    flush=True,
                )
            # Every socket listens: QEMU may start (a unit ordered after this one does).
            notify_ready(f"serving {len(backends)} standby backend(s); waiting for QMP")
            try:
                end = await _manage_vm(config, served, stop, vm_metrics)
            finally:
                notify_stopping()
    except FailoverError as err:
        end = VmEnd(EXIT_FAILURE, f"error: {err}")
    stream = sys.stdout if end.code == EXIT_OK else sys.stderr
    print(end.message, file=stream, flush=True)
    return end.code


def _monitor(config: RunConfig) -> tuple[Monitor, Coroutine[Any, Any, None]]:
    """The VM's monitor, and the coroutine that connects it (and checks a libvirt
    domain's pairs against the configuration)."""
    if config.libvirt is not None:
        # libvirt-python is optional (the [libvirt] extra): loaded only when used.
        try:
            from .libvirt_vm import connect_domain
        except ImportError as err:
            raise ConfigError("libvirt", libvirt_missing(err), str(config.source)) from None
        return connect_domain(config.libvirt, config.pairs, config.timeouts.qmp)
    assert config.qemu is not None
    qmp = QmpSession("vm")
    logger.info("waiting for QEMU's QMP socket %s", config.qemu.qmp)
    return qmp, qmp.connect(config.qemu.qmp, config.timeouts.qmp)


async def _manage_vm(
    config: RunConfig, served: ServedBackends, stop: asyncio.Event, vm_metrics: VmCollector
) -> VmEnd:
    """Reach the VM's QEMU (its QMP socket, or libvirt), manage every pair, follow the
    VM until its life here ends (or ``stop``); leaves the monitor as it found it."""
    qmp, connecting = _monitor(config)
    controllers: list[FailoverController] = []
    managers: list[asyncio.Task[None]] = []
    waits: list[asyncio.Future[Any]] = []
    try:
        stop_signal = asyncio.ensure_future(stop.wait())
        waits.append(stop_signal)
        connect = asyncio.ensure_future(connecting)
        await _until_first(connect, stop_signal)
        if stop.is_set():
            connect.cancel()
            return VmEnd(EXIT_OK, "stopped by a signal")
        connect.result()
        for pair, (_, backend) in zip(config.pairs, served.named, strict=True):
            primary = Primary(qmp, pair.primary, pair.primary_netdev) if pair.primary else None
            controllers.append(
                FailoverController(qmp, pair.standby, backend=backend, primary=primary)
            )
        for controller in controllers:
            await controller.check()
        await enable_migration_events(qmp)
        for controller in controllers:
            await controller.start()
        vm_metrics.controllers = controllers
        for controller, pair in zip(controllers, config.pairs, strict=True):
            managers.append(asyncio.create_task(_manage(controller, pair, config)))
        life = asyncio.ensure_future(
            follow_vm(
                qmp, wait_unplug_timeout=config.timeouts.wait_unplug, record=vm_metrics.record
            )
        )
        failed = asyncio.ensure_future(served.first_failure())
        waits += [life, failed]
        await _until_first(life, failed, stop_signal)
        if life.done():
            return life.result()
        if failed.done():
            label, reason = failed.result()
            return VmEnd(
                EXIT_FAILURE, f"error: {label}: the backend cannot serve any more: {reason}"
            )
        return VmEnd(EXIT_OK, "stopped by a signal")
    finally:
        for wait in waits:
            wait.cancel()
        for task in managers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, FailoverError):
                await task
        for controller in controllers:
            await controller.stop()
        await qmp.close()
