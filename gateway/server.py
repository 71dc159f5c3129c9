"""Serving an ASGI app with uvicorn inside a running event loop (e.g. beside a grpc.aio server)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import grpc
import uvicorn
from starlette.types import ASGIApp, Message
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.errors import GatewayError
from gateway.transcode import encode_json

# A request's line and headers must all arrive within this many seconds of
# its first byte (of the connection, for the first request) and within this
# many bytes, or the connection is closed: a client that sends a head byte
# by byte, or never finishes it, would otherwise hold its socket for ever.
HEAD_SECONDS = 20.0
HEAD_BYTES = 64 * 1024
# A connection whose request was answered before its body arrived (see
# _closing_unless_read) is closed at most this many seconds after the answer:
# meanwhile what the client still sends is read and dropped, as a socket
# closed with data unread would reset the connection, and the client could
# lose the answer before it reads it.
LINGER_SECONDS = 2.0
_CONNECTION_CLOSE = (b"connection", b"close")


@dataclass(frozen=True)
class ServerTLS:
    """TLS for the HTTP listener: certificate chain and key files, optionally a client CA."""

    certfile: str
    keyfile: str
    # When set, clients must present a certificate signed by this CA.
    client_ca_file: str | None = None
    keyfile_password: str | None = None


# The ASGI scope extension that carries a request's ClosedWatch.
CLOSED_EXTENSION = "gateway.closed"


class ClosedWatch:
    """What runs when the connection a request came on closes.

    uvicorn tells an app that its client left only through receive(), which
    needs a task waiting on it for the whole call; a callback registered
    here costs no task. The protocol below puts one in each request's scope
    (scope["extensions"][CLOSED_EXTENSION]); other servers put none.
    """

    __slots__ = ("_callbacks", "closed")

    def __init__(self) -> None:
        self.closed = False
        self._callbacks: list[Callable[[], object]] = []

    def add(self, callback: Callable[[], object]) -> None:
        """Run callback when the connection closes (at once if it has)."""
        if self.closed:
            callback()
        else:
            self._callbacks.append(callback)

    def remove(self, callback: Callable[[], object]) -> None:
        """Forget a callback added before; nothing if it has run."""
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def close(self) -> None:
        """The connection closed: run the callbacks, once."""
        self.closed = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class _Server(uvicorn.Server):  # type: ignore[misc]
    # The embedding program owns the signal handlers; it calls HttpServer.stop().
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop reading a head past HEAD_BYTES."""


def _ended_by_closing(cycle: RequestResponseCycle) -> Callable[[Message], Awaitable[None]]:
    """cycle's send for an HTTP/1.0 request: an answer of no stated length (a
    stream, a long list) is sent as it is, and ends as the connection closes,
    as HTTP/1.0 ends it. uvicorn would send it chunked, which an HTTP/1.0
    client cannot read (RFC 9112, 6.1); it closes such a connection after
    each answer."""
    send = cycle.send
    unframed = False

    async def send_unframed(message: Message) -> None:
        nonlocal unframed
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", ())}
            unframed = (
                not names & {b"content-length", b"transfer-encoding"}
                and cycle.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
            )
            if unframed:  # as uvicorn reads these: a length known, and none left over
                cycle.chunked_encoding = False
                cycle.expected_content_length = sys.maxsize
        elif unframed and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    return send_unframed


class _GuardedHttpTools(HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol, with a deadline and a size bound on each
    request's head (uvicorn has neither: its keep-alive timer stops at the
    first byte of the next request), and an end to a connection whose
    request was answered before its body arrived."""

    head_seconds = HEAD_SECONDS
    head_bytes = HEAD_BYTES
    linger_seconds = LINGER_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._head_read = 0
        self._head_too_large = False
        self._in_head = False
        # The first request's deadline runs from the connection: one that
        # sends nothing is closed too.
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.head_seconds, self._head_too_slow
        )
        # One per request not yet answered, oldest first. A request pipelined
        # behind another stops uvicorn reading the socket until the first is
        # answered, so a client that leaves meanwhile is noticed only then:
        # the call in flight runs to its end, as it did before these watches.
        self._closed_watches: list[ClosedWatch] = []
        # Set once a request is answered before its body has all arrived.
        self._lingering = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)
        watches, self._closed_watches = self._closed_watches, []
        for watch in watches:
            watch.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_read = True, 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_seconds, self._head_too_slow)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        watch = ClosedWatch()
        self._closed_watches.append(watch)
        self.scope.setdefault("extensions", {})[CLOSED_EXTENSION] = watch
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a request to answer, not an upgrade
            self.cycle.send = self._closing_unless_read(self.cycle)
            if self.scope["http_version"] == "1.0":
                self.cycle.send = _ended_by_closing(self.cycle)

    def on_response_complete(self) -> None:
        # The oldest request is answered: its watch has nothing left to tell.
        if self._closed_watches:
            del self._closed_watches[0]
        super().on_response_complete()
        if self._lingering:
            self._linger()

    def data_received(self, data: bytes) -> None:
        if not self._lingering:  # else the rest of a body nobody reads
            super().data_received(data)

    def _closing_unless_read(
        self, cycle: RequestResponseCycle
    ) -> Callable[[Message], Awaitable[None]]:
        """cycle's send, adding `Connection: close` to an answer begun before
        the request's body has all arrived (a 401 or 413 that does not read
        it, a 408 for one too slow). uvicorn would keep such a connection and
        drop the rest of the body as it came: a client sending it a byte at a
        time, each byte stopping the keep-alive timer, held the connection
        for as long as it went on."""
        send = cycle.send

        async def send_closing(message: Message) -> None:
            if message["type"] != "http.response.start" or not cycle.more_body:
                await send(message)
                return
            headers = [*message.get("headers", ()), _CONNECTION_CLOSE]
            await send({**message, "headers": headers})
            # The header has uvicorn close the connection as soon as the
            # answer is sent; the client, still sending, would be reset and
            # could lose the answer unread. The connection lingers instead.
            cycle.keep_alive = True
            self._lingering = True

        return send_closing

    def _linger(self) -> None:
        """After an answer that closes the connection: end the sending side,
        drop what still comes for up to LINGER_SECONDS, then close."""
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.linger_seconds, self.transport.close)

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers any error raised while parsing with a 400.
        if self._head_too_large:
            message = f"the request's head is larger than {self.head_bytes} bytes"
            self._refuse_head(GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message, 431))
        else:  # uvicorn's is plain text, where every other error is JSON
            message = "the request is not HTTP/1.1 that the server can read"
            self._refuse_head(GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message, 400))

    def _count(self, size: int) -> None:
        self._head_read += size
        if self._head_read > self.head_bytes:
            self._head_too_large = True
            raise _HeadTooLarge

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_head:
            message = f"the request's head did not arrive within {self.head_seconds:g} s"
            self._refuse_head(GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, message, 408))
        elif self.cycle is None:  # nothing asked: nothing to answer
            self.transport.close()

    def _refuse_head(self, error: GatewayError) -> None:
        """Answer the error as google.rpc.Status JSON, as the app answers its
        own, and close the connection (the parser holds no request to pass on)."""
        self._stop_head_timer()
        self._in_head = False
        body = encode_json(error.body())
        status = HTTPStatus(error.http_status)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status.value, status.phrase.encode(), len(body), body)
        )
        self.transport.close()


class HttpServer:
    """uvicorn on a socket bound up front, so port 0 works and the port is known.

    uvicorn's own access log (`access_log`) is off by default: the gateway's
    app writes one (GatewayOptions.access_log) with more in each line.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        tls: ServerTLS | None = None,
        reuse_port: bool = False,
        grace: float = 10.0,
        access_log: bool = False,
    ) -> None:
        self.app = app
        self._socket = _bind(host, port, reuse_port)
        self._config = uvicorn.Config(
            app,
            lifespan="on",
            http=_GuardedHttpTools,
            log_config=None,
            access_log=access_log,
            # Whole seconds, not fewer than asked: the calls are cut no sooner.
            timeout_graceful_shutdown=max(1, math.ceil(grace)),
            ssl_certfile=tls.certfile if tls else None,
            ssl_keyfile=tls.keyfile if tls else None,
            ssl_keyfile_password=tls.keyfile_password if tls else None,
            ssl_ca_certs=tls.client_ca_file if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE,
        )
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port the listener is bound to."""
        port: int = self._socket.getsockname()[1]
        return port

    async def start(self) -> None:
        """Start serving; returns once the app has started and the socket listens."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, end open streams, let in-flight requests finish (up to the grace)."""
        gateway: Any = getattr(getattr(self.app, "state", None), "gateway", None)
        if gateway is not None:
            gateway.close_streams()
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose listening socket says so, and with it on every response
    # whose head and body are written apart waits out a delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def serve(
    app: ASGIApp,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    tls: ServerTLS | None = None,
    reuse_port: bool = False,
    grace: float = 10.0,
) -> None:
    """Serve the app until `stop` is set, then shut down gracefully."""
    server = HttpServer(app, host=host, port=port, tls=tls, reuse_port=reuse_port, grace=grace)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()
