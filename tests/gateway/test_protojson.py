"""gateway.protojson prints what json_format prints (Value numbers fixed), key order included."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    struct_pb2,
)
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import protojson
from porch_stubs.v1 import porch_pb2
from tests.gateway.testproto import echo_pb2

texts = st.text(max_size=6)
int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
uint32s = st.integers(0, 2**32 - 1)
uint64s = st.integers(0, 2**64 - 1)
# Every double, non-finite ones included (json_format prints them as strings).
doubles = st.floats(allow_nan=True, allow_infinity=True)
# Numbers a Struct can hold: integral ones on both sides of 2^53, and fractions.
json_numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**60), 2**60).map(float),
)
json_values = st.recursive(
    st.none() | st.booleans() | json_numbers | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=12,
)
snake_paths = st.from_regex(r"[a-z][a-z0-9]{0,4}(_[a-z0-9]{1,3})?(\.[a-z]{1,4})?", fullmatch=True)


@st.composite
def inners(draw: st.DrawFn, depth: int = 2) -> echo_pb2.Inner:
    inner = echo_pb2.Inner(label=draw(texts), count=draw(int64s), color=draw(st.integers(0, 5)))
    if depth and draw(st.booleans()):
        inner.child.CopyFrom(draw(inners(depth - 1)))
    return inner


@st.composite
def echo_messages(draw: st.DrawFn) -> echo_pb2.EchoMessage:
    """EchoMessages with any subset of their fields set, to any value."""
    message = echo_pb2.EchoMessage()
    scalars = {
        "text": texts,
        "int32_value": int32s,
        "int64_value": int64s,
        "uint32_value": uint32s,
        "uint64_value": uint64s,
        "double_value": doubles,
        "float_value": doubles,
        "bool_value": st.booleans(),
        "bytes_value": st.binary(max_size=8),
        # Numbers beyond the enum's values too: proto3 enums are open.
        "color": st.integers(0, 6),
        "maybe": int32s,
    }
    for name, values in scalars.items():
        if draw(st.booleans()):
            setattr(message, name, draw(values))
    if draw(st.booleans()):
        message.tags.extend(draw(st.lists(texts, max_size=3)))
        message.colors.extend(draw(st.lists(st.integers(0, 5), max_size=3)))
        message.numbers.extend(draw(st.lists(int32s, max_size=3)))
    if draw(st.booleans()):
        message.inner.CopyFrom(draw(inners()))
    if draw(st.booleans()):
        message.when.FromMicroseconds(draw(st.integers(-(10**16), 10**16)))
        message.when.nanos = draw(st.sampled_from([0, 1, 1000, 1_000_000, 999_999_999]))
    if draw(st.booleans()):
        message.wait.FromNanoseconds(draw(st.integers(-(10**15), 10**15)))
    if draw(st.booleans()):
        message.data.update(draw(st.dictionaries(texts, json_values, max_size=4)))
    if draw(st.booleans()):
        message.wrapped.value = draw(int32s)
    if draw(st.booleans()):
        message.labels.update(draw(st.dictionaries(texts, texts, max_size=3)))
        message.metadata.update(draw(st.dictionaries(texts, texts, max_size=3)))
    if draw(st.booleans()):
        message.mask.paths.extend(draw(st.lists(snake_paths, max_size=3)))
    return message


def expected(message: Message, always: bool) -> Any:
    """What json_format prints, with Value numbers fixed: the reference."""
    return protojson._json_format(message, always)


def assert_same(message: Message, always: bool) -> None:
    try:
        reference = expected(message, always)
    except (json_format.Error, ValueError) as error:
        with pytest.raises(type(error)) as raised:
            protojson.to_json_object(message, always)
        assert str(raised.value) == str(error)
        return
    printed = protojson.to_json_object(message, always)
    # Same values, same key order, same types (1 and 1.0 differ in JSON).
    assert json.dumps(printed) == json.dumps(reference)
    assert printed == reference or _has_nan(reference)


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_nan(item) for item in value)
    return False


@settings(max_examples=400, deadline=None)
@given(echo_messages(), st.booleans())
def test_any_echo_message_prints_as_json_format_prints_it(
    message: echo_pb2.EchoMessage, always: bool
) -> None:
    assert_same(message, always)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(texts, json_values, max_size=4), st.integers(0, 6), st.booleans())
def test_any_task_prints_as_json_format_prints_it(
    task_input: dict[str, Any], status: int, always: bool
) -> None:
    task = porch_pb2.Task(
        pipeline=porch_pb2.Pipeline(name="p", uri="u", version="1"),
        task_input_id="ab" * 32,
        status=status,
    )
    task.task_input.update(task_input)
    task.create_time.FromMicroseconds(1_700_000_000_123_456)
    task.update_time.FromMicroseconds(1_700_000_000_000_000)
    assert_same(task, always)
    assert_same(porch_pb2.ListTasksResponse(tasks=[task, task], next_page_token="x"), always)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(-62_135_596_800, 253_402_300_799) | st.integers(-(2**40), 2**40),
    st.sampled_from([0, 1, 1000, 1_000_000, 999_999_999])
    | st.integers(0, 999_999_999)
    | st.integers(-5, 2 * 10**9),
)
def test_any_timestamp_prints_as_json_format_prints_it(seconds: int, nanos: int) -> None:
    # Beyond years 1 to 9999, or nanos outside [0, 1e9), both refuse it alike.
    message = echo_pb2.EchoMessage()
    message.when.seconds = seconds
    message.when.nanos = nanos
    assert_same(message, False)
    assert_same(message.when, False)


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_a_number_json_cannot_hold_fails_as_in_json_format(number: float) -> None:
    message = echo_pb2.EchoMessage()
    message.data.update({"a": [1, {"b": number}]})
    assert_same(message, True)
    with pytest.raises(json_format.SerializeToJsonError, match="Failed to serialize data field"):
        protojson.to_json_object(message)
    value = struct_pb2.Value(number_value=number)
    assert_same(value, False)


def test_values_alone_and_integral_numbers() -> None:
    value = struct_pb2.Value()
    assert protojson.to_json_object(value) is None
    value.list_value.extend([1.0, 2.5, 2.0**53, 2.0**53 + 2, True, None, "x"])
    assert protojson.to_json_object(value) == [1, 2.5, 2**53, 2.0**53 + 2, True, None, "x"]
    assert_same(value, True)


def test_any_goes_to_json_format() -> None:
    # google.rpc.Status carries its details in Any: printed with their @type.
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="R", domain="d", metadata={"k": "v"}))
    status = status_pb2.Status(code=3, message="bad", details=[detail])
    printed = protojson.to_json_object(status, True)
    assert printed["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert_same(status, True)


def test_an_aliased_enum_value_is_named_by_the_first_name_declared() -> None:
    # As json_format, Go and C++ name it; upb's values_by_number holds the last.
    file = descriptor_pb2.FileDescriptorProto(name="alias.proto", package="alias", syntax="proto3")
    kind = file.enum_type.add(name="Kind")
    kind.options.allow_alias = True
    for name, number in (("KIND_UNSPECIFIED", 0), ("ALPHA", 1), ("ALIAS_ALPHA", 1), ("BETA", 2)):
        kind.value.add(name=name, number=number)
    held = file.message_type.add(name="Held")
    held.field.add(
        name="kind",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".alias.Kind",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    message = message_factory.GetMessageClass(pool.FindMessageTypeByName("alias.Held"))(kind=1)
    assert protojson.to_json_object(message) == {"kind": "ALPHA"}
    assert_same(message, False)
