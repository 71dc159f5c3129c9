"""Opaque page tokens for keyset pagination (AIP-158).

A token carries the key of the last item served and a fingerprint of the
listing and its filters, so it can only continue the listing it came from.
It is not secret: forging one only moves where a listing resumes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import TypeVar

from porch_server.errors import InvalidArgument

Key = TypeVar("Key", int, str)
Filters = Mapping[str, str | int | bool | None]

_INVALID = "page_token is invalid or does not match the filters"


def encode_page_token(listing: str, filters: Filters, last_key: int | str) -> str:
    """Return the token that resumes listing after last_key."""
    body = json.dumps([_fingerprint(listing, filters), last_key], separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode("ascii").rstrip("=")


def decode_page_token(
    token: str, listing: str, filters: Filters, key_type: type[Key]
) -> Key | None:
    """Return the last key a token carries, None for the first page ("").

    Raises InvalidArgument for garbage and for a token of another listing or
    other filters.
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        fingerprint, last_key = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, TypeError, UnicodeError, binascii.Error, RecursionError) as error:
        raise InvalidArgument(_INVALID) from error
    if fingerprint != _fingerprint(listing, filters) or type(last_key) is not key_type:
        raise InvalidArgument(_INVALID)
    # Keys porch itself would never write: past a 64-bit id, or text no
    # database column holds.
    if isinstance(last_key, int) and not 0 <= last_key < 2**63:
        raise InvalidArgument(_INVALID)
    if isinstance(last_key, str) and not (last_key.isprintable() and len(last_key) <= 1024):
        raise InvalidArgument(_INVALID)
    return last_key


def _fingerprint(listing: str, filters: Filters) -> str:
    text = json.dumps([listing, dict(filters)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
