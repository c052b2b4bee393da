"""Shared fixtures: real frontends (dpdk-testpmd), short socket paths, backends
that are always stopped."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from failover_backend import StandbyBackend
from tools import require_tool


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def testpmd_binary() -> str:
    return require_tool("dpdk-testpmd", "Debian package dpdk; .ci/run installs it")


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
