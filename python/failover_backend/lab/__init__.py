"""The lab: a tiny guest, QEMU processes and host networking for failover runs."""
