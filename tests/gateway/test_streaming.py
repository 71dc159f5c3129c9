"""Server streaming as NDJSON and as Server-Sent Events, over a real socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import Backend, Live

pytestmark = pytest.mark.asyncio

SSE = {"accept": "text/event-stream"}


def ndjson(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


def tick(seq: int) -> dict[str, str]:
    return {"seq": str(seq), "cursor": str(seq)}


async def test_ndjson_one_result_per_line(live: Live) -> None:
    response = await live.client.get("/v1/count", params={"count": 3})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert ndjson(response.text) == [{"result": tick(1)}, {"result": tick(2)}, {"result": tick(3)}]


async def test_path_bound_stream_and_empty_stream(live: Live) -> None:
    assert ndjson((await live.client.get("/v1/count/2")).text) == [
        {"result": tick(1)},
        {"result": tick(2)},
    ]
    empty = await live.client.get("/v1/count/0")
    assert (empty.status_code, empty.text) == (200, "")


async def test_ndjson_error_mid_stream_is_the_last_line(live: Live) -> None:
    response = await live.client.get("/v1/count", params={"count": 5, "fail_after": 2})
    assert response.status_code == 200
    assert ndjson(response.text) == [
        {"result": tick(1)},
        {"result": tick(2)},
        {"error": {"code": 10, "message": "failed after 2 ticks", "details": []}},
    ]


@pytest.mark.parametrize("headers", [{}, SSE])
async def test_error_before_the_first_message_is_an_http_error(
    live: Live, headers: dict[str, str]
) -> None:
    response = await live.client.get("/v1/count", params={"count": 101}, headers=headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": 3, "message": "count must be 0 to 100", "details": []}


async def test_sse_with_ids_from_a_message_field(live: Live) -> None:
    response = await live.client.get("/v1/count", params={"count": 2}, headers=SSE)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    assert response.text == (
        'id: 1\ndata: {"seq":"1","cursor":"1"}\n\nid: 2\ndata: {"seq":"2","cursor":"2"}\n\n'
    )


async def test_sse_error_event_mid_stream(live: Live) -> None:
    response = await live.client.get("/v1/count", params={"count": 3, "fail_after": 1}, headers=SSE)
    events = response.text.split("\n\n")
    assert events[0] == 'id: 1\ndata: {"seq":"1","cursor":"1"}'
    assert (
        events[1] == 'event: error\ndata: {"code":10,"message":"failed after 1 ticks","details":[]}'
    )
    assert events[2:] == [""]


async def test_last_event_id_resumes_the_stream(live: Live) -> None:
    headers = {**SSE, "Last-Event-ID": "7"}
    response = await live.client.get(
        "/v1/count", params={"count": 2, "after": "1"}, headers=headers
    )
    assert [line for line in response.text.splitlines() if line.startswith("id:")] == [
        "id: 8",
        "id: 9",
    ]


async def test_client_disconnect_cancels_the_call(live: Live, backend: Backend) -> None:
    async with live.client.stream("GET", "/v1/ticks:watch") as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert json.loads(await anext(lines)) == {"result": tick(1)}
        assert json.loads(await anext(lines)) == {"result": tick(2)}
    await asyncio.wait_for(backend.state.watch_cancelled.wait(), timeout=5)


async def test_shutdown_ends_open_streams_saying_so(live: Live, backend: Backend) -> None:
    # As a server's stop ends them: with UNAVAILABLE, so that a client tells
    # it from a stream that ended, and resumes elsewhere (a plain end was
    # all the separate gateway sent).
    async with httpx.AsyncClient(base_url=live.base_url) as other:
        async with other.stream("GET", "/v1/ticks:watch", headers=SSE) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("id: 1")
            stop = asyncio.create_task(live.server.stop())
            rest = [line async for line in lines]
        await asyncio.wait_for(stop, timeout=5)
    events = [line for line in rest if line]
    assert events[-2] == "event: error", rest
    said = json.loads(events[-1].removeprefix("data: "))
    assert said["code"] == 14 and said["message"].startswith("the gateway is shutting down: ")
    await asyncio.wait_for(backend.state.watch_cancelled.wait(), timeout=5)


async def test_shutdown_ends_an_ndjson_stream_with_its_error_line(live: Live) -> None:
    async with httpx.AsyncClient(base_url=live.base_url) as other:
        async with other.stream("GET", "/v1/ticks:watch") as response:
            lines = response.aiter_lines()
            assert json.loads(await anext(lines))["result"]["seq"] == "1"
            stop = asyncio.create_task(live.server.stop())
            rest = [line async for line in lines]
        await asyncio.wait_for(stop, timeout=5)
    last = json.loads(rest[-1])
    assert last["error"]["code"] == 14, rest[-3:]
    assert all("result" in json.loads(line) for line in rest[:-1])
