"""Event cursors and PostgreSQL snapshots."""

import pytest

from porch_server.cursors import Snapshot, cursor_key, make_cursor
from porch_server.errors import InvalidArgument


def test_cursor_round_trip_and_order() -> None:
    assert cursor_key(make_cursor(12, 345)) == (12, 345)
    assert cursor_key("0.9") < cursor_key("0.10") < cursor_key("1.2")


@pytest.mark.parametrize(
    "bad",
    [
        *("", "1", "1.", ".1", "a.b", "1.2.3", "-1.2", "1.²", " 1.2"),
        *("00.1", "0.01", "0.9223372036854775808", "9223372036854775808.0", "0." + "9" * 5000),
    ],
)
def test_malformed_cursors_are_invalid_arguments(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="not an event cursor"):
        cursor_key(bad)


def test_the_largest_cursor_is_read() -> None:
    assert cursor_key("9223372036854775807.0") == (2**63 - 1, 0)


def test_a_snapshot_is_read_from_postgresqls_text() -> None:
    assert Snapshot.parse("100:105:100,103") == Snapshot(100, 105, frozenset({100, 103}))
    assert Snapshot.parse("7:7:").running == frozenset()
