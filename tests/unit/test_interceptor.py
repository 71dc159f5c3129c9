"""The interceptor's admission, which the in-process gateway asks before it
reads an HTTP request's body."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from porch_server.errors import Unavailable
from porch_server.interceptor import PorchInterceptor

pytestmark = pytest.mark.asyncio

LIST_TASKS = "/porch.v1.PorchService/ListTasks"


class _Store:
    """A store whose database is down."""

    def cached_token(self, secret_hash: str) -> Any:
        return None

    def find_token(self, secret_hash: str) -> Any:
        raise Unavailable("the database is unavailable: try again")


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
    with ThreadPoolExecutor(1) as executor:
        interceptor = PorchInterceptor(_Unreachable(), executor, anonymous_reads=False)  # type: ignore[arg-type]
        refusal = await interceptor.admit(LIST_TASKS, [("authorization", "Bearer " + "x" * 43)])
    assert refusal == (
        grpc.StatusCode.UNAVAILABLE,
        "the database is unavailable; try again (the server's log says why)",
    )
    assert 'server at "db.example.org", port 5432 failed' in caplog.text
