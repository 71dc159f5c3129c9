"""A server-streaming call as an HTTP response: NDJSON, or Server-Sent Events.

The HTTP status is chosen when the first message (or the end of the
stream) arrives, so a call that fails before it still gets its proper
error status. Later failures end the body with an error frame. The call is
cancelled when the client goes away, and the response ends cleanly when the
gateway shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import anyio
import grpc
from google.protobuf.message import Message
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, challenge_headers, rpc_error_json, rpc_error_status
from gateway.openapi import EVENT_STREAM, NDJSON
from gateway.transcode import encode_json
from gateway.upstream import HTTP_CODE_KEY, StreamCall, error_metadata_headers, response_headers

Call = StreamCall

# How long a response waits for its cancelled call to end.
CALL_END_SECONDS = 1.0


class StreamFormat:
    """How messages and a final error are framed in the body."""

    media_type = NDJSON

    def message(self, payload: Any, event_id: str | None) -> bytes:
        """One message."""
        return encode_json({"result": payload}) + b"\n"

    def error(self, status: dict[str, Any]) -> bytes:
        """The error that ends the stream."""
        return encode_json({"error": status}) + b"\n"


class EventStreamFormat(StreamFormat):
    """Server-Sent Events: `data:` per message, an `error` event on failure."""

    media_type = EVENT_STREAM

    def message(self, payload: Any, event_id: str | None) -> bytes:
        """One `data:` event, with an `id:` when the message has one."""
        head = f"id: {_one_line(event_id)}\n".encode() if event_id else b""
        return head + b"data: " + encode_json(payload) + b"\n\n"

    def error(self, status: dict[str, Any]) -> bytes:
        """An `error` event carrying the Status JSON."""
        return b"event: error\ndata: " + encode_json(status) + b"\n\n"


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").replace("\0", "")


class StreamResponse:
    """An ASGI response that relays a unary-stream call."""

    def __init__(
        self,
        call: Call,
        stream_format: StreamFormat,
        render: Callable[[Message], Any],
        event_id: Callable[[Message], str | None],
        success_status: Callable[[grpc.aio.Metadata], int],
        closing: asyncio.Event,
        hidden: tuple[str, ...] = (HTTP_CODE_KEY,),
    ) -> None:
        self.call = call
        self.format = stream_format
        self.render = render
        self.event_id = event_id
        self.success_status = success_status
        self.closing = closing
        self.hidden = hidden
        self.started = False
        # Set when no more may be sent: the client left, or a whole error response went out.
        self.finished = False
        # Set when the stream's own end (or error) was relayed.
        self.relayed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Relay the stream until it ends, the client leaves or the gateway closes."""
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._watch_disconnect, receive, tasks.cancel_scope)
                tasks.start_soon(self._watch_closing, tasks.cancel_scope)
                await self._relay(send)
                tasks.cancel_scope.cancel()
        finally:
            self.call.cancel()
            # Wait for its end, so that what it logs as it ends goes in (or
            # before) this request's access line; not for long, should a
            # handler take its time to stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CALL_END_SECONDS):
                    await self.call.code()
        if self.finished:
            return
        if not self.started:
            error = GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            await self._send_error(send, error.http_status, error.body())
            return
        if not self.relayed:  # cut off as the gateway closes: said, as a server's stop is
            said = "the gateway is shutting down: resume after the last message's cursor"
            error = GatewayError(grpc.StatusCode.UNAVAILABLE, said)
            await self._send_chunk(send, self.format.error(error.body()))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.finished = True
        scope.cancel()

    async def _watch_closing(self, scope: anyio.CancelScope) -> None:
        await self.closing.wait()
        scope.cancel()

    async def _relay(self, send: Send) -> None:
        try:
            message = await self._next()
        except grpc.aio.AioRpcError as error:
            headers = error_metadata_headers(error, skip=self.hidden)
            await self._send_error(send, rpc_error_status(error), rpc_error_json(error), headers)
            self.finished = True
            return
        initial = await self.call.initial_metadata()
        headers = {
            "content-type": self.format.media_type,
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **response_headers(initial, skip=self.hidden),
        }
        await send(
            {
                "type": "http.response.start",
                "status": self.success_status(initial),
                "headers": [
                    (key.encode("latin-1"), value.encode("latin-1"))
                    for key, value in headers.items()
                ],
            }
        )
        self.started = True
        try:
            while message is not None:
                await self._send_chunk(
                    send, self.format.message(self.render(message), self.event_id(message))
                )
                message = await self._next()
        except grpc.aio.AioRpcError as error:
            self.relayed = True  # before the send, which the gateway's closing may cut
            await self._send_chunk(send, self.format.error(rpc_error_json(error)))
        except GatewayError as error:
            self.relayed = True
            await self._send_chunk(send, self.format.error(error.body()))
        self.relayed = True

    async def _next(self) -> Message | None:
        message = await self.call.read()
        # Anything but a message is grpc.aio.EOF: the stream ended without error.
        return message if isinstance(message, Message) else None

    async def _send_chunk(self, send: Send, body: bytes) -> None:
        await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _send_error(
        self,
        send: Send,
        status: int,
        body: dict[str, Any],
        metadata: dict[str, str] | None = None,
    ) -> None:
        headers = [(b"content-type", b"application/json")]
        given = {**challenge_headers(status), **(metadata or {})}
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in given.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": encode_json(body), "more_body": False})
