"""LocalUpstream: a handler called in-process sees what a real call gives it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

import gateway
from tests.gateway.conftest import ECHO_SERVICE
from tests.gateway.testproto import echo_pb2

ECHO = ECHO_SERVICE.methods_by_name["Echo"]
COUNT = ECHO_SERVICE.methods_by_name["Count"]


def upstream_of(unary: Any = None, stream: Any = None) -> gateway.LocalUpstream:
    handlers = {}
    if unary is not None:
        handlers["Echo"] = grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=echo_pb2.EchoMessage.FromString,
            response_serializer=echo_pb2.EchoMessage.SerializeToString,
        )
    if stream is not None:
        handlers["Count"] = grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=echo_pb2.CountRequest.FromString,
            response_serializer=echo_pb2.Tick.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler("echo.v1.EchoService", handlers)
    return gateway.LocalUpstream([generic])


async def test_the_context_answers_as_a_real_one_does() -> None:
    seen: dict[str, Any] = {}

    async def echo(request: echo_pb2.EchoMessage, context: Any) -> echo_pb2.EchoMessage:
        seen["remaining"] = context.time_remaining()
        seen["peer"] = context.peer()
        seen["metadata"] = context.invocation_metadata()
        seen["before"] = (context.cancelled(), context.done(), context.code(), context.details())
        await context.send_initial_metadata((("x-one", "1"),))
        with pytest.raises(grpc.aio.UsageError):
            await context.send_initial_metadata((("x-two", "2"),))
        context.set_trailing_metadata((("x-trailer", "t"),))
        seen["trailing"] = context.trailing_metadata()
        return request

    upstream = upstream_of(unary=echo)
    response, initial, trailing = await upstream.unary_call(
        ECHO, echo_pb2.EchoMessage(text="hi"), [("key", "value")], 5.0
    )
    assert response.text == "hi" and list(initial) == [("x-one", "1")]
    assert list(trailing) == [("x-trailer", "t")]
    assert 4.0 < seen["remaining"] <= 5.0
    assert seen["peer"] == "local" and seen["metadata"] == [("key", "value")]
    assert seen["before"] == (False, False, None, None)
    assert seen["trailing"] == [("x-trailer", "t")]


async def test_a_status_set_without_abort_fails_the_call() -> None:
    async def echo(request: echo_pb2.EchoMessage, context: Any) -> echo_pb2.EchoMessage:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("no such echo")
        return request

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upstream_of(unary=echo).unary_call(ECHO, echo_pb2.EchoMessage(), [], None)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "no such echo"


async def test_deadlines_unknown_methods_and_crashes_become_statuses() -> None:
    async def slow(request: echo_pb2.EchoMessage, context: Any) -> echo_pb2.EchoMessage:
        await asyncio.sleep(5)
        return request

    async def crash(request: echo_pb2.EchoMessage, context: Any) -> echo_pb2.EchoMessage:
        raise RuntimeError("boom")

    cases = [
        (upstream_of(unary=slow), ECHO, 0.05, grpc.StatusCode.DEADLINE_EXCEEDED),
        (upstream_of(unary=crash), ECHO, None, grpc.StatusCode.UNKNOWN),
        (upstream_of(), ECHO, None, grpc.StatusCode.UNIMPLEMENTED),
    ]
    for upstream, method, limit, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await upstream.unary_call(method, echo_pb2.EchoMessage(), [], limit)
        assert raised.value.code() is code
    # Without a health service the health check names the failure.
    assert await upstream_of().health("", 1.0) == "UNIMPLEMENTED"


async def test_a_stream_is_read_to_its_end_or_cancelled() -> None:
    cancelled = asyncio.Event()

    async def count(request: echo_pb2.CountRequest, context: Any) -> Any:
        try:
            for seq in range(1, request.count + 1):
                yield echo_pb2.Tick(seq=seq)
            if request.count == 3:
                await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    upstream = upstream_of(stream=count)
    call = upstream.stream_call(COUNT, echo_pb2.CountRequest(count=2), [], None)
    ticks = [await call.read(), await call.read(), await call.read()]
    assert [tick.seq if tick else None for tick in ticks] == [1, 2, None]

    waiting = upstream.stream_call(COUNT, echo_pb2.CountRequest(count=3), [], None)
    assert [(await waiting.read()).seq for _ in range(3)] == [1, 2, 3]  # type: ignore[union-attr]
    assert waiting.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_a_stream_written_with_context_write_reads_the_same() -> None:
    async def count(request: echo_pb2.CountRequest, context: Any) -> None:
        for seq in range(1, request.count + 1):
            await context.write(echo_pb2.Tick(seq=seq))

    call = upstream_of(stream=count).stream_call(COUNT, echo_pb2.CountRequest(count=2), [], None)
    ticks = [await call.read(), await call.read(), await call.read()]
    assert [tick.seq if tick else None for tick in ticks] == [1, 2, None]

    async def write_in_unary(request: echo_pb2.EchoMessage, context: Any) -> echo_pb2.EchoMessage:
        await context.write(request)
        return request

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upstream_of(unary=write_in_unary).unary_call(ECHO, echo_pb2.EchoMessage(), [], None)
    assert raised.value.code() is grpc.StatusCode.UNKNOWN
    assert "only for server-streaming calls" in (raised.value.details() or "")


async def test_a_streams_code_is_the_status_its_reader_was_given() -> None:
    async def crash(request: echo_pb2.CountRequest, context: Any) -> Any:
        yield echo_pb2.Tick(seq=1)
        raise RuntimeError("the handler broke")

    async def slow(request: echo_pb2.CountRequest, context: Any) -> Any:
        yield echo_pb2.Tick(seq=1)
        await asyncio.sleep(60)

    async def count(request: echo_pb2.CountRequest, context: Any) -> Any:
        yield echo_pb2.Tick(seq=1)

    async def ended(call: Any) -> tuple[grpc.StatusCode | None, grpc.StatusCode]:
        given = None
        try:
            while await call.read() is not None:
                pass
        except grpc.aio.AioRpcError as error:
            given = error.code()
        return given, await call.code()

    request = echo_pb2.CountRequest(count=1)
    assert await ended(upstream_of(stream=count).stream_call(COUNT, request, [], None)) == (
        None,
        grpc.StatusCode.OK,
    )
    crashing = upstream_of(stream=crash).stream_call(COUNT, request, [], None)
    assert await ended(crashing) == (grpc.StatusCode.UNKNOWN,) * 2
    late = upstream_of(stream=slow).stream_call(COUNT, request, [], 0.05)
    assert await ended(late) == (grpc.StatusCode.DEADLINE_EXCEEDED,) * 2
    unknown = upstream_of(unary=crash).stream_call(COUNT, request, [], None)
    assert await ended(unknown) == (grpc.StatusCode.UNIMPLEMENTED,) * 2
    as_stream = upstream_of(unary=crash, stream=count)
    wrong_kind = as_stream.stream_call(ECHO, echo_pb2.EchoMessage(), [], None)
    assert await ended(wrong_kind) == (grpc.StatusCode.UNIMPLEMENTED,) * 2

    left = upstream_of(stream=slow).stream_call(COUNT, request, [], None)
    await left.read()
    left.cancel()
    assert await left.code() is grpc.StatusCode.CANCELLED
