"""Messages as proto3 JSON objects: json_format's output, decided once per message type.

``json_format.MessageToDict`` works out, for every field of every message it
prints, what kind of field it is, and is pure Python. A page of 1,000 tasks
spent 40 % of the gateway's time there. ``to_json_object`` builds, once per
message type, a printer that knows each field's conversion, and gives the
same objects in the same key order: proto field names, enum names, 64-bit
integers as strings, bytes as base64, the well-known types in their JSON
forms. Two things differ, both by design of ``gateway.message_to_dict``: a
number in a Struct, Value or ListValue that is integral and below 10^21 in
size comes out as an int (``1``, not ``1.0``), and nothing else does.

What it does not print itself goes to json_format: ``Any``, extensions, and
enums with custom JSON names.
"""

from __future__ import annotations

import base64
import datetime
import functools
import math
from collections.abc import Callable
from typing import Any, cast

from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

from gateway.rules import is_map_field

Convert = Callable[[Any], Any]
Printer = Callable[[Message], Any]

# A double holds every integer up to this in size exactly, and beyond it only some.
MAX_EXACT_INTEGER = 2**53
# Whole numbers are written in full below this in size, as JavaScript writes
# them (2^60 as 1152921504606846976, not 1.152921504606847e+18), and in
# exponent form from it on (1e+21): a double that holds a whole number holds
# that integer exactly, so it comes back as an integer sent was.
_WHOLE_BELOW = 1e21
JSON_VALUE_TYPES = frozenset(f"google.protobuf.{name}" for name in ("Struct", "Value", "ListValue"))
# Only these can hold a float somewhere inside; strings, bools and None are left alone.
_MAY_HOLD_FLOATS = frozenset((dict, list, float))
# How a field holds its messages in JSON: one, a list, or the values of an object.
_ONE, _LIST, _MAP = range(3)
_SELF_PRINTED = frozenset(f"google.protobuf.{name}" for name in ("Duration", "FieldMask"))
# Timestamps json_format can print: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_EPOCH = datetime.datetime(1970, 1, 1)
_FIRST_SECOND = -62_135_596_800
_LAST_SECOND = 253_402_300_799


class _Unsupported(Exception):
    """This message holds something only json_format prints."""


def to_json_object(message: Message, always_print_fields_with_no_presence: bool = False) -> Any:
    """The message as json_format.MessageToDict gives it with proto field names,
    but with integral Value numbers as ints; json_format.Error when it has no
    JSON form."""
    try:
        return _printer(message.DESCRIPTOR, always_print_fields_with_no_presence)(message)
    except _Unsupported:
        return _json_format(message, always_print_fields_with_no_presence)


def _json_format(message: Message, always: bool) -> Any:
    data = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=always, preserving_proto_field_name=True
    )
    return _fix_numbers(data, cast(Descriptor, message.DESCRIPTOR))


@functools.cache
def _printer(descriptor: Descriptor, always: bool) -> Printer:
    """How to print messages of one type (built on first use, then kept)."""
    name = descriptor.full_name
    if descriptor.file.name == "google/protobuf/wrappers.proto":
        convert = _converter(descriptor.fields_by_name["value"], always)
        return lambda message: convert(message.value)  # type: ignore[attr-defined]
    if name == "google.protobuf.Timestamp":
        return _timestamp
    if name in _SELF_PRINTED:
        return lambda message: message.ToJsonString()  # type: ignore[attr-defined]
    if name == "google.protobuf.Struct":
        return _struct
    if name == "google.protobuf.Value":
        return _value
    if name == "google.protobuf.ListValue":
        return _list_value
    if name == "google.protobuf.Any":
        return _unsupported
    return _regular(descriptor, always)


def _regular(descriptor: Descriptor, always: bool) -> Printer:
    fields = {field.name: _converter(field, always) for field in descriptor.fields}
    # The fields printed when unset: those without presence, in declaration order.
    defaults: list[tuple[str, Callable[[], Any]]] = []
    if always:
        for field in descriptor.fields:
            if not field.has_presence:
                defaults.append((field.name, _default(field, fields[field.name])))
    extensible = bool(descriptor.extension_ranges)

    def print_message(message: Message) -> Any:
        js: dict[str, Any] = {}
        name = ""
        try:
            for field, value in message.ListFields():
                name = field.name
                if extensible and field.is_extension:
                    raise _Unsupported
                js[name] = fields[name](value)
        except ValueError as error:
            raise json_format.SerializeToJsonError(
                f"Failed to serialize {name} field: {error}."
            ) from error
        for name, default in defaults:
            if name not in js:
                js[name] = default()
        return js

    return print_message


def _default(field: FieldDescriptor, convert: Convert) -> Callable[[], Any]:
    """A fresh default value for each message: lists and dicts are the caller's to change."""
    if is_map_field(field):
        return dict
    if field.is_repeated:
        return list
    value = convert(field.default_value)
    return lambda: value


def _converter(field: FieldDescriptor, always: bool) -> Convert:
    """One field's value (repeated and map fields whole) to JSON."""
    if is_map_field(field):
        entry = cast(Descriptor, field.message_type)
        key = _map_key
        value = _single(entry.fields_by_name["value"], always)
        return lambda values: {key(k): value(values[k]) for k in values}
    single = _single(field, always)
    if field.is_repeated:
        return lambda values: [single(item) for item in values]
    return single


def _map_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _single(field: FieldDescriptor, always: bool) -> Convert:
    """One value of a field to JSON."""
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_MESSAGE:
        return _child_printer(cast(Descriptor, field.message_type), always)
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        return _enum_converter(cast(EnumDescriptor, field.enum_type))
    if kind == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return lambda value: base64.b64encode(value).decode("utf-8")
        return _same
    if kind in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):
        return str
    if kind == FieldDescriptor.CPPTYPE_DOUBLE:
        return _double
    if kind == FieldDescriptor.CPPTYPE_FLOAT:
        return _float
    return _same  # bool, int32, uint32


def _child_printer(child: Descriptor, always: bool) -> Convert:
    """The printer of a field's message type, found when first used: a type
    may contain itself, so it cannot be built before its fields are."""
    found: list[Printer] = []

    def print_child(message: Message) -> Any:
        if not found:
            found.append(_printer(child, always))
        return found[0](message)

    return print_child


def _timestamp(message: Any) -> str:
    """As Timestamp.ToJsonString: 0, 3, 6 or 9 digits of fraction, then Z."""
    seconds: int = message.seconds
    nanos: int = message.nanos
    if not (_FIRST_SECOND <= seconds <= _LAST_SECOND and 0 <= nanos < 1_000_000_000):
        text: str = message.ToJsonString()  # raises its own error for these
        return text
    text = (_EPOCH + datetime.timedelta(seconds=seconds)).isoformat()
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1000 == 0:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"


def _enum_converter(enum: EnumDescriptor) -> Convert:
    if enum.full_name == "google.protobuf.NullValue":
        return lambda value: None
    if custom_enum_names():
        return _unsupported
    # The first value declared with each number, as json_format (and Go and
    # C++) name an alias's number: values_by_number may hold the last.
    names: dict[int, str] = {}
    for each in enum.values:
        names.setdefault(each.number, each.name)
    closed = enum.is_closed

    def convert(value: int) -> Any:
        name = names.get(value)
        if name is not None:
            return name
        if closed:
            raise json_format.SerializeToJsonError(
                "Enum field contains an integer value which can not mapped to an enum value."
            )
        return value

    return convert


@functools.cache
def custom_enum_names() -> bool:
    """Whether enum values may carry their own JSON names (an extension json_format reads)."""
    try:
        descriptor_pool.Default().FindExtensionByName("pb.enumvalue.json")
    except KeyError:
        return False
    return True


def _same(value: Any) -> Any:
    return value


def _double(value: float) -> Any:
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return value


def _float(value: float) -> Any:
    if math.isinf(value) or math.isnan(value):
        return _double(value)
    return type_checkers.ToShortestFloat(value)


def _unsupported(value: Any) -> Any:
    raise _Unsupported


def _value(message: Any) -> Any:
    which = message.WhichOneof("kind")
    if which == "number_value":
        number: float = message.number_value
        if math.isinf(number) or math.isnan(number):
            kind = "Infinity" if math.isinf(number) else "NaN"
            raise ValueError(
                f"Fail to serialize {kind} for Value.number_value, "
                "which would parse as string_value"
            )
        if number.is_integer() and -_WHOLE_BELOW < number < _WHOLE_BELOW:
            return int(number)
        return number
    if which == "string_value":
        return message.string_value
    if which == "struct_value":
        return _struct(message.struct_value)
    if which == "list_value":
        return _list_value(message.list_value)
    if which == "bool_value":
        return message.bool_value
    return None  # null_value, or no kind set


def _struct(message: Any) -> dict[str, Any]:
    fields = message.fields
    return {key: _value(fields[key]) for key in fields}


def _list_value(message: Any) -> list[Any]:
    return [_value(value) for value in message.values]


# json_format's output, numbers fixed afterwards: for what _printer leaves to it.


def integral_numbers(value: Any) -> Any:
    """A JSON value with every integral float below 10^21 in size as an int
    (lists and dicts in place)."""
    kind = type(value)
    if kind is float:
        return int(value) if value.is_integer() and -_WHOLE_BELOW < value < _WHOLE_BELOW else value
    if kind is dict:
        for key, item in value.items():
            if type(item) in _MAY_HOLD_FLOATS:
                value[key] = integral_numbers(item)
    elif kind is list:
        for index, item in enumerate(value):
            if type(item) in _MAY_HOLD_FLOATS:
                value[index] = integral_numbers(item)
    return value


def _fix_numbers(data: Any, descriptor: Descriptor) -> Any:
    if descriptor.full_name in JSON_VALUE_TYPES:
        return integral_numbers(data)
    for name, child, shape in _value_fields(descriptor):
        value = data.get(name)
        if value is None:
            continue
        if shape == _ONE:
            data[name] = _fix_numbers(value, child)
        elif shape == _LIST:
            data[name] = [_fix_numbers(item, child) for item in value]
        else:
            data[name] = {key: _fix_numbers(item, child) for key, item in value.items()}
    return data


@functools.cache
def _value_fields(descriptor: Descriptor) -> tuple[tuple[str, Descriptor, int], ...]:
    """The message fields whose JSON can hold a Value number: only these are walked."""
    fields = []
    for field in descriptor.fields:
        child = field.message_type
        shape = _LIST if field.is_repeated else _ONE
        if child is not None and child.GetOptions().map_entry:
            child, shape = child.fields_by_name["value"].message_type, _MAP
        if child is not None and _holds_values(child):
            fields.append((field.name, child, shape))
    return tuple(fields)


def _holds_values(descriptor: Descriptor) -> bool:
    """Whether a message is, or reaches through its fields, a Struct, Value or ListValue."""
    return reaches(descriptor, JSON_VALUE_TYPES)


@functools.cache
def reaches(descriptor: Descriptor, full_names: frozenset[str]) -> bool:
    """Whether a message is, or holds somewhere in its fields, a message of these types."""
    seen, stack = set(), [descriptor]
    while stack:
        current = stack.pop()
        if current.full_name in full_names:
            return True
        if current.full_name not in seen:
            seen.add(current.full_name)
            stack += [f.message_type for f in current.fields if f.message_type is not None]
    return False
