"""The HTTP listener bounds how long and how large a request's head may be,
and closes a connection whose request is answered before its body arrives."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

import gateway
from gateway import server
from tests.gateway.conftest import Backend, Live, echo_app

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def short_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server._GuardedHttpTools, "head_seconds", 0.3)
    monkeypatch.setattr(server._GuardedHttpTools, "head_bytes", 4096)


async def _connect(live: Live) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", live.server.port)


def _answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_head_that_never_ends_is_answered_408_and_closed(live: Live) -> None:
    reader, writer = await _connect(live)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    status, body = _answer(await asyncio.wait_for(reader.read(), 5))
    assert status == 408
    assert body["message"] == "the request's head did not arrive within 0.3 s"
    writer.close()


async def test_a_request_that_is_not_http_is_answered_400_as_json(live: Live) -> None:
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        reader, writer = await _connect(live)
        writer.write(garbage)
        status, body = _answer(await asyncio.wait_for(reader.read(), 5))
        assert (status, body["code"]) == (400, 3)
        assert body["message"] == "the request is not HTTP/1.1 that the server can read"
        writer.close()


async def test_a_connection_that_asks_nothing_is_closed(live: Live) -> None:
    reader, writer = await _connect(live)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_head_too_large_is_answered_431(live: Live) -> None:
    reader, writer = await _connect(live)
    writer.write(b"GET /healthz HTTP/1.1\r\nX-Padding: " + b"x" * 5000 + b"\r\n\r\n")
    status, body = _answer(await asyncio.wait_for(reader.read(), 5))
    assert status == 431
    assert body["message"] == "the request's head is larger than 4096 bytes"
    writer.close()


async def test_each_request_on_a_kept_alive_connection_has_its_own_deadline(
    live: Live,
) -> None:
    reader, writer = await _connect(live)
    for _ in range(3):  # each well within the deadline, together past it
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b"}")
        await asyncio.sleep(0.15)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # then a head that stops
    status, _ = _answer(await asyncio.wait_for(reader.read(), 5))
    assert status == 408
    writer.close()


async def test_a_body_that_does_not_arrive_in_time_is_answered_408(backend: Backend) -> None:
    app = echo_app(backend, "in-process", max_body_seconds=0.3)
    http = gateway.HttpServer(app, port=0, grace=1)
    await http.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
        writer.write(
            b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"text":'
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408")
        assert b"\r\nconnection: close\r\n" in head
        await _closed_while_the_body_trickles_in(reader, writer)
    finally:
        await http.stop()


async def test_an_answer_before_the_body_has_arrived_closes_the_connection(live: Live) -> None:
    reader, writer = await _connect(live)
    writer.write(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413")
    assert b"\r\nconnection: close\r\n" in head
    await _closed_while_the_body_trickles_in(reader, writer)


async def test_an_answer_after_the_whole_body_keeps_the_connection(live: Live) -> None:
    reader, writer = await _connect(live)
    for _ in range(2):
        writer.write(
            b'POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\n{"text": "hi"}\n'
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head
        length = re.search(rb"content-length: (\d+)", head)
        assert length is not None
        await reader.readexactly(int(length[1]))
    writer.close()


@pytest.mark.parametrize("path", ["/v1/count/3", "/v1/count/0", "/v1/fail/ABORTED"])
async def test_an_http_1_0_client_gets_an_answer_it_can_read(live: Live, path: str) -> None:
    # A stream has no length to state: uvicorn sent it chunked, which
    # HTTP/1.0 does not have (curl --http1.0 read it; ApacheBench would not).
    reader, writer = await _connect(live)
    writer.write(b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
    raw = await asyncio.wait_for(reader.read(), 5)  # to the connection's end
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    length = re.search(rb"content-length: (\d+)", head)
    if path == "/v1/fail/ABORTED":  # an answer of known length keeps it
        assert length is not None and int(length[1]) == len(body)
        assert json.loads(body)["code"] == 10
    else:
        assert length is None and head.endswith(b"\r\nconnection: close")
        ticks = [int(json.loads(line)["result"]["seq"]) for line in body.splitlines()]
        assert ticks == list(range(1, int(path[-1]) + 1))
    writer.close()


async def test_an_http_1_1_client_still_gets_a_stream_chunked(live: Live) -> None:
    reader, writer = await _connect(live)
    writer.write(b"GET /v1/count/2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"\r\ntransfer-encoding: chunked\r\n" in head
    writer.close()


async def _closed_while_the_body_trickles_in(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Send the rest of the body a byte at a time, as the answer's body is
    read, until the server closes the connection: AssertionError if it has
    not within 2 s."""
    for _ in range(20):
        writer.write(b" ")
        try:
            if await asyncio.wait_for(reader.read(65536), 0.1) == b"":
                break
        except TimeoutError:
            continue
        except ConnectionError:
            break
    else:
        raise AssertionError("the connection is still open")
    writer.close()
