"""Conversions between porch's values and porch.v1 messages."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from google.protobuf import json_format, struct_pb2

from porch_server import messages
from porch_server.models import Pipeline, Task
from porch_server.states import State
from porch_stubs.v1 import porch_pb2


def test_to_dict_reads_every_kind_of_value_as_json_format_does() -> None:
    struct = struct_pb2.Struct()
    struct.update(
        {
            "run": 45925,
            "name": "sample/1 é",
            "ok": True,
            "none": None,
            "list": [1.5, "a", [], {}, [None, False]],
            "nested": {"deeper": {"x": -0.0}},
        }
    )
    struct.fields["unset"].CopyFrom(struct_pb2.Value())
    plain = messages.to_dict(struct)
    assert plain == json_format.MessageToDict(struct)
    assert plain["run"] == 45925.0 and isinstance(plain["run"], float)
    assert plain["unset"] is None and plain["nested"] == {"deeper": {"x": 0.0}}


def test_to_dict_keeps_numbers_json_cannot_hold_for_the_digest_to_refuse() -> None:
    struct = struct_pb2.Struct()
    struct.update({"n": float("inf")})
    assert math.isinf(messages.to_dict(struct)["n"])


def test_state_of_every_number() -> None:
    for state in State:
        assert messages.state_of(porch_pb2.Task.State.Value(state.value)) is state
    assert messages.state_of(porch_pb2.Task.STATE_UNSPECIFIED) is None
    with pytest.raises(ValueError, match="99"):
        messages.state_of(99)


def test_an_empty_task_input_is_set_not_missing() -> None:
    pipeline = Pipeline(name="p", uri="https://example.org/p", version="1")
    now = datetime.now(UTC)
    task = Task(pipeline, "0" * 64, {}, State.PENDING, now, now, None, None, None)
    message = messages.task_message(task)
    assert message.HasField("task_input")
    assert json_format.MessageToDict(message)["taskInput"] == {}
