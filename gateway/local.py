"""Calls into gRPC handlers in the same process and event loop, without a socket.

A gateway served beside its grpc.aio server can skip the loopback
connection: `LocalUpstream` looks a method up in the handlers the server was
given, runs the server's interceptors in front of it and calls it directly
with a `LocalContext`. Requests and responses are still serialized and
parsed, so the handler sees exactly the message a remote call would bring,
and failures come back as `grpc.aio.AioRpcError`, as from a channel. An
interceptor may also refuse a call from its metadata alone (`admit`), before
the gateway reads the request's body.

    registry = HandlerRegistry()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(servicer, registry)
    upstream = LocalUpstream(registry.handlers, interceptors, target="in-process")
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from gateway.transcode import message_class
from gateway.upstream import Metadata, UnaryReply, method_path

logger = logging.getLogger(__name__)

Handler = Any  # grpc.RpcMethodHandler; its type parameters do not help here
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# Messages a streaming handler may run ahead of the HTTP response.
_STREAM_BUFFER = 16


class HandlerRegistry:
    """Stands in for a server in `add_<Service>Servicer_to_server` and keeps the handlers."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler[Any, Any]] = []

    @property
    def as_server(self) -> grpc.aio.Server:
        """This registry, typed as the server the generated functions expect: they
        call only the two methods below."""
        return cast(grpc.aio.Server, self)

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        """Keep a service's generic handlers."""
        self.handlers.extend(handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        """Nothing to do: the generic handlers cover the same methods."""


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.method = method
        self.invocation_metadata = tuple(metadata)


class _Aborted(Exception):
    """Raised by LocalContext.abort, as grpc.aio raises to end the handler."""


class LocalContext:
    """The part of grpc.aio.ServicerContext that handlers use, for an in-process call."""

    def __init__(self, metadata: Metadata, deadline: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._initial: Metadata | None = None
        self._trailing: Metadata = []
        self._cancelled = False
        # Where write() sends a streaming call's messages; set by LocalStreamCall.
        self._writer: Callable[[Any], Awaitable[None]] | None = None

    def invocation_metadata(self) -> Metadata:
        """The metadata the caller sent."""
        return list(self._metadata)

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Record the initial metadata; once only, as on a real call."""
        if self._initial is not None:
            raise grpc.aio.UsageError("initial metadata was already sent")
        self._initial = list(metadata)

    async def write(self, message: Any) -> None:
        """Send one message of a server-streaming call, as a handler that
        returns nothing does on a grpc.aio server."""
        if self._writer is None:
            raise grpc.aio.UsageError("write() is only for server-streaming calls")
        await self._writer(message)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Set the trailing metadata."""
        self._trailing = list(metadata)

    def trailing_metadata(self) -> Metadata:
        """The trailing metadata set so far."""
        return list(self._trailing)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        """End the call with code and details."""
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status other than OK")
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = list(trailing_metadata)
        raise _Aborted(details)

    def set_code(self, code: grpc.StatusCode) -> None:
        """Set the status the call ends with."""
        self._code = code

    def set_details(self, details: str) -> None:
        """Set the status message the call ends with."""
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        """The status set so far, or None."""
        return self._code

    def details(self) -> str | None:
        """The status message set so far, or None."""
        return self._details

    def time_remaining(self) -> float | None:
        """Seconds until the deadline, or None without one."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        """Where the call came from: this process."""
        return "local"

    def cancelled(self) -> bool:
        """True once the caller has cancelled the call."""
        return self._cancelled

    def done(self) -> bool:
        """True once the call has ended."""
        return self._cancelled or self._code is not None

    def initial_metadata(self) -> Metadata:
        """What the handler sent as initial metadata."""
        return list(self._initial or ())

    def error(self) -> grpc.aio.AioRpcError | None:
        """The call's failure, if the handler set a status other than OK."""
        if self._code is None or self._code == grpc.StatusCode.OK:
            return None
        return _rpc_error(self._code, self._details or "", self._initial, self._trailing)


def _rpc_error(
    code: grpc.StatusCode,
    details: str,
    initial: Metadata | None = None,
    trailing: Metadata | None = None,
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(*(initial or ())),
        grpc.aio.Metadata(*(trailing or ())),
        details,
        None,
    )


def _failure(context: LocalContext, error: BaseException, method: str) -> grpc.aio.AioRpcError:
    """The AioRpcError for an exception a handler raised, as a grpc.aio server reports it."""
    if isinstance(error, _Aborted):
        found = context.error()
        assert found is not None
        return found
    if isinstance(error, TimeoutError):
        return _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    logger.error("unexpected error in %s", method, exc_info=error)
    return _rpc_error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(error)}: {error}")


class LocalUpstream:
    """The gateway's upstream when the handlers run in this process."""

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler[Any, Any]],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
        target: str = "in-process",
    ) -> None:
        self.target = target
        self._handlers = tuple(handlers)
        self._interceptors = tuple(interceptors)
        self._output_classes: dict[str, Callable[[bytes], Message]] = {}

    async def close(self) -> None:
        """Nothing to close: there is no connection."""

    async def unary_call(
        self,
        method: MethodDescriptor,
        message: Message,
        metadata: Metadata,
        time_limit: float | None,
    ) -> UnaryReply:
        """Call a unary method: its response and metadata, or AioRpcError."""
        response, handler, context = await self._invoke(
            method_path(method), message, metadata, time_limit
        )
        return UnaryReply(
            self._response(method, handler, response),
            context.initial_metadata(),
            context.trailing_metadata(),
        )

    def stream_call(
        self,
        method: MethodDescriptor,
        message: Message,
        metadata: Metadata,
        time_limit: float | None,
    ) -> LocalStreamCall:
        """Start a server-streaming method; read its messages from the returned call."""
        return LocalStreamCall(self, method, message, metadata, time_limit)

    async def admit(self, method: MethodDescriptor, metadata: Metadata, rights: bool) -> None:
        """Ask each interceptor that has an `admit(path, metadata, rights)`
        coroutine, which gives (code, details) for a call it would refuse
        whatever its request (with rights, judging the caller's rights too),
        else None; AioRpcError with the first refusal."""
        path = method_path(method)
        for interceptor in self._interceptors:
            admit = getattr(interceptor, "admit", None)
            refusal = None if admit is None else await admit(path, metadata, rights)
            if refusal is not None:
                raise _rpc_error(*refusal)

    def probe(self, method: MethodDescriptor, metadata: Metadata) -> None:
        """None: admit has judged the caller before the body is read."""
        return None

    async def health(self, service: str, deadline: float) -> str:
        """The serving status the health service reports, or the failed call's code name."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response, _, _ = await self._invoke(_HEALTH_CHECK, request, [], deadline)
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def _invoke(
        self, path: str, message: Message, metadata: Metadata, time_limit: float | None
    ) -> tuple[Any, Handler, LocalContext]:
        """Run a unary handler behind the interceptors: its own response, or AioRpcError."""
        handler, context = await self._start(path, metadata, time_limit)
        if handler.response_streaming or not (handler.unary_unary or handler.stream_unary):
            raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{path} is not a unary method")
        request = _request(handler, message)
        try:
            async with asyncio.timeout(time_limit):
                if handler.unary_unary is not None:
                    result = handler.unary_unary(request, context)
                else:  # a handler that takes its request as a stream
                    result = handler.stream_unary(_one(request), context)
                response = await result if inspect.isawaitable(result) else result
        except Exception as error:
            raise _failure(context, error, path) from None
        failed = context.error()
        if failed is not None:
            raise failed
        return response, handler, context

    async def _start(
        self, path: str, metadata: Metadata, time_limit: float | None
    ) -> tuple[Handler, LocalContext]:
        """The method's handler behind the interceptors, and a context for the call."""
        details = _CallDetails(path, metadata)
        handler = await self._intercepted(0, details)
        if handler is None:
            raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path}")
        deadline = None if time_limit is None else time.monotonic() + time_limit
        return handler, LocalContext(metadata, deadline)

    async def _intercepted(self, index: int, details: grpc.HandlerCallDetails) -> Handler | None:
        """The handler as the interceptors from index on return it, like grpc.aio's chain."""
        if index == len(self._interceptors):
            return self._lookup(details)

        async def continuation(next_details: grpc.HandlerCallDetails) -> Handler:
            return await self._intercepted(index + 1, next_details)

        return await self._interceptors[index].intercept_service(continuation, details)

    def _lookup(self, details: grpc.HandlerCallDetails) -> Handler | None:
        for generic in self._handlers:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def _response(self, method: MethodDescriptor, handler: Handler, response: Any) -> Message:
        """The response as the gateway's own message class, through its wire form."""
        parse = self._output_classes.get(method.full_name)
        if parse is None:
            parse = self._output_classes[method.full_name] = message_class(
                method.output_type
            ).FromString
        data = response if isinstance(response, bytes) else handler.response_serializer(response)
        return parse(data)


class LocalStreamCall:
    """A server-streaming call run in this process: read(), initial_metadata(), cancel().

    The handler runs in a task of its own, a few messages ahead of the reader,
    as it would on a server; cancel() cancels that task.
    """

    def __init__(
        self,
        upstream: LocalUpstream,
        method: MethodDescriptor,
        message: Message,
        metadata: Metadata,
        time_limit: float | None,
    ) -> None:
        self._upstream = upstream
        self._method = method
        self._queue: asyncio.Queue[Message | grpc.aio.AioRpcError | None] = asyncio.Queue(
            _STREAM_BUFFER
        )
        self._context: LocalContext | None = None
        self._ended = False
        # The status the reader is given at the end; None until then.
        self._status: grpc.StatusCode | None = None
        self._task = asyncio.create_task(self._run(message, metadata, time_limit))

    async def _run(self, message: Message, metadata: Metadata, time_limit: float | None) -> None:
        path = method_path(self._method)
        try:
            handler, context = await self._upstream._start(path, metadata, time_limit)
        except grpc.aio.AioRpcError as error:
            await self._end(error)
            return
        self._context = context
        if not handler.response_streaming:
            await self._end(
                _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{path} is not a streaming method")
            )
            return
        try:
            async with asyncio.timeout(time_limit):
                await self._relay(handler, context, _request(handler, message))
        except asyncio.CancelledError:
            context._cancelled = True
            raise
        except Exception as error:
            await self._end(_failure(context, error, path))
            return
        await self._end(context.error())

    async def _end(self, error: grpc.aio.AioRpcError | None) -> None:
        """Give the reader the call's end: None (OK) or its error."""
        self._status = grpc.StatusCode.OK if error is None else error.code()
        await self._queue.put(error)

    async def _relay(self, handler: Handler, context: LocalContext, request: Message) -> None:
        """Pass on what the handler yields, or writes with context.write."""

        async def send(response: Any) -> None:
            await self._queue.put(self._upstream._response(self._method, handler, response))

        context._writer = send
        if handler.unary_stream is not None:
            result = handler.unary_stream(request, context)
        else:  # a handler that takes its request as a stream
            result = handler.stream_stream(_one(request), context)
        if isinstance(result, AsyncIterator):
            async for response in result:
                await send(response)
        elif inspect.isawaitable(result):
            await result
        else:
            raise TypeError(
                f"{method_path(self._method)}: only async generators and coroutines can stream"
            )

    async def read(self) -> Message | None:
        """The next message; None at the end; AioRpcError when the call failed."""
        if self._ended:
            return None
        item = await self._queue.get()
        if isinstance(item, Message):
            return item
        self._ended = True
        if item is None:
            return None
        raise item

    async def initial_metadata(self) -> Metadata:
        """The initial metadata the handler sent (read after the first message)."""
        return self._context.initial_metadata() if self._context is not None else []

    def cancel(self) -> bool:
        """Cancel the handler's task; False if it had ended already."""
        return self._task.cancel()

    async def code(self) -> grpc.StatusCode:
        """The call's status code, once the handler's task has ended: the one
        the reader is given, or CANCELLED."""
        await asyncio.wait([self._task])
        return self._status or grpc.StatusCode.CANCELLED


async def _one(request: Any) -> AsyncIterator[Any]:
    """A stream of one request, for a handler that takes its request as a stream."""
    yield request


def _request(handler: Handler, message: Message) -> Any:
    """The request as the handler's own message class, through its wire form."""
    deserialize: Callable[[bytes], Any] | None = handler.request_deserializer
    data = message.SerializeToString()
    return deserialize(data) if deserialize is not None else data
