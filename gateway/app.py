"""The ASGI application: transcoded routes, errors, streaming, OpenAPI, docs and health."""

from __future__ import annotations

import asyncio
import functools
import html
import logging
from collections.abc import AsyncIterator, Collection, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote

import grpc
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Mount, NoMatchFound, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gateway.access import AccessLog
from gateway.errors import (
    GatewayError,
    challenge_headers,
    quoted,
    rpc_error_json,
    rpc_error_status,
    status_json,
)
from gateway.openapi import EVENT_STREAM, build_openapi
from gateway.options import GatewayOptions, MethodOptions
from gateway.rules import (
    NEXT_PAGE_TOKEN,
    PAGE_TOKEN,
    Binding,
    RouteMatch,
    RouteTable,
    load_bindings,
    resolve_field,
)
from gateway.server import CLOSED_EXTENSION, ClosedWatch
from gateway.streaming import Call, EventStreamFormat, StreamFormat, StreamResponse
from gateway.transcode import build_request, encode_json, response_json
from gateway.upstream import (
    HTTP_CODE_KEY,
    CallOptions,
    Probe,
    UnaryReply,
    Upstream,
    UpstreamCalls,
    call_metadata,
    call_timeout,
    error_metadata_headers,
    response_headers,
)

T = TypeVar("T")

logger = logging.getLogger(__name__)

JSON = "application/json"
# A body larger than this is read into its message on a thread of its own:
# the JSON is turned into protobuf in Python (0.4 s a MiB of small objects), which on
# the event loop would hold up every other call of the process meanwhile.
# Smaller ones, nearly all, are read at once, as a thread costs more than
# they do.
THREAD_BODY_BYTES = 64 * 1024
# Statuses that cannot carry the JSON body every transcoded answer has.
_BODILESS = {204, 205, 304}


class Gateway:
    """The state behind the app: routes, the upstream channel, the OpenAPI document."""

    def __init__(self, options: GatewayOptions, upstream: UpstreamCalls | None = None) -> None:
        self.options = options
        bindings = load_bindings(options.services)
        _check_method_options(bindings, options.methods)
        self.routes = RouteTable(bindings)
        self.upstream: UpstreamCalls = upstream or Upstream(
            options.target, options.tls, options.channel_options, options.max_request_bytes
        )
        document = build_openapi(options.services, options.document, options.methods)
        self.openapi = encode_json(document)
        self.closing = asyncio.Event()
        # Metadata that does not become a response header.
        self.hidden = (HTTP_CODE_KEY, *options.hidden_metadata)
        # One thread for large bodies: Python's parsing holds the GIL, so a
        # second thread would read no faster and take more of the loop's turns.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="gateway-body")

    def close_streams(self) -> None:
        """End every open stream cleanly (the gateway is going away)."""
        self.closing.set()

    async def transcode(self, request: Request, match: RouteMatch) -> Response | StreamResponse:
        """Answer one request bound to a gRPC method."""
        binding = match.binding
        options = self.options.methods.get(binding.method.full_name, MethodOptions())
        probe: Probe | None = None
        try:
            metadata = call_metadata(request.headers.items(), self.options.forward_headers)
            large = _large_body(request)
            # A caller the server would refuse whatever its request costs it no
            # body to read. Its rights are judged so only for a large body: with a
            # small one the server judges them with the request in hand, and its
            # refusal can say more (which pipeline the call was for, say).
            await self.upstream.admit(binding.method, metadata, rights=large)
            if large:
                # Over a channel, a call begun with the metadata alone, which a
                # server that refuses the caller so ends at once.
                probe = self.upstream.probe(binding.method, metadata)
            if probe is None:
                body = await self._read_body(request)
            else:
                body = await _unless_refused(self._read_body(request), probe)
                probe.close()
            overrides = []
            last_event_id = request.headers.get("last-event-id")
            if binding.server_streaming and options.last_event_id_field and last_event_id:
                overrides.append((options.last_event_id_field, last_event_id))
            message = await self._build_request(match, request, body, overrides)
            if binding.server_streaming:
                timeout = call_timeout(request.headers, None)
                call = self.upstream.stream_call(binding.method, message, metadata, timeout)
                return self._stream_response(request, match, options, call)
            timeout = call_timeout(request.headers, self.options.default_timeout)
            return await self._unary(request, match, message, CallOptions(metadata, timeout))
        except GatewayError as error:
            return error_response(error.http_status, error.body())
        except grpc.aio.AioRpcError as error:
            headers = error_metadata_headers(error, skip=self.hidden)
            return error_response(rpc_error_status(error), rpc_error_json(error), headers)
        finally:
            if probe is not None:
                probe.close()

    async def _read_body(self, request: Request) -> bytes:
        transfer = [
            coding.strip().lower()
            for header in request.headers.getlist("transfer-encoding")
            for coding in header.split(",")
        ]
        unknown = [coding for coding in transfer if coding != "chunked"]
        if unknown:
            # The server undoes only chunked: the body would be read still
            # encoded, as if it were not (RFC 9112, 6.1).
            message = (
                f"the request body is sent with Transfer-Encoding {', '.join(unknown)}: the"
                " gateway takes only chunked"
            )
            raise GatewayError(grpc.StatusCode.UNIMPLEMENTED, message, http_status=501)
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        seconds = self.options.max_body_seconds
        try:
            async with asyncio.timeout(seconds):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
        except TimeoutError:
            message = f"the request body did not arrive within {seconds:g} s"
            raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, message, 408) from None
        except ClientDisconnect:  # the client left: no fault of the gateway's
            raise _client_left() from None
        encodings = [
            coding.strip().lower()
            for header in request.headers.getlist("content-encoding")
            for coding in header.split(",")
        ]
        encoded = [coding for coding in encodings if coding not in ("", "identity")]
        if size and encoded:
            message = (
                f"the request body is sent with Content-Encoding {', '.join(encoded)}: send "
                "it uncompressed (the gateway does not decode bodies)"
            )
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message, http_status=415)
        return b"".join(chunks)

    async def _build_request(
        self,
        match: RouteMatch,
        request: Request,
        body: bytes,
        overrides: Sequence[tuple[str, str]],
    ) -> Message:
        query = _query_items(request)
        if len(body) <= THREAD_BODY_BYTES:
            return build_request(match, query, body, overrides)
        loop = asyncio.get_running_loop()
        build = functools.partial(build_request, match, query, body, overrides)
        return await loop.run_in_executor(self._reader, build)

    async def _unary(
        self, request: Request, match: RouteMatch, message: Message, options: CallOptions
    ) -> Response:
        binding = match.binding
        # If the client goes away, the call is cancelled too, as a gRPC
        # client's leaving would, so the server can undo what nobody will
        # hear of (a claim, say).
        call = self.upstream.unary_call(binding.method, message, options.metadata, options.timeout)
        watch = request.scope.get("extensions", {}).get(CLOSED_EXTENSION)
        if isinstance(watch, ClosedWatch):
            response, initial, trailing = await _unless_closed(call, watch)
        else:
            response, initial, trailing = await _unless_disconnected(call, request)
        payload = response_json(binding, response)
        headers = response_headers(initial, skip=self.hidden)
        if trailing:
            headers |= response_headers(trailing, self.hidden, prefix="Grpc-Trailer-")
        # An answer is the caller's own (a new token's secret, say): for no cache.
        headers["cache-control"] = "no-store"
        status = success_status((*initial, *trailing))
        token: str = getattr(response, NEXT_PAGE_TOKEN) if binding.paginates else ""
        if token:
            pages = _LaterPages(self, match, message, options)
            pages.check(token)
            return _ArrayResponse(
                pages.array(_array_items(payload), token, isinstance(payload, dict)),
                status_code=status,
                media_type=JSON,
                headers=headers,
            )
        return Response(encode_json(payload), status_code=status, media_type=JSON, headers=headers)

    def _stream_response(
        self, request: Request, match: RouteMatch, options: MethodOptions, call: Call
    ) -> StreamResponse:
        binding = match.binding
        accept = request.headers.get("accept", "")
        stream_format = EventStreamFormat() if EVENT_STREAM in accept else StreamFormat()
        id_field = options.sse_id_field

        def event_id(message: Message) -> str | None:
            return str(getattr(message, id_field)) if id_field else None

        return StreamResponse(
            call,
            stream_format,
            lambda message: response_json(binding, message),
            event_id,
            success_status,
            self.closing,
            self.hidden,
        )

    async def health(self, request: Request) -> Response:
        """200 when the gRPC server reports SERVING, else 503."""
        status = await self.upstream.health(
            self.options.health_service, self.options.health_timeout
        )
        return JSONResponse({"status": status}, status_code=200 if status == "SERVING" else 503)

    async def openapi_document(self, request: Request) -> Response:
        """The OpenAPI document."""
        return Response(self.openapi, media_type=JSON)

    async def index(self, request: Request) -> Response:
        """A small page that links to the docs and names the gRPC server."""
        root = request.scope.get("root_path", "")
        links = [(self.options.docs_path, "Interactive API documentation")]
        links += [(path, f"OpenAPI document ({path})") for path in self.options.openapi_paths]
        links.append((self.options.health_path, "Health"))
        items = "".join(
            f'<li><a href="{html.escape(root + path)}">{html.escape(text)}</a></li>'
            for path, text in links
            if path
        )
        title = html.escape(self.options.document.title)
        target = html.escape(self.options.public_target or self.options.target)
        return HTMLResponse(
            f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{title}</title></head>"
            f"<body><h1>{title}</h1>"
            f"<p>HTTP/JSON gateway to the gRPC server at <code>{target}</code>.</p>"
            f"<ul>{items}</ul></body></html>"
        )

    async def docs(self, request: Request) -> Response:
        """Swagger UI, from the assets of the swagger-ui-py package."""
        root = request.scope.get("root_path", "")
        static = html.escape(f"{root}{self.options.docs_path}/static")
        spec = encode_json(root + self.options.openapi_paths[0]).decode()
        title = html.escape(self.options.document.title)
        return HTMLResponse(
            f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="{static}/swagger-ui.css">
<link rel="stylesheet" href="{static}/index.css">
<link rel="icon" type="image/png" href="{static}/favicon-32x32.png" sizes="32x32">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{static}/swagger-ui-bundle.js"></script>
<script src="{static}/swagger-ui-standalone-preset.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: {spec},
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "StandaloneLayout",
  validatorUrl: null
}});
</script>
</body>
</html>
"""
        )

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Close the channel when the app shuts down."""
        try:
            yield
        finally:
            self.close_streams()
            self._reader.shutdown(wait=False)
            await self.upstream.close()


def _check_method_options(
    bindings: Sequence[Binding], methods: Mapping[str, MethodOptions]
) -> None:
    """Refuse, at start-up, options naming methods or fields that do not exist."""
    known = {binding.method.full_name: binding.method for binding in bindings}
    for name, options in methods.items():
        method = known.get(name)
        if method is None:
            raise ValueError(f"options for {name!r}: no such method with an HTTP rule")
        if options.sse_id_field and options.sse_id_field not in method.output_type.fields_by_name:
            raise ValueError(
                f"{name}: sse_id_field {options.sse_id_field!r} is not a response field"
            )
        resume = options.last_event_id_field
        if resume and resolve_field(method.input_type, resume.split(".")) is None:
            raise ValueError(f"{name}: last_event_id_field {resume!r} is not a request field")


def _too_large(limit: int) -> GatewayError:
    message = f"the request body is larger than {limit} bytes"
    return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, http_status=413)


def success_status(metadata: Sequence[tuple[str, str | bytes]] | Any) -> int:
    """200, or the status the server chose through `x-http-code` metadata
    (initial or trailing: trailing metadata rides with the response and costs
    the server no separate send)."""
    for key, value in metadata or ():
        if key != HTTP_CODE_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if text.isdigit() and 200 <= int(text) <= 599 and int(text) not in _BODILESS:
            return int(text)
        logger.warning("ignoring %s %r: not a status that can carry a body", HTTP_CODE_KEY, text)
    return 200


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    """An error as `google.rpc.Status` JSON, with the headers its status asks."""
    headers = {**challenge_headers(status), **(headers or {})}
    return Response(encode_json(body), status_code=status, media_type=JSON, headers=headers)


class _EndedAtShutdown:
    """Answers a request that the HTTP server ends when its shutdown grace
    runs out (it cancels the request's task) with 503 and a Status body, as
    every other error is answered, where uvicorn would send a plain-text 500
    and log a traceback. An answer already begun is cut off."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        begun = False

        async def watched(message: Any) -> None:
            nonlocal begun
            begun = begun or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # answered here: the cancellation has been handled
            if begun:
                return
            body = status_json(
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down and ended this call; try again",
            )
            await error_response(503, body, {"Connection": "close"})(scope, receive, send)


class _PageFailed(Exception):
    """A later page of a bare-array answer failed after the answer began."""


class _LaterPages:
    """The pages after the first of a bare-array answer, fetched as the answer is sent.

    The client of a bare array cannot see page tokens, so the gateway follows
    them, a page at a time: memory holds one page, not the whole list.
    """

    def __init__(
        self, gateway: Gateway, match: RouteMatch, message: Message, options: CallOptions
    ) -> None:
        self._gateway = gateway
        self._binding = match.binding
        self._message = message
        self._options = options
        self._seen = {getattr(message, PAGE_TOKEN)}

    def check(self, token: str) -> None:
        """GatewayError (500) when the server repeats a token or gives too many pages."""
        if token in self._seen or len(self._seen) >= self._gateway.options.max_pages:
            reason = (
                "repeated a page token"
                if token in self._seen
                else f"has more than {len(self._seen)} pages"
            )
            raise GatewayError(
                grpc.StatusCode.INTERNAL, f"{self._binding.method.full_name} {reason}"
            )
        self._seen.add(token)

    async def array(self, first: bytes, token: str, is_map: bool) -> AsyncIterator[bytes]:
        """The JSON array (or object, for a map field) from the first page's
        items (as _array_items gives them), then page by page; _PageFailed
        if a later page fails."""
        opening, closing = (b"{", b"}") if is_map else (b"[", b"]")
        separator = opening
        items = first
        while True:
            if items:
                yield separator + items
                separator = b","
            if not token:
                break
            items, token = await self._page(token)
        yield closing if separator == b"," else opening + closing

    async def _page(self, token: str) -> tuple[bytes, str]:
        """The items of the page at token, as _array_items gives them, and the next token."""
        method = self._binding.method
        try:
            setattr(self._message, PAGE_TOKEN, token)
            response, _, _ = await self._gateway.upstream.unary_call(
                method, self._message, self._options.metadata, self._options.timeout
            )
            items = _array_items(response_json(self._binding, response))
            following: str = getattr(response, NEXT_PAGE_TOKEN)
            if following:
                self.check(following)
        except (GatewayError, grpc.aio.AioRpcError) as error:
            details = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
            logger.warning(
                "%s: page %d failed after the answer began; cutting it short: %s",
                method.full_name,
                len(self._seen),
                details,
            )
            raise _PageFailed from error
        except Exception as error:
            logger.exception(
                "%s: page %d failed after the answer began; cutting it short",
                method.full_name,
                len(self._seen),
            )
            raise _PageFailed from error
        return items, following


def _array_items(items: list[Any] | dict[str, Any]) -> bytes:
    """The items of a JSON array (or the members of an object) as JSON,
    without the brackets: b"" for none."""
    return encode_json(items)[1:-1]


class _ArrayResponse(StreamingResponse):
    """A JSON array (or a map's object) sent as it is fetched. When a later page fails, the body
    ends without its close: the server closes the connection mid-body, which
    the client sees as a broken response rather than a shorter list."""

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except _PageFailed:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _TranscodedRoutes(BaseRoute):
    """Every HTTP binding of the services, as one Starlette route.

    It comes first, since nearly every request is for it, but leaves the
    gateway's own pages (`pages`, and every path under `page_prefixes`) to
    their routes, whatever the bindings say.
    """

    def __init__(
        self, gateway: Gateway, pages: Collection[str], page_prefixes: tuple[str, ...]
    ) -> None:
        self.gateway = gateway
        self.pages = frozenset(pages)
        self.page_prefixes = page_prefixes

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return Match.NONE, {}
        path = _route_path(scope)
        if path in self.pages or path.startswith(self.page_prefixes):
            return Match.NONE, {}
        raw_path = _raw_path(scope)
        match = self.gateway.routes.resolve(scope["method"], raw_path)
        if match is None and scope["method"] == "HEAD":
            # A GET's answer without its body (the server sends none for
            # HEAD); not a stream's, which would never end.
            match = self.gateway.routes.resolve("GET", raw_path)
            if match is not None and match.binding.server_streaming:
                match = None
        if match is not None:
            return Match.FULL, {"gateway.match": match}
        allowed = self.gateway.routes.allowed_methods(raw_path)
        if allowed:
            return Match.PARTIAL, {"gateway.allowed": allowed}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = scope.get("gateway.match")
        if match is None:
            allowed = ", ".join(scope["gateway.allowed"])
            message = f"{quoted(scope['method'])} is not allowed here; allowed: {allowed}"
            body = status_json(grpc.StatusCode.UNIMPLEMENTED, message)
            response: Response | StreamResponse = error_response(405, body, {"Allow": allowed})
        else:
            response = await self.gateway.transcode(Request(scope, receive), match)
        await response(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)


async def _unless_closed(call: Coroutine[Any, Any, UnaryReply], watch: ClosedWatch) -> UnaryReply:
    """Await call in this task; cancel it if the connection closes first."""
    if watch.closed:
        call.close()
        raise _client_left()
    task = asyncio.current_task()
    assert task is not None
    left = False

    def leave() -> None:
        nonlocal left
        left = True
        task.cancel()

    watch.add(leave)
    try:
        answer = await call
    except BaseException:
        # The call may have turned the cancel into an error of its own.
        if left and task.uncancel() == 0:
            raise _client_left() from None
        raise
    finally:
        watch.remove(leave)
    if left and task.uncancel() == 0:  # a call that finished despite the cancel
        raise _client_left()
    return answer


async def _unless_disconnected(
    call: Coroutine[Any, Any, UnaryReply], request: Request
) -> UnaryReply:
    """Await call; cancel it if the client disconnects first. For servers
    without a ClosedWatch: a second task waits for the disconnect."""
    calling, _ = await _first_of(call, _disconnected(request))
    if not calling.done():
        raise _client_left()
    return calling.result()


def _large_body(request: Request) -> bool:
    """Whether a request's body is large: declared of more than
    THREAD_BODY_BYTES, or of a length not declared (chunked)."""
    # A Transfer-Encoding overrides a Content-Length (RFC 9112, 6.3).
    declared = request.headers.get("content-length")
    if "transfer-encoding" in request.headers:
        return True
    if declared is None:
        return False
    return not (declared.isdigit() and int(declared) <= THREAD_BODY_BYTES)


async def _unless_refused(reading: Coroutine[Any, Any, bytes], probe: Probe) -> bytes:
    """The body reading gives, unless the server refuses the caller first
    (see Probe): then its refusal, the rest of the body left unread."""
    body, refused = await _first_of(reading, probe.refused())
    if body.done() and not body.cancelled():
        return body.result()
    raise refused.result()


async def _first_of(
    work: Coroutine[Any, Any, T], rival: Coroutine[Any, Any, Any]
) -> tuple[asyncio.Future[T], asyncio.Future[Any]]:
    """Run work and rival until either ends, then cancel the other: work
    unfinished is cancelled (not done yet when this returns), rival always."""
    working = asyncio.ensure_future(work)
    racing = asyncio.ensure_future(rival)
    try:
        await asyncio.wait((working, racing), return_when=asyncio.FIRST_COMPLETED)
    finally:
        racing.cancel()
        if not working.done():
            working.cancel()
    return working, racing


def _client_left() -> GatewayError:
    return GatewayError(grpc.StatusCode.CANCELLED, "the client closed the connection")


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection. Called after the
    body has been read whole, when the next message can only say that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _query_items(request: Request) -> list[tuple[str, str]]:
    """The query's parameters, bytes that are not UTF-8 kept as surrogates
    (Starlette's would turn them into U+FFFD) for the request to refuse."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    return parse_qsl(query, keep_blank_values=True, errors="surrogateescape")


def _route_path(scope: Scope) -> str:
    """The decoded path as Starlette's routes match it: without the root path."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def _raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if raw is None:
        return quote(scope["path"])
    return bytes(raw).decode("latin-1").split("?", 1)[0]


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(
        error.status_code, grpc.StatusCode.UNKNOWN
    )
    message = "no route for this path" if error.status_code == 404 else error.detail
    return error_response(error.status_code, status_json(code, message), dict(error.headers or {}))


def create_app(options: GatewayOptions, upstream: UpstreamCalls | None = None) -> Starlette:
    """The gateway as an ASGI app; `app.state.gateway` is its Gateway.

    Calls go to a channel to `options.target` unless another upstream is
    given, such as a gateway.local.LocalUpstream for handlers in this process.
    """
    gateway = Gateway(options, upstream)
    # The document is served with and without a trailing slash, as the routes are.
    routes: list[BaseRoute] = [
        Route(each, gateway.openapi_document, methods=["GET"])
        for path in options.openapi_paths
        for each in (path, path + "/")
    ]
    page_prefixes: tuple[str, ...] = ()
    if options.docs_path:
        routes.append(Route(options.docs_path, gateway.docs, methods=["GET"]))
        static = StaticFiles(packages=[("swagger_ui", "static")])
        routes.append(Mount(f"{options.docs_path}/static", app=static))
        page_prefixes = (f"{options.docs_path}/static/",)
    if options.index_path:
        routes.append(Route(options.index_path, gateway.index, methods=["GET"]))
    if options.health_path:
        routes.append(Route(options.health_path, gateway.health, methods=["GET"]))
    pages = [route.path for route in routes if isinstance(route, Route)]
    routes.insert(0, _TranscodedRoutes(gateway, pages, page_prefixes))
    middleware = [Middleware(AccessLog, logger=options.access_log)] if options.access_log else []
    middleware.append(Middleware(_EndedAtShutdown))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return app
