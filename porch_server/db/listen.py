"""A PostgreSQL connection that LISTENs for porch's event notifications."""

from __future__ import annotations

from typing import Any

import psycopg2
from sqlalchemy import Engine

CHANNEL = "porch_events"


class Listener:
    """One autocommit connection, listening on CHANNEL; poll it when its socket is readable."""

    def __init__(self, engine: Engine) -> None:
        dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._connection: Any = psycopg2.connect(dsn, connect_timeout=10, application_name="porch")
        self._connection.autocommit = True
        with self._connection.cursor() as cursor:
            cursor.execute(f"LISTEN {CHANNEL}")

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
