"""The gateway's configuration: small frozen values, built once by the caller."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# What a gRPC server accepts in one message unless told otherwise.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ClientTLS:
    """TLS for the channel to the gRPC server; PEM bytes, all optional."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None


@dataclass(frozen=True)
class MethodOptions:
    """HTTP behaviour of one method that its descriptor cannot express."""

    # Streaming: the field of each message whose value becomes the SSE `id:`.
    sse_id_field: str | None = None
    # Streaming: the request field set from the `Last-Event-ID` header of a
    # reconnecting client (dotted for nested fields).
    last_event_id_field: str | None = None
    # Success statuses besides 200 that the server may choose through the
    # `x-http-code` response metadata, e.g. (201,): documented in OpenAPI.
    other_success_statuses: tuple[int, ...] = ()
    # False when the server always chooses one of those: 200 is then not
    # documented as an answer.
    may_answer_200: bool = True


@dataclass(frozen=True)
class SchemaAlias:
    """An extra `components.schemas` entry: a copy of another schema under a fixed name."""

    name: str
    # Full protobuf name of the message or enum to copy, e.g. "pkg.v1.Task.State".
    full_name: str
    # Leave the zero value (the "unspecified" sentinel) out of an enum's names.
    omit_zero_enum_value: bool = False


@dataclass(frozen=True)
class DocumentOptions:
    """What the generated OpenAPI document says beyond the descriptors."""

    title: str = "API"
    version: str = "0.0.0"
    description: str = ""
    # Serialized FileDescriptorSets built with source info: the proto comments.
    descriptor_sets: tuple[bytes, ...] = ()
    aliases: tuple[SchemaAlias, ...] = ()
    # Server URLs for the `servers` list; the document's own origin when empty.
    servers: tuple[str, ...] = ()
    # Declare bearer-token authentication for every operation.
    bearer_auth: bool = True
    # JSON Schema keywords added to a field's schema wherever the field
    # appears (property, path or query parameter), keyed by the field's full
    # name, e.g. {"pkg.v1.Thing.name": {"maxLength": 255}}: the limits the
    # server enforces, which descriptors cannot state.
    field_schemas: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # JSON Schema keywords added to one route's parameter, keyed by the route
    # as its rule writes it and then by the parameter's name, e.g.
    # {"POST /v1/things/{name}": {"kind": {"enum": ["SMALL"]}}}: where what
    # the path names rules out values the field takes elsewhere.
    route_parameters: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True)
class GatewayOptions:
    """Everything create_app needs: the services to expose and where they run."""

    services: tuple[ServiceDescriptor, ...]
    target: str
    # The gRPC address to show people (on the index page) when `target` is one
    # they cannot use themselves, such as a private Unix socket.
    public_target: str | None = None
    tls: ClientTLS | None = None
    # Extra grpc channel arguments, e.g. (("grpc.max_receive_message_length", n),).
    channel_options: tuple[tuple[str, str | int], ...] = ()
    document: DocumentOptions = DocumentOptions()
    # Keyed by full method name, e.g. "pkg.v1.Service.Watch".
    methods: Mapping[str, MethodOptions] = field(default_factory=lambda: MappingProxyType({}))
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The largest request message the server accepts (gRPC's default): one
    # larger is answered 413 before it is sent over a channel.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Seconds a request's whole body may take to arrive: 4 MiB at 70 KB/s.
    max_body_seconds: float = 60.0
    # Deadline of unary calls, in seconds, unless the request sends Grpc-Timeout.
    default_timeout: float | None = None
    # Upper bound on the pages an auto-paginated binding follows.
    max_pages: int = 10_000
    # HTTP headers forwarded as metadata under their lower-cased names.
    forward_headers: tuple[str, ...] = ("authorization",)
    # Metadata keys kept from the response's headers: the server's own
    # signals to its clients (x-http-code, which sets the status, always is).
    hidden_metadata: tuple[str, ...] = ()
    openapi_paths: tuple[str, ...] = ("/openapi.json",)
    docs_path: str | None = "/docs"
    index_path: str | None = "/"
    health_path: str | None = "/healthz"
    # Service name asked about by the health check; "" is the whole server.
    health_service: str = ""
    health_timeout: float = 5.0
    # The logger of the access log, one line per HTTP request (gateway.access);
    # None for no access log.
    access_log: str | None = "gateway.access"
