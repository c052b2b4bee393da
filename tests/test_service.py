"""Running as a service: the systemd template unit in ``contrib/`` verifies, ``serve``
tells its service manager READY only once its socket listens and STOPPING when it
stops (the ``Type=notify`` protocol, against a notify socket of the test's own), and
the libvirt domain example validates against libvirt's schema."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

from tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "failover-backend@.service"


def test_the_systemd_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "apt-get install systemd")
    # As an operator installs it: ExecStart= pointed at the script pip installed.
    script = Path(sys.executable).parent / "failover-backend"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/failover-backend run --config" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/usr/local/bin/failover-backend", str(script)))
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / "failover-backend@vm1.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done
    assert done.stderr.strip() == "", done.stderr
    for needed in ("Type=notify", "RuntimeDirectory=failover-backend/%i", "Restart=on-failure"):
        assert needed in text


def test_serve_is_ready_once_its_socket_listens_and_says_when_it_stops(tmp_path: Path) -> None:
    notify = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(20)
    vhost_socket = tmp_path / "standby.sock"
    serve = subprocess.Popen(
        [sys.executable, "-m", "failover_backend", "serve", "--socket", str(vhost_socket)],
        env={**os.environ, "NOTIFY_SOCKET": str(notify)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = dict(line.split("=", 1) for line in listener.recv(4096).decode().splitlines())
        # The socket listens when READY comes: QEMU started after it can connect.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(vhost_socket))
        probe.close()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(serve.pid), ready
        assert str(vhost_socket) in ready["STATUS"]
        serve.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        serve.communicate(timeout=15)
        assert serve.returncode == 0
    finally:
        serve.kill()
        serve.wait()
        listener.close()


def test_the_libvirt_domain_example_validates_and_pairs_by_alias() -> None:
    validate = require_tool("virt-xml-validate", "apt-get install libvirt-clients libxml2-utils")
    example = ROOT / "contrib" / "libvirt" / "vm1.xml"
    done = subprocess.run(
        [validate, str(example), "domain"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done
    domain = ElementTree.parse(example).getroot()
    backing = domain.find("memoryBacking")
    assert backing is not None
    assert backing.find("source").get("type") == "memfd"  # type: ignore[union-attr]
    assert backing.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    standby = domain.find("devices/interface[@type='vhostuser']")
    primary = domain.find("devices/interface[@type='hostdev']")
    assert standby is not None and primary is not None
    assert standby.find("teaming").get("type") == "persistent"  # type: ignore[union-attr]
    alias = standby.find("alias").get("name")  # type: ignore[union-attr]
    teaming = primary.find("teaming")
    assert teaming is not None and teaming.get("type") == "transient"
    assert teaming.get("persistent") == alias
    assert standby.find("mac").get("address") == primary.find("mac").get("address")  # type: ignore[union-attr]
    source = standby.find("source")
    assert source is not None and source.get("mode") == "client"
    assert source.get("path", "").startswith("/run/failover-backend/vm1/")
