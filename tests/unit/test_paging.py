"""Page tokens: opaque, url-safe, and valid only for the listing they came from."""

from __future__ import annotations

import base64
import re

import pytest

from porch_server.errors import InvalidArgument
from porch_server.paging import decode_page_token, encode_page_token

FILTERS = {"pipeline": "p1", "status": None}


@pytest.mark.parametrize("key", [0, 1, 2**62])
def test_round_trip_int(key: int) -> None:
    token = encode_page_token("tasks", FILTERS, key)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert decode_page_token(token, "tasks", dict(FILTERS), int) == key


@pytest.mark.parametrize("key", ["", "p1", "name with spaces/é"])
def test_round_trip_str(key: str) -> None:
    token = encode_page_token("pipelines", FILTERS, key)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert decode_page_token(token, "pipelines", FILTERS, str) == key


def test_empty_token_is_the_first_page() -> None:
    assert decode_page_token("", "tasks", FILTERS, int) is None


def test_filter_order_does_not_matter() -> None:
    token = encode_page_token("tasks", {"a": 1, "b": True}, 7)
    assert decode_page_token(token, "tasks", {"b": True, "a": 1}, int) == 7


@pytest.mark.parametrize(
    ("listing", "filters", "key_type"),
    [
        ("tasks", {"pipeline": "p2", "status": None}, int),
        ("tasks", {"pipeline": "p1", "status": "PENDING"}, int),
        ("tasks", {"pipeline": "p1"}, int),
        ("pipelines", FILTERS, int),
    ],
)
def test_token_from_another_listing_is_rejected(
    listing: str, filters: dict[str, str | None], key_type: type[int]
) -> None:
    token = encode_page_token("tasks", FILTERS, 7)
    with pytest.raises(InvalidArgument, match="page_token is invalid or does not match"):
        decode_page_token(token, listing, filters, key_type)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "é",
        "a",
        _b64(b"not json"),
        _b64(b"[1, 2, 3]"),
        _b64(b"{}"),
        _b64(b"7"),
        _b64(b"\xff\xfe"),
        _b64(b'["0000000000000000", true]'),
        # Nested deeper than json's recursion allows: an error, not a crash.
        _b64(b"[" * 100_000 + b"]" * 100_000),
    ],
)
def test_garbage_is_rejected(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token is invalid or does not match"):
        decode_page_token(token, "tasks", FILTERS, int)


def test_key_of_another_type_is_rejected() -> None:
    token = encode_page_token("tasks", FILTERS, 7)
    with pytest.raises(InvalidArgument):
        decode_page_token(token, "tasks", FILTERS, str)


def test_bool_is_not_an_int_key() -> None:
    token = encode_page_token("tasks", FILTERS, True)
    with pytest.raises(InvalidArgument):
        decode_page_token(token, "tasks", FILTERS, int)


@pytest.mark.parametrize(
    ("listing", "key"),
    [
        ("tasks", 2**63),
        ("tasks", 10**30),
        ("tasks", -1),
        ("pipelines", "a\x00b"),
        ("pipelines", "x" * 1025),
    ],
)
def test_a_key_porch_never_wrote_is_rejected(listing: str, key: int | str) -> None:
    # Forged tokens: the database would fail on them (an integer past 64
    # bits, a NUL), which must not be a 500.
    token = encode_page_token(listing, FILTERS, key)
    with pytest.raises(InvalidArgument):
        decode_page_token(token, listing, FILTERS, type(key))
