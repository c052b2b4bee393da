"""Shared fixtures: real frontends (dpdk-testpmd, QEMU), short socket paths,
backends that are always stopped."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from failover_backend import StandbyBackend
from tools import require_root, require_tool

T = TypeVar("T")

# Guest kernel packages and built images are cached in the checkout (see README).
os.environ.setdefault(
    "FAILOVER_BACKEND_CACHE", str(Path(__file__).resolve().parent.parent / ".cache")
)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def testpmd_binary() -> str:
    return require_tool("dpdk-testpmd", "Debian package dpdk-dev; .ci/run installs it")


@pytest.fixture
def qemu_lab() -> None:
    """The lab's needs: QEMU, root (TAPs, bridge), and Debian's tools to build the guest."""
    require_tool("qemu-system-x86_64", "Debian package qemu-system-x86; .ci/run installs it")
    for tool, package in (("dpkg-deb", "dpkg"), ("cpio", "cpio"), ("depmod", "kmod")):
        require_tool(tool, f"Debian package {package}")
    require_root("TAP devices and a bridge")


@pytest.fixture
def libvirt_lab(qemu_lab: None) -> None:
    """libvirtd (run by the test itself, in a mount namespace) and libvirt-python."""
    require_tool("libvirtd", "Debian package libvirt-daemon; .ci/run installs it")
    require_tool("unshare", "Debian package util-linux")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        require_tool("libvirt-python", "pip install libvirt-python; ./dev setup does")


def run(coro: Coroutine[Any, Any, T], timeout: float = 240.0) -> T:
    """Run one scenario, bounded: a stuck guest fails the test instead of hanging CI."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


BackendFactory = Callable[..., StandbyBackend]


@pytest.fixture
def make_backend(sockdir: Path) -> Iterator[BackendFactory]:
    """Start a StandbyBackend on a fresh socket; every one is stopped after the test."""
    started: list[StandbyBackend] = []

    def make(name: str = "standby.sock", **kwargs: Any) -> StandbyBackend:
        backend = StandbyBackend(sockdir / name, **kwargs)
        backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.stop()
