"""The one mapping from porch's errors to gRPC status codes and answers."""

from __future__ import annotations

import logging

import grpc

from porch_server import errors

log = logging.getLogger("porch.server")

# A status message travels in trailing metadata, each byte of it outside
# printable ASCII percent-encoded as three, and clients refuse metadata past
# 8 to 16 KiB: RESOURCE_EXHAUSTED would then stand in for the real status.
# Longer messages are cut at this many bytes of UTF-8.
MAX_STATUS_MESSAGE_BYTES = 2048

# Trailing metadata of the errors porch's handlers answer calls with (every
# UNAVAILABLE of theirs among them, but not the calls gRPC ends itself as the
# server stops). gRPC sends none with a failure of its own (a server it
# could not reach), so a separate gateway tells the server's UNAVAILABLE,
# whose words it passes on, from gRPC's, which can name addresses and TLS
# faults.
ANSWERED = (("x-porch-error", "1"),)

CODES: dict[type[errors.PorchError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def code_of(error: errors.PorchError) -> grpc.StatusCode:
    """Return the gRPC status code for a porch error."""
    for kind in type(error).__mro__:
        if kind in CODES:
            return CODES[kind]
    return grpc.StatusCode.INTERNAL


def message_of(error: errors.PorchError) -> str:
    """What the caller of a call that failed with error is told, at most
    MAX_STATUS_MESSAGE_BYTES of it. The cause of an Unavailable goes to the
    server's log instead."""
    if not isinstance(error, errors.Unavailable) or error.cause is None:
        return _bounded(str(error))
    errors.warn_now_and_then(log, str(error))  # each call would repeat it
    return _bounded(f"{error.message}; try again (the server's log says why)")


def _bounded(message: str) -> str:
    """message, cut at MAX_STATUS_MESSAGE_BYTES with a note saying so."""
    data = message.encode()
    if len(data) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    kept = data[:MAX_STATUS_MESSAGE_BYTES].decode(errors="ignore")
    return f"{kept}… (cut: the message was {len(data):,} bytes)"
