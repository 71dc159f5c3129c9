"""gRPC status codes as HTTP statuses, and errors as `google.rpc.Status` JSON.

Exception
 └── GatewayError       a request the gateway answers itself (code + message)
"""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

# Imported for its side effect: the standard error detail types become
# known to the default pool, so `details` of upstream errors render as JSON.
_ERROR_DETAILS = error_details_pb2

logger = logging.getLogger(__name__)

# The standard mapping (google/rpc/code.proto, grpc-gateway, Envoy).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def challenge_headers(status: int) -> dict[str, str]:
    """The headers an error answer with this HTTP status must carry: for a
    401, how to authenticate (RFC 9110, 11.6.1), with a bearer token, as the
    gateway forwards an Authorization header as gRPC's metadata."""
    return {"www-authenticate": "Bearer"} if status == 401 else {}


class GatewayError(Exception):
    """An error the gateway reports itself, as a gRPC code and a message."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = HTTP_STATUS[code] if http_status is None else http_status

    def body(self) -> dict[str, Any]:
        """The error as `google.rpc.Status` JSON."""
        return status_json(self.code, self.message)


# The most characters of a value the caller sent that an error's message quotes.
QUOTED_CHARACTERS = 64


def quoted(value: object) -> str:
    """A value the caller sent, for an error's message: repr of a string's
    first QUOTED_CHARACTERS characters, with "…" after them when there were
    more (of another value, its repr so cut). Quoted whole, a value could
    make the message as long as the request."""
    if isinstance(value, str):
        cut = value[:QUOTED_CHARACTERS] + "…" if len(value) > QUOTED_CHARACTERS else value
        return repr(cut)
    shown = repr(value)
    return shown[:QUOTED_CHARACTERS] + "…" if len(shown) > QUOTED_CHARACTERS else shown


# In a message of protobuf's or Python's own, which quote values whole: a
# quoted run longer than quoted() leaves one, and a longer run of characters
# other than quotes and white space (a value not in quotes).
_LONG_QUOTE = re.compile(rf"""(['"])([^'"]{{{QUOTED_CHARACTERS}}})[^'"]+\1""")
_LONG_RUN = re.compile(rf"""[^\s'"…]{{{QUOTED_CHARACTERS + 1},}}""")


# The most characters of such a message kept: a value with white space in
# it and not in quotes is not found as one.
_MOST_OF_A_MESSAGE = 1024


def shorten_values(message: str) -> str:
    """message, a library's, with each value in it longer than
    QUOTED_CHARACTERS cut as quoted() cuts a value, and the whole cut at
    _MOST_OF_A_MESSAGE characters (saying so)."""
    message = _LONG_QUOTE.sub(lambda found: f"{found[1]}{found[2]}…{found[1]}", message)
    message = _LONG_RUN.sub(lambda found: found[0][:QUOTED_CHARACTERS] + "…", message)
    if len(message) <= _MOST_OF_A_MESSAGE:
        return message
    return f"{message[:_MOST_OF_A_MESSAGE]}… (cut: the message was {len(message):,} characters)"


def invalid_argument(message: str) -> GatewayError:
    """A 400 naming what is wrong with the request."""
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def status_json(
    code: grpc.StatusCode, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`google.rpc.Status` JSON: the numeric code, the message, the details."""
    return {"code": code.value[0], "message": message, "details": details or []}


def rpc_error_json(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The Status JSON of a failed call, with rich details when the server sent them."""
    code = error.code()
    return status_json(code, error.details() or "", _details(error.trailing_metadata()))


def rpc_error_status(error: grpc.aio.AioRpcError) -> int:
    """The HTTP status for a failed call."""
    return HTTP_STATUS.get(error.code(), 500)


def _details(trailing: Any) -> list[dict[str, Any]]:
    for key, value in trailing or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
            rendered = json_format.MessageToDict(status, preserving_proto_field_name=True)
        except Exception:
            # A detail of a type this process does not know cannot be shown
            # as JSON; the code and message still reach the client.
            logger.debug("dropping undecodable status details", exc_info=True)
            return []
        details: list[dict[str, Any]] = rendered.get("details", [])
        return details
    return []
