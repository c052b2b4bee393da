"""``python -m failover_backend serve`` as users run it: a subprocess, signals, exit codes."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testpmd import Testpmd, two_bursts_looped_back, virtio_user_vdev, wait_for


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failover_backend", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "failover_backend", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "udp:1.2.3.4"], "--port"),
        (["--port", "tap:"], "--port"),
        (["--port", "gen:64,rate=0"], "--port"),
        (["--queues", "0"], "--queues"),
        (["--queues", "two"], "--queues"),
        (["--mac", "01:00:5e:00:00:01"], "--mac"),
        (["--mac", "52:54:00:12:34"], "--mac"),
        (["--queue-size", "1000"], "--queue-size"),
        (["--mtu", "20"], "--mtu"),
        (["--poll-us", "-1"], "--poll-us"),
        (["--poll-us", "1000001"], "--poll-us"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(
    sockdir: Path, args: list[str], named: str
) -> None:
    result = run_cli("serve", "--socket", str(sockdir / "s.sock"), *args)
    assert result.returncode == 2, result
    assert f"argument {named}" in result.stderr
    assert not (sockdir / "s.sock").exists()


def test_missing_socket_argument_exits_2() -> None:
    result = run_cli("serve")
    assert result.returncode == 2
    assert "--socket" in result.stderr


def test_runtime_failure_exits_1_with_the_cause(sockdir: Path) -> None:
    result = run_cli("serve", "--socket", str(sockdir / "no-such-dir" / "s.sock"))
    assert result.returncode == 1, result
    assert "error: cannot listen on" in result.stderr
    assert "No such file or directory" in result.stderr


def test_a_second_backend_on_a_live_socket_is_refused(sockdir: Path) -> None:
    socket = sockdir / "s.sock"
    first = start_serve("--socket", str(socket))
    try:
        wait_for(socket.exists, 15, "the first backend's socket")
        second = run_cli("serve", "--socket", str(socket))
        assert second.returncode == 1
        assert "another backend is already listening" in second.stderr
        assert first.poll() is None, "the first backend must keep serving"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=15)
    assert first.returncode == 0


@pytest.mark.dpdk
def test_serve_carries_traffic_and_stops_cleanly_on_sigterm(
    sockdir: Path, testpmd_binary: str
) -> None:
    socket = sockdir / "s.sock"
    serve = start_serve("--socket", str(socket), "--port", "loop", "--mac", "52:54:00:AA:BB:CC")
    try:
        wait_for(socket.exists, 15, "the backend's socket")
        stats = two_bursts_looped_back(testpmd_binary, socket)
        assert stats["TX-packets"] == stats["RX-packets"] == 64
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=15)

    assert serve.returncode == 0, err
    assert out.splitlines()[0] == (
        f"QEMU arguments: -chardev socket,id=chr-standby0,path={socket},reconnect=1 "
        "-netdev vhost-user,id=standby0,chardev=chr-standby0 "
        "-device virtio-net-pci,netdev=standby0,id=standby0,mac=52:54:00:aa:bb:cc,failover=on"
    )
    counters = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert counters["rx0"][0] == counters["tx0"][0] == "64"
    for expected in (
        f"listening on {socket}",
        "frontend connected (connection 1)",
        "features negotiated",
        "guest memory mapped",
        "frontend disconnected (connection 1)",
        "stopped",
    ):
        assert expected in err
    assert not socket.exists(), "the socket must be removed at exit"


def test_serve_exits_1_with_the_cause_when_the_device_cannot_serve_again(
    sockdir: Path,
) -> None:
    """Out of descriptors, a connection cannot be set up: serve says why and exits 1,
    so its supervisor restarts it (it does not linger, alive and useless)."""
    path = sockdir / "s.sock"
    serve = subprocess.Popen(
        [sys.executable, "-m", "failover_backend", "serve", "--socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(path.exists, 15, "the socket")
        # Leave the process no room for one more connection's descriptors.
        idle = len(list(Path(f"/proc/{serve.pid}/fd").iterdir()))
        subprocess.run(["prlimit", f"--pid={serve.pid}", f"--nofile={idle + 2}"], check=True)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        out, err = serve.communicate(timeout=30)
        client.close()
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 1, (out, err)
    assert "error: the backend cannot serve any more:" in err
    assert "Too many open files" in err


def test_version_names_the_program_as_it_was_invoked() -> None:
    by_module = run_cli("--version")
    assert by_module.returncode == 0, by_module
    assert re.fullmatch(r"python -m failover_backend \d+\.\d+\.\d+\n", by_module.stdout)
    script = Path(sys.executable).parent / "failover-backend"
    by_script = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=30
    )
    assert re.fullmatch(r"failover-backend \d+\.\d+\.\d+\n", by_script.stdout), by_script
    usage = subprocess.run([str(script), "serve"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2
    assert usage.stderr.startswith("usage: failover-backend serve"), usage.stderr


def test_log_level_is_taken_after_the_command_too() -> None:
    missing = "/nonexistent/qmp.sock"
    after = run_cli("status", "--qmp", missing, "--timeout", "0.5", "--log-level", "error")
    assert after.returncode == 1, after
    assert "cannot connect to QMP" in after.stderr and "usage:" not in after.stderr
    bad = run_cli("status", "--qmp", missing, "--log-level", "loud")
    assert bad.returncode == 2
    assert "argument --log-level" in bad.stderr


def test_qemu_qmp_lines_are_debug_lines_of_ours_and_the_error_is_said_once() -> None:
    missing = "/nonexistent/qmp.sock"
    plain = run_cli("status", "--qmp", missing, "--timeout", "0.5")
    assert plain.returncode == 1, plain
    assert plain.stdout == ""
    assert plain.stderr.splitlines() == [
        f"error: vm: cannot connect to QMP at {missing}: [Errno 2] No such file or directory"
        f" (is QEMU running with -qmp unix:{missing},server=on,wait=off, and no other client"
        " on it?)"
    ]
    debug = run_cli("status", "--qmp", missing, "--timeout", "0.5", "--log-level", "debug")
    library = [line for line in debug.stderr.splitlines() if " qemu.qmp" in line]
    assert library, debug.stderr
    assert all(" DEBUG   qemu.qmp" in line for line in library), library
    assert debug.stderr.count("cannot connect to QMP") == 1


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.dpdk
def test_metrics_endpoint_counts_what_testpmd_sent(testpmd_binary: str, sockdir: Path) -> None:
    sock = sockdir / "metrics.sock"
    proc = start_serve("--socket", str(sock), "--port", "null", "--metrics", "127.0.0.1:0")
    try:
        assert proc.stderr is not None
        url = ""
        while not url:
            line = proc.stderr.readline()
            assert line, f"serve ended before it served metrics (exit {proc.poll()})"
            if "metrics on " in line:
                url = line.split("metrics on ")[1].strip()
        labels = (("direction", "tx"), ("queue", "0"), ("standby", str(sock)))
        vdev = virtio_user_vdev(str(sock))
        app = ["--forward-mode=txonly", "--txpkts=64", "--nb-cores=1"]
        with Testpmd(testpmd_binary, [vdev], app) as pmd:
            standby = (("standby", str(sock)),)
            wait_for(
                lambda: _scrape(url).get(("failover_backend_connected", standby)) == 1,
                20,
                "the endpoint to show the frontend connected",
            )
            pmd.cmd("start")
            wait_for(
                lambda: _scrape(url)[("failover_backend_frames_total", labels)] > 1000,
                20,
                "frames counted while traffic flows",
            )
            pmd.cmd("stop")
            sent = pmd.port_stats(0)
            wait_for(
                lambda: (
                    _scrape(url)[("failover_backend_frames_total", labels)] == sent["TX-packets"]
                ),
                10,
                f"the endpoint to count {sent['TX-packets']} frames",
            )
            metrics = _scrape(url)
        assert metrics[("failover_backend_bytes_total", labels)] == sent["TX-bytes"]
        assert metrics[("failover_backend_drops_total", labels)] == 0
        assert metrics[("failover_backend_connections_total", standby)] == 1
        version_1 = (("feature", "VERSION_1"), ("standby", str(sock)))
        assert metrics[("failover_backend_feature_acked", version_1)] == 1
        assert metrics[("failover_backend_dirty_logging", standby)] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


SERVE_MANY = """
[[backend]]
name = "vm1"
socket = "{dir}/vm1.sock"
port = "loop"
mac = "52:54:00:00:00:01"

[[backend]]
socket = "{dir}/vm2.sock"
port = "null"
mac = "52:54:00:00:00:02"
queues = 2
"""


@pytest.mark.dpdk
def test_one_serve_carries_the_standbys_a_file_lists(sockdir: Path, testpmd_binary: str) -> None:
    config = sockdir / "standbys.toml"
    config.write_text(SERVE_MANY.format(dir=sockdir))
    vm1, vm2 = sockdir / "vm1.sock", sockdir / "vm2.sock"
    serve = start_serve("--config", str(config))
    try:
        wait_for(lambda: vm1.exists() and vm2.exists(), 15, "both sockets")
        # vm1 loops 64 frames back; vm2 (two queue pairs) drops what it is sent.
        with Testpmd(
            testpmd_binary, [virtio_user_vdev(str(vm1))], ["--forward-mode=rxonly"]
        ) as pmd:
            pmd.cmd("start tx_first 2")
            wait_for(lambda: pmd.port_stats(0)["RX-packets"] == 64, 15, "64 frames back")
            pmd.cmd("stop")
            pmd.quit()
        with Testpmd(
            testpmd_binary,
            [virtio_user_vdev(str(vm2), queues=2)],
            ["--forward-mode=txonly", "--rxq=2", "--txq=2"],
        ) as pmd:
            pmd.cmd("start tx_first 3")
            pmd.cmd("stop")
            sent = pmd.port_stats(0)["TX-packets"]
            pmd.quit()
        assert serve.poll() is None, "serve keeps serving the others"
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(
        f"QEMU arguments for vm1: -chardev socket,id=chr-standby0,path={vm1}"
    )
    assert lines[1].startswith(
        f"QEMU arguments for {vm2}: -chardev socket,id=chr-standby0,path={vm2}"
    )
    assert "mq=on" in lines[1]
    tables = out.split(f"vm1 ({vm1}):\n")[1].split(f"{vm2} ({vm2}):\n")
    vm1_counters = {line.split()[0]: line.split()[1:] for line in tables[0].splitlines()[1:]}
    vm2_counters = {line.split()[0]: line.split()[1:] for line in tables[1].splitlines()[1:]}
    assert vm1_counters["tx0"][0] == vm1_counters["rx0"][0] == "64"
    assert sent > 0
    assert int(vm2_counters["tx0"][0]) + int(vm2_counters["tx1"][0]) == sent
    assert vm2_counters["rx0"][0] == vm2_counters["rx1"][0] == "0"
    assert "vm1: frontend connected (connection 1)" in err
    assert f"{vm2}: frontend disconnected (connection 1)" in err
    assert not vm1.exists() and not vm2.exists()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (("vm2.sock", "vm1.sock"), "backend[1].socket: '"),
        (('port = "null"', 'port = "tap:"'), "backend[1].port: "),
        (("queues = 2", "queues = 0"), "backend[1].queues: "),
        (('name = "vm1"', "name = 1"), "backend[0].name: expected a name"),
        (("[[backend]]\nsocket", "[[backends]]\nsocket"), "backends: unknown table"),
    ],
)
def test_a_bad_serve_file_exits_1_naming_the_backend_and_its_key(
    sockdir: Path, edit: tuple[str, str], field: str
) -> None:
    config = sockdir / "standbys.toml"
    config.write_text(SERVE_MANY.format(dir=sockdir).replace(*edit))
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"error: {config}: {field}"), result.stderr
    assert not list(sockdir.glob("*.sock")), "nothing was served"


def test_serve_takes_a_file_or_options_not_both(sockdir: Path) -> None:
    config = sockdir / "standbys.toml"
    config.write_text(SERVE_MANY.format(dir=sockdir))
    result = run_cli("serve", "--config", str(config), "--port", "loop", "--queues", "2")
    assert result.returncode == 2
    assert "argument --config: the file describes every backend; leave out --port, --queues" in (
        result.stderr
    )
