"""An in-process grpc.aio EchoService and the gateway in front of it; porch behind it too.

`client` talks to the app through httpx's ASGI transport; `live` runs it
under a real uvicorn on port 0 and talks over a socket. `porch_http` is a
real porch gRPC server (on this test's database, SQLite and PostgreSQL)
behind porch's gateway under uvicorn, with an admin token. Each runs with
the gateway calling over a channel and calling the handlers in-process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import empty_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette

import gateway
from porch_server import web
from porch_server.models import Role
from tests.gateway.testproto import echo_pb2, echo_pb2_grpc
from tests.integration.conftest import Porch, start_porch

ECHO_SERVICE = echo_pb2.DESCRIPTOR.services_by_name["EchoService"]
DESCRIPTOR_SET = (Path(echo_pb2.__file__).parent / "echo.binpb").read_bytes()
MAX_BODY = 64 * 1024
# ListItems totals that ask for a page token that repeats, and for a second
# page that fails.
LOOPING_TOTAL, FAILING_TOTAL = 1001, 1002
# Metadata the transport adds on its own; not interesting to echo back.
_TRANSPORT_KEYS = {"user-agent", "grpc-accept-encoding", "grpc-encoding", "x-forwarded-for"}


@dataclass
class EchoState:
    """What the servicer saw, for tests to inspect."""

    things: dict[str, echo_pb2.Thing] = field(default_factory=dict)
    watch_started: asyncio.Event = field(default_factory=asyncio.Event)
    watch_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    sleep_started: asyncio.Event = field(default_factory=asyncio.Event)
    sleep_cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """The test service behind the gateway."""

    def __init__(self, state: EchoState) -> None:
        self.state = state
        self.serials = itertools.count(1)

    async def Echo(
        self, request: echo_pb2.EchoMessage, context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoMessage:  # type: ignore[override]
        initial = [("x-echo", "yes")]
        if request.text == "twice":  # a key given twice
            initial.append(("x-echo", "again"))
        await context.send_initial_metadata(initial)
        if request.text == "sleep":
            self.state.sleep_started.set()
            try:
                await asyncio.sleep(min(request.wait.ToTimedelta().total_seconds(), 5))
            except asyncio.CancelledError:
                self.state.sleep_cancelled.set()
                raise
        reply = echo_pb2.EchoMessage()
        reply.CopyFrom(request)
        for key, value in context.invocation_metadata() or ():
            if key not in _TRANSPORT_KEYS:
                reply.metadata[key] = value if isinstance(value, str) else value.hex()
        return reply

    async def CreateThing(
        self, request: echo_pb2.CreateThingRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.Thing:  # type: ignore[override]
        name = request.thing.name
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "thing.name is required")
        if name not in self.state.things:
            created = timestamp_pb2.Timestamp()
            created.GetCurrentTime()
            self.state.things[name] = echo_pb2.Thing(
                name=name, serial=next(self.serials), create_time=created
            )
            # As porch does: with the response, not in a send of its own.
            context.set_trailing_metadata((("x-http-code", "201"), ("x-created", "yes")))
        return self.state.things[name]

    async def ListItems(
        self, request: echo_pb2.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> echo_pb2.ListItemsResponse:  # type: ignore[override]
        # A bare-array route's client sends no page_token: totals past 1000
        # ask for the odd answers.
        if request.page_token == "loop" or request.total == LOOPING_TOTAL:
            return echo_pb2.ListItemsResponse(
                items=[echo_pb2.Item(index=0)], next_page_token="loop"
            )
        first_page = not request.page_token
        if request.page_token == "then-fail" or (request.total == FAILING_TOTAL and first_page):
            # A first page whose next token the following call refuses.
            return echo_pb2.ListItemsResponse(
                items=[echo_pb2.Item(index=0)], next_page_token="refused"
            )
        if request.page_token and not request.page_token.isdigit():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token")
        if not 0 <= request.total <= 1000 or request.page_size < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "total must be 0 to 1000")
        start = int(request.page_token or 0)
        # Without a page_size (a bare-array route cannot send one), a page
        # holds 3 items, or 100 of a total of 700 or more.
        end = min(
            start + (request.page_size or (100 if request.total >= 700 else 3)), request.total
        )
        items = [echo_pb2.Item(index=index) for index in range(start, end)]
        return echo_pb2.ListItemsResponse(
            items=items, next_page_token=str(end) if end < request.total else ""
        )

    async def Count(
        self, request: echo_pb2.CountRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.Tick]:  # type: ignore[override]
        if not 0 <= request.count <= 100:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "count must be 0 to 100",
                trailing_metadata=(("echo-failed", "1"),),
            )
        if request.after and not request.after.isdigit():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "after must be a cursor")
        start = int(request.after or 0)
        for sent, seq in enumerate(range(start + 1, start + request.count + 1)):
            if request.fail_after and sent == request.fail_after:
                await context.abort(grpc.StatusCode.ABORTED, f"failed after {sent} ticks")
            yield echo_pb2.Tick(seq=seq, cursor=str(seq))

    async def Watch(
        self, request: echo_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.Tick]:  # type: ignore[override]
        self.state.watch_started.set()
        try:
            for seq in itertools.count(int(request.after or 0) + 1):
                yield echo_pb2.Tick(seq=seq, cursor=str(seq))
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.state.watch_cancelled.set()
            raise

    async def Fail(
        self, request: echo_pb2.FailRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:  # type: ignore[override]
        if request.code == code_pb2.OK:
            return empty_pb2.Empty()
        code = next(each for each in grpc.StatusCode if each.value[0] == request.code)
        # Metadata with the error, as porch's server sends: without any, an
        # UNAVAILABLE reads as gRPC's own, a server not reached.
        trailing: tuple[tuple[str, str | bytes], ...] = (("echo-failed", "1"),)
        if request.message in ("without metadata", "Cancelling all calls"):
            trailing = ()  # as gRPC ends a call, the latter as a server's grace ends
        if request.message == "twice":
            trailing = (("echo-failed", "1"), ("echo-failed", "2"))
        if request.message == "no header":  # which only an in-process handler can send
            trailing = (("x-bad", "a\r\nSet-Cookie: x=1"), ("X-Upper", "1"), ("x-dash", "\u2013"))
            trailing += (("echo-failed", "1"),)
        if request.message == "with details":
            status = status_pb2.Status(code=request.code, message=request.message)
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason="TEST", domain="echo.v1"))
            trailing = (("grpc-status-details-bin", status.SerializeToString()),)
        await context.abort(code, request.message or code.name, trailing_metadata=trailing)


def unused_target() -> str:
    """An address where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class Backend:
    """The running gRPC server."""

    target: str
    state: EchoState
    health: health.HealthServicer
    # The same services' handlers, for a gateway that calls them in-process.
    registry: gateway.HandlerRegistry


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    """An EchoService (with the health service) on a free port."""
    server = grpc.aio.server()
    registry = gateway.HandlerRegistry()
    state = EchoState()
    servicer = EchoServicer(state)
    health_servicer = health.HealthServicer()
    for target in (server, registry.as_server):
        echo_pb2_grpc.add_EchoServiceServicer_to_server(servicer, target)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, target)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Backend(f"127.0.0.1:{port}", state, health_servicer, registry)
    await server.stop(None)


# Every gateway test runs twice: calling over a channel, and calling the
# handlers in-process (as `porch serve` does).
UPSTREAMS = ["channel", "in-process"]


def echo_app(backend: Backend, kind: str, **changes: object) -> Starlette:
    """The gateway app for the echo backend, calling it the given way."""
    options = echo_options(backend.target, **changes)
    if kind == "in-process":
        return gateway.create_app(options, gateway.LocalUpstream(backend.registry.handlers))
    return gateway.create_app(options)


def echo_options(target: str, **changes: object) -> gateway.GatewayOptions:
    """Gateway options for the echo service, as the tests use them."""
    options = gateway.GatewayOptions(
        services=(ECHO_SERVICE,),
        target=target,
        document=gateway.DocumentOptions(
            title="Echo",
            version="1.0.0",
            descriptor_sets=(DESCRIPTOR_SET,),
            aliases=(gateway.SchemaAlias("ColorEnum", "echo.v1.Color", omit_zero_enum_value=True),),
        ),
        methods={
            "echo.v1.EchoService.Count": gateway.MethodOptions(
                sse_id_field="cursor", last_event_id_field="after"
            ),
            "echo.v1.EchoService.Watch": gateway.MethodOptions(sse_id_field="cursor"),
            "echo.v1.EchoService.CreateThing": gateway.MethodOptions(other_success_statuses=(201,)),
        },
        max_body_bytes=MAX_BODY,
        health_timeout=2.0,
        forward_headers=("authorization",),
    )
    return dataclasses.replace(options, **changes)  # type: ignore[arg-type]


@pytest.fixture(params=UPSTREAMS)
async def client(
    backend: Backend, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the gateway app, through the ASGI transport."""
    app = echo_app(backend, request.param)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        yield http
    await app.state.gateway.upstream.close()


@dataclass
class Live:
    """The gateway under uvicorn on a real socket."""

    server: gateway.HttpServer
    base_url: str
    client: httpx.AsyncClient


@pytest.fixture(params=UPSTREAMS)
async def live(backend: Backend, request: pytest.FixtureRequest) -> AsyncIterator[Live]:
    """The gateway served by uvicorn on a free port, and a client for it."""
    server = gateway.HttpServer(echo_app(backend, request.param), port=0, grace=2)
    await server.start()
    base_url = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        yield Live(server, base_url, http)
    await server.stop()


@dataclass
class PorchHttp:
    """porch's gRPC server and its gateway on real sockets, and an HTTP client for it."""

    porch: Porch
    server: gateway.HttpServer
    base_url: str
    client: httpx.AsyncClient
    upstream: str = "channel"

    @property
    def admin(self) -> dict[str, str]:
        """Headers that carry the admin token."""
        return bearer(self.porch.admin)

    def token(self, role: Role, pipeline: str | None = None, description: str = "test") -> str:
        """A new token's secret, made directly in the database."""
        return self.porch.token(role, pipeline, description)

    async def pipeline(self, name: str = "p1") -> dict[str, str]:
        """Create a pipeline over HTTP; the headers of a token for it."""
        body = {"name": name, "uri": "https://example.org/p", "version": "1"}
        created = await self.client.post("/v1/pipelines", json=body, headers=self.admin)
        assert created.status_code == 201, created.text
        return bearer(self.token(Role.PIPELINE, name, f"{name} wrapper"))


def bearer(secret: str) -> dict[str, str]:
    """The Authorization header of a token."""
    return {"Authorization": f"Bearer {secret}"}


async def start_porch_http(db_url: str, upstream: str = "channel") -> PorchHttp:
    """Start porch (in a thread) and its gateway on free ports.

    "channel": the gateway runs in this event loop and calls porch over a
    connection, as `porch gateway` does. "in-process": the gateway runs in
    porch's own event loop and calls its handlers directly, as `porch serve` does.
    """
    porch = await asyncio.to_thread(start_porch, db_url)
    if upstream == "in-process":
        local = porch.server.running.local
        app = gateway.create_app(web.gateway_options(local.target), local)
        server = gateway.HttpServer(app, port=0, grace=2)
        await asyncio.to_thread(porch.server.call, server.start())
    else:
        app = gateway.create_app(web.gateway_options(porch.target))
        server = gateway.HttpServer(app, port=0, grace=2)
        await server.start()
    base_url = f"http://127.0.0.1:{server.port}"
    client = httpx.AsyncClient(base_url=base_url, timeout=30)
    return PorchHttp(porch, server, base_url, client, upstream)


async def stop_porch_http(running: PorchHttp) -> None:
    """Stop the gateway, then porch."""
    await running.client.aclose()
    if running.upstream == "in-process":
        await asyncio.to_thread(running.porch.server.call, running.server.stop())
    else:
        await running.server.stop()
    for channel in running.porch.channels:
        channel.close()
    await asyncio.to_thread(running.porch.server.stop)


@pytest.fixture(params=UPSTREAMS)
async def porch_http(db_url: str, request: pytest.FixtureRequest) -> AsyncIterator[PorchHttp]:
    """porch on this test's database (SQLite, then PostgreSQL) behind its gateway,
    reached over a channel and in-process."""
    running = await start_porch_http(db_url, request.param)
    yield running
    await stop_porch_http(running)


# What a schemathesis run checks: no 5xx, and nothing that contradicts the
# document (status, content type, headers, body schema).
SCHEMATHESIS_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def schemathesis_settings(examples: int) -> settings:
    """Hypothesis settings for a schemathesis run: repeatable, no deadline,
    nothing stored between runs."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
