"""porch's HTTP/JSON gateway: the generic gateway, configured for porch.v1."""

from __future__ import annotations

from importlib import metadata, resources
from typing import Any

import gateway
from porch_server.config import RECEIVE_LIMIT
from porch_server.interceptor import ACCESS_LOG
from porch_stubs.v1 import porch_pb2

SERVICE = porch_pb2.DESCRIPTOR.services_by_name["PorchService"]
# npg_porch_client reads the status enumeration from this document path and name.
OPENAPI_PATHS = ("/openapi.json", "/api/v1/openapi.json")
CREATES = ("CreatePipeline", "CreateToken", "RegisterTask", "RegisterTasks")
# Methods that always create, so always answer 201; the others, 200 when
# nothing new was made.
ALWAYS_CREATE = ("CreatePipeline", "CreateToken")


def _document() -> gateway.DocumentOptions:
    descriptors = resources.files("porch_stubs.v1").joinpath("porch.binpb").read_bytes()
    return gateway.DocumentOptions(
        title="porch",
        version=metadata.version("porch"),
        description=(
            "Each definition of pipeline work runs once and only once: register tasks "
            "(idempotently), claim them (never twice), report their status, watch events."
        ),
        descriptor_sets=(descriptors,),
        aliases=(
            gateway.SchemaAlias("TaskStateEnum", "porch.v1.Task.State", omit_zero_enum_value=True),
        ),
    )


def _methods() -> dict[str, gateway.MethodOptions]:
    methods = {
        f"porch.v1.PorchService.{name}": gateway.MethodOptions(
            other_success_statuses=(201,), may_answer_200=name not in ALWAYS_CREATE
        )
        for name in CREATES
    }
    methods["porch.v1.PorchService.WatchEvents"] = gateway.MethodOptions(
        sse_id_field="cursor", last_event_id_field="after"
    )
    return methods


def gateway_options(
    target: str,
    tls: gateway.ClientTLS | None = None,
    max_body_bytes: int | None = None,
) -> gateway.GatewayOptions:
    """Return the gateway's options for porch's service at target."""
    extra: dict[str, Any] = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    return gateway.GatewayOptions(
        services=(SERVICE,),
        target=target,
        tls=tls,
        document=_document(),
        methods=_methods(),
        openapi_paths=OPENAPI_PATHS,
        # Calls through the gateway get one line, HTTP and gRPC side together.
        access_log=ACCESS_LOG,
        channel_options=(RECEIVE_LIMIT,),
        **extra,
    )


def openapi_document() -> dict[str, Any]:
    """Return porch's OpenAPI 3.1 document."""
    return gateway.build_openapi((SERVICE,), _document(), _methods())
