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
own, but for one check first: a field holding JSON of the wrong kind for
its type, an enum value the enum does not name, or a field the message does
not have, gets an error naming the field and what it takes (``check_shapes``).
The property tests hold merge_json_object to that check and json_format.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import json
import math
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, cast

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from gateway.errors import quoted
from gateway.protojson import JSON_VALUE_TYPES, MAX_EXACT_INTEGER, custom_enum_names
from gateway.rules import is_map_field

# json_format.ParseDict's default: messages (each Struct and Value counts) nest this deep.
_MAX_DEPTH = 100
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?Z"
)
_EPOCH = datetime.datetime(1970, 1, 1)
# A Struct key that reads as one name in a path.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A Duration in JSON: seconds, up to nine decimals, then "s" (the proto3 JSON mapping).
_DURATION = re.compile(r"-?[0-9]+(?:\.[0-9]{0,9})?s")
# The most a Duration holds: 10,000 years (google/protobuf/duration.proto).
_DURATION_SECONDS = 315_576_000_000
_INTEGERS = frozenset(
    (
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    )
)
# A number as JSON writes it, in a string (the proto3 JSON mapping lets
# integers come so), with a leading + too, as protobuf reads it.
_NUMBER_TEXT = re.compile(r"[+-]?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?")
# The values each integer type holds, by its C++ type.
INTEGER_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


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


def check_shapes(data: Any, message: Message, where: str = "") -> None:
    """json_format.ParseError naming the field where the body has something
    other than an object for a message, or other than a string for a string
    field. json_format itself would walk a string as if it were an object
    (`no field named "s"`), or fail inside a regular expression. where names
    data in the message when it is not the whole body."""
    _check_shapes(data, message.DESCRIPTOR, where, 1)


def _check_shapes(data: Any, descriptor: Any, path: str, depth: int) -> None:
    name = descriptor.full_name
    if data is None or depth > _MAX_DEPTH:
        return  # null leaves a field unset; json_format refuses the depth
    if name == "google.protobuf.Duration":
        _check_duration(data, path)
    elif name == "google.protobuf.Timestamp":
        _check_timestamp(data, path)
    elif name in ("google.protobuf.Struct", "google.protobuf.ListValue"):
        kind = dict if name.endswith("Struct") else list
        if type(data) is not kind:
            expected = "an object" if kind is dict else "a list"
            raise json_format.ParseError(f"{_where(path)}: expected {expected}, got {_kind(data)}")
    if name in JSON_VALUE_TYPES:
        inexact = inexact_integer(data, path)
        if inexact is not None:
            raise json_format.ParseError(inexact)
    if name.startswith("google.protobuf."):
        return  # well-known types have JSON forms of their own; json_format judges them
    if type(data) is not dict:
        raise json_format.ParseError(f"{_where(path)}: expected an object, got {_kind(data)}")
    named: dict[str, str] = {}  # each field's key, to refuse one given twice
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if field is None:
            names = ", ".join(each.name for each in descriptor.fields)
            raise json_format.ParseError(
                f"{_where(path)} has no field named {_quoted(key)}; its fields are {names}"
            )
        if field.name in named:  # by its name and its JSON name: which value was meant?
            raise json_format.ParseError(
                f"{_where(path)} gives the field {field.name} twice, as"
                f" {_quoted(named[field.name])} and as {_quoted(key)}"
            )
        named[field.name] = key
        if value is None:
            continue
        where = f"{path}.{key}" if path else key
        if is_map_field(field):
            if type(value) is not dict:
                raise json_format.ParseError(f"{where}: expected an object, got {_kind(value)}")
        elif field.is_repeated:
            if type(value) is not list:
                raise json_format.ParseError(f"{where}: expected a list, got {_kind(value)}")
            for index, item in enumerate(value):
                if field.message_type is not None:
                    _check_shapes(item, field.message_type, f"{where}[{index}]", depth + 1)
                elif item is not None:
                    _check_scalar(item, field, f"{where}[{index}]")
        elif field.message_type is not None:
            _check_shapes(value, field.message_type, where, depth + 1)
        else:
            _check_scalar(value, field, where)


def _check_scalar(value: Any, field: FieldDescriptor, where: str) -> None:
    """ParseError unless value is JSON that the field's type takes: json_format
    would read true as 1, 6.5 as 6, and say "unhashable type" of a list."""
    kind = field.cpp_type
    if field.type == FieldDescriptor.TYPE_STRING:
        if type(value) is not str:
            raise json_format.ParseError(f"{where}: expected a string, got {_kind(value)}")
    elif kind == FieldDescriptor.CPPTYPE_BOOL:
        if type(value) is not bool:
            raise json_format.ParseError(f"{where}: expected true or false, got {_given(value)}")
    elif kind in _INTEGERS:
        low, high = INTEGER_RANGES[kind]
        number = integral(value)
        if number is None or not low <= number <= high:
            raise json_format.ParseError(
                f"{where}: expected an integer from {low} to {high}, got {_given(value)}"
            )
    elif kind in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        # As a query gives it: json_format reads "1e400" as infinity, "1_000"
        # as 1000, and 1e-50 into a float as 0.
        single = kind == FieldDescriptor.CPPTYPE_FLOAT
        if type(value) not in (str, int, float):  # json_format reads true as 1
            raise json_format.ParseError(f"{where}: expected a number, got {_given(value)}")
        if type(value) is str:
            problem = float_text_problem(value, single)
        elif single:  # a double's range was checked as the number was read
            problem = float_value_problem(float(value), repr(value), single)
        else:
            problem = None
        if problem is not None:
            raise json_format.ParseError(f"{where}: {_given(value)} {problem}")
    elif kind == FieldDescriptor.CPPTYPE_ENUM and not custom_enum_names():
        # A value's name, or its number as a JSON number (not in a string, not true).
        enum = cast(EnumDescriptor, field.enum_type)
        if type(value) is str:
            known = value in enum.values_by_name
        else:
            number = integral(value)
            low, high = INTEGER_RANGES[FieldDescriptor.CPPTYPE_INT32]
            known = number is not None and low <= number <= high
        if not known:
            raise json_format.ParseError(
                f"{where}: expected one of {offered_names(enum)}, got {_given(value)}"
            )


# A float field's text: a number's, in JSON's form with a leading + or
# point allowed, or one of the words for what JSON's numbers cannot say.
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_FLOAT_WORDS = re.compile(r"[+-]?(?:nan|inf|infinity)", re.ASCII | re.IGNORECASE)


def float_text_problem(text: str, single: bool) -> str | None:
    """Why text, a double field's (or, single, a float's) value in a query,
    a path or a JSON string, is none the field holds; None when it is one.
    A number's text is taken, and NaN, Infinity and -Infinity in any case,
    as protobuf's JSON and Go write them; not Python's other forms
    (`1_000`, full-width digits, spaces around it), nor a number the field
    would hold as infinity or as 0."""
    if _FLOAT_WORDS.fullmatch(text):
        return None
    if not _FLOAT_TEXT.fullmatch(text):
        return "is not a number"
    return float_value_problem(float(text), text, single)


def float_value_problem(value: float, text: str, single: bool) -> str | None:
    """Why value, read from text, is none a double field (or, single, a
    float field) holds as it is: it would be infinity, or 0."""
    held = struct.unpack("f", struct.pack("f", value))[0] if single else value
    kind = "float" if single else "double"
    lost = _held_as(held, text)
    if lost == "infinity":
        return f"is out of range for a {kind}"
    if lost == "0":
        return f"is too small for a {kind}, which would hold it as 0"
    return None


def _held_as(held: float, text: str) -> str | None:
    """What a number written as text is held as where it is no longer
    itself: "infinity" past the largest, "0" for one not 0 below the
    smallest; else None."""
    if math.isinf(held):
        return "infinity"
    at = max(text.find("e"), text.find("E"))  # the exponent's, or -1
    if held == 0 and _NONZERO_DIGIT.search(text if at < 0 else text[:at]):
        return "0"
    return None


def inexact_integer(data: Any, path: str) -> str | None:
    """Why data, the JSON of a Struct, ListValue or Value found at path,
    cannot be read as it is: an integer in it that is not a double's value,
    a double being the one kind of number these hold. None when there is
    none. (JavaScript writes 2^60 as 1152921504606847000, its double's
    shortest form, which is not 2^60: refused too, as any other integer a
    double would change.)"""
    for where, value in json_leaves(data, path):
        if type(value) is int and not -MAX_EXACT_INTEGER <= value <= MAX_EXACT_INTEGER:
            try:
                kept = int(float(value))
            except OverflowError:
                return (
                    f"{_where(where)}: the integer {_number(value)} is past any double, the"
                    " kind of number a JSON value holds in protobuf; send it as a string"
                )
            if kept != value:
                stored = _number(kept)
                # Both shortened, the two could read alike.
                becomes = (
                    "is no double's value" if "…" in stored else f"would be stored as {stored}"
                )
                return (
                    f"{_where(where)}: the integer {_number(value)} {becomes} (protobuf keeps"
                    " a JSON value's numbers as doubles, exact up to 2^53); send it as a string"
                )
    return None


def json_leaves(data: Any, path: str, *, sort_keys: bool = False) -> Iterator[tuple[str, Any]]:
    """Each value in data, JSON as json.loads reads it, that is neither an
    object nor a list, with its path from path (.key, ["key"], [index]), in
    the order they are written: an object's members as they come, or by key
    with sort_keys."""
    pending = [(path, data)]
    while pending:
        where, value = pending.pop()
        # Pushed last to first, so that they come out first to last.
        if type(value) is dict:
            items = sorted(value.items()) if sort_keys else value.items()
            pending.extend(reversed([(_member(where, key), item) for key, item in items]))
        elif type(value) is list:
            pending.extend(reversed([(f"{where}[{i}]", item) for i, item in enumerate(value)]))
        else:
            yield where, value


def _member(path: str, key: str) -> str:
    """The path of an object's member: .key, or ["key"] (shortened) for a key
    that would not read as one short name."""
    if len(key) <= 40 and _NAME.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{_quoted(key)}]"


def integral(value: Any) -> int | None:
    """The integer a JSON value writes: a number with no fraction, or one
    written in a string ("12", "1e3", "12.0", as the proto3 JSON mapping
    allows); None for anything else, and for strings of numbers far past
    any 64-bit integer."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is not str or len(value) > 100 or not _NUMBER_TEXT.fullmatch(value):
        return None
    number = decimal.Decimal(value)
    if number.adjusted() > 20 or number != number.to_integral_value():
        return None
    return int(number)


@functools.cache
def offered_values(enum: EnumDescriptor) -> Mapping[str, int]:
    """An enum's values by name, but for a zero value named *_UNSPECIFIED,
    which means "not given": not one to offer. Built once per enum."""
    return MappingProxyType(
        {
            each.name: each.number
            for each in enum.values
            if not (each.number == 0 and each.name.endswith("UNSPECIFIED"))
        }
    )


def offered_names(enum: EnumDescriptor) -> str:
    """The names of offered_values, for an error."""
    return ", ".join(offered_values(enum))


def _check_timestamp(data: Any, path: str) -> None:
    """A Timestamp's JSON form is an RFC 3339 time: json_format's own words for
    anything else are strptime's."""
    if type(data) is str:
        try:
            timestamp_pb2.Timestamp().FromJsonString(data)
        except ValueError:
            pass
        else:
            return
    raise json_format.ParseError(
        f'{_where(path)}: expected a time such as "2026-01-31T12:00:00Z" (RFC 3339), '
        f"got {_given(data)}"
    )


def _where(path: str) -> str:
    return path or "the body"


def _given(value: Any) -> str:
    """value for an error: a string or number as JSON writes it (shortened), else its kind."""
    if type(value) is str:
        return _quoted(value)
    if type(value) in (int, float):
        return _number(value)
    return _kind(value)


def _number(value: float) -> str:
    """A number for an error as JSON writes it (shortened, as _number_text)."""
    return _number_text(json.dumps(value))


def _number_text(text: str) -> str:
    """A number's JSON text for an error; one of more than 40 digits by its
    first ones and how many there are."""
    digits = len(text.lstrip("-"))
    return text if digits <= 40 else f"{text[:24]}… ({digits} digits)"


class _LongInteger(Exception):
    """An integer of more digits than Python converts, by its text."""


def _refuse_long(text: str) -> int:
    if len(text.lstrip("-")) > sys.get_int_max_str_digits():
        raise _LongInteger(text)
    return 0  # its value is not wanted, only which integer is too long


class NamedTwice(ValueError):
    """A JSON object with a key given twice: which value was meant?"""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads's object_pairs_hook for objects that name each key once;
    NamedTwice ("names 'key' twice in one object") for one that does not."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise NamedTwice(f"names {quoted(key)} twice in one object")
            seen.add(key)
    return value


class LostNumber(ValueError):
    """A number too small for a double (it would read as 0) or too large
    (it would read as infinity, which JSON cannot carry back)."""


class _Constant(str):
    """NaN, Infinity or -Infinity written bare, which json.loads reads and
    JSON has not: read as this, then refused by where it is."""


_NONZERO_DIGIT = re.compile(r"[1-9]")


def nonzero_float(text: str) -> float:
    """json.loads's parse_float: the double of a JSON number with a fraction
    or exponent; LostNumber for one not 0 that a double holds only as 0
    (1e-400, say), which would be stored as another number, and for one
    past the largest double (1e400), which would be stored as infinity."""
    value = float(text)
    lost = _held_as(value, text)
    if lost is not None:
        size = "large" if lost == "infinity" else "small"
        raise LostNumber(
            f"the number {_float_text(text)} is too {size} for a double,"
            f" which would hold it as {lost}"
        )
    return value


def _float_text(text: str) -> str:
    """A number's text for an error, its exponent kept where it is
    shortened: the exponent says why it was refused."""
    at = max(text.find("e"), text.find("E"))
    if at > 20 and len(text) - at <= 20:
        return f"{text[:20]}…{text[at:]}"
    return _number_text(text)


class UnreadableJson(ValueError):
    """JSON that read_json refuses; its message names the problem."""


class NotJson(UnreadableJson):
    """Text that is not JSON at all."""


def read_json(text: bytes | str, what: str) -> Any:
    """json.loads(text) as porch reads JSON: a key named twice in one object,
    a number a double holds only as 0, and an integer of more digits than
    Python converts are refused rather than read as something else.
    UnreadableJson for any of these or for text that is not JSON, its
    message naming the text as what ("the request body", say). Bytes are
    UTF-8, as JSON sent between systems is (RFC 8259, 8.1): json.loads would
    read UTF-16 and UTF-32 too. A UTF-8 byte order mark before them is ignored."""
    constants: list[str] = []

    def constant(name: str) -> _Constant:
        constants.append(name)
        return _Constant(name)

    try:
        if isinstance(text, bytes):
            text = text.decode().removeprefix("\ufeff")
        value = json.loads(
            text,
            object_pairs_hook=unique_keys,
            parse_float=nonzero_float,
            parse_constant=constant,
        )
    except NamedTwice as error:
        raise UnreadableJson(f"{what} {error}") from None
    except LostNumber as error:
        raise UnreadableJson(f"{error}; send it as a string") from None
    except UnicodeDecodeError as error:
        raise UnreadableJson(f"{what} is not UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise NotJson(f"{what} is not JSON: {error}") from None
    except RecursionError:
        raise UnreadableJson(f"{what} nests too deeply") from None
    except ValueError:  # an integer of more digits than Python converts
        raise UnreadableJson(
            f"{what} holds a number too long to read: the integer {too_long_integer(text)}"
            " is past any number a field or a JSON value holds; send it as a string"
        ) from None
    if constants:  # found by where it is
        for where, leaf in json_leaves(value, ""):
            if type(leaf) is _Constant:
                at = f" (at {where})" if where else ""
                raise NotJson(
                    f"{what} is not JSON: {leaf}{at} is not a JSON number; JSON has no NaN"
                    " or infinity"
                )
    return value


def too_long_integer(body: bytes | str) -> str:
    """The first integer in body, JSON that json.loads refused for holding one
    of more digits than Python converts, shown as an error shows a number."""
    try:
        json.loads(body, parse_int=_refuse_long)
    except _LongInteger as error:
        return _number_text(str(error))
    raise ValueError("the body holds no integer of more digits than Python converts")


def _quoted(text: str) -> str:
    return json.dumps(text[:40] + ("…" if len(text) > 40 else ""), ensure_ascii=False)


def _check_duration(data: Any, path: str) -> None:
    """A Duration's JSON form is seconds with an "s": json_format's own words
    for anything else are a Python error ("invalid literal for int()")."""
    if type(data) is str and _DURATION.fullmatch(data):
        seconds = data[:-1].partition(".")[0].lstrip("-").lstrip("0") or "0"
        if len(seconds) <= 12 and int(seconds) <= _DURATION_SECONDS:
            return
        raise json_format.ParseError(
            f"{_where(path)}: a duration is at most {_DURATION_SECONDS:,} seconds either way,"
            f" got {_given(data)}"
        )
    raise json_format.ParseError(
        f'{_where(path)}: expected a duration, seconds with an "s" such as "3600s" '
        f'or "1.5s", got {_given(data)}'
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
    elif kind is float or (kind is int and -MAX_EXACT_INTEGER <= data <= MAX_EXACT_INTEGER):
        message.number_value = data
    else:
        raise _NotPlain  # a larger integer: check_shapes refuses it unless a double holds it


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
