"""gateway.jsonparse reads a body into the message json_format.ParseDict makes, or fails alike."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.jsonparse import UnreadableJson, check_shapes, merge_json_object, read_json
from porch_stubs.v1 import porch_pb2
from tests.gateway.testproto import echo_pb2

# Text with the odd lone surrogate, which protobuf refuses.
texts = st.text(max_size=5) | st.sampled_from(["a\ud800", "RED", "GREEN", "1", " 2", "1.5"])
integers = st.integers(-(2**64), 2**64) | st.sampled_from([0, 1, -1, 2**31, 2**63])
scalars = st.none() | st.booleans() | integers | st.floats() | texts
any_json = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=10,
)
timestamps = st.one_of(
    st.datetimes().map(lambda moment: moment.isoformat() + "Z"),
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,10})?(Z|[+-]0[0-9]:00)",
        fullmatch=True,
    ),
    st.sampled_from(
        ["2026-02-30T00:00:00Z", "2026-12-31T23:59:60Z", "0000-01-01T00:00:00Z", "2026-01-01"]
    ),
)


@st.composite
def nested(draw: st.DrawFn) -> dict[str, Any]:
    """A Struct nested about as deep as json_format allows: lists and objects, empty or not."""
    value: Any = draw(st.sampled_from([1, {}, [], None]))
    for as_list in draw(st.lists(st.booleans(), min_size=40, max_size=60)):
        value = [value] if as_list else {"a": value}
    return {"x": value}


structs = st.dictionaries(texts, any_json, max_size=4) | nested()


def fitting(field: str) -> st.SearchStrategy[Any]:
    """Values of the right JSON type for an EchoMessage field (mostly)."""
    return {
        "text": texts,
        "int32_value": integers,
        "int64_value": integers | st.integers().map(str),
        "uint32_value": integers,
        "uint64_value": integers,
        "double_value": st.floats() | integers,
        "float_value": st.floats(),
        "bool_value": st.booleans(),
        "bytes_value": st.sampled_from(["", "YWJj", "not base64!"]),
        "color": st.sampled_from(["RED", "BLUE", "PURPLE", 2, "2"]),
        "tags": st.lists(texts, max_size=3),
        "colors": st.lists(st.sampled_from(["RED", "GREEN", None]), max_size=3),
        "numbers": st.lists(integers, max_size=3),
        "inner": st.fixed_dictionaries(
            {}, optional={"label": texts, "count": integers, "color": texts, "child": any_json}
        ),
        "maybe": integers,
        "when": timestamps,
        "wait": st.sampled_from(["1s", "1.5s", "x"]),
        "data": structs,
        "wrapped": integers,
        "labels": st.dictionaries(texts, texts, max_size=2),
        "mask": st.sampled_from(["a,b.c", "fooBar", "a_b"]),
        "metadata": any_json,
        "choice_text": texts,
        "choice_number": integers,
        "choice_inner": st.fixed_dictionaries({}, optional={"label": texts, "count": integers}),
    }[field]


ECHO_FIELDS = [field for field in echo_pb2.EchoMessage.DESCRIPTOR.fields]


@st.composite
def echo_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """EchoMessage bodies: fields by proto or JSON name, fitting values or any JSON."""
    body: dict[str, Any] = {}
    for field in draw(st.lists(st.sampled_from(ECHO_FIELDS), max_size=6)):
        key = draw(st.sampled_from([field.name, field.json_name]))
        body[key] = draw(fitting(field.name) if draw(st.integers(0, 4)) else any_json)
    if draw(st.integers(0, 9)) == 0:
        body[draw(texts)] = draw(any_json)
    return body


def outcome(data: Any, message_type: type[Message], parse: Any) -> tuple[str, Any]:
    message = message_type()
    try:
        parse(copy.deepcopy(data), message)
    except Exception as error:
        return type(error).__name__, str(error)
    return "ok", message.SerializeToString(deterministic=True)


def checked_parse(data: Any, message: Message) -> None:
    """json_format.ParseDict after the check merge_json_object makes first."""
    check_shapes(data, message)
    json_format.ParseDict(data, message)


def assert_same(data: Any, message_type: type[Message]) -> None:
    expected = outcome(data, message_type, checked_parse)
    assert outcome(data, message_type, merge_json_object) == expected


@settings(max_examples=600, deadline=None)
@given(echo_bodies())
def test_any_echo_body_reads_as_json_format_reads_it(body: dict[str, Any]) -> None:
    assert_same(body, echo_pb2.EchoMessage)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "pipeline": st.fixed_dictionaries(
                {"name": texts}, optional={"uri": texts, "version": texts}
            ),
            "task_input_id": texts,
            "task_input": structs,
            "status": st.sampled_from(["RUNNING", "DONE", "SOMETIMES", 3]),
            "create_time": timestamps,
            "update_time": timestamps,
            "claimed_by_token_id": texts,
        },
    ),
    st.sampled_from(["", "a message"]),
)
def test_any_npg_porch_update_reads_as_json_format_reads_it(
    task: dict[str, Any], text: str
) -> None:
    assert_same({"task": task, "message": text}, porch_pb2.UpdateTaskRequest)


@pytest.mark.parametrize("innermost", [1, {}, []])
@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("levels", range(44, 52))
def test_nesting_is_refused_at_json_formats_depth(
    levels: int, as_list: bool, innermost: Any
) -> None:
    value = innermost
    for _ in range(levels):
        value = [value] if as_list else {"a": value}
    assert_same({"task_input": {"x": value}}, porch_pb2.Task)
    assert_same({"task": {"task_input": {"x": value}}}, porch_pb2.UpdateTaskRequest)


def test_an_npg_porch_update_is_read_without_json_format() -> None:
    # The whole task as an npg_porch client sends it back: every field plain.
    body = {
        "task": {
            "pipeline": {"name": "p", "uri": "u", "version": "1"},
            "task_input_id": "ab" * 32,
            "task_input": {"id_run": 1, "path": "/a", "flags": [True, None, 2.5], "x": {}},
            "status": "RUNNING",
            "create_time": "2026-11-28T06:00:00.123456Z",
            "update_time": "2026-11-28T06:00:01Z",
            "claim_time": "2026-11-28T06:00:01.5Z",
            "claimed_by_token_id": "7",
            "lease_expire_time": "2026-11-28T07:00:00.000000001Z",
        }
    }
    fast = porch_pb2.UpdateTaskRequest()
    from gateway import jsonparse

    jsonparse._merge(copy.deepcopy(body), fast, 1)  # raises if it would fall back
    assert_same(body, porch_pb2.UpdateTaskRequest)
    assert fast.task.lease_expire_time.nanos == 1
    assert fast.task.task_input["flags"][2] == 2.5


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_json_sent_in_another_encoding_than_utf_8_is_refused(encoding: str) -> None:
    # json.loads reads them, where JSON between systems is UTF-8 (RFC 8259).
    # Without a byte order mark, UTF-16's NULs are UTF-8 but not JSON.
    with pytest.raises(UnreadableJson, match=r"^the request body is not (UTF-8|JSON): "):
        read_json('{"a": 1}'.encode(encoding), "the request body")


def test_json_in_utf_8_is_read_with_or_without_a_byte_order_mark() -> None:
    for body in (b'{"a": "\xc3\xa9"}', b'\xef\xbb\xbf{"a": "\xc3\xa9"}'):
        assert read_json(body, "the request body") == {"a": "é"}
