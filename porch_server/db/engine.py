"""Engine set-up for SQLite (the embedded default) and PostgreSQL.

On SQLite, sqlite3's own transaction handling is switched off and porch emits
BEGIN itself: a plain (deferred) BEGIN for reads and BEGIN IMMEDIATE for
writes, so a writer takes the database's write lock up front instead of
failing half-way when it upgrades a read lock. Write transactions run on the
engine returned by ``writer(engine)``; both share one connection pool.

On PostgreSQL, each connection's ``search_path`` is set to the schema given
(npg_porch deploys into a non-default one) and its time zone to UTC, after
the URL's own libpq ``options``; ``postgresql_session`` gives the settings
every driver porch uses starts its connections with.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, exc
from sqlalchemy.dialects.sqlite.base import SQLiteCompiler
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util import asbool

DEFAULT_URL = "sqlite:///porch.db"

# Seconds a new PostgreSQL connection may take, unless the URL's
# connect_timeout says otherwise.
CONNECT_TIMEOUT_SECONDS = 10

# How long a SQLite writer waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_SECONDS = 30

_WRITE_OPTION = "porch_write"
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# A password given as a query parameter (?password=…, &sslpassword=…).
_QUERY_PASSWORD = re.compile(r"([?&][^=&]*password=)[^&]*", re.IGNORECASE)
# psycopg2 connections taken from their pools and not given back yet, in
# this process: those whose statements a stopping server cancels.
_IN_USE: weakref.WeakSet[Any] = weakref.WeakSet()
_IN_USE_LOCK = threading.Lock()
# The libpq settings each PostgreSQL engine's pool starts its connections
# with (see connect_apart).
_SETTINGS: weakref.WeakKeyDictionary[Engine, dict[str, Any]] = weakref.WeakKeyDictionary()


def make_engine(url: str, schema: str | None = None, *, pool_size: int = 10) -> Engine:
    """Return an engine for url; schema (PostgreSQL only) holds porch's tables."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:  # its text may hold the password: not shown
        raise ValueError(f"not a database URL: {_without_password(url)!r}") from None
    except ValueError as error:  # a port that is not a number
        raise ValueError(f"not a database URL: {_without_password(url)!r} ({error})") from None
    try:
        backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    except exc.NoSuchModuleError:  # a scheme no installed dialect has
        backend, driver = parsed.drivername, ""
    if (backend, driver) not in (("sqlite", "pysqlite"), ("postgresql", "psycopg2")):
        raise ValueError(
            f"unsupported database URL {shown_url(url)}: use sqlite:///FILE or "
            "postgresql://… (with porch's drivers, pysqlite and psycopg2)"
        )
    if backend == "sqlite":
        if schema is not None:
            raise ValueError("a schema can only be given for PostgreSQL")
        if sqlite_file(url) is None:
            raise ValueError(
                f"{url} names no database file: use sqlite:///FILE (porch's tables "
                "must outlive each connection, which an in-memory database does not)"
            )
        return _make_sqlite_engine(url, pool_size)
    if backend == "postgresql":
        return _make_postgresql_engine(url, schema, pool_size)
    raise ValueError(f"unsupported database URL {shown_url(url)}: use sqlite or postgresql")


def sqlite_file(url: str) -> str | None:
    """The path of the file a SQLite URL names; None for an in-memory
    database (sqlite:///:memory:, ?mode=memory). A URI filename (?uri=true)
    is refused: what it names is SQLite's to read, after percent-decoding,
    its own query, its VFS, and may be memory however it is spelt."""
    parsed = make_url(url)
    if asbool(parsed.query.get("uri", False)):
        raise ValueError(
            f"{url} is a SQLite URI filename (?uri=true), which "
            "porch does not open: give the database file's path, sqlite:///FILE"
        )
    path = parsed.database or ""
    if parsed.query.get("mode") == "memory":
        return None
    return None if path in ("", ":memory:") else path


def shown_url(url: str) -> str:
    """url as porch shows it, a password in it (before the host, or as a
    query parameter such as ?password=) as ***."""
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError):
        return _without_password(url)
    shown = parsed.set(query={}).render_as_string(hide_password=True)
    pairs = [
        f"{key}={'***' if 'password' in key.lower() else value}"
        for key, values in parsed.query.items()
        for value in (values if isinstance(values, tuple) else (values,))
    ]
    return f"{shown}?{'&'.join(pairs)}" if pairs else shown


def _without_password(url: str) -> str:
    """url with what may be a password (after the user's name, up to the
    last @) as ***: an unparsed URL may hold one, which may hold : / or @."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    rest = _QUERY_PASSWORD.sub(r"\1***", rest)
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return f"{scheme}{separator}{rest}"
    return f"{scheme}{separator}{user}:***@{host}"


def writer(engine: Engine) -> Engine:
    """Return a view of engine whose transactions are write transactions."""
    return engine.execution_options(**{_WRITE_OPTION: True})


def quote_schema(schema: str) -> str:
    """Return schema as a quoted SQL identifier, refusing anything unusual
    and the names PostgreSQL keeps for itself."""
    if not _SCHEMA_NAME.fullmatch(schema):
        if len(schema) > 63 and _SCHEMA_NAME.fullmatch(schema[:63]):
            raise ValueError(f"invalid schema name {schema!r}: at most 63 characters")
        raise ValueError(f"invalid schema name {schema!r}: use letters, digits and _")
    if schema.startswith("pg_") or schema == "information_schema":
        raise ValueError(
            f"invalid schema name {schema!r}: PostgreSQL keeps pg_* and "
            "information_schema for itself"
        )
    return f'"{schema}"'


@dataclass(frozen=True)
class Session:
    """How each of porch's PostgreSQL connections starts, whichever driver opens it."""

    # libpq's options: the URL's own, then porch's time zone and search_path.
    options: str
    application_name: str
    # Seconds; None waits as long as connecting takes (libpq's 0 or less).
    connect_timeout: int | None


def postgresql_session(url: URL, schema: str | None) -> tuple[URL, Session]:
    """url without the libpq settings porch starts each connection with, and
    those settings: the URL's own where it gives them (options such as
    ``-c statement_timeout=5s``, an application_name, a connect_timeout),
    porch's time zone (UTC) and the schema's search_path coming after the
    URL's options, so that they hold."""
    query = url.query

    def given(name: str) -> str | None:
        value = query.get(name)
        if isinstance(value, tuple):
            raise ValueError(f"{name} is given {len(value)} times in the database URL")
        return value

    options = " ".join(filter(None, [given("options"), "-c timezone=UTC"]))
    if schema is not None:
        options += f" -c search_path={quote_schema(schema)}"
    timeout_text = given("connect_timeout")
    timeout: int | None = CONNECT_TIMEOUT_SECONDS
    if timeout_text is not None:
        try:
            timeout = int(timeout_text)
        except ValueError:
            raise ValueError(
                f"connect_timeout={timeout_text!r} in the database URL is not a whole "
                "number of seconds"
            ) from None
        timeout = timeout if timeout > 0 else None
    session = Session(options, given("application_name") or "porch", timeout)
    rest = url.difference_update_query(["options", "application_name", "connect_timeout"])
    return rest, session


def _make_postgresql_engine(url: str, schema: str | None, pool_size: int) -> Engine:
    rest, session = postgresql_session(make_url(url), schema)
    connect_args = {
        "options": session.options,
        "application_name": session.application_name,
        "connect_timeout": session.connect_timeout or 0,
    }
    try:
        engine = create_engine(
            rest,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            connect_args=connect_args,
        )
    except exc.ArgumentError as error:  # ?port=x; the message names the argument, not the URL
        raise ValueError(f"not a database URL: {shown_url(url)} ({error})") from None
    _SETTINGS[engine] = connect_args
    if checks_client_unless_set(session.options):
        event.listen(engine, "connect", _check_client)
    # Carried to the pools recreated from this one's.
    event.listen(engine, "checkout", _taken)
    event.listen(engine, "checkin", _given_back)
    # A connection lost in use is invalidated first, and checked in as None.
    event.listen(engine, "invalidate", _invalidated)
    return engine


# How often, in ms, PostgreSQL looks whether the client of a statement
# still running is there (PostgreSQL 14 and later; see _check_client).
CLIENT_CHECK_MS = 1000
# The statement that asks it to: the setting, a server's own, cannot be
# given at connection time to a server that does not know it.
CHECK_CLIENT = f"SET client_connection_check_interval = {CLIENT_CHECK_MS}"


def checks_client_unless_set(options: str) -> bool:
    """Whether porch sets client_connection_check_interval: not where the
    URL's options set it (to 0, say), in any of the forms PostgreSQL reads
    (`-c name=value`, `-cname=value`, `--name=value`; a name in any case,
    its underscores as dashes)."""
    return "client_connection_check_interval" not in _option_names(options)


def _option_names(options: str) -> set[str]:
    """The names of the settings a libpq options string gives, as
    PostgreSQL reads them."""
    names = set()
    words = iter(options.split())
    for word in words:
        if word == "-c":
            setting = next(words, "")
        elif word.startswith(("-c", "--")):
            setting = word[2:]
        else:
            continue
        names.add(setting.partition("=")[0].replace("-", "_").lower())
    return names


def checks_client(server_version: int) -> bool:
    """Whether a PostgreSQL server of this version (server_version_num)
    can look for a client gone while its statement runs."""
    return server_version >= 140000


def _check_client(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    """Have PostgreSQL end a statement of this connection once porch's
    process is gone (killed, or stopped at once by a second signal), rather
    than let it wait for a lock and run when the lock is released, holding
    the connection slot and its place in the lock's queue meanwhile.
    Where the server's platform cannot look (the setting refused), the
    connection stays as it was."""
    if not checks_client(dbapi_connection.server_version):
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(CHECK_CLIENT)
    except dbapi_connection.Error:
        dbapi_connection.rollback()
    else:
        dbapi_connection.commit()


def connect_apart(engine: Engine, timeout: int) -> Any:
    """A psycopg2 connection to a PostgreSQL engine's database, started as its
    pool's are (application_name, options, search_path), but outside the pool
    and not among those in use, which a stopping server waits for and
    cancels; waiting at most timeout seconds for the server, or the URL's
    connect_timeout if that is shorter."""
    args, options = engine.dialect.create_connect_args(engine.url)
    settings = _SETTINGS.get(engine, {})  # none for an engine made elsewhere
    given = settings.get("connect_timeout", 0)  # 0: none
    waiting = min(given, timeout) if given else timeout
    return engine.dialect.loaded_dbapi.connect(
        *args, **{**options, **settings, "connect_timeout": waiting}
    )


def _taken(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
    with _IN_USE_LOCK:
        _IN_USE.add(dbapi_connection)


def _given_back(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    if dbapi_connection is not None:
        with _IN_USE_LOCK:
            _IN_USE.discard(dbapi_connection)


def _invalidated(dbapi_connection: Any, record: ConnectionPoolEntry, error: Any) -> None:
    _given_back(dbapi_connection, record)


def connections_in_use() -> int:
    """How many psycopg2 connections this process has taken from a pool and
    not given back."""
    return len(_IN_USE)


def backend_pids() -> list[int]:
    """The PostgreSQL backends of the psycopg2 connections this process has
    taken from a pool and not given back, for a stopping server to cancel
    their statements: psycopg2's own cancel holds the interpreter while it
    connects, however long PostgreSQL takes to answer."""
    with _IN_USE_LOCK:  # threads give theirs back meanwhile
        in_use = list(_IN_USE)
    pids = []
    for connection in in_use:
        try:
            pids.append(connection.get_backend_pid())
        except Exception:  # psycopg2's InterfaceError: closed meanwhile
            continue
    return pids


def _make_sqlite_engine(url: str, pool_size: int) -> Engine:
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
    )
    engine.dialect.statement_compiler = _SQLiteCompiler
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


class _SQLiteCompiler(SQLiteCompiler):
    """SQLite's compiler with the table hints that SQLAlchemy's leaves out:
    `Select.with_hint(table, "INDEXED BY name", "sqlite")`."""

    def get_from_hint_text(self, table: Any, text: str | None) -> str | None:
        return text


def _configure_sqlite_connection(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # None stops sqlite3 from emitting BEGIN itself; _begin_sqlite_transaction does.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL mode is the file's own, set by migrate.upgrade once the file is
        # known to be porch's: set here, it would change a file porch refuses.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    write = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
