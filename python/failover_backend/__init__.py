"""failover-backend: a vhost-user standby network backend for QEMU virtio-net failover.

The standby half of a failover pair (``virtio-net-pci,failover=on``) runs its datapath
in :class:`StandbyBackend`, a Rust device built on the rust-vmm crates. The
controller drives QEMU over QMP through the pairing, negotiation, primary hotplug
and migration steps.
"""

import logging

from .backend import (
    BackendEvent,
    BackendStats,
    FrontendFeatures,
    QueueStats,
    StandbyBackend,
    SteeringStatus,
)
from .errors import BackendError, ConfigError, FailoverError
from .qemu_args import shared_memory_args, standby_qemu_args

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BackendError",
    "BackendEvent",
    "BackendStats",
    "ConfigError",
    "FailoverError",
    "FrontendFeatures",
    "QueueStats",
    "StandbyBackend",
    "SteeringStatus",
    "shared_memory_args",
    "standby_qemu_args",
]
