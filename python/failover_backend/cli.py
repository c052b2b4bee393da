"""Command line: ``python -m failover_backend <command>``.

Exit codes: 0 success, 1 runtime failure (the cause is printed), 2 bad arguments;
``run`` also ends with 3 when the VM's incoming migration failed (see
:mod:`failover_backend.lifecycle`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .backend import StandbyBackend
from .config import load_config, parse_port
from .errors import ConfigError, FailoverError
from .metrics import parse_listen
from .remote import MigrateArgs, cancel_command, migrate_command, status_command
from .run import run_vm
from .serve import serve

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_LOG_LEVELS = ["debug", "info", "warning", "error"]


def _version() -> str:
    try:
        return metadata.version("failover-backend")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _port(value: str) -> str:
    try:
        return parse_port(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mac(value: str) -> str:
    if not _MAC.match(value):
        raise argparse.ArgumentTypeError(
            f"expected six hex octets like 52:54:00:12:34:56, got {value!r}"
        )
    if int(value[:2], 16) & 1:
        raise argparse.ArgumentTypeError(f"{value} is a multicast address")
    return value.lower()


def _bounded(low: int, high: int) -> type[int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {number}")
        return number

    return parse  # type: ignore[return-value]


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {number}")
    return number


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected octal permission bits like 0660, got {value!r}"
        ) from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"expected permission bits up to 0777, got {value}")
    return mode


def _listen(value: str) -> str:
    try:
        parse_listen(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return value


def _power_of_two(value: str) -> int:
    number = _bounded(64, 32768)(value)
    if number & (number - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {number}")
    return number


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """``prog``: the program name as invoked (``failover-backend``, or
    ``python -m failover_backend``), shown in usage and errors."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="vhost-user standby backend and controller for QEMU virtio-net failover",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", default="info", choices=_LOG_LEVELS, help="(default info)")
    # Also accepted after the command (`serve --log-level debug`); there it wins.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=_LOG_LEVELS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], **kwargs)

    serve_cmd = add_command(
        "serve",
        help="run a standby vhost-user backend in the foreground",
        description="Serve a vhost-user virtio-net standby device until SIGINT/SIGTERM.",
    )
    serve_cmd.add_argument("--socket", required=True, help="vhost-user socket path")
    serve_cmd.add_argument(
        "--client", action="store_true", help="connect to a socket the frontend listens on"
    )
    serve_cmd.add_argument(
        "--port",
        type=_port,
        default="null",
        help="host side: null, sink, loop, tap:NAME or gen:SIZE[,rate=FPS][,count=N]"
        " (default null)",
    )
    serve_cmd.add_argument(
        "--queues", type=_bounded(1, 16), default=1, help="queue pairs (default 1)"
    )
    serve_cmd.add_argument("--mac", type=_mac, help="guest MAC (default: random local address)")
    serve_cmd.add_argument(
        "--queue-size", type=_power_of_two, default=1024, help="largest ring size (default 1024)"
    )
    serve_cmd.add_argument(
        "--mtu", type=_bounded(68, 65535), default=1500, help="MTU (default 1500)"
    )
    serve_cmd.add_argument(
        "--poll-us",
        type=_bounded(0, 1_000_000),
        default=50,
        help="keep polling the rings this many µs after the last frame moved, "
        "guest kicks suppressed; 0 never polls (default 50)",
    )
    serve_cmd.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o600,
        help="permission bits of the socket, whatever the umask (default 0600)",
    )
    serve_cmd.add_argument(
        "--socket-group", help="group of the socket, by name or id (QEMU's, libvirt's)"
    )
    serve_cmd.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_listen,
        help="serve Prometheus metrics (per-queue counters, connection, features) there",
    )
    serve_cmd.add_argument(
        "--handshake-timeout",
        type=_positive,
        default=5.0,
        help="seconds a frontend may take to send a request (default 5); then it is closed",
    )

    run_cmd = add_command(
        "run",
        help="serve the standby backends and manage one VM's failover pairs",
        description=(
            "Serve the standby backends and manage the failover pairs of one VM for as "
            "long as it lives on this host. Exit status: 0 when the VM shut down, "
            "migrated away or a stop signal came; 1 on a failure (QEMU killed, bad "
            "pair); 3 when the incoming migration failed."
        ),
    )
    run_cmd.add_argument("--config", required=True, type=Path, help="VM configuration (TOML)")
    run_cmd.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_listen,
        help="serve Prometheus metrics of every pair's backend there",
    )

    migrate_cmd = add_command(
        "migrate",
        help="live-migrate a VM with its failover pairs",
        description=(
            "Migrate with every primary unplugged on the source and plugged on the target."
        ),
    )
    migrate_cmd.add_argument("--source-qmp", required=True, type=Path, help="source QMP socket")
    migrate_cmd.add_argument("--target-qmp", required=True, type=Path, help="target QMP socket")
    migrate_cmd.add_argument(
        "--uri", required=True, help="migration URI (unix:PATH, tcp:HOST:PORT)"
    )
    migrate_cmd.add_argument(
        "--wait-unplug-timeout",
        type=_positive,
        default=30.0,
        help="cancel when the guest holds the primary longer (seconds, default 30)",
    )
    migrate_cmd.add_argument(
        "--timeout", type=_positive, default=600.0, help="bound on the whole migration (s)"
    )
    migrate_cmd.add_argument(
        "--no-announce", action="store_true", help="skip announce-self on the target"
    )
    migrate_cmd.add_argument(
        "--json",
        action="store_true",
        help="the report and timeline as one JSON object on stdout (progress on stderr)",
    )
    migrate_cmd.add_argument(
        "--force",
        action="store_true",
        help="migrate even when a source standby's backend is disconnected (no failover path)",
    )

    status_cmd = add_command(
        "status",
        help="show a VM's failover pairs",
        description="Show the VM's failover pairs; exit 1 when one cannot fail over.",
    )
    status_cmd.add_argument("--qmp", required=True, type=Path, help="QMP socket")
    status_cmd.add_argument("--standby", help="only this standby (default: every pair)")
    status_cmd.add_argument(
        "--timeout", type=_positive, default=5.0, help="wait for QEMU this long (default 5 s)"
    )
    status_cmd.add_argument(
        "--json", action="store_true", help="one JSON object on stdout, for scripts"
    )

    cancel_cmd = add_command(
        "cancel",
        help="cancel a VM's outgoing migration",
        description=(
            "Cancel the VM's outgoing migration and follow QEMU until it gave up (in "
            "wait-unplug QEMU waits up to 30 s for the guest's eject)."
        ),
    )
    cancel_cmd.add_argument("--qmp", required=True, type=Path, help="the source's QMP socket")
    cancel_cmd.add_argument(
        "--timeout", type=_positive, default=45.0, help="give up waiting after S (default 45)"
    )

    demo_cmd = add_command(
        "demo",
        help="build a tiny guest and show negotiation, hotplug and a live migration (root)",
    )
    demo_cmd.add_argument("--keep", action="store_true", help="keep logs and sockets")
    demo_cmd.add_argument(
        "--kvm", action="store_true", help="use KVM instead of TCG (nested guests may hang)"
    )
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    backend = StandbyBackend(
        args.socket,
        port=args.port,
        mac=args.mac,
        queues=args.queues,
        client=args.client,
        queue_size=args.queue_size,
        mtu=args.mtu,
        poll_us=args.poll_us,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        handshake_timeout=args.handshake_timeout,
    )
    return asyncio.run(serve(backend, args.metrics))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; ``prog`` defaults to the name the program was started by."""
    parser = build_parser(prog or Path(sys.argv[0]).name)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    if args.log_level != "debug":
        # qemu.qmp logs every connection's end at INFO; its errors reach us as exceptions.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "run":
            return asyncio.run(run_vm(load_config(args.config), args.metrics))
        if args.command == "migrate":
            return asyncio.run(
                migrate_command(
                    MigrateArgs(
                        source_qmp=args.source_qmp,
                        target_qmp=args.target_qmp,
                        uri=args.uri,
                        wait_unplug_timeout=args.wait_unplug_timeout,
                        timeout=args.timeout,
                        announce=not args.no_announce,
                        force=args.force,
                        as_json=args.json,
                    )
                )
            )
        if args.command == "status":
            return asyncio.run(
                status_command(args.qmp, args.standby, args.timeout, as_json=args.json)
            )
        if args.command == "cancel":
            return asyncio.run(cancel_command(args.qmp, args.timeout))
        if args.command == "demo":
            from .demo import demo  # the lab is big; only the demo needs it

            return asyncio.run(
                demo(
                    keep=args.keep,
                    accel="kvm" if args.kvm else "tcg",
                    verbose=args.log_level == "debug",
                )
            )
    except ConfigError as err:
        if err.source is not None:
            # A bad file is not a bad command line: say what to fix, exit 1.
            print(f"error: {err}", file=sys.stderr)
            return 1
        parser.error(str(err))
    except FailoverError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2
