"""QEMU command-line fragments for a failover pair.

The standby runs on vhost-user, so QEMU also needs guest RAM it can share with the
backend (``memory-backend-memfd,share=on``); :func:`shared_memory_args` gives that part.
"""

from __future__ import annotations


def standby_qemu_args(
    *,
    socket_path: str,
    mac: str,
    queues: int = 1,
    backend_is_client: bool = False,
    device_id: str = "standby0",
    bus: str | None = None,
    failover: bool = True,
    legacy_interrupts: bool = False,
) -> list[str]:
    """``-chardev``/``-netdev``/``-device`` arguments for a vhost-user standby.

    :param backend_is_client: The backend connects to QEMU, so QEMU listens. Otherwise
        QEMU connects, and reconnects every second when the backend restarts
        (without ``reconnect`` the standby would stay disconnected for good).
    :param bus: PCIe root port to put the device on (``None``: QEMU picks).
    :param legacy_interrupts: ``vectors=0``: needed by QEMU 7.2 under TCG, whose
        vhost-user + MSI-X path crashes without KVM.
    """
    chardev = f"socket,id=chr-{device_id},path={socket_path}"
    if backend_is_client:
        chardev += ",server=on,wait=off"
    else:
        chardev += ",reconnect=1"
    netdev = f"vhost-user,id={device_id},chardev=chr-{device_id}"
    if queues > 1:
        netdev += f",queues={queues}"
    device = f"virtio-net-pci,netdev={device_id},id={device_id},mac={mac}"
    if bus:
        device += f",bus={bus}"
    if queues > 1:
        device += f",mq=on,vectors={0 if legacy_interrupts else 2 * queues + 2}"
    elif legacy_interrupts:
        device += ",vectors=0"
    device += f",failover={'on' if failover else 'off'}"
    return ["-chardev", chardev, "-netdev", netdev, "-device", device]


def shared_memory_args(size: str, mem_id: str = "mem0") -> list[str]:
    """Guest RAM the vhost-user backend can map (required for any vhost-user device)."""
    return [
        "-object",
        f"memory-backend-memfd,id={mem_id},size={size},share=on",
        "-numa",
        f"node,memdev={mem_id}",
    ]
