"""PostgreSQL from the event loop: porch's busiest statements on asyncpg.

A claim, an update and a registration are each one statement in autocommit
(see ``porch_server.store``). Run through SQLAlchemy and psycopg2 they need
a thread-pool hop and SQLAlchemy's per-execute work, which together cost
about as much CPU as the gRPC call itself. ``AsyncStatements`` runs the very
same SQLAlchemy statements, compiled once for asyncpg, on a pool of asyncpg
connections from the event loop. Everything else stays on the Store's
SQLAlchemy engine.

Rows come back as ``RowView``: attribute access by column name, like
SQLAlchemy's rows, so the Store turns both into values the same way.
Connection failures become ``Unavailable``; a statement that lost a deadlock
or a serialization conflict (and so changed nothing) raises ``Contended``,
and one PostgreSQL refused otherwise ``Refused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from porch_server.db.engine import (
    CHECK_CLIENT,
    checks_client,
    checks_client_unless_set,
    postgresql_session,
)
from porch_server.errors import LOCK_TIMED_OUT, READ_ONLY_DATABASE, Unavailable, first_line

_DIALECT = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]
# asyncpg's words when it will not start a statement on a connection (its
# protocol's _set_state and _ensure_connected): before the statement's Bind
# and Execute are written (at most a Parse, which runs nothing).
_NOT_SENT = re.compile(r"cannot switch to state |not connected$")
# How long close() waits for the statements it cancelled to end before it
# closes their connections anyway.
CANCEL_SECONDS = 2.0


class Contended(Exception):
    """The statement lost to concurrent work (a deadlock or serialization
    failure) and changed nothing: the caller may run it again or otherwise."""


class TimedOut(Unavailable):
    """PostgreSQL ended the statement for a lock_timeout or statement_timeout
    (or a cancel), having changed nothing. Alone, its caller is told to try
    again; in a batch it may be one caller's doing (an input that is slow to
    store, say), and each caller may go alone."""


class LockTimedOut(TimedOut):
    """The statement waited for a lock longer than its lock_timeout."""


class Refused(Exception):
    """PostgreSQL refused the statement (for one of its values, say) and it
    changed nothing: in a batch, one caller's data may be the cause."""


class RowView(tuple[Any, ...]):
    """One asyncpg record's values, read by attribute like a SQLAlchemy row.

    Each set of columns has its own subclass (``row_class``), made once,
    whose attributes read the tuple by position: a name looked up in the
    record at every read cost ten times as much.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        # Reached only for a name that is not one of the row's columns.
        raise AttributeError(f"the row has no column {name!r}")


_ROW_CLASSES: dict[tuple[str, ...], type[RowView]] = {}


def row_class(columns: tuple[str, ...]) -> type[RowView]:
    """The RowView class of rows with these columns, in this order."""
    made = _ROW_CLASSES.get(columns)
    if made is None:
        fields = {name: property(itemgetter(index)) for index, name in enumerate(columns)}
        made = _ROW_CLASSES[columns] = type("RowView", (RowView,), {"__slots__": (), **fields})
    return made


@dataclass(frozen=True)
class _Compiled:
    sql: str
    # For each $n: the caller's parameter name, or None for a fixed value.
    names: tuple[str | None, ...]
    fixed: tuple[Any, ...]

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        return [
            fixed if name is None else params[name]
            for name, fixed in zip(self.names, self.fixed, strict=True)
        ]


def _compile(statement: ClauseElement) -> _Compiled:
    """The statement as asyncpg SQL, with the order of its parameters.

    Literal values and IN lists fixed in the statement are expanded once,
    and those with a plain SQL literal (states, event kinds, sizes) are
    written into its text: the update batch fixed 41 of its 48 parameters,
    each encoded and bound again at every execution. The parameters a
    caller supplies (bindparams without a value) stay $n.
    """
    compiled = statement.compile(dialect=_DIALECT)
    assert isinstance(compiled, SQLCompiler)
    required = {key for key, bind in compiled.binds.items() if bind.required}
    expanded = compiled.construct_expanded_state(dict.fromkeys(required))
    names: list[str | None] = []
    fixed: list[Any] = []
    # What each $n of the expanded statement becomes: a literal or a new $n.
    replacements: dict[str, str] = {}
    for number, name in enumerate(expanded.positiontup or (), start=1):
        value = None if name in required else expanded.parameters[name]
        literal = None if name in required else _literal(value)
        if literal is None:
            names.append(name if name in required else None)
            fixed.append(value)
            literal = f"${len(names)}"
        replacements[str(number)] = literal
    sql = _PLACEHOLDER.sub(lambda match: replacements[match[1]], expanded.statement)
    return _Compiled(sql, tuple(names), tuple(fixed))


_PLACEHOLDER = re.compile(r"\$(\d+)")
# Text written into a statement as it is: no quote, backslash or other
# character whose meaning in a literal depends on the server's settings.
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9_]*")


def _literal(value: Any) -> str | None:
    """The SQL literal of a value fixed in a statement, or None to send it
    as a parameter. Each $n carries its type's cast, as the literal does then."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and _PLAIN_TEXT.fullmatch(value):
        return f"'{value}'"
    return None


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is.

    asyncpg's default reset runs a query (RESET ALL, UNLISTEN *, ...) on every
    release: a round trip per statement. Only single autocommit statements
    run here, so a session never holds anything to undo.
    """


async def _check_client(connection: asyncpg.Connection) -> None:
    """As the store's connections do (engine._check_client): PostgreSQL ends
    a statement whose client is gone, where it can look."""
    version = connection.get_server_version()
    if not checks_client(version.major * 10000 + version.minor):
        return
    with contextlib.suppress(asyncpg.PostgresError):
        await connection.execute(CHECK_CLIENT)


def _lost(connection: asyncpg.Connection) -> bool:
    """True when a connection taken from the pool can serve no more."""
    try:
        closed: bool = connection.is_closed()
    except asyncpg.InterfaceError:  # the pool took it back when it closed
        return True
    return closed


# Settings of libpq's own side of a connection that asyncpg does not know and
# would send PostgreSQL as the session's, failing to connect ("unrecognized
# configuration parameter"); psycopg2's connections keep them. Left out for
# asyncpg's, each with the values that ask nothing asyncpg fails to do (None:
# any value); with another (gssencmode=require, say) asyncpg fails, and every
# statement goes to psycopg2's connections, rather than connect without it.
LIBPQ_CLIENT_ONLY: dict[str, frozenset[str] | None] = {
    "keepalives": None,
    "keepalives_idle": None,
    "keepalives_interval": None,
    "keepalives_count": None,
    "sslcompression": None,
    "fallback_application_name": None,
    "sslsni": None,
    "gssencmode": frozenset(("disable", "prefer")),
    "channel_binding": frozenset(("disable", "prefer")),
    "gssdelegation": frozenset(("0",)),
    "load_balance_hosts": frozenset(("disable",)),
}


def _asyncpg_dsn(url: URL) -> str:
    """url as asyncpg's DSN, without the LIBPQ_CLIENT_ONLY settings it may leave out."""
    dropped = []
    for name, value in url.query.items():
        if name in LIBPQ_CLIENT_ONLY and isinstance(value, str):
            harmless = LIBPQ_CLIENT_ONLY[name]
            if harmless is None or value in harmless:
                dropped.append(name)
    rest = url.difference_update_query(dropped)
    return rest.set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncStatements:
    """A pool of asyncpg connections that runs SQLAlchemy statements."""

    def __init__(self, url: str, schema: str | None, pool_size: int) -> None:
        # libpq's URL form, query (sslmode, host=/socket/dir, ...) included
        # but for what asyncpg would take as server settings: those porch
        # starts each connection with, as its other connections start.
        rest, self._session = postgresql_session(make_url(url), schema)
        self._dsn = _asyncpg_dsn(rest)
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        # A connection kept out of the pool for the statements that find it
        # free. Most come one after another (a batch at a time), and asyncpg
        # spends about as much CPU taking a connection from its pool and
        # giving it back (a task, a timer and futures) as on the statement.
        self._held: asyncpg.Connection | None = None
        self._held_busy = False
        self._returning: set[asyncio.Future[None]] = set()
        # The tasks running a statement now: close() cancels those left.
        self._running: set[asyncio.Task[Any]] = set()
        # Keyed by the statement object; the value keeps the statement alive.
        self._compiled: dict[int, tuple[ClauseElement, _Compiled]] = {}

    async def open(self) -> None:
        """Connect the pool; Unavailable when the database cannot be reached."""
        session = self._session
        settings = {"options": session.options, "application_name": session.application_name}
        # No floor of open connections (min_size=0): asyncpg would reopen a
        # lost one at once and log a traceback for each failed try while the
        # database restarts. A connection opens when a statement needs it.
        pool = asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            server_settings=settings,
            timeout=session.connect_timeout,
            reset=_keep_session,
            init=_check_client if checks_client_unless_set(session.options) else None,
        )
        try:
            await pool
            await pool.execute("SELECT 1")
        except (TimeoutError, OSError, asyncpg.PostgresError) as error:
            pool.terminate()
            raise Unavailable("the database is unavailable", first_line(error)) from error
        self._pool = pool

    async def close(self, patience: float | None = None) -> None:
        """Close every connection once it is back. Statements still running
        after patience seconds are cancelled first: one waiting for a lock
        would go on in PostgreSQL once its connection closed, and commit when
        the lock is released, long after its caller was told the call ended."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if not self._held_busy:  # else its statement gives it back as it ends
            self._give_back_held(pool)
        # Pool.close() terminates every connection when it is cancelled.
        closing = asyncio.ensure_future(pool.close())
        if not await _within(closing, patience):
            for running in self._running:
                running.cancel()  # asyncpg asks PostgreSQL to cancel its statement
            if not await _within(closing, CANCEL_SECONDS):
                closing.cancel()
        try:
            await closing
        except asyncio.CancelledError:
            closer = asyncio.current_task()
            if closer is not None and closer.cancelling():
                raise  # close() itself was cancelled, not only the pool's closing

    async def cancel_backends(self, pids: Sequence[int]) -> int:
        """Cancel what the PostgreSQL backends pids run, from a connection of
        its own, within CANCEL_SECONDS; how many were running something."""
        query = "SELECT count(*) FROM unnest($1::int[]) AS pid WHERE pg_cancel_backend(pid)"

        async def cancel() -> int:
            connection = await asyncpg.connect(self._dsn)
            try:
                return int(await connection.fetchval(query, list(pids)))
            finally:
                connection.terminate()

        return await asyncio.wait_for(cancel(), CANCEL_SECONDS)

    async def rows(self, statement: ClauseElement, params: Mapping[str, Any]) -> Sequence[RowView]:
        """Run one statement in autocommit; its rows."""
        records = await self._fetch(statement, params)
        if not records:
            return []
        made = row_class(tuple(records[0].keys()))
        return [tuple.__new__(made, record) for record in records]

    async def scalar(self, statement: ClauseElement, params: Mapping[str, Any]) -> Any:
        """Run one statement in autocommit; the first column of its first row, or None."""
        records = await self._fetch(statement, params)
        return records[0][0] if records else None

    async def _fetch(
        self, statement: ClauseElement, params: Mapping[str, Any]
    ) -> list[asyncpg.Record]:
        entry = self._compiled.get(id(statement))
        if entry is None:
            entry = self._compiled[id(statement)] = (statement, _compile(statement))
        compiled = entry[1]
        if self._pool is None:
            raise Unavailable("the database is unavailable: the connection pool is closed")
        records: list[asyncpg.Record]
        arguments = compiled.arguments(params)
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            try:
                records = await self._fetch_on(self._pool, compiled.sql, arguments)
            except asyncpg.InternalClientError as error:
                # A session PostgreSQL ended (a restart, pg_terminate_backend)
                # just before the statement was to go, its connection not yet
                # seen closed: asyncpg refuses to run it, so nothing ran, and
                # another connection may. Other such errors come from reading
                # an answer, the statement done: those are not tried again.
                if not _NOT_SENT.match(str(error)) or self._pool is None:
                    raise
                records = await self._fetch_on(self._pool, compiled.sql, arguments)
        except asyncpg.InternalClientError as error:
            raise Unavailable(
                "the database is unavailable: the connection was lost during the call; try again"
            ) from error
        except asyncpg.LockNotAvailableError as error:
            raise LockTimedOut(LOCK_TIMED_OUT, first_line(error)) from error
        except asyncpg.QueryCanceledError as error:
            raise TimedOut("the database is unavailable", first_line(error)) from error
        except (
            TimeoutError,
            OSError,
            asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError,
            # What psycopg2 calls operational errors, the database's state and
            # not the statement's values: too many connections, disk full (53),
            # a database closed to connections (55), a shutdown (57), an I/O
            # error (58).
            asyncpg.InsufficientResourcesError,
            asyncpg.ObjectNotInPrerequisiteStateError,
            asyncpg.OperatorInterventionError,
            asyncpg.PostgresSystemError,
            # As a new connection is refused: no such database (a database
            # renamed or dropped under the server), or the role refused.
            asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidAuthorizationSpecificationError,
        ) as error:
            raise Unavailable("the database is unavailable", first_line(error)) from error
        except asyncpg.ReadOnlySQLTransactionError as error:
            raise Unavailable(READ_ONLY_DATABASE, first_line(error)) from error
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as error:
            raise Contended(str(error)) from error
        except asyncpg.PostgresError as error:
            raise Refused(str(error)) from error
        finally:
            self._running.discard(task)
        return records

    async def _fetch_on(
        self, pool: asyncpg.Pool, sql: str, arguments: list[Any]
    ) -> list[asyncpg.Record]:
        if self._held_busy or self._pool_size < 2:  # one alone is never held
            records: list[asyncpg.Record] = await pool.fetch(sql, *arguments)
            return records
        return await self._fetch_held(pool, sql, arguments)

    async def _fetch_held(
        self, pool: asyncpg.Pool, sql: str, arguments: list[Any]
    ) -> list[asyncpg.Record]:
        """Run the statement on the held connection, taking one from the pool
        when none is held or the one held was lost."""
        self._held_busy = True
        try:
            if self._held is None or _lost(self._held):
                self._give_back_held(pool)
                self._held = await pool.acquire()
            records: list[asyncpg.Record] = await self._held.fetch(sql, *arguments)
        except asyncpg.PostgresError:
            raise  # PostgreSQL refused the statement; the session goes on
        except BaseException:
            # Lost, or the call cancelled mid-statement: the pool ends the
            # connection, or waits for PostgreSQL to cancel the statement.
            self._give_back_held(pool)
            raise
        finally:
            self._held_busy = False
            if self._pool is None:  # closed meanwhile
                self._give_back_held(pool)
        return records

    def _give_back_held(self, pool: asyncpg.Pool) -> None:
        connection, self._held = self._held, None
        if connection is not None:
            returning = asyncio.ensure_future(pool.release(connection))
            self._returning.add(returning)
            returning.add_done_callback(self._returning.discard)


async def _within(future: asyncio.Future[Any], seconds: float | None) -> bool:
    """Wait up to seconds (None: for ever) for future; whether it is done."""
    done, _ = await asyncio.wait({future}, timeout=seconds)
    return bool(done)
