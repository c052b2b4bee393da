"""The commands as an operator runs them: ``run`` processes serving a VM's standby,
and one-shot commands (``migrate``, ``status``, ``cancel``) on a QEMU's second QMP
socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from failover_backend.lab.hostnet import unique_name
from failover_backend.lab.scenario import Lab, pair_mac

CONFIG = """
[backend]
socket = "{socket}"
port = "tap:{tap}"
mac = "{mac}"

[qemu]
qmp = "{qmp}"
standby = "standby0"

[primary]
id = "primary0"
driver = "e1000e"
bus = "root1"
properties = {{ netdev = "hostnet0", romfile = "" }}

[primary.netdev]
type = "tap"
id = "hostnet0"
ifname = "{primary_tap}"
script = "no"
downscript = "no"

[timeouts]
qmp = 30
negotiation = 60
wait_unplug = {wait_unplug}
"""


PAIR = """
[[pair]]
standby = "standby{index}"

[pair.backend]
socket = "{socket}"
port = "tap:{tap}"
mac = "{mac}"

[pair.primary]
id = "primary{index}"
driver = "e1000e"
bus = "root{bus}"
properties = {{ netdev = "hostnet{index}", romfile = "" }}

[pair.primary.netdev]
type = "tap"
id = "hostnet{index}"
ifname = "{primary_tap}"
script = "no"
downscript = "no"
"""


@dataclass
class RunProcess:
    """A ``python -m failover_backend run`` for one VM, its output collected."""

    process: asyncio.subprocess.Process
    sockets: list[Path]
    taps: list[str]
    lines: list[str] = field(default_factory=list)
    #: When each line arrived (the event loop's clock).
    arrived: list[float] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def socket(self) -> Path:
        """The first pair's socket."""
        return self.sockets[0]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.arrived.append(asyncio.get_running_loop().time())
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    async def wait_for(self, text: str, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not any(text in line for line in self.lines):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"run never said {text!r}:\n{self.output}")
            await asyncio.sleep(0.1)

    async def metrics_url(self, timeout: float = 15) -> str:
        """The URL ``run --metrics`` logged."""
        await self.wait_for("metrics on ", timeout)
        return self.output.split("metrics on ", 1)[1].split()[0]

    async def exit_code(self, timeout: float = 30) -> int:
        """Wait for ``run`` to end by itself; one that does not is made to print where
        each of its threads is (SIGABRT, with the fault handler on) for the failure."""
        since = asyncio.get_running_loop().time()
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            native = await _native_stacks(self.process.pid)
            self.process.send_signal(signal.SIGABRT)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)
            if self.reader is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.reader, 5)
            timed = "\n".join(
                f"{at - since:+8.2f} s  {line}"
                for at, line in zip(self.arrived, self.lines, strict=True)
            )
            raise AssertionError(
                f"run did not end within {timeout:g} s (times from the wait's start); "
                f"where it was:\n{timed}\n{native}"
            ) from None
        if self.reader is not None:
            await self.reader
        return code

    async def stop(self, timeout: float = 30) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.exit_code(timeout)


async def _native_stacks(pid: int) -> str:
    """Every thread's native stack (gdb), when gdb is there: a hang in the native core
    shows only there."""
    if shutil.which("gdb") is None:
        return "(no gdb for the native stacks)"
    gdb = await asyncio.create_subprocess_exec(
        "gdb",
        "-p",
        str(pid),
        "-batch",
        "-ex",
        "thread apply all bt",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(gdb.communicate(), 60)
    except asyncio.TimeoutError:
        gdb.kill()
        return "(gdb did not finish)"
    return "native stacks:\n" + out.decode(errors="replace")


async def launch_run(
    config: Path, sockets: list[Path], taps: list[str], *options: str
) -> RunProcess:
    """``run --config CONFIG [OPTIONS]`` as a process, once every socket listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "failover_backend",
        "run",
        "--config",
        str(config),
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    run = RunProcess(process, sockets, taps)
    run.reader = asyncio.create_task(run._read())
    for _ in range(200):
        if all(socket.exists() for socket in sockets):
            break
        await asyncio.sleep(0.05)
    assert all(s.exists() for s in sockets), f"{config.stem}: run did not start:\n{run.output}"
    return run


async def start_run(
    lab: Lab,
    name: str,
    *,
    guest: int = 0,
    wait_unplug: float = 30,
    pairs: int = 1,
    metrics: bool = False,
) -> RunProcess:
    """A ``run`` process for VM ``name`` (QEMU started after it, with these sockets):
    its backends listen before QEMU starts, and it plugs the primaries itself. One
    pair is written the one-pair way, several as ``[[pair]]`` tables. ``metrics``:
    with a Prometheus endpoint on a free port (:meth:`RunProcess.metrics_url`)."""
    sockets = [lab.workdir / f"{name}-run{index}.sock" for index in range(pairs)]
    taps = [unique_name("fbsb") for _ in range(pairs)]
    qmp = lab.workdir / f"{name}-qmp.sock"
    if pairs == 1:
        text = CONFIG.format(
            socket=sockets[0],
            tap=taps[0],
            mac=pair_mac(0, guest),
            qmp=qmp,
            primary_tap=lab.network.add_tap("fbpr"),
            wait_unplug=wait_unplug,
        )
    else:
        text = f'[qemu]\nqmp = "{qmp}"\n\n[timeouts]\nwait_unplug = {wait_unplug}\n'
        for index in range(pairs):
            text += PAIR.format(
                index=index,
                socket=sockets[index],
                tap=taps[index],
                mac=pair_mac(index, guest),
                bus=2 * index + 1,
                primary_tap=lab.network.add_tap("fbpr"),
            )
    config = lab.workdir / f"{name}.toml"
    config.write_text(text)
    run = await launch_run(
        config, sockets, taps, *(["--metrics", "127.0.0.1:0"] if metrics else [])
    )
    for tap in taps:
        lab.network.attach(tap)
    return run


async def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "failover_backend", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    """A command left running (to be killed, as an operator's tool might be)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "failover_backend",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
