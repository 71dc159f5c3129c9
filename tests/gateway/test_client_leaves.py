"""A unary call whose HTTP client leaves before its answer is cancelled."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
import uvicorn

import gateway
from gateway import app as gateway_app
from gateway.errors import GatewayError
from gateway.server import CLOSED_EXTENSION, ClosedWatch
from tests.gateway.conftest import Backend, Live, echo_app

SLEEP = json.dumps({"text": "sleep", "wait": "5s"}).encode()


async def _post_and_leave(port: int, backend: Backend) -> None:
    """Send a call that sleeps 5 s, and close the connection once it has started."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(SLEEP), SLEEP)
    )
    await asyncio.wait_for(backend.state.sleep_started.wait(), 5)
    writer.close()
    await writer.wait_closed()


async def test_a_unary_call_is_cancelled_when_its_client_leaves(
    live: Live, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def second_task(*args: object) -> None:
        raise AssertionError("gateway's own listener gives a watch: no second task")

    monkeypatch.setattr(gateway_app, "_unless_disconnected", second_task)
    await _post_and_leave(live.server.port, backend)
    await asyncio.wait_for(backend.state.sleep_cancelled.wait(), 2)
    # Only that request's call was cancelled: the server goes on answering.
    assert (await live.client.post("/v1/echo", json={"text": "hi"})).json()["text"] == "hi"


async def test_under_another_asgi_server_a_second_task_watches_for_the_client(
    backend: Backend, unused_tcp_port: int
) -> None:
    config = uvicorn.Config(echo_app(backend, "in-process"), port=unused_tcp_port, log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    for _ in range(500):  # started within 5 s
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        await _post_and_leave(unused_tcp_port, backend)
        await asyncio.wait_for(backend.state.sleep_cancelled.wait(), 2)
    finally:
        server.should_exit = True
        await serving


async def test_the_listener_gives_each_request_its_own_watch(unused_tcp_port: int) -> None:
    seen: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(scope.get("extensions", {}).get(CLOSED_EXTENSION))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    server = gateway.HttpServer(app, port=unused_tcp_port, grace=1)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port)
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204")
        writer.close()
        await writer.wait_closed()
    finally:
        await server.stop()
    first, second = seen
    assert isinstance(first, ClosedWatch) and isinstance(second, ClosedWatch)
    assert first is not second


def test_a_watch_runs_its_callbacks_once_and_at_once_when_closed() -> None:
    watch, ran = ClosedWatch(), []
    watch.add(lambda: ran.append("first"))
    removed = lambda: ran.append("removed")  # noqa: E731
    watch.add(removed)
    watch.remove(removed)
    watch.remove(removed)  # twice: nothing
    watch.close()
    watch.close()
    assert ran == ["first"]
    watch.add(lambda: ran.append("late"))
    assert ran == ["first", "late"]


def _is_client_left(error: GatewayError) -> bool:
    return (error.code, error.message) == (
        grpc.StatusCode.CANCELLED,
        "the client closed the connection",
    )


async def test_no_call_is_made_for_a_connection_already_closed() -> None:
    watch = ClosedWatch()
    started = False

    async def call() -> Any:
        nonlocal started
        started = True

    watch.close()
    with pytest.raises(GatewayError) as raised:
        await gateway_app._unless_closed(call(), watch)
    assert _is_client_left(raised.value)
    assert not started
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancel left pending for this task


async def test_a_call_that_turns_the_cancel_into_an_error_still_answers_client_left() -> None:
    watch = ClosedWatch()

    async def call() -> Any:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            raise RuntimeError("cleaning up failed") from None

    async def request() -> int:
        with pytest.raises(GatewayError) as raised:
            await gateway_app._unless_closed(call(), watch)
        assert _is_client_left(raised.value)
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    serving = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    watch.close()
    assert await serving == 0


async def test_a_cancel_from_elsewhere_is_not_taken_for_the_client_leaving() -> None:
    watch = ClosedWatch()

    async def call() -> Any:
        await asyncio.sleep(5)

    waiting = asyncio.create_task(gateway_app._unless_closed(call(), watch))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
