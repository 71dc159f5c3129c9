"""Canonical JSON of a task_input and its digest, the task_input_id.

The algorithm is npg_porch's, so ids computed by either agree: keys sorted
recursively, no whitespace, non-ASCII escaped as \\uXXXX, ``/`` escaped as
``\\/``, other numbers as Python's ``repr`` writes them but with no leading
zero in the exponent (``1e-5``), and integral numbers written as integers (a
protobuf Struct carries every number as a double, so ``1.0`` arrives for
``1``). This last rule is porch's own: npg_porch hashed ``100.0`` as written.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from porch_server.errors import InvalidArgument


def _integral(value: Any) -> Any:
    """Return value with every integral float turned into an int, recursively."""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgument("task_input holds a number that is not finite")
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


# One encoder for every input: json.dumps with options builds a new one per
# call, which took a third of the time of encoding a small input.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_json(task_input: dict[str, Any]) -> str:
    """Return the canonical JSON text of task_input."""
    value = _integral(task_input)
    text = _ENCODER.encode(value)
    if "e-0" in text or "\\u007f" in text:
        # Perhaps one of the two things json.dumps writes unlike npg_porch's
        # encoder: ask the exact writer, slower, for these inputs only.
        text = _exact(value)
    return text.replace("/", "\\/")


def _exact(value: Any) -> str:
    """What json.dumps writes (keys sorted, no whitespace, ASCII), but as
    npg_porch's encoder (ujson) writes two things: an exponent without a
    leading zero (``1e-5``, not ``1e-05``) and DEL (U+007F) as itself, not
    ``\\u007f``; nothing else in their output differs."""
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{_string(key)}:{_exact(item)}" for key, item in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_exact(item) for item in value) + "]"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")
        return f"{mantissa}e{exponent[0]}{exponent[1:].lstrip('0')}" if e else mantissa
    return json.dumps(value)


def _string(text: str) -> str:
    parts = (json.dumps(part, ensure_ascii=True)[1:-1] for part in text.split("\x7f"))
    return '"' + "\x7f".join(parts) + '"'


def task_input_id(task_input: dict[str, Any]) -> str:
    """Return the lowercase hex SHA-256 of the canonical JSON of task_input."""
    return digest_of(canonical_json(task_input))


def digest_of(canonical: str) -> str:
    """Return the task_input_id of a canonical JSON text (from canonical_json)."""
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
