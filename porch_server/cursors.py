"""Event cursors: opaque strings to clients, (transaction id, event id) to porch.

On PostgreSQL an event id alone is no safe cursor, because ids are handed
out before their transactions commit, and commits happen out of id order.
Events are therefore read in (writing transaction id, event id) order and
only below the oldest transaction still running, where nothing new can
appear. On SQLite writers are serialised, so the transaction id is 0 and
the event id alone orders events.
"""

from __future__ import annotations

from dataclasses import dataclass

from porch_server.errors import InvalidArgument, shortened

Key = tuple[int, int]


def make_cursor(xid: int, event_id: int) -> str:
    """Return the cursor of the event event_id written by transaction xid."""
    return f"{xid}.{event_id}"


# Both parts are stored as 64-bit signed integers.
_MAX_PART = 2**63 - 1


def cursor_key(cursor: str) -> Key:
    """Return the (xid, event id) a cursor stands for; InvalidArgument if it is
    not one as make_cursor writes them (no leading zeros, each part in range)."""
    xid, dot, event_id = cursor.partition(".")
    if not (dot and _is_part(xid) and _is_part(event_id)):
        raise InvalidArgument(f"not an event cursor: {shortened(cursor)!r}")
    return int(xid), int(event_id)


def _is_part(text: str) -> bool:
    return (
        0 < len(text) <= 19
        and text.isascii()
        and text.isdigit()
        and (text == "0" or text[0] != "0")
        and int(text) <= _MAX_PART
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Which transactions were running at one moment (PostgreSQL's snapshot):
    every one below xmin had ended, and of those from xmin below xmax, the
    ones in running had not. A stream that starts "from now" begins at
    (xmin, 0).
    """

    xmin: int
    xmax: int
    running: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """Read PostgreSQL's text form of a snapshot, 'xmin:xmax:xip,...'."""
        xmin, xmax, running = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in running.split(",") if x))
