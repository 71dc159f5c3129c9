"""The one grpc.aio channel to the gRPC server, and the calls made on it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import GatewayError, invalid_argument, quoted
from gateway.options import DEFAULT_MAX_REQUEST_BYTES, ClientTLS
from gateway.transcode import message_class

logger = logging.getLogger(__name__)

# What a caller is told, in place of gRPC's words, which can name the
# server's address and a TLS fault, of an UNAVAILABLE or CANCELLED that came
# with no metadata: the server could not be reached, or gRPC ended the call
# as the server stopped (CANCELLED for one that came as it began to,
# UNAVAILABLE for one its grace cut short), which neither can tell apart
# from the other. Not the caller's 499.
UNREACHABLE = (
    "the server behind this gateway could not be reached, or ended the call as it stopped;"
    " try again later"
)
# What a call is told that reached the server and was cut short as the
# server's shutdown grace ended (gRPC's words for it, GRACE_ENDED).
CUT_SHORT = (
    "the server behind this gateway stopped before the call was done (its shutdown grace"
    " ended): what it asked may have been done; try again later"
)
GRACE_ENDED = "Cancelling all calls"

# The codes of those calls, which gRPC ends without a word from the server.
_ENDED_BY_GRPC = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

Metadata = list[tuple[str, str | bytes]]


@dataclass(frozen=True)
class CallOptions:
    """What every call of one HTTP request carries: metadata and a timeout in seconds."""

    metadata: Metadata
    timeout: float | None


METADATA_PREFIX = "grpc-metadata-"
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
# Set by the transport itself; a client must not smuggle them in.
_RESERVED_KEYS = {"content-type", "te", "user-agent", "host", "connection"}
_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class UnaryReply(NamedTuple):
    """A unary call's response with the metadata sent before and after it."""

    response: Message
    initial: Sequence[tuple[str, str | bytes]]
    trailing: Sequence[tuple[str, str | bytes]]


class StreamCall(Protocol):
    """A server-streaming call as the gateway reads it."""

    async def read(self) -> Any:
        """The next message; anything else (EOF, None) at the end; AioRpcError on failure."""

    async def initial_metadata(self) -> Any:
        """The call's initial metadata."""

    def cancel(self) -> bool:
        """Cancel the call."""

    async def code(self) -> grpc.StatusCode:
        """The call's status code, once it has ended."""


class UpstreamCalls(Protocol):
    """Where the gateway sends its calls: a channel (Upstream) or handlers in this
    process (gateway.local.LocalUpstream)."""

    target: str

    async def unary_call(
        self,
        method: MethodDescriptor,
        message: Message,
        metadata: Metadata,
        time_limit: float | None,
    ) -> UnaryReply:
        """Call a unary method: its response and metadata, or AioRpcError."""

    def stream_call(
        self,
        method: MethodDescriptor,
        message: Message,
        metadata: Metadata,
        time_limit: float | None,
    ) -> StreamCall:
        """Start a server-streaming call."""

    async def admit(self, method: MethodDescriptor, metadata: Metadata, rights: bool) -> None:
        """AioRpcError when a call with this metadata would be refused whatever
        its request (an unknown caller, say; with rights, also a caller whose
        rights never allow the call): the gateway asks before it reads the
        request's body."""

    def probe(self, method: MethodDescriptor, metadata: Metadata) -> Probe | None:
        """A call begun with this metadata and no request, whose server may
        refuse the caller while the gateway reads a large body (see Probe),
        or None where admit judges the caller already."""

    async def health(self, service: str, deadline: float) -> str:
        """The serving status the health service reports, or the failed call's code name."""

    async def close(self) -> None:
        """Release what the upstream holds."""


# The codes of a refusal of the caller, which a server may give from a
# call's metadata alone.
_CALLER_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class Probe:
    """A call begun with a request's metadata, its request never sent.

    A server that judges a caller from the call's metadata alone (porch's
    refuses an unknown token so) ends it with that refusal, and the gateway,
    reading a large body meanwhile, need not read the rest. Otherwise it
    waits for a request that never comes, and is cancelled once the body
    has been read; the request then goes in a call of its own, as any
    other, its time limit running from then.
    """

    def __init__(self, call: grpc.aio.StreamStreamCall[bytes, bytes]) -> None:
        self._call = call
        self._closing: asyncio.Task[None] | None = None

    async def refused(self) -> grpc.aio.AioRpcError:
        """The server's refusal of the caller, once it comes; it never comes
        from a server that takes the caller, or does not judge it so."""
        code = await self._call.code()
        if code not in _CALLER_REFUSED:
            await asyncio.get_running_loop().create_future()  # never: the call tells
        return grpc.aio.AioRpcError(
            code,
            await self._call.initial_metadata(),
            await self._call.trailing_metadata(),
            await self._call.details(),
            None,
        )

    def close(self) -> None:
        """End the call: half-closed, sending nothing, so that a server judging
        the caller meanwhile ends it as one whose client sent no request
        (porch's logs no such call) rather than one its client cancelled;
        cancelled PROBE_SECONDS later if the server has not ended it (one
        that runs no handler until a request comes never does)."""
        if self._closing is None and not self._call.done():
            self._closing = asyncio.ensure_future(self._end())
            _CLOSING.add(self._closing)
            self._closing.add_done_callback(_CLOSING.discard)

    async def _end(self) -> None:
        try:
            await self._call.done_writing()
            await asyncio.wait_for(self._call.code(), PROBE_SECONDS)
        except (TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            pass
        finally:
            self._call.cancel()


# Seconds a probe half-closed may wait for its server to end it.
PROBE_SECONDS = 5.0
# Probes being ended, held until they are.
_CLOSING: set[asyncio.Task[None]] = set()


class _Reach:
    """Whether the server at target answers: gRPC's words for a failure to
    reach it go to the log once each time they change, not to the caller."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._failing: tuple[grpc.StatusCode, str] | None = None

    def answered(self) -> None:
        """Note an answer from the server."""
        if self._failing is not None:
            self._failing = None
            logger.warning("the gRPC server at %s answers again", self.target)

    def told(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """error as the caller is told it. gRPC sends no metadata with a
        failure of its own; a server may (porch's does with every error)."""
        if error.initial_metadata() or error.trailing_metadata():
            self.answered()
            return error
        if error.code() not in _ENDED_BY_GRPC:
            return error
        details = error.details() or ""
        if (error.code(), details) != self._failing:
            self._failing = (error.code(), details)
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                logger.warning("cannot reach the gRPC server at %s: %s", self.target, details)
            else:
                logger.warning(
                    "the gRPC server at %s ended a call unanswered, most likely as it stopped: %s",
                    self.target,
                    details,
                )
        empty = grpc.aio.Metadata()
        said = CUT_SHORT if details == GRACE_ENDED else UNREACHABLE
        return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, empty, empty, said, None)


class _Stream:
    """A server-streaming call whose failures are told as _Reach tells them."""

    def __init__(self, call: grpc.aio.UnaryStreamCall[Message, Message], reach: _Reach) -> None:
        self._call = call
        self._reach = reach

    async def read(self) -> Any:
        """The next message; anything else (EOF) at the end; AioRpcError on failure."""
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise self._reach.told(error) from None
        self._reach.answered()
        return message

    async def initial_metadata(self) -> Any:
        """The call's initial metadata."""
        return await self._call.initial_metadata()

    def cancel(self) -> bool:
        """Cancel the call."""
        return self._call.cancel()

    async def code(self) -> grpc.StatusCode:
        """The call's status code, once it has ended."""
        return await self._call.code()


class Upstream:
    """Creates the channel on first use (inside the serving event loop) and closes it."""

    def __init__(
        self,
        target: str,
        tls: ClientTLS | None = None,
        channel_options: Sequence[tuple[str, str | int]] = (),
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.target = target
        self._tls = tls
        self._channel_options = tuple(channel_options)
        self._max_request_bytes = max_request_bytes
        self._channel: grpc.aio.Channel | None = None
        self._callables: dict[str, Any] = {}
        self._probes: dict[str, grpc.aio.StreamStreamMultiCallable[bytes, bytes]] = {}
        self._reach = _Reach(target)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The shared channel, created on first use."""
        if self._channel is None:
            if self._tls is None:
                self._channel = grpc.aio.insecure_channel(
                    self.target, options=self._channel_options
                )
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=self._tls.root_certificates,
                    private_key=self._tls.private_key,
                    certificate_chain=self._tls.certificate_chain,
                )
                self._channel = grpc.aio.secure_channel(
                    self.target, credentials, options=self._channel_options
                )
        return self._channel

    async def close(self) -> None:
        """Close the channel, cancelling calls still in flight."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._callables.clear()
            self._probes.clear()
            await channel.close(None)

    def unary(self, method: MethodDescriptor) -> grpc.aio.UnaryUnaryMultiCallable[Message, Message]:
        """A callable for a unary method, built from its descriptor."""
        if method.full_name not in self._callables:
            self._callables[method.full_name] = self.channel.unary_unary(
                method_path(method),
                request_serializer=_serialize,
                response_deserializer=message_class(method.output_type).FromString,
            )
        callable_: grpc.aio.UnaryUnaryMultiCallable[Message, Message] = self._callables[
            method.full_name
        ]
        return callable_

    def stream(
        self, method: MethodDescriptor
    ) -> grpc.aio.UnaryStreamMultiCallable[Message, Message]:
        """A callable for a server-streaming method, built from its descriptor."""
        if method.full_name not in self._callables:
            self._callables[method.full_name] = self.channel.unary_stream(
                method_path(method),
                request_serializer=_serialize,
                response_deserializer=message_class(method.output_type).FromString,
            )
        callable_: grpc.aio.UnaryStreamMultiCallable[Message, Message] = self._callables[
            method.full_name
        ]
        return callable_

    async def unary_call(
        self,
        method: MethodDescriptor,
        message: Message,
        metadata: Metadata,
        time_limit: float | None,
    ) -> UnaryReply:
        """Call a unary method: its response and metadata, or AioRpcError."""
        self._check_size(message)
        call = self.unary(method)(message, metadata=metadata, timeout=time_limit)
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            raise self._reach.told(error) from None
        self._reach.answered()
        return UnaryReply(
            response, tuple(await call.initial_metadata()), tuple(await call.trailing_metadata())
        )

    def _check_size(self, message: Message) -> None:
        """GatewayError (413) for a request larger than the server accepts:
        JSON's numbers and objects can take several times their text's bytes
        as protobuf, so a body within the HTTP limit may become one. The
        server would refuse it with RESOURCE_EXHAUSTED, which reads as 429,
        a request to retry."""
        size, limit = message.ByteSize(), self._max_request_bytes
        if size > limit:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request takes {size:,} bytes as protobuf, more than the {limit:,} "
                "the gRPC server accepts: send less in one request",
                http_status=413,
            )

    def stream_call(
        self,
        method: MethodDescriptor,
        message: Message,
        metadata: Metadata,
        time_limit: float | None,
    ) -> StreamCall:
        """Start a server-streaming call."""
        self._check_size(message)
        call = self.stream(method)(message, metadata=metadata, timeout=time_limit)
        return _Stream(call, self._reach)

    async def admit(self, method: MethodDescriptor, metadata: Metadata, rights: bool) -> None:
        """Nothing: a server at the end of a channel judges the call itself."""

    def probe(self, method: MethodDescriptor, metadata: Metadata) -> Probe:
        """Begin a call of method with this metadata and no request (see Probe)."""
        path = method_path(method)
        if path not in self._probes:
            self._probes[path] = self.channel.stream_stream(path, None, None)
        # With no request iterator, the call sends nothing until written to.
        return Probe(self._probes[path](None, metadata=metadata))

    async def health(self, service: str, deadline: float) -> str:
        """The serving status the health service reports, or the failed call's code name."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=deadline
            )
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def method_path(method: MethodDescriptor) -> str:
    """The gRPC path of a method: /package.Service/Method."""
    return f"/{method.containing_service.full_name}/{method.name}"


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def call_metadata(headers: Iterable[tuple[str, str]], forward: Iterable[str]) -> Metadata:
    """Metadata from HTTP headers: the forwarded ones, and `Grpc-Metadata-<key>` as `<key>`.

    A `-bin` key carries base64 in HTTP and bytes in gRPC. GatewayError (400)
    for a key or value gRPC cannot carry; 401 for such an authorization.
    """
    forwarded = {name.lower() for name in forward}
    metadata: Metadata = []
    for name, value in headers:
        name = name.lower()
        if name.startswith(METADATA_PREFIX):
            key = name[len(METADATA_PREFIX) :]
        elif name in forwarded:
            key = name
        else:
            continue
        if key == "authorization" and any(have == key for have, _ in metadata):
            raise _malformed_authorization("given more than once")
        metadata.append((key, _metadata_value(key, value)))
    return metadata


def _malformed_authorization(why: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.UNAUTHENTICATED, f"malformed authorization: {why}")


def _metadata_value(key: str, value: str) -> str | bytes:
    if not _METADATA_KEY.fullmatch(key) or key.startswith("grpc-") or key in _RESERVED_KEYS:
        raise invalid_argument(f"header for metadata key {quoted(key)} cannot be forwarded")
    if key.endswith("-bin"):
        try:
            return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise invalid_argument(f"metadata {quoted(key)} is not base64") from None
    if not value.isascii() or not value.isprintable():
        if key == "authorization":  # credentials no server can read: HTTP's 401
            raise _malformed_authorization("it has characters gRPC cannot carry")
        raise invalid_argument(f"metadata {quoted(key)} has characters gRPC cannot carry")
    return value


# The longest deadline a call is given: grpcio takes one some centuries
# away (Grpc-Timeout allows 99999999H, 11,000 years) as already passed; ten
# years is no deadline in practice.
LONGEST_TIMEOUT = 10 * 365 * 86_400.0


def call_timeout(headers: Mapping[str, str], default: float | None) -> float | None:
    """The deadline from a `Grpc-Timeout` header (e.g. `10S`, `500m`), else the default."""
    text = headers.get("grpc-timeout")
    if text is None:
        return default
    found = _TIMEOUT.fullmatch(text.strip())
    if found is None:
        raise invalid_argument(
            f"Grpc-Timeout {quoted(text)} is not a number and one of the units H M S m u n"
        )
    return min(int(found.group(1)) * _TIMEOUT_UNITS[found.group(2)], LONGEST_TIMEOUT)


# The metadata key through which a server chooses the HTTP status (say 201);
# it is read, not forwarded as a header.
HTTP_CODE_KEY = "x-http-code"


# What gRPC allows in a metadata key, and in a value that is text.
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_METADATA_TEXT = re.compile(r"[\x20-\x7e]*")


def response_headers(
    metadata: Iterable[tuple[str, str | bytes]],
    skip: Iterable[str],
    prefix: str = "Grpc-Metadata-",
) -> dict[str, str]:
    """Metadata of a call as `<prefix><key>` response headers: `Grpc-Metadata-`
    for initial metadata, `Grpc-Trailer-` for trailing metadata. A key given
    more than once is one header of its values in order, comma-separated,
    as HTTP combines a field's lines (RFC 9110, 5.3)."""
    skipped = set(skip)
    headers: dict[str, str] = {}
    for key, value in metadata:
        if key in skipped or key.startswith("grpc-"):
            continue
        text = base64.b64encode(value).decode() if isinstance(value, bytes) else value
        if not (_METADATA_KEY.fullmatch(key) and _METADATA_TEXT.fullmatch(text)):
            # No gRPC server could send it (an in-process handler's, say), and
            # as a header it could end the answer early or break its framing.
            logger.warning("metadata %r is not sent as a header: not a gRPC key and value", key)
            continue
        name = f"{prefix}{key}"
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    return headers


def error_metadata_headers(error: grpc.aio.AioRpcError, skip: Iterable[str]) -> dict[str, str]:
    """A failed call's metadata as response headers, as a call that succeeded
    would have them."""
    initial = cast(Iterable[tuple[str, str | bytes]], error.initial_metadata() or ())
    trailing = cast(Iterable[tuple[str, str | bytes]], error.trailing_metadata() or ())
    return {
        **response_headers(initial, skip),
        **response_headers(trailing, skip, prefix="Grpc-Trailer-"),
    }
