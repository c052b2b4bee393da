"""``status``: a VM's failover pairs and whether each can fail over, from its QMP
socket only (a second ``-qmp`` socket: QEMU takes one client per socket)."""

from __future__ import annotations

import json
from pathlib import Path

from .controller import FailoverController
from .errors import MonitorError
from .migrate_command import print_error
from .qmp import QmpSession
from .vm_devices import failover_pairs


async def status_command(
    qmp_path: Path, standby: str | None, timeout: float = 5.0, as_json: bool = False
) -> int:
    """Every failover pair of the VM (or just ``standby``), as text or as one JSON
    object; 1 when a pair cannot fail over (its standby's backend is disconnected)."""
    qmp = QmpSession("vm")
    try:
        await qmp.connect(qmp_path, timeout)
        standbys = [standby] if standby else sorted(await failover_pairs(qmp))
        pairs = [await FailoverController(qmp, standby_id).status() for standby_id in standbys]
        healthy = all(pair.healthy for pair in pairs)
        if as_json:
            document = {"pairs": [pair.to_json() for pair in pairs], "healthy": healthy}
            print(json.dumps(document, indent=2), flush=True)
        elif not pairs:
            print("VM has no failover standby (virtio-net-pci with failover=on)")
        else:
            for index, pair in enumerate(pairs):
                lines = pair.lines()
                print("\n".join(lines if index == 0 else lines[1:]), flush=True)
        return 0 if healthy else 1
    except MonitorError as err:
        print_error(str(err))
        return 1
    finally:
        await qmp.close()
