"""Command line: ``python -m failover_backend <command>``.

Exit codes: 0 success, 1 runtime failure (the cause is printed), 2 bad arguments;
``run`` also ends with 3 when the VM's incoming migration failed (see
:mod:`failover_backend.vm_life`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .backend import StandbyBackend, group_id
from .config import BackendSection, load_config, load_serve_config
from .errors import ConfigError, FailoverError
from .metrics import parse_listen
from .migrate_command import (
    LibvirtMigrateArgs,
    MigrateArgs,
    cancel_command,
    migrate_command,
    migrate_libvirt_command,
)
from .run import run_vm
from .serve import serve
from .serving import standby_backend
from .settings import SettingError, cli_option, setting_and_rule
from .status_command import status_command

_LOG_LEVELS = ["debug", "info", "warning", "error"]


def _version() -> str:
    try:
        return metadata.version("failover-backend")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _number(value: str) -> int:
    """A whole number; its range is the setting's rule (see :func:`_check_serve`)."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None


def _seconds(value: str) -> float:
    """Seconds; their range is the setting's rule (see :func:`_check_serve`)."""
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None


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
        return int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected octal permission bits like 0660, got {value!r}"
        ) from None


def _alias_path(value: str) -> tuple[str, Path]:
    alias, sep, path = value.partition("=")
    if not sep or not alias or not path:
        raise argparse.ArgumentTypeError(f"expected ALIAS=PATH, got {value!r}")
    return alias, Path(path)


def _check_migrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Either QEMU's QMP sockets or a libvirt domain, each with what it needs."""
    qmp = {"--source-qmp": args.source_qmp, "--target-qmp": args.target_qmp, "--uri": args.uri}
    if args.libvirt is None:
        missing = [option for option, value in qmp.items() if value is None]
        if missing:
            parser.error(
                f"the following arguments are required: {', '.join(missing)} "
                "(or --libvirt, --domain and --to)"
            )
        return
    given = [option for option, value in qmp.items() if value is not None]
    if given:
        parser.error(
            f"argument --libvirt: libvirt reaches both QEMUs; leave out {', '.join(given)}"
        )
    for option, value in (("--domain", args.domain), ("--to", args.to)):
        if value is None:
            parser.error(f"argument --libvirt: needs {option}")


def _listen(value: str) -> str:
    try:
        parse_listen(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return value


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
        help="run standby vhost-user backends in the foreground",
        description=(
            "Serve a vhost-user virtio-net standby device (--socket and its options), or "
            "every one a file lists (--config), until SIGINT/SIGTERM."
        ),
    )
    serve_cmd.add_argument("--socket", help="vhost-user socket path")
    serve_cmd.add_argument(
        "--config",
        type=Path,
        help="serve every [[backend]] this TOML file lists (instead of --socket and its options)",
    )
    serve_cmd.add_argument(
        "--client", action="store_true", help="connect to a socket the frontend listens on"
    )
    serve_cmd.add_argument(
        "--port",
        default="null",
        help="host side: null, sink, loop, tap:NAME or gen:SIZE[,rate=FPS][,count=N]"
        " (default null)",
    )
    serve_cmd.add_argument("--queues", type=_number, default=1, help="queue pairs (default 1)")
    serve_cmd.add_argument("--mac", help="guest MAC (default: random local address)")
    serve_cmd.add_argument(
        "--queue-size", type=_number, default=1024, help="largest ring size (default 1024)"
    )
    serve_cmd.add_argument(
        "--mtu",
        type=_number,
        default=1500,
        help="the guest's MTU: QEMU's host_mtu in the printed arguments, and the TAP's"
        " (default 1500)",
    )
    serve_cmd.add_argument(
        "--poll-us",
        type=_number,
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
        type=_seconds,
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
    migrate_cmd.add_argument("--source-qmp", type=Path, help="source QMP socket")
    migrate_cmd.add_argument("--target-qmp", type=Path, help="target QMP socket")
    migrate_cmd.add_argument("--uri", help="migration URI (unix:PATH, tcp:HOST:PORT)")
    libvirt_group = migrate_cmd.add_argument_group(
        "through libvirt",
        "migrate a libvirt domain with libvirt's own API (instead of --source-qmp, "
        "--target-qmp, --uri)",
    )
    libvirt_group.add_argument("--libvirt", metavar="SRC_URI", help="the source's libvirt URI")
    libvirt_group.add_argument("--domain", help="the domain's name")
    libvirt_group.add_argument("--to", metavar="DEST_URI", help="the destination's libvirt URI")
    libvirt_group.add_argument(
        "--p2p", action="store_true", help="peer to peer: the source libvirtd drives it"
    )
    libvirt_group.add_argument(
        "--migrate-uri", help="where the destination QEMU listens (tcp://HOST:PORT)"
    )
    libvirt_group.add_argument("--listen-address", help="the destination QEMU's listen address")
    libvirt_group.add_argument(
        "--dest-socket",
        metavar="ALIAS=PATH",
        action="append",
        default=[],
        type=_alias_path,
        help="a standby's vhost-user socket on the destination, where it differs",
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


class FoldQmpLibrary(logging.Filter):
    """qemu.qmp logs its own view of what reaches us as exceptions (a connection that
    failed, one that ended): its records become debug lines of ours, shown with
    ``--log-level debug`` and never as a second ERROR beside our own message."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "qemu.qmp" or record.name.startswith("qemu.qmp."):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.level <= logging.DEBUG
        return True


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of command ``name`` (its usage goes with its errors)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    return parser


def _serve_backend(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BackendSection:
    """``serve``'s one backend, checked by the core's rules before anything opens (a
    broken option exits 2 naming it); the port and MAC come back canonical and the
    group as its id."""
    if args.socket is None:
        parser.error("one of --socket or --config is required")
    try:
        group = group_id(args.socket_group)
    except ConfigError as err:
        parser.error(f"argument --socket-group: {err.message}")
    options = {name: getattr(args, name) for name in _backend_options()}
    try:
        return BackendSection(**{**options, "socket_group": group}).checked()
    except SettingError as err:
        setting, rule = setting_and_rule(err)
        parser.error(f"argument {cli_option(setting)}: {rule}")


def _backend_options() -> list[str]:
    """``serve``'s options that describe its one backend (``--config`` replaces them
    all): one per backend setting, spelled as the setting."""
    return [f.name for f in dataclasses.fields(BackendSection)]


def _check_serve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--config`` describes every backend: no backend option goes with it."""
    given = [name for name in _backend_options() if getattr(args, name) != parser.get_default(name)]
    if given:
        options = ", ".join(cli_option(name) for name in given)
        parser.error(f"argument --config: the file describes every backend; leave out {options}")


def _run_serve(
    args: argparse.Namespace, parser: argparse.ArgumentParser, backend: BackendSection | None
) -> int:
    """``backend``: the one backend's (:func:`_serve_backend`), without ``--config``."""
    named: list[tuple[str, StandbyBackend]]
    if args.config is not None:
        _check_serve_config(args, parser)
        config = load_serve_config(args.config)
        named = [(name, standby_backend(section)) for name, section in config.backends]
    else:
        assert backend is not None
        named = [("", standby_backend(backend))]
    return asyncio.run(serve(named, args.metrics))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; ``prog`` defaults to the name the program was started by."""
    parser = build_parser(prog or Path(sys.argv[0]).name)
    args = parser.parse_args(argv)
    serve_parser = _command_parser(parser, "serve")
    if args.command == "migrate":
        _check_migrate(args, _command_parser(parser, "migrate"))
    serve_backend = None
    if args.command == "serve" and args.config is None:
        # A bad option exits before logging starts.
        serve_backend = _serve_backend(args, serve_parser)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(FoldQmpLibrary(level))
    try:
        if args.command == "serve":
            return _run_serve(args, serve_parser, serve_backend)
        if args.command == "run":
            return asyncio.run(run_vm(load_config(args.config), args.metrics))
        if args.command == "migrate" and args.libvirt is not None:
            return asyncio.run(
                migrate_libvirt_command(
                    LibvirtMigrateArgs(
                        source_uri=args.libvirt,
                        domain=args.domain,
                        dest_uri=args.to,
                        p2p=args.p2p,
                        migrate_uri=args.migrate_uri,
                        listen_address=args.listen_address,
                        dest_sockets=dict(args.dest_socket),
                        wait_unplug_timeout=args.wait_unplug_timeout,
                        timeout=args.timeout,
                        as_json=args.json,
                    )
                )
            )
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
