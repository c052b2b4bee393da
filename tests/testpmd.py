"""Drive DPDK's dpdk-testpmd interactively: the real vhost-user frontend of the tests.

testpmd runs with ``-i``; commands go to its stdin and each answer ends with the
``testpmd> `` prompt. Every wait is bounded; on failure the whole output is in the
exception so a CI log says what testpmd said.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType

PROMPT = "testpmd> "

# What testpmd's interrupt thread prints on its own (link changes, vhost-user reconnects),
# each in one write. The prompt is written a character at a time, so a notice can land
# inside it ("t" + notice + "estpmd> "); prompts are counted with the notices cut out.
ASYNC_NOTICE = re.compile(
    r"(?:virtio_user|vhost_user)_[a-z_]+\(\): [^\n]*\n|\nPort \d+: [a-z ]+ event\n"
)


def prompt_count(text: str) -> int:
    return ASYNC_NOTICE.sub("", text).count(PROMPT)


class TestpmdError(RuntimeError):
    pass


def virtio_user_vdev(
    socket: str, *, queues: int = 1, queue_size: int = 256, **devargs: object
) -> str:
    """``--vdev`` value for a virtio-user port on a vhost-user socket."""
    args = [f"path={socket}", f"queues={queues}", f"queue_size={queue_size}"]
    args += [f"{key}={value}" for key, value in devargs.items()]
    return "net_virtio_user0," + ",".join(args)


class Testpmd:
    """One dpdk-testpmd process.

    :param vdevs: ``--vdev`` values (ports are numbered in this order).
    :param app_args: testpmd's own options (after ``--``), besides ``-i``.
    :param lcores: EAL ``--lcores``: with 2 CPUs, give the main and the forwarding
        lcore one CPU each.
    """

    __test__ = False  # not a test class, despite the name

    def __init__(
        self,
        binary: str,
        vdevs: list[str],
        app_args: list[str] | None = None,
        *,
        lcores: str = "0@0,1@1",
        memory_mb: int = 1024,
        eal_args: list[str] | None = None,
    ) -> None:
        self.prefix = f"fbt{uuid.uuid4().hex[:8]}"
        # testpmd prints with stdio: unbuffered, or a pipe sees answers only in 4 KiB lumps.
        self.argv = [
            "stdbuf",
            "-o0",
            "-e0",
            binary,
            "--lcores",
            lcores,
            "--no-huge",
            "-m",
            str(memory_mb),
            "--no-pci",
        ]
        self.argv += ["--file-prefix", self.prefix, *(eal_args or [])]
        for vdev in vdevs:
            self.argv += ["--vdev", vdev]
        self.argv += ["--", "-i", "--total-num-mbufs=32768", *(app_args or [])]
        self._output: list[str] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    # -- process -------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> str:
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self._wait_prompts(1, timeout)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            with self._lock:
                self._output.append(chunk.decode(errors="replace"))

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._output)

    def _wait_prompts(self, count: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output
            if prompt_count(text) >= count:
                return text
            if self._proc is not None and self._proc.poll() is not None:
                break
            time.sleep(0.02)
        raise TestpmdError(
            f"testpmd gave no prompt within {timeout:.0f} s (exit {self.returncode})\n"
            f"argv: {' '.join(self.argv)}\n--- output ---\n{self.output}"
        )

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def cmd(self, line: str, timeout: float = 20.0) -> str:
        """Run one command; returns what testpmd printed for it."""
        assert self._proc is not None and self._proc.stdin is not None
        before = self.output
        prompts = prompt_count(before)
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()
        text = self._wait_prompts(prompts + 1, timeout)
        return text[len(before) :]

    def quit(self, timeout: float = 30.0) -> str:
        """Quit (stopping forwarding first, as testpmd does) and wait for the exit."""
        if self._proc is None:
            return ""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(b"quit\n")
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
                raise TestpmdError(
                    f"testpmd did not quit in {timeout:.0f} s\n{self.output}"
                ) from None
        if self._reader is not None:
            self._reader.join(5)
        return self.output

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        shutil.rmtree(Path("/var/run/dpdk") / self.prefix, ignore_errors=True)

    def __enter__(self) -> Testpmd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    # -- answers ------------------------------------------------------------------

    def port_stats(self, port: int) -> dict[str, int]:
        """``show port stats``: RX-packets, RX-bytes, TX-packets, TX-bytes, ..."""
        text = self.cmd(f"show port stats {port}")
        return {key: int(value) for key, value in re.findall(r"([RT]X-[a-z]+):\s+(\d+)", text)}

    def xstats(self, port: int) -> dict[str, int]:
        """``show port xstats``: per-queue counters such as ``tx_q1_good_packets``."""
        text = self.cmd(f"show port xstats {port}")
        return {key: int(value) for key, value in re.findall(r"^\s*(\w+):\s+(\d+)\s*$", text, re.M)}

    def negotiated_features(self) -> dict[str, int]:
        """Feature words virtio-user logged while starting (needs
        ``--log-level=pmd.net.virtio.init:debug``): what the driver asked for, what
        the device offered, what was agreed, and what went to the backend."""
        text = self.output
        found = {}
        patterns = {
            "driver": r"guest_features before negotiate = ([0-9a-f]+)",
            "device": r"host_features before negotiate = ([0-9a-f]+)",
            "agreed": r"features after negotiate = ([0-9a-f]+)",
            "sent_to_backend": r"set features: 0x([0-9a-f]+)",
        }
        for key, pattern in patterns.items():
            match = re.search(pattern, text)
            if match is None:
                raise TestpmdError(f"testpmd did not log {key!r} features\n{text}")
            found[key] = int(match.group(1), 16)
        return found


def wait_for(condition: object, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``condition()`` until true; fail with ``what`` after ``timeout`` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def two_bursts_looped_back(binary: str, socket: Path) -> dict[str, int]:
    """Send two bursts of 32 frames to a ``loop`` backend on ``socket`` and wait until all
    64 came back; returns the port's counters after stopping."""
    with Testpmd(
        binary, [virtio_user_vdev(str(socket))], ["--forward-mode=rxonly", "--nb-cores=1"]
    ) as pmd:
        pmd.cmd("start tx_first 2")
        wait_for(lambda: pmd.port_stats(0)["RX-packets"] == 64, 15, "64 frames back")
        pmd.cmd("stop")
        stats = pmd.port_stats(0)
        pmd.quit()
    return stats
