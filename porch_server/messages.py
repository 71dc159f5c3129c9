"""Conversions between porch's values and porch.v1 protobuf messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from porch_server import models
from porch_server.errors import InvalidArgument
from porch_server.states import State
from porch_stubs.v1 import porch_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TASK_STATES = {state: porch_pb2.Task.State.Value(state.value) for state in State}
_STATES_OF: dict[int, State] = {number: state for state, number in _TASK_STATES.items()}


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A Timestamp of an aware datetime (naive ones are taken as UTC), built
    directly: Timestamp.FromDatetime costs three times as much."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


# Objects and lists inside one another in a task's input, the input itself
# included. Each takes two levels of protobuf messages, and an answer with
# the task wraps it in up to four more: deeper, and a client's decoder
# (at most 100 levels) would refuse an answer about a task already stored.
MAX_INPUT_DEPTH = 32


def to_dict(struct: struct_pb2.Struct, depth: int = 1) -> dict[str, Any]:
    """Return a Struct as a plain JSON-like dict, numbers as floats;
    InvalidArgument if it nests deeper than MAX_INPUT_DEPTH.

    Read directly: json_format.MessageToDict takes twice as long, and it
    refuses NaN and infinities with a ValueError where the digest names them.
    """
    _check_depth(depth)
    return {key: _plain(value, depth) for key, value in struct.fields.items()}


def _check_depth(depth: int) -> None:
    if depth > MAX_INPUT_DEPTH:
        raise InvalidArgument(f"task_input nests deeper than {MAX_INPUT_DEPTH} levels")


def _plain(value: struct_pb2.Value, depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "struct_value":
        return to_dict(value.struct_value, depth + 1)
    if kind == "list_value":
        _check_depth(depth + 1)
        return [_plain(item, depth + 1) for item in value.list_value.values]
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or a Value with nothing set


def pipeline_message(pipeline: models.Pipeline) -> porch_pb2.Pipeline:
    """Return a Pipeline message."""
    return porch_pb2.Pipeline(name=pipeline.name, uri=pipeline.uri, version=pipeline.version)


def task_message(task: models.Task) -> porch_pb2.Task:
    """Return a Task message."""
    message = porch_pb2.Task(
        pipeline=pipeline_message(task.pipeline),
        task_input_id=task.task_input_id,
        status=_TASK_STATES[task.status],
        create_time=_timestamp(task.create_time),
        update_time=_timestamp(task.update_time),
        claim_time=None if task.claim_time is None else _timestamp(task.claim_time),
        lease_expire_time=(
            None if task.lease_expire_time is None else _timestamp(task.lease_expire_time)
        ),
        claimed_by_token_id=task.claimed_by_token_id or "",
        claim_number=task.claim_number,
    )
    # Set even when empty: a task_input of {} is still there, as {} in JSON.
    message.task_input.SetInParent()
    message.task_input.update(task.task_input)
    return message


def event_message(event: models.Event) -> porch_pb2.Event:
    """Return an Event message."""
    return porch_pb2.Event(
        cursor=event.cursor,
        time=_timestamp(event.time),
        pipeline_name=event.pipeline_name,
        task_input_id=event.task_input_id,
        kind=porch_pb2.Event.Kind.Value(event.kind),
        old_status=_state_value(event.old_status),
        new_status=_state_value(event.new_status),
        token_id=event.token_id or "",
        token_description=event.token_description or "",
        message=event.message or "",
    )


def _state_value(state: State | None) -> porch_pb2.Task.State.ValueType:
    return porch_pb2.Task.State.Value(state) if state else porch_pb2.Task.STATE_UNSPECIFIED


def token_message(token: models.Token) -> porch_pb2.Token:
    """Return a Token message (metadata only; there is no secret to give)."""
    message = porch_pb2.Token(
        token_id=token.token_id,
        role=porch_pb2.Token.Role.Value(token.role),
        pipeline_name=token.pipeline_name or "",
        description=token.description,
        create_time=_timestamp(token.create_time),
    )
    if token.revoke_time is not None:
        message.revoke_time.FromDatetime(token.revoke_time)
    return message


def state_of(value: int) -> State | None:
    """Return the State of a proto enum value; None for STATE_UNSPECIFIED.
    ValueError for a number that is no State."""
    if not value:
        return None
    try:
        return _STATES_OF[value]
    except KeyError:
        raise ValueError(f"no Task.State has the number {value}") from None


def role_of(value: int) -> models.Role | None:
    """Return the Role of a proto enum value; None for ROLE_UNSPECIFIED."""
    return (
        models.Role(porch_pb2.Token.Role.Name(porch_pb2.Token.Role.ValueType(value)))
        if value
        else None
    )
