"""porch's HTTP/JSON gateway: the generic gateway, configured for porch.v1."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from importlib import metadata, resources
from typing import Any

import gateway
from porch_server.config import CHANNEL_OPTIONS
from porch_server.interceptor import ACCESS_LOG
from porch_server.service import (
    BIDI_CONTROLS,
    MAX_BATCH,
    MAX_MESSAGE_BYTES,
    MAX_NAME,
    MAX_PIPELINE_TEXT,
)
from porch_server.status import ANSWERED
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
        field_schemas=_field_schemas(),
        # npg_porch's route names the pipeline the token is bound to: the
        # other roles are bound to none.
        route_parameters={
            "POST /pipelines/{pipeline_name}/token/{description}": {
                "role": {
                    "enum": ["PIPELINE"],
                    "description": "The route makes PIPELINE tokens only, the default.",
                }
            }
        },
    )


# For the patterns below, written as ECMA-262 reads them (Python reads them
# alike with re.fullmatch): control characters; those with the line and
# paragraph separators; and the white space that Python's str.strip takes
# off, named one by one, as ECMA-262's \s takes U+FEFF too and Python's not.
_CONTROLS = r"\u0000-\u001F\u007F-\u009F"
_BREAKS = _CONTROLS + r"\u2028\u2029"
_SPACES = r" \u00A0\u1680\u2000-\u200A\u202F\u205F\u3000"


def _character_class(codes: Iterable[int]) -> str:
    """Code points, in order, as a character class's body: \\uXXXX and ranges."""
    runs: list[tuple[int, int]] = []
    for code in codes:
        if runs and runs[-1][1] == code - 1:
            runs[-1] = (runs[-1][0], code)
        else:
            runs.append((code, code))
    return "".join(
        f"\\u{low:04X}" + (f"-\\u{high:04X}" if high > low else "") for low, high in runs
    )


def _one_line_text(refused: str) -> str:
    """The pattern of text that is not blank, on one line, without refused."""
    bad = _BREAKS + refused
    return f"^[^{bad}]*[^{_SPACES}{bad}][^{bad}]*$"


def _field_schemas() -> dict[str, dict[str, Any]]:
    """The limits the service checks, stated in the document for clients
    that validate or generate requests from it. Each is a condition every
    accepted value meets; the comments and the error messages say the rest
    (the other characters that do not print, which no name may hold either;
    a lease's upper bound; that a message's 64 KiB are counted in bytes)."""
    name = {"maxLength": MAX_NAME, "pattern": f"^[^/{_BREAKS}]*$"}
    task_input_id = {"pattern": "^[0-9a-f]{64}$"}
    # A token's id is a whole number from 1 (2^31 - 1 at most, not stated).
    token_id = {"pattern": "^[1-9][0-9]{0,9}$"}
    # The format characters (Unicode category Cf) of the Basic Multilingual
    # Plane: without ECMA-262's u flag a pattern cannot name those beyond it
    # (tag characters, a few of historic scripts), which are refused too.
    formats = _character_class(
        code for code in range(0x10000) if unicodedata.category(chr(code)) == "Cf"
    )
    bidi = _character_class(sorted(map(ord, BIDI_CONTROLS)))
    limits: dict[str, dict[str, Any]] = {
        "porch.v1.Pipeline.name": name,
        "porch.v1.GetPipelineRequest.name": name,
        "porch.v1.CreateTokenRequest.description": {
            "minLength": 1,
            "maxLength": MAX_NAME,
            "pattern": _one_line_text(bidi),
        },
        # A Task's schema serves answers too: what a request's task needs is
        # stated where the request holds it.
        "porch.v1.RegisterTaskRequest.task": {"required": ["pipeline", "task_input"]},
        "porch.v1.RegisterTasksRequest.tasks": {
            "minItems": 1,
            "maxItems": MAX_BATCH,
            "items": {"$ref": "#/components/schemas/porch.v1.Task", "required": ["task_input"]},
        },
        "porch.v1.UpdateTaskRequest.task": {"required": ["pipeline", "status"]},
        # Not empty: the claim's pipeline, unless its path names it.
        "porch.v1.ClaimTasksRequest.pipeline": {"properties": {"name": {"minLength": 1}}},
        "porch.v1.ClaimTasksRequest.num_tasks": {"minimum": 1},
        "porch.v1.Token.token_id": token_id,
        "porch.v1.CreateTokenResponse.token_id": token_id,
        # One a request names may have leading zeros.
        "porch.v1.RevokeTokenRequest.token_id": {"pattern": "^0*[1-9][0-9]*$"},
        # Positive: neither negative nor zero (at most 30 days, as its comment says).
        "porch.v1.ClaimTasksRequest.lease": {
            "pattern": r"^(?!-)(?![0.]*s$)[0-9]+(\.[0-9]{0,9})?s$"
        },
        "porch.v1.Task.claim_number": {"minimum": 0},
        # In characters, which a message of MAX_MESSAGE_BYTES bytes never exceeds.
        "porch.v1.UpdateTaskRequest.message": {"maxLength": MAX_MESSAGE_BYTES},
        # A task is never in the zero state, stored or asked for; an event's
        # old_status is, before its task existed, so the enum keeps it.
        "porch.v1.Task.status": {"$ref": "#/components/schemas/TaskStateEnum"},
        "porch.v1.GetTaskRequest.task_input_id": task_input_id,
        "porch.v1.ListTaskEventsRequest.task_input_id": task_input_id,
        "porch.v1.UpdateTaskRequest.task_input_id": task_input_id,
        # A pipeline elsewhere is named by its name alone; one made needs all
        # three, its uri and version within bounds (a pipeline made before
        # the bounds, or imported, may be answered with longer ones).
        "porch.v1.CreatePipelineRequest.pipeline": {
            "required": ["name", "uri", "version"],
            "properties": {
                # No space at either end, and not "." or "..", which no URL could name.
                "name": {
                    "minLength": 1,
                    "pattern": f"^[^/ {_BREAKS}]([^/{_BREAKS}]*[^/ {_BREAKS}])?$",
                    "not": {"enum": [".", ".."]},
                },
                **{
                    field: {
                        "minLength": 1,
                        "maxLength": longest,
                        "pattern": _one_line_text(formats),
                    }
                    for field, longest in MAX_PIPELINE_TEXT.items()
                },
            },
        },
    }
    for message in porch_pb2.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            if field.name == "pipeline_name":
                limits[field.full_name] = name
            elif field.name == "page_size":
                limits[field.full_name] = {"minimum": 0}
    return limits


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
        channel_options=CHANNEL_OPTIONS,
        # The mark of porch's own errors, for its gRPC clients (status.ANSWERED).
        hidden_metadata=tuple(key for key, _ in ANSWERED),
        **extra,
    )


def openapi_document() -> dict[str, Any]:
    """Return porch's OpenAPI 3.1 document."""
    return gateway.build_openapi((SERVICE,), _document(), _methods())
