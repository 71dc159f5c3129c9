"""HTTP requests to protobuf messages, and protobuf messages to JSON.

A request message is built in three layers, each overriding the one before:
the body (`body: "*"` or one field), then query parameters (every field the
path and body leave free), then the path variables.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Sequence
from typing import Any, cast

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from gateway.errors import GatewayError, invalid_argument, quoted, shorten_values
from gateway.jsonparse import (
    INTEGER_RANGES,
    UnreadableJson,
    check_shapes,
    float_text_problem,
    integral,
    merge_json_object,
    offered_names,
    offered_values,
    read_json,
)
from gateway.protojson import reaches, to_json_object
from gateway.rules import Binding, RouteMatch, is_map_field, resolve_field

_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_TRUE, _FALSE = ("true", "1", "t"), ("false", "0", "f")
# Well-known messages whose JSON form is a single string or scalar, so a
# query parameter or path variable can carry them.
_SCALAR_MESSAGES = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
    *(
        f"google.protobuf.{name}Value"
        for name in (
            "Double",
            "Float",
            "Int64",
            "UInt64",
            "Int32",
            "UInt32",
            "Bool",
            "String",
            "Bytes",
        )
    ),
}


def message_class(descriptor: Descriptor) -> type[Message]:
    """The generated (or dynamically built) class of a message type."""
    return message_factory.GetMessageClass(descriptor)


def _check_utf8(what: str, text: str) -> None:
    """A percent-decoded value whose bytes were not UTF-8 (kept as surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise invalid_argument(f"{what} is not UTF-8 once percent-decoded") from None


def build_request(
    match: RouteMatch,
    query: Sequence[tuple[str, str]],
    body: bytes,
    overrides: Sequence[tuple[str, str]] = (),
) -> Message:
    """The request message of a matched route; GatewayError (400) names a bad field.

    `overrides` are (field path, value) pairs applied after the query
    parameters and before the path, e.g. from the `Last-Event-ID` header.
    """
    binding = match.binding
    request = message_class(binding.method.input_type)()
    if binding.body and body.strip():
        _merge_body(binding, request, body)
    body_field = binding.body if binding.body != "*" else None
    seen: set[str] = set()
    for key, value in query:
        what = f"query parameter {quoted(key)}"
        _check_utf8(what, key + value)
        path = _proto_names(binding.method.input_type, key.split("."))
        named = ".".join(path)
        if named in seen:
            field = resolve_field(binding.method.input_type, path)
            if field is not None and not field.is_repeated:
                raise invalid_argument(f"{what} is given more than once")
        seen.add(named)
        if binding.body == "*":
            raise invalid_argument(f"unknown {what}: every field is in the body")
        if path[0] == body_field:
            raise invalid_argument(f"{what} names a field of the request body")
        if named in binding.followed_fields:
            raise invalid_argument(f"unknown {what}: this route answers with every page at once")
        set_field(request, path, value, what)
    for path_text, value in overrides:
        set_field(request, path_text.split("."), value, f"{path_text!r}")
    for name, value in match.variables.items():
        _set_path_variable(request, name, value)
    _check_field_masks(request)
    return request


_FIELD_MASK = frozenset(("google.protobuf.FieldMask",))


def _check_field_masks(message: Message) -> None:
    # json_format parses masks it cannot print (e.g. paths with upper case);
    # refuse them here rather than fail on the way back.
    if not reaches(message.DESCRIPTOR, _FIELD_MASK):
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.full_name == "google.protobuf.FieldMask":
            for mask in value if field.is_repeated else [value]:
                try:
                    mask.ToJsonString()
                except ValueError as error:
                    raise invalid_argument(
                        f"invalid field mask in {field.name!r}: {shorten_values(str(error))}"
                    ) from None
        elif is_map_field(field):
            for item in value.values():
                if isinstance(item, Message):
                    _check_field_masks(item)
        else:
            for item in value if field.is_repeated else [value]:
                _check_field_masks(item)


# protobuf's words for a string field's lone surrogate, ending with the
# field's path from the request message: "… at RegisterTasksRequest.tasks[1].pipeline.name."
_UNPAIRED = re.compile(r"Unpaired surrogate at \w+\.((?:[\w.]|\[[^\]]*\])+?)\.*$")


def _merge_body(binding: Binding, request: Message, body: bytes) -> None:
    try:
        data = read_json(body, "the request body")
    except UnreadableJson as error:
        raise invalid_argument(str(error)) from None
    if binding.body == "*":
        if not isinstance(data, dict):
            raise invalid_argument("the request body must be a JSON object")
    else:
        data = {binding.body: data}
    try:
        merge_json_object(data, request)
    except json_format.ParseError as error:
        # The first line names the field; the rest lists every field there is.
        first = str(error).splitlines()[0]
        # json reads "\ud800" as one: a string field refuses it as an
        # "Unpaired surrogate at" its path, a Struct's string as "surrogates
        # not allowed" under the fields that lead to it.
        unpaired = _UNPAIRED.search(first)
        if unpaired or "surrogates not allowed" in first:
            named = re.findall(r"Failed to parse (\S+) field", first)
            field = unpaired[1] if unpaired else ".".join(named) or "the body"
            raise invalid_argument(
                f"{field}: a string holds an unpaired surrogate (a \\uD800 to \\uDFFF"
                " escape without its pair), which is not text"
            ) from None
        if "Message too deep" in first:  # past json_format's 100 levels of messages
            raise invalid_argument(
                "the request body nests too deeply for protobuf to read (100 levels of "
                "messages, two for each object or list in a task_input)"
            ) from None
        raise invalid_argument(shorten_values(first)) from None
    except OverflowError:
        raise invalid_argument("a number in the request body is too large") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as error:
        raise invalid_argument(f"invalid request body: {shorten_values(str(error))}") from None


def _set_path_variable(request: Message, name: str, text: str) -> None:
    """Set the field a path variable names from its text, in place of what the
    body or query gave it; GatewayError (400) when they gave it something
    else (which one was meant?)."""
    what = f"path variable {name!r}"
    _check_utf8(what, text)
    path = name.split(".")
    # Reading does not set a message field: an unset one reads as defaults.
    parent = _parent(request, path, what)
    field = _field(parent, path[-1])  # its oneof checked as _set_in sets it
    if field is not None and not field.is_repeated:
        if field.message_type is None:
            given = getattr(parent, path[-1])
            if given != field.default_value and given != parse_scalar(field, text, name):
                raise invalid_argument(
                    f"{name} is {quoted(given)} in the request but {quoted(text)} in the path"
                )
        parent.ClearField(path[-1])
    _set_in(parent, field, text, what)


def _proto_names(message: Descriptor, path: list[str]) -> list[str]:
    """A query parameter's dotted path with each field named by its proto
    name, where it was named by its JSON name (`pageSize` for `page_size`),
    as the body may name it; names of no field are left as they are."""
    names: list[str] = []
    for position, name in enumerate(path):
        field = message.fields_by_name.get(name) or _by_json_name(message).get(name)
        if field is None:
            return names + path[position:]
        names.append(field.name)
        if field.message_type is None:
            return names + path[position + 1 :]
        message = field.message_type
    return names


@functools.cache
def _by_json_name(message: Descriptor) -> dict[str, FieldDescriptor]:
    return {field.json_name: field for field in message.fields}


def _field(message: Message, name: str) -> FieldDescriptor | None:
    return cast(FieldDescriptor | None, message.DESCRIPTOR.fields_by_name.get(name))


def set_field(message: Message, path: list[str], text: str, what: str) -> None:
    """Set (or append to) the field at a dotted path from its text form."""
    parent = _parent(message, path, what)
    _set_in(parent, _field(parent, path[-1]), text, what)


def _set_in(parent: Message, field: FieldDescriptor | None, text: str, what: str) -> None:
    """Set (or append to) parent's field from its text form."""
    if field is None:
        raise invalid_argument(f"unknown {what}: no such field")
    if is_map_field(field):
        raise invalid_argument(f"{what} names a map field, which only the body can set")
    _check_oneof(parent, field, what)
    repeated = bool(field.is_repeated)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        target = getattr(parent, field.name).add() if repeated else getattr(parent, field.name)
        _parse_scalar_message(target, text, what)
        return
    value = parse_scalar(field, text, what)
    if repeated:
        getattr(parent, field.name).append(value)
    else:
        setattr(parent, field.name, value)


def _parent(message: Message, path: list[str], what: str) -> Message:
    for name in path[:-1]:
        field = _field(message, name)
        if field is None or field.message_type is None or field.is_repeated:
            raise invalid_argument(
                f"unknown {what}: {quoted(name)} is not a singular message field"
            )
        _check_oneof(message, field, what)
        message = getattr(message, name)
    return message


def _check_oneof(parent: Message, field: FieldDescriptor, what: str) -> None:
    """GatewayError (400) when another field of field's oneof is set already:
    setting field would drop it, and which was meant depends on the order
    the parameters came in. (The body refuses two of a oneof itself.)"""
    oneof = field.containing_oneof
    if oneof is None:
        return
    chosen = parent.WhichOneof(oneof.name)
    if chosen is not None and chosen != field.name:
        raise invalid_argument(
            f"{what} sets {field.name!r}, but {chosen!r} of the same oneof ({oneof.name!r})"
            " is set already; a request sets one of them"
        )


def _parse_scalar_message(target: Message, text: str, what: str) -> None:
    full_name = target.DESCRIPTOR.full_name
    if full_name not in _SCALAR_MESSAGES:
        raise invalid_argument(f"{what} is a {full_name} message: set its fields one by one")
    value: Any = text
    if full_name not in (
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
    ):
        value_field = _field(target, "value")
        assert value_field is not None  # every wrapper type has one
        value = parse_scalar(value_field, text, what)
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
    try:
        check_shapes(value, target, f"invalid {what}")  # a Duration's or Timestamp's form
    except json_format.ParseError as error:
        raise invalid_argument(str(error)) from None
    try:
        json_format.ParseDict(value, target)
    except (json_format.ParseError, ValueError, TypeError):
        form = ""
        if full_name == "google.protobuf.FieldMask":
            form = (
                " (its JSON form: paths in lowerCamelCase, comma-separated, as fooBar,inner.label)"
            )
        raise invalid_argument(
            f"invalid {what}: {quoted(text)} is not a {full_name}{form}"
        ) from None


def parse_scalar(field: FieldDescriptor, text: str, what: str) -> Any:
    """The value of a scalar or enum field from its text form."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text
    if kind == FieldDescriptor.TYPE_BYTES:
        return _parse_bytes(text, what)
    if kind == FieldDescriptor.TYPE_BOOL:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise invalid_argument(f"invalid {what}: {quoted(text)} is not true or false")
    if kind == FieldDescriptor.TYPE_ENUM:
        return _parse_enum(field, text, what)
    if kind in _FLOATS:
        return _parse_float(text, what, single=kind == FieldDescriptor.TYPE_FLOAT)
    low, high = INTEGER_RANGES[field.cpp_type]
    number = integral(text)
    if number is None or not low <= number <= high:
        raise invalid_argument(
            f"invalid {what}: {quoted(text)} is not an integer from {low} to {high}"
        )
    return number


def _parse_float(text: str, what: str, single: bool) -> float:
    """A double's (or, single, a float's) value from its text; GatewayError
    (400) saying why the text is none the field holds (float_text_problem)."""
    problem = float_text_problem(text, single)
    if problem is not None:
        raise invalid_argument(f"invalid {what}: {quoted(text)} {problem}")
    return float(text)


def _parse_bytes(text: str, what: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_argument(f"invalid {what}: {quoted(text)} is not base64") from None


def _parse_enum(field: FieldDescriptor, text: str, what: str) -> int:
    """A value's name or number; not the zero value that means "not given"
    (its name or 0 would read as no value at all: no filter, say)."""
    enum = field.enum_type
    assert enum is not None
    offered = offered_values(enum)
    number = offered.get(text)
    if number is not None:
        return number
    number = integral(text)
    if number is not None and number in offered.values():
        return number
    raise invalid_argument(f"invalid {what}: {quoted(text)} is not one of {offered_names(enum)}")


def message_json(message: Message) -> Any:
    """Proto JSON with proto field names, enum names, and every field without presence."""
    try:
        return message_to_dict(message, always_print_fields_with_no_presence=True)
    except (json_format.Error, ValueError) as error:
        raise GatewayError(
            grpc.StatusCode.INTERNAL, f"the response has no JSON form: {error}"
        ) from None


def message_to_dict(message: Message, *, always_print_fields_with_no_presence: bool = False) -> Any:
    """`json_format.MessageToDict` with proto field names, and JSON numbers as JSON has them.

    protobuf prints every `google.protobuf.Value` number as a float (`1.0`),
    since a Value holds a double; here the integral ones below 10^21 in size
    are written as integers (`1`), as the client sent them, and as JavaScript
    writes them.
    See gateway.protojson, which prints it.
    """
    return to_json_object(message, always_print_fields_with_no_presence)


def response_json(binding: Binding, message: Message) -> Any:
    """The JSON answer of a binding: the response, or its `response_body` field."""
    name = binding.response_body
    if not name:
        return message_json(message)
    field = message.DESCRIPTOR.fields_by_name[name]
    singular_message = field.message_type is not None and not field.is_repeated
    if singular_message:
        return message_json(getattr(message, name))
    return message_json(message)[name]


# Built once: json.dumps with options builds an encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; GatewayError (500) if a value has no JSON form."""
    try:
        return _ENCODER.encode(value).encode()
    except ValueError as error:
        raise GatewayError(
            grpc.StatusCode.INTERNAL, f"the response has no JSON form: {error}"
        ) from None
