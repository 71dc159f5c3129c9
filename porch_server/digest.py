"""Canonical JSON of a task_input and its digest, the task_input_id.

The algorithm is npg_porch's, so ids computed by either agree: keys sorted
recursively, no whitespace, non-ASCII escaped as \\uXXXX, ``/`` escaped as
``\\/``, and integral numbers written as integers (a protobuf Struct carries
every number as a double, so ``1.0`` arrives for ``1``).
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


def canonical_json(task_input: dict[str, Any]) -> str:
    """Return the canonical JSON text of task_input."""
    text = json.dumps(
        _integral(task_input), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return text.replace("/", "\\/")


def task_input_id(task_input: dict[str, Any]) -> str:
    """Return the lowercase hex SHA-256 of the canonical JSON of task_input."""
    return digest_of(canonical_json(task_input))


def digest_of(canonical: str) -> str:
    """Return the task_input_id of a canonical JSON text (from canonical_json)."""
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
