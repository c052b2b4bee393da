"""Did the guest negotiate VIRTIO_NET_F_STANDBY on the standby?

QEMU says so with FAILOVER_NEGOTIATED {device-id} (possibly more than once: each time
the driver sets features) and then plugs the hidden primary. A guest without
net_failover never negotiates, and nothing says so: hence the deadline here, and a
message that says what is probably missing.
"""

from __future__ import annotations

from .errors import MonitorCommandError, NegotiationTimeout
from .qmp import Monitor, QmpEvent

STANDBY_FEATURE = "VIRTIO_NET_F_STANDBY"


async def guest_features(qmp: Monitor, standby_id: str) -> list[str]:
    """The feature names the guest driver acked on the standby (``x-query-virtio-status``)."""
    try:
        status = await qmp.execute(
            "x-query-virtio-status", {"path": f"/machine/peripheral/{standby_id}/virtio-backend"}
        )
    except MonitorCommandError:
        return []
    features = status.get("guest-features", {})
    names = [*features.get("dev-features", []), *features.get("transports", [])]
    return [name.split(":")[0] for name in names]


async def standby_negotiated(qmp: Monitor, standby_id: str) -> bool:
    return STANDBY_FEATURE in await guest_features(qmp, standby_id)


async def wait_negotiated(
    qmp: Monitor, standby_id: str, *, timeout: float, since: int = 0
) -> QmpEvent | None:
    """Wait until the guest negotiated STANDBY on ``standby_id``.

    Returns the FAILOVER_NEGOTIATED event, or ``None`` when the guest had negotiated
    before this session heard any event.

    :raise NegotiationTimeout: When it does not within ``timeout`` seconds.
    """

    def for_standby(event: QmpEvent) -> bool:
        return event.data.get("device-id") == standby_id

    if not qmp.events_named("FAILOVER_NEGOTIATED", since) and await standby_negotiated(
        qmp, standby_id
    ):
        return None
    try:
        return await qmp.wait_event(
            "FAILOVER_NEGOTIATED", since=since, match=for_standby, timeout=timeout
        )
    except TimeoutError:
        raise NegotiationTimeout(
            f"the guest did not negotiate VIRTIO_NET_F_STANDBY on {standby_id} within "
            f"{timeout:.0f} s (no net_failover in the guest, or its virtio-net driver is "
            "not loaded?); QEMU keeps the primary hidden until it does"
        ) from None
