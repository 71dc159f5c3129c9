"""JSON request bodies into messages: json_format's result, quicker for the plain cases.

``json_format.ParseDict`` is pure Python and general: an npg_porch client's
``PUT /tasks``, the whole task with four timestamps, took it about 100 µs,
most of it in ``strptime``. ``merge_json_object`` reads the plain cases
itself, the ones requests are made of: known fields by proto or JSON name,
strings, booleans, integers, enum names, nested messages, lists of these,
Structs and Timestamps written as ``YYYY-MM-DDTHH:MM:SS[.fraction]Z``.

Anything else (null, floats, bytes, maps, oneofs, other well-known types,
numbers or enums as strings, a field named twice, nesting as deep as
json_format refuses) sends the whole body to json_format on a cleared
message, so results and errors outside the plain cases are json_format's
own, but for one check first: a field holding the wrong kind of JSON for
a message or a string gets an error naming it (``check_shapes``). The
property tests hold merge_json_object to that check and json_format.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Callable
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from gateway.protojson import custom_enum_names
from gateway.rules import is_map_field

# json_format.ParseDict's default: messages (each Struct and Value counts) nest this deep.
_MAX_DEPTH = 100
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?Z"
)
_EPOCH = datetime.datetime(1970, 1, 1)
# A Duration in JSON: seconds, up to nine decimals, then "s" (the proto3 JSON mapping).
_DURATION = re.compile(r"-?[0-9]+(?:\.[0-9]{0,9})?s")
_INTEGERS = frozenset(
    (
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    )
)


class _NotPlain(Exception):
    """The body holds something only json_format reads."""


def merge_json_object(data: Any, message: Message) -> None:
    """json_format.ParseDict(data, message) for an empty message, with its errors."""
    try:
        _merge(data, message, 1)
    except Exception:  # _NotPlain, or a value protobuf refused: json_format's to judge
        pass
    else:
        return
    message.Clear()
    check_shapes(data, message)
    json_format.ParseDict(data, message)


def check_shapes(data: Any, message: Message) -> None:
    """json_format.ParseError naming the field where the body has something
    other than an object for a message, or other than a string for a string
    field. json_format itself would walk a string as if it were an object
    (`no field named "s"`), or fail inside a regular expression."""
    _check_shapes(data, message.DESCRIPTOR, "", 1)


def _check_shapes(data: Any, descriptor: Any, path: str, depth: int) -> None:
    if descriptor.full_name == "google.protobuf.Duration" and data is not None:
        _check_duration(data, path)
    if descriptor.full_name.startswith("google.protobuf.") or data is None or depth > _MAX_DEPTH:
        return  # well-known types have JSON forms of their own; json_format judges them
    if type(data) is not dict:
        raise json_format.ParseError(f"{path or 'the body'}: expected an object, got {_kind(data)}")
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if field is None or value is None:
            continue  # json_format names an unknown field; null leaves a field unset
        where = f"{path}.{key}" if path else key
        if is_map_field(field):
            if type(value) is not dict:
                raise json_format.ParseError(f"{where}: expected an object, got {_kind(value)}")
        elif field.is_repeated:
            if field.message_type is not None and type(value) is list:
                for index, item in enumerate(value):
                    _check_shapes(item, field.message_type, f"{where}[{index}]", depth + 1)
        elif field.message_type is not None:
            _check_shapes(value, field.message_type, where, depth + 1)
        elif field.type == FieldDescriptor.TYPE_STRING and type(value) is not str:
            raise json_format.ParseError(f"{where}: expected a string, got {_kind(value)}")


def _check_duration(data: Any, path: str) -> None:
    """A Duration's JSON form is seconds with an "s": json_format's own words
    for anything else are a Python error ("invalid literal for int()")."""
    if type(data) is str and _DURATION.fullmatch(data):
        return
    given = (
        json.dumps(data[:40] + ("…" if len(data) > 40 else ""), ensure_ascii=False)
        if type(data) is str
        else _kind(data)
    )
    raise json_format.ParseError(
        f'{path or "the body"}: expected a duration, seconds with an "s" such as "3600s" '
        f'or "1.5s", got {given}'
    )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return "a list" if isinstance(value, list) else "an object"


def _merge(data: Any, message: Message, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _NotPlain
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        _struct(data, message, depth)
    elif name == "google.protobuf.Timestamp":
        _timestamp(data, message)
    elif name.startswith("google.protobuf.") or type(data) is not dict:
        raise _NotPlain
    else:
        _regular(data, message, depth)


# How a field is read: one message, a list of messages, one scalar, a list of scalars.
_MESSAGE, _MESSAGES, _SCALAR, _SCALARS = range(4)
_Field = tuple[str, int, Callable[[Any], Any]]


def _regular(data: dict[str, Any], message: Message, depth: int) -> None:
    fields = _fields(message.DESCRIPTOR)
    seen: set[str] = set()
    for key, value in data.items():
        found = fields.get(key)
        if found is None or value is None:
            raise _NotPlain
        name, how, scalar = found
        if name in seen:
            raise _NotPlain
        seen.add(name)
        if how == _SCALAR:
            setattr(message, name, scalar(value))
        elif how == _MESSAGE:
            child = getattr(message, name)
            child.SetInParent()
            _merge(value, child, depth + 1)
        elif type(value) is not list:
            raise _NotPlain
        elif how == _SCALARS:
            getattr(message, name).extend([scalar(item) for item in value])
        else:
            items = getattr(message, name)
            for item in value:
                if item is None:
                    raise _NotPlain
                _merge(item, items.add(), depth + 1)


@functools.cache
def _fields(descriptor: Descriptor) -> dict[str, _Field]:
    """The fields read here, by JSON name and by proto name: not maps, not in oneofs."""
    plain = [
        field
        for field in descriptor.fields
        if field.containing_oneof is None and not is_map_field(field)
    ]
    json_names = {field.json_name for field in descriptor.fields}
    # JSON names first, as json_format looks them up first.
    keys = [(field.json_name, field) for field in plain]
    keys += [(field.name, field) for field in plain if field.name not in json_names]
    return {key: _how(field) for key, field in keys}


def _how(field: FieldDescriptor) -> _Field:
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return field.name, _MESSAGES if field.is_repeated else _MESSAGE, _not_plain
    return field.name, _SCALARS if field.is_repeated else _SCALAR, _scalar_reader(field)


def _scalar_reader(field: FieldDescriptor) -> Callable[[Any], Any]:
    """A field's value from JSON, or _NotPlain."""
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_STRING and field.type == FieldDescriptor.TYPE_STRING:
        return functools.partial(_exactly, str)
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        return functools.partial(_exactly, bool)
    if kind in _INTEGERS:
        return functools.partial(_exactly, int)
    if kind == FieldDescriptor.CPPTYPE_ENUM and not custom_enum_names():
        numbers = {
            name: value.number
            for name, value in cast(EnumDescriptor, field.enum_type).values_by_name.items()
        }
        return functools.partial(_enum, numbers)
    return _not_plain


def _exactly(kind: type, value: Any) -> Any:
    if type(value) is not kind:
        raise _NotPlain
    return value


def _enum(numbers: dict[str, int], value: Any) -> int:
    number = numbers.get(value) if type(value) is str else None
    if number is None:
        raise _NotPlain
    return number


def _not_plain(value: Any) -> Any:
    raise _NotPlain


def _struct(data: Any, message: Any, depth: int) -> None:
    if type(data) is not dict or depth > _MAX_DEPTH:
        raise _NotPlain
    message.Clear()
    fields = message.fields
    for key, value in data.items():
        _value(value, fields[key], depth + 1)


def _value(data: Any, message: Any, depth: int) -> None:
    # In json_format's order: a bool is an int too.
    if depth > _MAX_DEPTH:
        raise _NotPlain
    kind = type(data)
    if kind is dict:
        _struct(data, message.struct_value, depth + 1)
    elif kind is list:
        if depth + 1 > _MAX_DEPTH:
            raise _NotPlain
        values = message.list_value
        values.ClearField("values")
        for item in data:
            _value(item, values.values.add(), depth + 2)
    elif data is None:
        message.null_value = 0
    elif kind is bool:
        message.bool_value = data
    elif kind is str:
        message.string_value = data
    elif kind is int or kind is float:
        message.number_value = data
    else:
        raise _NotPlain


def _timestamp(data: Any, message: Any) -> None:
    match = _TIMESTAMP.fullmatch(data) if type(data) is str else None
    if match is None:
        raise _NotPlain
    year, month, day, hour, minute, second = map(int, match.groups()[:6])
    fraction = match.group(7)
    moment = datetime.datetime(year, month, day, hour, minute, second)
    elapsed = moment - _EPOCH
    message.seconds = elapsed.days * 86_400 + elapsed.seconds
    # As json_format computes it, float rounding included.
    message.nanos = round(float("0." + fraction) * 1e9) if fraction else 0
