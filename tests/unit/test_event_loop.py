"""The event loop `porch serve` runs on."""

from __future__ import annotations

import asyncio

import pytest

from porch_server.cli import run_loop


def loop_module(event_loop: str) -> str:
    """The module of the loop run_loop runs a coroutine on."""
    seen: list[str] = []

    async def record() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_loop(record(), event_loop)
    return seen[0]


def test_auto_and_uvloop_run_on_uvloop_where_installed() -> None:
    pytest.importorskip("uvloop", reason="uvloop is not installed on this platform")
    assert loop_module("auto").startswith("uvloop")
    assert loop_module("uvloop").startswith("uvloop")


def test_asyncio_runs_on_the_standard_loop() -> None:
    assert loop_module("asyncio").startswith("asyncio")
