"""A backend's settings: each rule written once, in the native core, and named the
way each surface's user wrote it.

The core (``standby_net::Settings``) checks every setting of a standby backend; the
command line, the TOML loader and the Python API all hand their values to it and
show its rule as it is. What differs is only how the user spelled the setting:
``--queue-size`` on the command line, ``backend.queue_size`` in TOML, ``queue_size=``
in Python.
"""

from __future__ import annotations

import os
from typing import Any

from . import _native

#: What the core raises: ``args`` are ``(setting, rule)``.
SettingError = _native.SettingError

#: Python's int is unbounded; the core reads 64 bits. Beyond those a value is out of
#: every range anyway, and the core says so (with the value clamped).
_I64 = (-(2**63), 2**63 - 1)


def cli_option(setting: str) -> str:
    """``queue_size`` → ``--queue-size`` (``socket_path`` is ``--socket``)."""
    return "--socket" if setting == "socket_path" else "--" + setting.replace("_", "-")


def toml_key(setting: str) -> str:
    """``socket_path`` → ``socket``; the others are spelled as in Python."""
    return "socket" if setting == "socket_path" else setting


def python_keyword(setting: str) -> str:
    """``queue_size`` → ``queue_size=``."""
    return f"{setting}="


def native_arguments(**settings: Any) -> dict[str, Any]:
    """Keyword arguments for the core: integers clamped to 64 bits."""
    return {
        key: min(max(value, _I64[0]), _I64[1])
        if isinstance(value, int) and not isinstance(value, bool)
        else value
        for key, value in settings.items()
    }


def check_backend_settings(
    socket_path: str | os.PathLike[str], **settings: Any
) -> tuple[str, str | None]:
    """Check backend settings (the keywords of :class:`~failover_backend.StandbyBackend`,
    ``socket_group`` as an id) without opening anything.

    :return: The port and the MAC in their canonical spelling (MAC ``None`` if not given).
    :raise SettingError: ``args`` are ``(setting, rule)``.
    """
    port, mac = _native.check_settings(os.fspath(socket_path), **native_arguments(**settings))
    return port, mac


def setting_and_rule(err: BaseException) -> tuple[str, str]:
    """The ``(setting, rule)`` a :data:`SettingError` carries."""
    setting, rule = err.args
    return str(setting), str(rule)
