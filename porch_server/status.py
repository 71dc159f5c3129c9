"""The one mapping from porch's errors to gRPC status codes."""

from __future__ import annotations

import grpc

from porch_server import errors

CODES: dict[type[errors.PorchError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def code_of(error: errors.PorchError) -> grpc.StatusCode:
    """Return the gRPC status code for a porch error."""
    for kind in type(error).__mro__:
        if kind in CODES:
            return CODES[kind]
    return grpc.StatusCode.INTERNAL


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: errors.PorchError
) -> None:
    """End the call with the status code and message of error."""
    await context.abort(code_of(error), str(error))
