"""Exceptions raised by failover_backend.

Every exception derives from :class:`FailoverError`::

    FailoverError
     ├── ConfigError      a configuration value or file is wrong (names the field)
     └── BackendError     the native standby backend failed (socket, port, announcement)
"""

from __future__ import annotations


class FailoverError(Exception):
    """Root of every error this package raises."""


class ConfigError(FailoverError, ValueError):
    """A configuration value is wrong.

    :param field: The argument or config field at fault (``"port"``, ``"pair.mac"``).
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
