"""Serving an ASGI app with uvicorn inside a running event loop (e.g. beside a grpc.aio server)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import ASGIApp


@dataclass(frozen=True)
class ServerTLS:
    """TLS for the HTTP listener: certificate chain and key files, optionally a client CA."""

    certfile: str
    keyfile: str
    # When set, clients must present a certificate signed by this CA.
    client_ca_file: str | None = None
    keyfile_password: str | None = None


class _Server(uvicorn.Server):  # type: ignore[misc]
    # The embedding program owns the signal handlers; it calls HttpServer.stop().
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
            log_config=None,
            access_log=access_log,
            timeout_graceful_shutdown=max(1, round(grace)),
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
