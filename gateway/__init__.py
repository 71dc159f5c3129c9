"""A generic HTTP/JSON gateway to gRPC services, driven by `google.api.http` rules.

Given service descriptors and a gRPC target (or, for handlers in the same
process, a `LocalUpstream`), `create_app` builds an ASGI app that transcodes
HTTP/JSON requests into gRPC calls, serves an OpenAPI 3.1 description
generated from the descriptors, interactive docs and a health check;
`serve` / `HttpServer` run it under uvicorn.

    Exception
     └── GatewayError   a request the gateway rejects itself (code, message, HTTP status)

It never imports the services' implementation: only their descriptors.
"""

from gateway.app import Gateway, create_app
from gateway.errors import HTTP_STATUS, GatewayError
from gateway.jsonparse import (
    NotJson,
    UnreadableJson,
    inexact_integer,
    json_leaves,
    read_json,
)
from gateway.local import HandlerRegistry, LocalUpstream
from gateway.openapi import build_openapi
from gateway.options import (
    ClientTLS,
    DocumentOptions,
    GatewayOptions,
    MethodOptions,
    SchemaAlias,
)
from gateway.protojson import integral_numbers
from gateway.rules import Binding, PathTemplate, RouteTable, load_bindings, parse_template
from gateway.server import HttpServer, ServerTLS, serve
from gateway.transcode import message_to_dict
from gateway.upstream import Upstream

__all__ = [
    "HTTP_STATUS",
    "Binding",
    "ClientTLS",
    "DocumentOptions",
    "Gateway",
    "GatewayError",
    "GatewayOptions",
    "HandlerRegistry",
    "HttpServer",
    "LocalUpstream",
    "MethodOptions",
    "NotJson",
    "PathTemplate",
    "RouteTable",
    "SchemaAlias",
    "ServerTLS",
    "UnreadableJson",
    "Upstream",
    "build_openapi",
    "create_app",
    "inexact_integer",
    "integral_numbers",
    "json_leaves",
    "load_bindings",
    "message_to_dict",
    "parse_template",
    "read_json",
    "serve",
]
