"""Steering the host's switches to whichever path carries the guest's traffic.

While a primary is enslaved, the guest drops frames arriving on the standby, and the
host's switch (a Linux bridge, the NIC's embedded switch) forwards by the port it
last learned the guest's MAC on. When the standby becomes the active path (the
primary is being unplugged, or the VM has just resumed on the target without one),
the standby's backend announces the guest's MAC from its host port.

After a migration QEMU repeats its own announcements for a while (``announce-*``
parameters, by default at 50, 150, 300, 500 and 750 ms... after RESUME) on every
NIC, the primary's too: its RARPs leave through the primary's host port, where the
guest cannot receive yet. The burst below outlasts them, so the switch ends up
pointing at the standby.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from .backend import StandbyBackend
from .errors import BackendError
from .timeline import Timeline

logger = logging.getLogger(__name__)

#: Seconds after the switch-over at which to announce.
ANNOUNCE_SCHEDULE: tuple[float, ...] = (0.0, 0.1, 0.3, 0.6, 1.0, 1.5)


async def announce_burst(
    backend: StandbyBackend,
    schedule: Sequence[float] = ANNOUNCE_SCHEDULE,
    timeline: Timeline | None = None,
    label: str = "backend",
) -> int:
    """Announce the guest's MAC from the backend's host port at each offset of
    ``schedule``; returns the frames sent. A port that cannot announce (``null``,
    ``loop``) is logged, not raised: steering is best effort."""
    if timeline is not None:
        timeline.add(label, "announce", f"{len(schedule)} RARP over {schedule[-1]:.1f} s")
    start = time.monotonic()
    sent = 0
    for offset in schedule:
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            sent += backend.announce(1)
        except BackendError as err:
            logger.warning("cannot steer traffic to the standby: %s", err)
            break
    return sent
