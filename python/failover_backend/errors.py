"""Exceptions raised by failover_backend.

Every exception derives from :class:`FailoverError`::

    FailoverError
     ├── ConfigError             a configuration value or file is wrong (names the field)
     ├── BackendError            the native standby backend failed (socket, port, announcement)
     ├── MonitorError            talking to QEMU over QMP failed
     │    ├── MonitorUnavailable   no QMP socket, or QEMU does not answer on it
     │    ├── MonitorCommandError  QEMU refused a command
     │    └── QemuGone             QEMU went away (the connection closed)
     ├── PairingError            the failover pair breaks QEMU's rules (all of them listed)
     ├── NegotiationTimeout      the guest did not negotiate VIRTIO_NET_F_STANDBY in time
     ├── PrimaryError            plugging or unplugging the primary failed
     │    └── UnplugTimeout        the guest did not release the primary in time
     └── MigrationError          a migration could not start, failed, or was cancelled
                                 (in :mod:`failover_backend.migration`, with its report)

This module imports nothing from the package: every other module may import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class FailoverError(Exception):
    """Root of every error this package raises."""


class ConfigError(FailoverError, ValueError):
    """A configuration value is wrong.

    :param field: The argument or config field at fault (``"port"``, ``"standby.mac"``).
    :param message: What is wrong and how to fix it.
    :param source: The file the value came from, if any.
    """

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field = field
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


class BackendError(FailoverError):
    """The standby backend could not do what was asked."""


class MonitorError(FailoverError):
    """Talking to QEMU's monitor (QMP) failed."""


class MonitorUnavailable(MonitorError):
    """No QMP socket at the given path, or QEMU does not answer on it."""


class MonitorCommandError(MonitorError):
    """QEMU refused a QMP command.

    :param command: The command sent.
    :param arguments: Its arguments.
    :param error_class: QEMU's error class (``GenericError``, ``DeviceNotFound``...).
    :param description: QEMU's message.
    """

    def __init__(
        self, command: str, arguments: dict[str, Any] | None, error_class: str, description: str
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.description = description
        super().__init__(f"QEMU refused {command} {arguments or {}}: {description}")


class QemuGone(MonitorError):
    """QEMU closed the monitor connection (it exited or was killed)."""


@dataclass(frozen=True)
class Violation:
    """A failover pairing rule broken (see :mod:`failover_backend.pairing`)."""

    rule: str
    message: str


class PairingError(FailoverError):
    """The failover pair breaks rules QEMU or the guest rely on.

    :param violations: Every rule broken, each named.
    """

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = list(violations)
        lines = "\n".join(f"  - {v.rule}: {v.message}" for v in self.violations)
        super().__init__(f"the failover pair breaks {len(self.violations)} rule(s):\n{lines}")


class NegotiationTimeout(FailoverError):
    """The guest did not negotiate VIRTIO_NET_F_STANDBY on the standby in time."""


class PrimaryError(FailoverError):
    """Plugging, unplugging or repairing the primary failed."""


class UnplugTimeout(PrimaryError):
    """The guest did not release (eject) the primary before the deadline."""


def libvirt_missing(err: ImportError) -> str:
    """What to say when libvirt-python (the optional ``[libvirt]`` extra) cannot load."""
    return f"needs libvirt-python ({err}): pip install 'failover-backend[libvirt]'"
