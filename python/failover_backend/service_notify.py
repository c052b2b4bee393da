"""Telling a service manager that the backend is ready (systemd's ``Type=notify``).

A unit that starts QEMU after the backend (``After=failover-backend@vm1.service``)
needs the vhost-user sockets to exist before QEMU connects: ``serve`` and ``run`` say
``READY=1`` once every socket listens, not when the process starts. This is the
``sd_notify`` datagram protocol, which needs no library: one datagram to the Unix
socket named in ``NOTIFY_SOCKET`` (``@`` at its start: the abstract namespace).
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


def notify(**fields: str) -> bool:
    """Send ``KEY=value`` lines to the service manager; says whether there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    message = "\n".join(f"{key}={value}" for key, value in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as err:
        logger.warning("cannot notify the service manager at %s: %s", path, err)
        return False
    return True


def notify_ready(status: str) -> bool:
    """``READY=1``, with a status line ``systemctl status`` shows."""
    return notify(READY="1", STATUS=status, MAINPID=str(os.getpid()))


def notify_stopping() -> bool:
    return notify(STOPPING="1")
