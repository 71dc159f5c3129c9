"""The interceptor every porch call passes: authentication, authorization,
error mapping and the access log (one line per call, never a secret)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from contextvars import ContextVar
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from gateway import access
from porch_server import auth
from porch_server.errors import (
    InvalidArgument,
    PorchError,
    Unauthenticated,
    Unavailable,
    shortened,
)
from porch_server.messages import MAX_INPUT_DEPTH
from porch_server.models import Token
from porch_server.status import ANSWERED, code_of, message_of
from porch_server.store import Store

ACCESS_LOG = "porch.access"
log = logging.getLogger(ACCESS_LOG)
errors = logging.getLogger("porch.server")

INTERNAL_ERROR = "internal error: the server logged what went wrong"

SERVICE_PREFIX = "/porch.v1.PorchService/"

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

# The last secret hashed in this task and the tasks it starts, as
# (authorization, its secret's hash): a call through the in-process gateway
# is identified twice, by admit() and then by serve(), and hashes once.
_HASHED: ContextVar[tuple[str, str] | None] = ContextVar("porch_hashed_secret", default=None)
# What a call is told while the database does not answer.
DATABASE_SILENT = (
    "the database does not answer (the server's own SELECT 1 went unanswered): the call was"
    " not made; try again later"
)

# What a call is told that was waiting as the database stopped answering.
DATABASE_STOPPED = (
    "the database stopped answering while the call waited on it (the server's own SELECT 1"
    " went unanswered): what it asked may have been done; try again later"
)

# What _authorization finds when a call names more than one token.
_GIVEN_TWICE = object()


class PorchInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates, authorizes and logs every PorchService call."""

    def __init__(
        self,
        store: Store,
        executor: Executor,
        anonymous_reads: bool,
        services: Sequence[str] = (),
    ) -> None:
        self._store = store
        self._executor = executor
        self._anonymous_reads = anonymous_reads
        # The services the server serves, named to a call of a method it does not.
        self._services = tuple(services)
        # The wrapped handlers of each method, built on its first call: the
        # usual one, and one taking the request as a stream (see _known).
        self._handlers: dict[str, tuple[Handler, Handler]] = {}
        # Set once a stopping server's grace period is over: grpc.aio then
        # cancels the calls left, and their clients are told UNAVAILABLE.
        self.grace_over = False
        # Set while the database leaves SELECT 1 unanswered (the server's
        # housekeeping finds it): calls are refused at once, UNAVAILABLE,
        # rather than wait on it as long as the network lets them.
        self.database_silent = False
        # The tasks of the unary calls being served, and of them those that
        # cut_waiting cancelled.
        self._waiting: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()

    def cut_waiting(self) -> int:
        """End the unary calls being served, UNAVAILABLE (DATABASE_STOPPED),
        as the database stops answering (see database_silent): each would
        wait on it as long as the network lets it. Streams are left to the
        event hub, and a call waiting for its client's request is left to
        wait. Returns how many were ended."""
        cut = 0
        for task in self._waiting:
            if task not in self._cut:
                self._cut.add(task)
                task.cancel()
                cut += 1
        return cut

    def _cut_short(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether task's cancelling was cut_waiting's alone: if so, it is
        taken back (the call goes on to answer). One that grpc cancelled as
        well (its deadline passed, its client left, the grace ended) ends as
        that: the call is over, and its line says why."""
        if task is None or task not in self._cut:
            return False
        self._cut.discard(task)
        if task.cancelling() > 1:
            return False
        task.uncancel()
        return True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        full_method = handler_call_details.method
        handlers = self._handlers.get(full_method)
        if handlers is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return self._unknown(full_method)
            if not full_method.startswith(SERVICE_PREFIX):
                return handler
            method = full_method.removeprefix(SERVICE_PREFIX)
            # The request reaches serve as bytes, read only once its caller is
            # known: a body built to be costly to read costs an unknown caller nothing.
            read = _tolerant(handler.request_deserializer)
            if handler.unary_unary is not None:
                behavior: Any = handler.unary_unary
                serialize = handler.response_serializer
                usual: Any = grpc.unary_unary_rpc_method_handler
                streamed: Any = grpc.stream_unary_rpc_method_handler
            elif handler.unary_stream is not None:
                behavior, serialize = handler.unary_stream, _bytes_or(handler.response_serializer)
                usual = grpc.unary_stream_rpc_method_handler
                streamed = grpc.stream_stream_rpc_method_handler
            else:
                return handler
            unary = handler.unary_unary is not None
            serve = self._serving(method, read, behavior, unary)
            handlers = (
                usual(serve, response_serializer=serialize),
                streamed(serve, response_serializer=serialize),
            )
            self._handlers[full_method] = handlers
        known = self._known(full_method, handler_call_details.invocation_metadata)
        return handlers[0] if known else handlers[1]

    def _unknown(self, full_method: str) -> Handler:
        """The handler of a method the server does not serve: UNIMPLEMENTED,
        as grpc answers it, but naming the method and the services there
        are, and with an access line (grpc writes none). Built for each such
        call, not kept: a client can name any number of methods. Its
        request, of whatever kind, is never read."""
        services = ", ".join(self._services)
        message = f"unknown method {shortened(full_method)!r}" + (
            f": this server serves {services} (reflection lists their methods)" if services else ""
        )

        async def refuse(requests: Any, context: Context) -> None:
            start = time.perf_counter()
            peer = context.peer()
            try:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            finally:
                authorization = _authorization(context.invocation_metadata())
                named = _field(full_method)
                _log_call(named, context, None, authorization, start, False, peer=peer)

        return grpc.stream_stream_rpc_method_handler(refuse)

    def _known(self, full_method: str, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """Whether a call's caller is settled without a round trip: a token
        this process found valid less than TOKEN_CACHE_SECONDS ago, or none,
        for a read the server lets anyone make.

        grpc reads a unary call's request whole before its handler runs: up
        to 4 MiB, held while the call lasts, and a caller may open many calls
        at once. A call whose caller is not settled so gets the handler that
        takes its request as a stream: started once the call's metadata has
        arrived, it looks the token up and reads the message only if the
        caller may make the call, so an unknown one is refused at once and
        most of what it sent is never held.
        """
        method = full_method.removeprefix(SERVICE_PREFIX)
        rule = auth.RULES.get(method)
        if rule is None:
            return True
        authorization = _authorization(metadata)
        if not authorization:
            return self._anonymous_reads and rule.access is auth.Access.READ
        if not isinstance(authorization, str):  # bytes, or given twice
            return False
        try:
            secret_hash = _secret_hash(authorization)
        except PorchError:
            return False
        return self._store.cached_token(secret_hash) is not None

    async def admit(
        self, path: str, metadata: Iterable[tuple[str, Any]], rights: bool = True
    ) -> tuple[grpc.StatusCode, str] | None:
        """Why a PorchService call with this metadata would be refused
        whatever its request (its token, with rights a role that may never
        call the method, or the database down while looking the token up),
        or None: the in-process gateway asks before it reads an HTTP
        request's body."""
        if not path.startswith(SERVICE_PREFIX):
            return None
        method = path.removeprefix(SERVICE_PREFIX)
        if method not in auth.RULES:
            return None
        authorization = _authorization(metadata)
        token = None
        task = asyncio.current_task()
        if task is not None:
            self._waiting.add(task)
        try:
            if self.database_silent:
                raise Unavailable(DATABASE_SILENT)
            token = await self._identify(method, authorization)
            if token is not None:
                auth.check_token(token)
                if rights:
                    auth.check_role(method, token)
        except PorchError as error:  # the token's, or the database down while looking
            code, message = code_of(error), message_of(error)
        except asyncio.CancelledError:
            if not self._cut_short(task):
                raise
            code, message = grpc.StatusCode.UNAVAILABLE, DATABASE_STOPPED
        except Exception:  # as serve answers it: a fault, or a refusal porch has no word for
            errors.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_ERROR
        else:
            return None
        finally:
            if task is not None:
                self._waiting.discard(task)
                self._cut.discard(task)
        access.note(f"{method} {code.name} {_caller(token, authorization, code)}")
        return code, message

    async def _identify(self, method: str, authorization: Any) -> Token | None:
        """The token the call came with (its authorization metadata), revoked
        or not; None for an anonymous read the server allows. Unauthenticated
        for a missing, malformed or unknown token."""
        if authorization is _GIVEN_TWICE:  # refused, as the gateway refuses it
            raise Unauthenticated("malformed authorization: given more than once")
        is_read = auth.RULES[method].access is auth.Access.READ
        if not authorization and self._anonymous_reads and is_read:
            return None
        if isinstance(authorization, bytes):
            raise Unauthenticated("malformed authorization: expected 'Bearer <token>'")
        secret_hash = _secret_hash(authorization)
        found = self._store.cached_token(secret_hash)
        if found is None:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(self._executor, self._store.find_token, secret_hash)
        if found is None:
            raise Unauthenticated("unknown token")
        return found

    def _serving(
        self,
        method: str,
        read: Callable[[bytes], Any],
        behavior: Callable[[Any, Context], Awaitable[Any]],
        unary: bool,
    ) -> Callable[[bytes | AsyncIterator[bytes], Context], Awaitable[Any]]:
        """Wrap a method: a unary one's answer, or a streaming one that writes
        its messages with context.write and returns None. The wrapper is
        given the request's bytes, or a stream of its one request's bytes
        that it reads only once the caller may make the call (see _known),
        and reads them with read."""

        async def serve(data: bytes | AsyncIterator[bytes], context: Context) -> Any:
            start = time.perf_counter()
            token = None
            cancelled = unsent = False
            authorization = _authorization(context.invocation_metadata())
            # Read now: grpc forgets it once a call is cancelled.
            peer = context.peer()
            task = asyncio.current_task() if unary else None
            if task is not None:
                self._waiting.add(task)
            try:
                if self.database_silent:
                    raise Unavailable(DATABASE_SILENT)
                # Identified first, so that the access line of a call refused
                # (a revoked token, one without the right) names its token.
                token = await self._identify(method, authorization)
                if token is not None:
                    auth.check_token(token)
                if not isinstance(data, bytes):
                    # A call that ends before its request comes is not logged,
                    # as grpc runs no handler for such a unary call. It waits
                    # on its client, not the database: cut_waiting leaves it.
                    unsent = True
                    self._waiting.discard(task)
                    data = await _only_request(data)
                    if task is not None:
                        self._waiting.add(task)
                    unsent = False
                    if self.database_silent:  # fallen silent while the request came
                        raise Unavailable(DATABASE_SILENT)
                request = read(data)
                _check_read(request)
                if token is not None:
                    auth.authorize(method, token, request)
                auth.CALLER.set(token)
                return await behavior(request, context)
            except PorchError as error:
                await context.abort(code_of(error), message_of(error), ANSWERED)
            except asyncio.CancelledError:
                if self._cut_short(task):
                    unsent = False  # cut as its token was looked up, say
                    with contextlib.suppress(grpc.aio.UsageError):  # cut in its own abort
                        await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_STOPPED, ANSWERED)
                cancelled = True
                raise
            except grpc.aio.AbortError:
                raise
            except grpc.aio.InternalError:
                # A message the transport could not send (context.write): its
                # call is over, the client gone. grpc.aio cancels the task for
                # that, but a write waiting for room can fail first. Ended as
                # grpc.aio's cancelling would end it.
                cancelled = True
                raise asyncio.CancelledError from None
            except Exception:
                # A fault of porch's, or a refusal the database gave no
                # reason porch knows: the details go to the log, not the caller.
                errors.exception("%s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR, ANSWERED)
            finally:
                if task is not None:
                    self._waiting.discard(task)
                    self._cut.discard(task)
                if not unsent:
                    cut = cancelled and self.grace_over
                    _log_call(method, context, token, authorization, start, cancelled, cut, peer)

        return serve


def _secret_hash(authorization: str) -> str:
    """The hash of the secret an authorization carries, hashed once a task
    (see _HASHED); Unauthenticated for one that is malformed."""
    hashed = _HASHED.get()
    if hashed is not None and hashed[0] == authorization:
        return hashed[1]
    secret_hash = auth.hash_secret(auth.bearer_secret(authorization))
    _HASHED.set((authorization, secret_hash))
    return secret_hash


async def _only_request(requests: AsyncIterator[bytes]) -> bytes:
    """The one request of a unary call taken as a stream (see _known).
    InvalidArgument for a call its client ended without one (a gateway's
    probe of a caller ends so), or CancelledError: grpc.aio ends the stream
    of a call cancelled (its deadline passed, its client gone, the server
    stopping) a turn of the event loop before it cancels the handler."""
    async for data in requests:
        return data
    await asyncio.sleep(0)
    raise InvalidArgument("the call ended without its request")


class _Unread:
    """A request whose bytes could not be read as its message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """The deserializer, giving _Unread instead of raising: grpc would answer
    UNKNOWN with the Python exception, where the caller should learn that
    its request was at fault."""
    if deserialize is None:
        return lambda data: data

    def read(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return _Unread(str(error))

    return read


def _check_read(request: Any) -> None:
    if not isinstance(request, _Unread):
        return
    if "MaxDepth" in request.reason:  # upb's "Exceeded upb_DecodeOptions_MaxDepth"
        raise InvalidArgument(
            "the request nests too deeply for protobuf to read (100 levels of messages,"
            " of which each object or list in a task_input takes two or three): a"
            f" task_input may nest at most {MAX_INPUT_DEPTH} levels"
        )
    raise InvalidArgument(
        f"the request could not be read ({request.reason}): it is not a valid message"
    )


def _authorization(metadata: Iterable[tuple[str, Any]] | None) -> Any:
    """The `authorization` value of a call's metadata, None, or _GIVEN_TWICE:
    which of two tokens is meant, porch cannot tell."""
    found = None
    for key, value in metadata or ():
        if key == "authorization":
            if found is not None:
                return _GIVEN_TWICE
            found = value
    return found


def _bytes_or(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A serializer that passes bytes through: a stream may send a message it
    serialized once for many streams."""

    def serialize_message(message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        assert serialize is not None
        return serialize(message)

    return serialize_message


# Seconds before its deadline within which a call its client ended is taken
# to have ended for its deadline (see _log_call).
DEADLINE_SLACK = 0.1


def _log_call(
    method: str,
    context: Context,
    token: Token | None,
    authorization: Any,
    start: float,
    cancelled: bool,
    cut: bool = False,
    peer: str | None = None,
) -> None:
    """Write the call's access line: method, status code, time, the
    client's address (peer, as context.peer() gave it while the call
    lasted) and caller (token, the one found; authorization, the metadata
    value it was sent as, or None). A call through the gateway in
    this process adds them to the HTTP request's line instead, which the
    gateway writes to the same logger.

    A call whose task was cancelled is UNAVAILABLE when the server cut it
    (cut: its grace period over, as it stops), else DEADLINE_EXCEEDED when
    its deadline has passed or is at most DEADLINE_SLACK away, else
    CANCELLED (the client left): grpc.aio's context does not say so yet when
    the handler ends. The slack is for the client's own timer, which started
    as the call left it, before the server's, and so ends the call first. A token's
    description is escaped, as it may hold anything, a line break included.
    A call that sent a token porch does not know (or cannot read) is from
    "unknown token"; one that sent none, "anonymous"; one that sent two,
    "two tokens"; one that failed before its token was looked up (the
    database down, say), "token not checked".
    """
    if not log.isEnabledFor(logging.INFO):
        return
    if cut:
        code = grpc.StatusCode.UNAVAILABLE
    elif cancelled:
        remaining = context.time_remaining()
        late = remaining is not None and remaining <= DEADLINE_SLACK
        code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
    else:
        code = context.code() or grpc.StatusCode.OK
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    who = _caller(token, authorization, code)
    if access.note(f"{method} {name} {who}"):
        return
    elapsed_ms = (time.perf_counter() - start) * 1000
    log.info("%s %s %.1fms %s %s", method, name, elapsed_ms, _peer(peer), who)


@functools.lru_cache(maxsize=1024)
def _peer(peer: str | None) -> str:
    """Where a call came from, as its access line gives it: gRPC's
    `ipv4:10.1.2.3:50422` as `10.1.2.3:50422`, `ipv6:[::1]:50422` as
    `[::1]:50422` (the HTTP access line's forms), any other kind of address
    (`unix:/run/porch.sock`) whole; escaped, as a line's every field is.
    Cached: a few clients make most calls."""
    if not peer:
        return "-"
    kind, colon, address = peer.partition(":")
    if colon and kind in ("ipv4", "ipv6"):
        peer = urllib.parse.unquote(address)  # grpc sends ipv6:%5B::1%5D:50422
    return _field(peer)


def _field(text: str) -> str:
    """text a client chose, as one field of an access line: escaped, its
    spaces too, so that it can forge neither a field nor a line."""
    return access.escape(text).replace(" ", "\\x20")


def _caller(token: Token | None, authorization: Any, code: Any) -> str:
    """Who made a call, for its access line (see _log_call)."""
    if token is not None:
        return f"token {token.token_id} ({access.escape(token.description)})"
    if authorization is None:
        return "anonymous"
    if authorization is _GIVEN_TWICE:
        return "two tokens"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "unknown token"
    return "token not checked"  # the call failed before its token could be looked up
