"""Finding the real programs the tests drive, and failing loudly in CI without them."""

from __future__ import annotations

import os
import shutil

import pytest

#: Set by .ci/run: a missing tool is a failure there, never a silent skip.
STRICT = os.environ.get("FAILOVER_BACKEND_STRICT_TOOLS") == "1"


def require_tool(name: str, hint: str) -> str:
    """Path of program ``name``; fails in CI and skips locally when it is missing."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found ({hint})"
    if STRICT:
        pytest.fail(message)
    pytest.skip(message)


def require_root(what: str) -> None:
    """Fail in CI, skip locally, when not root (TAP devices, namespaces, bridges)."""
    if os.geteuid() == 0:
        return
    message = f"needs root for {what}"
    if STRICT:
        pytest.fail(message)
    pytest.skip(message)
