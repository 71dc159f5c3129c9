"""The server's housekeeping and the health it reports."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from porch_server import server
from porch_server.config import Config
from porch_server.db.pgasync import TimedOut
from porch_server.errors import LOCK_TIMED_OUT, Locked, PorchError, Unavailable
from porch_server.server import _sweep

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Interceptor:
    """The interceptor's database_silent, each value it is set to remembered,
    and how often the calls waiting were cut short."""

    def __init__(self) -> None:
        self.silences: list[bool] = []
        self.cuts = 0

    def cut_waiting(self) -> int:
        self.cuts += 1
        return 0

    @property
    def database_silent(self) -> bool:
        return self.silences[-1] if self.silences else False

    @database_silent.setter
    def database_silent(self, silent: bool) -> None:
        self.silences.append(silent)


class Health:
    """The health service's set(), remembered."""

    def __init__(self) -> None:
        self.set_to: list[tuple[str, Any]] = []

    async def set(self, name: str, status: Any) -> None:
        self.set_to.append((name, status))


async def health_after(*failures: PorchError | None) -> list[Any]:
    """The statuses the sweep sets while its lease sweeps fail in turn (None: succeeds)."""
    outcomes = list(failures)
    swept = threading.Event()

    class Store:
        def expire_leases(self) -> int:
            failure = outcomes.pop(0) if outcomes else None
            if not outcomes:
                swept.set()
            if failure is not None:
                raise failure
            return 0

    health = Health()
    with ThreadPoolExecutor(1) as executor:
        sweeping = asyncio.ensure_future(
            _sweep(Config(lease_sweep_seconds=0.01), Store(), executor, health, Interceptor())  # type: ignore[arg-type]
        )
        assert await asyncio.to_thread(swept.wait, 10)
        await asyncio.sleep(0.05)  # its health set, from the last sweep
        sweeping.cancel()
    return [status for name, status in health.set_to if name == ""]


async def test_a_database_out_of_reach_takes_the_server_out_of_service_until_back() -> None:
    down = Unavailable("the database is unavailable", "connection refused")
    assert await health_after(down, down, None) == [NOT_SERVING, SERVING]


async def test_a_lock_held_elsewhere_leaves_the_servers_health_as_it_was() -> None:
    locked = Locked(LOCK_TIMED_OUT, "canceling statement due to lock timeout")
    assert await health_after(locked, locked, None) == []
    down = Unavailable("the database is unavailable", "connection refused")
    assert await health_after(down, locked, None) == [NOT_SERVING, SERVING]


@pytest.mark.parametrize("held", ["expire_leases", "prune_events"])
@pytest.mark.parametrize(("answers", "expected"), [(False, [NOT_SERVING, SERVING]), (True, [])])
async def test_a_database_that_hangs_takes_the_server_out_of_service_until_back(
    monkeypatch: pytest.MonkeyPatch, answers: bool, expected: list[Any], held: str
) -> None:
    # It fails nothing: the sweep's statement (the lease expiry, or the
    # hourly pruning of events) waits, and so does SELECT 1. A lock held
    # elsewhere holds the sweep too, but SELECT 1 is answered.
    pings_answered = 1_000 if answers else 0
    during, after = await statuses_while_held(monkeypatch, held, pings_answered, None)
    assert during == expected[:1]
    assert after == expected


async def statuses_while_held(
    monkeypatch: pytest.MonkeyPatch,
    held: str,
    pings_answered: int,
    held_then: PorchError | None,
    refused: bool = False,
) -> tuple[list[Any], list[Any]]:
    """The statuses the sweep sets while its first run of held (expire_leases
    or prune_events) waits, and in all once it ends and the next lease
    expiry too (each expiry raising held_then, if given), with SELECT 1
    answered only pings_answered times."""
    monkeypatch.setattr(server, "HOUSEKEEPING_SECONDS", 0.05)
    monkeypatch.setattr(server, "PING_SECONDS", 0.05)
    monkeypatch.setattr(server, "SILENT_PING_SECONDS", 0.02)
    released = threading.Event()
    swept = threading.Event()

    class Store:
        def __init__(self) -> None:
            self.sweeps = self.pings = 0

        def expire_leases(self) -> int:
            self.sweeps += 1
            if self.sweeps > 1:
                swept.set()
            elif held == "expire_leases":
                released.wait(10)
            if held_then is not None:
                raise held_then
            return 0

        def prune_events(self, before: datetime) -> int:
            if held == "prune_events":
                released.wait(10)
            return 0

        def ping_apart(self, connect_timeout: int) -> None:
            self.pings += 1
            if self.pings > pings_answered:
                if refused:  # an answer: a refusal
                    raise RuntimeError('too many connections for role "porch"')
                released.wait(10)

    health = Health()
    interceptor = Interceptor()
    config = Config(lease_sweep_seconds=0.01, event_retention_days=1)
    # One database thread, which the sweep holds: every one may be waiting
    # for the lock, and SELECT 1 must not wait behind them.
    with ThreadPoolExecutor(1) as executor:
        sweeping = asyncio.ensure_future(
            _sweep(config, Store(), executor, health, interceptor)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.5)
        during = [status for name, status in health.set_to if name == ""]
        # Calls are refused at once while, and only while, SELECT 1 goes unanswered.
        silent = pings_answered < 1_000 and not refused
        assert interceptor.database_silent == silent, interceptor.silences
        # And the calls waiting on it ended, once, as it began.
        assert interceptor.cuts == (1 if silent else 0)
        released.set()
        assert await asyncio.to_thread(swept.wait, 10)
        await asyncio.sleep(0.05)
        sweeping.cancel()
    assert not interceptor.database_silent, interceptor.silences
    return during, [status for name, status in health.set_to if name == ""]


async def test_a_database_that_hangs_in_a_long_statement_is_seen_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SELECT 1 is answered at first (a long statement, a lock), then not:
    # the database has begun to hang, and is asked again while it is held.
    during, after = await statuses_while_held(monkeypatch, "expire_leases", 1, None)
    assert during == [NOT_SERVING]
    assert after == [NOT_SERVING, SERVING]


async def test_a_lock_that_ends_a_hang_leaves_the_health_as_it_was_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The statement held while SELECT 1 went unanswered ends at last for a
    # lock held elsewhere, as does the next: the database answers, and a
    # lock is no cause to be out of service.
    locked = Locked(LOCK_TIMED_OUT, "canceling statement due to lock timeout")
    during, after = await statuses_while_held(monkeypatch, "expire_leases", 0, locked)
    assert during == [NOT_SERVING]
    assert after == [NOT_SERVING, SERVING]


@pytest.mark.parametrize(("answers", "expected"), [(True, []), (False, [NOT_SERVING])])
async def test_a_statement_timeout_counts_against_the_health_only_if_select_1_goes_unanswered(
    monkeypatch: pytest.MonkeyPatch, answers: bool, expected: list[Any]
) -> None:
    # PostgreSQL's statement_timeout ends a statement held by a lock
    # elsewhere as it ends one on a database too slow to serve.
    timed_out = TimedOut("the database is unavailable", "canceling statement due to timeout")
    pings_answered = 1_000 if answers else 0
    during, after = await statuses_while_held(monkeypatch, "nothing", pings_answered, timed_out)
    assert during == after == expected


@pytest.mark.parametrize("held", ["expire_leases", "nothing"])
async def test_a_refused_select_1_is_an_answer_that_refuses_no_call(
    monkeypatch: pytest.MonkeyPatch, held: str
) -> None:
    # The role's connections used up by the pools waiting for a lock held
    # elsewhere, say: out of service, but the calls that need no lock go on.
    timed_out = TimedOut("the database is unavailable", "canceling statement due to timeout")
    held_then = timed_out if held == "nothing" else None
    during, _ = await statuses_while_held(monkeypatch, held, 0, held_then, refused=True)
    assert during == [NOT_SERVING]


async def test_a_connection_that_times_out_while_the_database_is_silent_keeps_it_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The sweep's statement, held on a database that hangs, fails at last
    # for want of a connection (connect_timeout): SELECT 1 still goes
    # unanswered, so calls are still refused, until it is answered.
    monkeypatch.setattr(server, "HOUSEKEEPING_SECONDS", 0.05)
    monkeypatch.setattr(server, "PING_SECONDS", 0.05)
    monkeypatch.setattr(server, "SILENT_PING_SECONDS", 0.02)
    failing, thawed = threading.Event(), threading.Event()

    class Store:
        def expire_leases(self) -> int:
            if not thawed.is_set():
                failing.wait(10)
                raise Unavailable("the database is unavailable", "timeout expired")
            return 0

        def ping_apart(self, connect_timeout: int) -> None:
            thawed.wait(10)

    interceptor = Interceptor()
    with ThreadPoolExecutor(4) as executor:
        sweeping = asyncio.ensure_future(
            _sweep(Config(lease_sweep_seconds=0.01), Store(), executor, Health(), interceptor)  # type: ignore[arg-type]
        )
        try:
            await _until(lambda: interceptor.silences == [True])
            failing.set()
            await asyncio.sleep(0.3)  # a sweep or two
            assert interceptor.silences == [True], "taken to answer while it still hangs"
            thawed.set()
            await _until(lambda: interceptor.silences == [True, False])
        finally:
            failing.set()
            thawed.set()
            sweeping.cancel()


async def _until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until condition holds; AssertionError after seconds."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.01)
