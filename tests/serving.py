"""Helpers shared by the server tests (imported as `from serving import ...`, like tests/csvrows.py)."""

from __future__ import annotations

import socket
import time

import pytest

DESCRIPTION = "Поднос под самовар, жесть, роспись"


def unused_port() -> int:
    """A TCP port nothing holds now (a fixed one can collide with another job's)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    """`check()`'s first truthy value, polled every 0.1 s; the test fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")
