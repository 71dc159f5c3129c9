"""A PostgreSQL connection that LISTENs for porch's event notifications."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

CHANNEL = "porch_events"


class Listener:
    """One autocommit connection, listening on CHANNEL; poll it when its socket is readable."""

    def __init__(self, engine: Engine) -> None:
        # Opened as the engine opens its connections (the URL's settings and
        # porch's), then detached: it is held for as long as it listens.
        pooled = engine.raw_connection()
        pooled.detach()
        connection: Any = pooled.dbapi_connection
        try:
            connection.rollback()  # anything the engine's first-connect checks left open
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def fileno(self) -> int:
        """The socket to wait on."""
        return int(self._connection.fileno())

    def drain(self) -> int:
        """Read what arrived; return how many notifications it held. Raises on a lost connection."""
        self._connection.poll()
        count = len(self._connection.notifies)
        self._connection.notifies.clear()
        return count

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()
