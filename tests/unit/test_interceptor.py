"""The interceptor's admission, which the in-process gateway asks before it
reads an HTTP request's body."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from porch_server.errors import Unavailable
from porch_server.interceptor import DATABASE_STOPPED, INTERNAL_ERROR, PorchInterceptor, _peer
from porch_server.models import Role, Token

pytestmark = pytest.mark.asyncio

LIST_TASKS = "/porch.v1.PorchService/ListTasks"
SERVICE = "/porch.v1.PorchService/"


class _Store:
    """A store whose database is down."""

    def cached_token(self, secret_hash: str) -> Any:
        return None

    def find_token(self, secret_hash: str) -> Any:
        raise Unavailable("the database is unavailable: try again")


async def _admitted(method: str, store: Any) -> tuple[grpc.StatusCode, str] | None:
    """The interceptor's refusal of a call of method with a token, over store."""
    with ThreadPoolExecutor(1) as executor:
        interceptor = PorchInterceptor(store, executor, anonymous_reads=False)
        return await interceptor.admit(method, [("authorization", "Bearer " + "x" * 43)])


async def test_a_database_down_while_the_token_is_looked_up_is_unavailable() -> None:
    with ThreadPoolExecutor(1) as executor:
        interceptor = PorchInterceptor(_Store(), executor, anonymous_reads=False)  # type: ignore[arg-type]
        refusal = await interceptor.admit(LIST_TASKS, [("authorization", "Bearer " + "x" * 43)])
        assert refusal == (grpc.StatusCode.UNAVAILABLE, "the database is unavailable: try again")
        refusal = await interceptor.admit(LIST_TASKS, [])
        assert refusal is not None and refusal[0] == grpc.StatusCode.UNAUTHENTICATED
        assert await interceptor.admit("/grpc.health.v1.Health/Check", []) is None


class _Unreachable(_Store):
    """A store whose database refuses connections, in its driver's words."""

    def find_token(self, secret_hash: str) -> Any:
        cause = 'connection to server at "db.example.org", port 5432 failed: FATAL: no "porch"'
        raise Unavailable("the database is unavailable", cause)


async def test_the_databases_own_words_go_to_the_log_not_to_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusal = await _admitted(LIST_TASKS, _Unreachable())
    assert refusal == (
        grpc.StatusCode.UNAVAILABLE,
        "the database is unavailable; try again (the server's log says why)",
    )
    assert 'server at "db.example.org", port 5432 failed' in caplog.text


class _Faulty(_Store):
    """A store whose token lookup fails in a way porch has no word for
    (the role lost its right to read the token table, say)."""

    def find_token(self, secret_hash: str) -> Any:
        raise RuntimeError("permission denied for table token")


async def test_a_token_lookup_that_fails_otherwise_is_internal_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusal = await _admitted(LIST_TASKS, _Faulty())
    assert refusal == (grpc.StatusCode.INTERNAL, INTERNAL_ERROR)
    assert "ListTasks failed" in caplog.text and "permission denied" in caplog.text


class _OneToken:
    """A store that knows every secret as one token, of the given role."""

    def __init__(self, role: Role) -> None:
        pipeline = "p1" if role is Role.PIPELINE else None
        self.token = Token("7", role, pipeline, "test", datetime.now(UTC))

    def cached_token(self, secret_hash: str) -> Any:
        return self.token

    def find_token(self, secret_hash: str) -> Any:
        return self.token


@pytest.mark.parametrize(
    ("role", "method", "refused"),
    [
        (Role.READER, "RegisterTasks", True),
        (Role.ADMIN, "ClaimTasks", True),
        (Role.PIPELINE, "CreatePipeline", True),
        # Which pipeline a wrapper may write to is for its request to say.
        (Role.PIPELINE, "RegisterTasks", False),
        (Role.READER, "ListTasks", False),
        (Role.ADMIN, "CreateToken", False),
    ],
)
async def test_a_role_that_may_never_make_the_call_is_refused_before_its_request(
    role: Role, method: str, refused: bool
) -> None:
    refusal = await _admitted(SERVICE + method, _OneToken(role))
    if refused:
        assert refusal is not None and refusal[0] == grpc.StatusCode.PERMISSION_DENIED
        assert f"{method} needs" in refusal[1]
    else:
        assert refusal is None


async def test_rights_left_to_the_call_admit_a_known_token_of_any_role() -> None:
    secret = [("authorization", "Bearer " + "x" * 43)]
    with ThreadPoolExecutor(1) as executor:
        reader = PorchInterceptor(_OneToken(Role.READER), executor, anonymous_reads=False)  # type: ignore[arg-type]
        assert await reader.admit(SERVICE + "RegisterTasks", secret, rights=False) is None
        unknown = PorchInterceptor(_Store(), executor, anonymous_reads=False)  # type: ignore[arg-type]
        refusal = await unknown.admit(SERVICE + "RegisterTasks", [], rights=False)
        assert refusal is not None and refusal[0] == grpc.StatusCode.UNAUTHENTICATED


class _Held(_Store):
    """A store whose token lookup waits until released."""

    def __init__(self) -> None:
        self.looking = threading.Event()
        self.released = threading.Event()

    def find_token(self, secret_hash: str) -> Any:
        self.looking.set()
        self.released.wait(10)
        return None


@contextlib.asynccontextmanager
async def _admitting() -> AsyncIterator[tuple[PorchInterceptor, asyncio.Task[Any]]]:
    """An interceptor, and an admission under way that waits for its token's lookup."""
    store = _Held()
    with ThreadPoolExecutor(1) as executor:
        interceptor = PorchInterceptor(store, executor, anonymous_reads=False)  # type: ignore[arg-type]
        admitting = asyncio.ensure_future(
            interceptor.admit(LIST_TASKS, [("authorization", "Bearer " + "x" * 43)])
        )
        try:
            assert await asyncio.to_thread(store.looking.wait, 10)
            yield interceptor, admitting
        finally:
            store.released.set()


async def test_a_call_waiting_on_the_database_as_it_stops_answering_is_ended() -> None:
    async with _admitting() as (interceptor, admitting):
        assert interceptor.cut_waiting() == 1
        assert interceptor.cut_waiting() == 0  # ended once
        assert await admitting == (grpc.StatusCode.UNAVAILABLE, DATABASE_STOPPED)


async def test_a_call_cut_as_its_own_end_comes_ends_as_that() -> None:
    # Its deadline passed, or its client left, in the same turn of the loop:
    # the call is over, and not answered as cut.
    async with _admitting() as (interceptor, admitting):
        assert interceptor.cut_waiting() == 1
        admitting.cancel()  # as grpc, or the HTTP server, cancels a call that ended
        with pytest.raises(asyncio.CancelledError):
            await admitting


@pytest.mark.parametrize(
    ("peer", "shown"),
    [
        ("ipv4:10.1.2.3:50422", "10.1.2.3:50422"),
        ("ipv6:%5B::1%5D:50422", "[::1]:50422"),
        ("ipv6:[fe80::1%25eth0]:5", "[fe80::1%eth0]:5"),
        ("unix:/run/porch sock", "unix:/run/porch\\x20sock"),
        ("", "-"),
        (None, "-"),
    ],
)
async def test_a_peer_is_shown_as_the_http_access_line_shows_a_client(
    peer: str | None, shown: str
) -> None:
    assert _peer(peer) == shown
