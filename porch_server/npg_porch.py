"""npg_porch's database, read for `porch db import-npg-porch`.

npg_porch 2 keeps its pipelines, tokens, tasks and their events in four
tables (`pipeline`, `token`, `task`, `event`). They are read in one
read-only snapshot and given to the store as porch keeps such things:

- A task's id is computed from its input as porch computes ids. That is
  npg_porch's own id except where npg_porch wrote a whole number sent with a
  fraction as a float (`100.0`, where porch writes `100`); such tasks are
  listed in `changed_ids`.
- Times carry no time zone there. On PostgreSQL they are read in the time
  zone its server gives a session, as npg_porch's sessions had it; on SQLite
  as UTC, which its `CURRENT_TIMESTAMP` writes.
- The event texts "Created", "Task claimed" and "Task changed, new status X"
  become CREATED, CLAIMED and STATUS_CHANGED events, in the order npg_porch
  numbered them: its times, without a zone, repeat an hour a year.
- A token bound to a pipeline becomes a PIPELINE token of it. One bound to
  none, which npg_porch let create pipelines, becomes an ADMIN token. Its
  secret is kept as porch keeps its own: by its SHA-256 only.

Anything porch would refuse from a client (a pipeline name with '/', an
input that is not a JSON object) is an InvalidArgument naming the row.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    Table,
    Text,
    cast,
    create_engine,
    event,
    exc,
    func,
    inspect,
    make_url,
    select,
    union_all,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from gateway import inexact_integer
from porch_server import auth
from porch_server.db.engine import shown_url
from porch_server.digest import digest_of
from porch_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    first_line,
    shortened,
)
from porch_server.messages import MAX_INPUT_DEPTH
from porch_server.models import (
    EventKind,
    ImportedEvent,
    ImportedPipeline,
    ImportedTask,
    ImportedToken,
    Role,
)
from porch_server.service import check_description, checked_new_pipeline, checked_task_input
from porch_server.states import State
from porch_stubs.v1 import porch_pb2

# Rows read at a time.
BATCH = 5_000
# Where npg_porch keeps its tables on PostgreSQL when its DB_SCHEMA is not set.
DEFAULT_SCHEMA = "npg_porch"

_TABLES = MetaData()
_pipeline = Table(
    "pipeline",
    _TABLES,
    Column("pipeline_id", Integer),
    Column("name", Text),
    Column("repository_uri", Text),
    Column("version", Text),
)
_token = Table(
    "token",
    _TABLES,
    Column("token_id", Integer),
    Column("token", Text),
    Column("description", Text),
    Column("pipeline_id", Integer),
    Column("date_issued", DateTime),
    Column("date_revoked", DateTime),
)
_task = Table(
    "task",
    _TABLES,
    Column("task_id", Integer),
    Column("pipeline_id", Integer),
    Column("job_descriptor", Text),
    Column("definition", Text),
    Column("state", Text),
    Column("created", DateTime),
)
_event = Table(
    "event",
    _TABLES,
    Column("event_id", Integer),
    Column("task_id", Integer),
    Column("time", DateTime),
    Column("change", Text),
    Column("token_id", Integer),
)

_STATUS_CHANGE = re.compile(r"Task changed, new status (?:TaskStateEnum\.)?([A-Z]+)")


class NpgPorchSource:
    """npg_porch's rows, read on one connection in one snapshot, as an ImportSource."""

    def __init__(self, connection: Connection, postgresql: bool, shown: str) -> None:
        self._connection = connection
        self._postgresql = postgresql
        self._shown = shown
        self._pipeline_names: dict[int, str] = {}
        self._token_keys: set[int] = set()

    def check_tables(self, schema: str | None) -> None:
        """FailedPrecondition naming the schema, or the first of npg_porch's
        tables or columns, not there."""
        with self._reading():
            _check_tables(self._connection, schema, self._shown)

    def time_zone(self) -> str:
        """The time zone npg_porch's times are read in."""
        if not self._postgresql:
            return "UTC"
        with self._reading():
            return str(self._connection.scalar(select(func.current_setting("TimeZone"))))

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read-only transaction, rolled back at the end: by then porch's
        may have been committed, and a connection lost since changes nothing."""
        transaction = self._connection.begin()
        try:
            yield
        finally:
            with contextlib.suppress(exc.DBAPIError):
                transaction.rollback()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Name npg_porch's database in its driver's errors: they are read
        where porch's own database is written, and must not pass for its."""
        try:
            yield
        except exc.DBAPIError as error:
            raise _unreadable(self._shown, error, self._postgresql) from None

    def _rows(self, query: Any, table: str) -> Iterator[Sequence[Any]]:
        """query's rows, a batch at a time; InvalidArgument naming the table
        for a value its driver cannot read (a time out of range, a number
        where SQLite should hold a time)."""
        batches = self._connection.execute(query.execution_options(yield_per=BATCH)).partitions()
        while True:
            try:
                rows = next(batches, None)
            except (ValueError, OverflowError, TypeError) as error:
                raise InvalidArgument(
                    f"npg_porch's database {self._shown} holds a value in its table"
                    f" '{table}' that porch cannot read: {error}"
                ) from None
            if rows is None:
                return
            yield rows

    def pipelines(self) -> Iterator[ImportedPipeline]:
        with self._reading():
            yield from self._pipelines()

    def _pipelines(self) -> Iterator[ImportedPipeline]:
        first_use = self._first_use()
        query = select(_pipeline).order_by(_pipeline.c.pipeline_id)
        for row in itertools.chain.from_iterable(self._rows(query, "pipeline")):
            given = porch_pb2.Pipeline(
                name=row.name or "", uri=row.repository_uri or "", version=row.version or ""
            )
            try:
                pipeline = checked_new_pipeline(given)
            except InvalidArgument as error:
                raise InvalidArgument(f"npg_porch's pipeline {row.pipeline_id}: {error}") from None
            self._pipeline_names[row.pipeline_id] = pipeline.name
            created = first_use.get(row.pipeline_id) or datetime.now(UTC)
            yield ImportedPipeline(row.pipeline_id, pipeline, created)

    def _first_use(self) -> dict[int, datetime]:
        """When each pipeline was first used (a task or a token made), which
        npg_porch does not record of the pipeline itself."""
        uses = union_all(
            select(_task.c.pipeline_id, self._time(_task.c.created).label("time")),
            select(_token.c.pipeline_id, self._time(_token.c.date_issued).label("time")),
        ).subquery()
        query = select(uses.c.pipeline_id, func.min(uses.c.time)).group_by(uses.c.pipeline_id)
        rows = itertools.chain.from_iterable(self._rows(query, "task' or 'token"))
        return {key: _utc(time, f"pipeline {key}'s first use") for key, time in rows if time}

    def tokens(self) -> Iterator[ImportedToken]:
        with self._reading():
            yield from self._tokens()

    def _tokens(self) -> Iterator[ImportedToken]:
        query = select(
            _token.c.token_id,
            _token.c.token,
            _token.c.description,
            _token.c.pipeline_id,
            self._time(_token.c.date_issued).label("issued"),
            self._time(_token.c.date_revoked).label("revoked"),
        ).order_by(_token.c.token_id)
        for row in itertools.chain.from_iterable(self._rows(query, "token")):
            yield self._token(row)
            self._token_keys.add(row.token_id)

    def _token(self, row: Any) -> ImportedToken:
        where = f"npg_porch's token {row.token_id}"
        if not auth.is_secret(row.token or ""):
            raise InvalidArgument(
                f"{where} has a secret that is not one porch accepts"
                " (32 to 128 letters, digits, '-' and '_')"
            )
        try:
            description = check_description(row.description or "")
        except InvalidArgument as error:
            raise InvalidArgument(f"{where}: {error}") from None
        if row.pipeline_id is not None and row.pipeline_id not in self._pipeline_names:
            raise InvalidArgument(f"{where} is of pipeline {row.pipeline_id}, which is not there")
        return ImportedToken(
            key=row.token_id,
            role=Role.ADMIN if row.pipeline_id is None else Role.PIPELINE,
            pipeline_key=row.pipeline_id,
            description=description,
            secret_hash=auth.hash_secret(row.token),
            # npg_porch dated its tokens itself: one made by hand may have no date.
            create_time=datetime.now(UTC) if row.issued is None else _utc(row.issued, where),
            revoke_time=None if row.revoked is None else _utc(row.revoked, where),
        )

    def tasks(self) -> Iterator[list[ImportedTask]]:
        with self._reading():
            yield from self._tasks()

    def _tasks(self) -> Iterator[list[ImportedTask]]:
        query = select(
            _task.c.task_id,
            _task.c.pipeline_id,
            _task.c.job_descriptor,
            cast(_task.c.definition, Text).label("definition"),
            _task.c.state,
            self._time(_task.c.created).label("created"),
        ).order_by(_task.c.task_id)
        for rows in self._rows(query, "task"):
            yield [self._task(row) for row in rows]

    def _task(self, row: Any) -> ImportedTask:
        name = self._pipeline_names.get(row.pipeline_id)
        if name is None:
            raise InvalidArgument(
                f"npg_porch's task {row.task_id} is of pipeline {row.pipeline_id},"
                " which is not there"
            )
        where = f"npg_porch's task {row.task_id} (pipeline {shortened(name)!r})"
        canonical = _canonical_input(where, row.definition)
        if row.state is None:
            raise InvalidArgument(f"{where} has no status")
        if row.state not in State.__members__:
            raise InvalidArgument(f"{where} has status {shortened(str(row.state))!r}, not porch's")
        if row.created is None:
            raise InvalidArgument(f"{where} has no creation time")
        task_input_id = digest_of(canonical)
        return ImportedTask(
            key=row.task_id,
            pipeline_key=row.pipeline_id,
            task_input=canonical,
            task_input_id=task_input_id,
            status=State(row.state),
            create_time=_utc(row.created, where),
            former_id=None if row.job_descriptor in (None, task_input_id) else row.job_descriptor,
        )

    def events(self) -> Iterator[list[ImportedEvent]]:
        with self._reading():
            yield from self._events()

    def _events(self) -> Iterator[list[ImportedEvent]]:
        time = self._time(_event.c.time).label("time")
        query = select(
            _event.c.event_id, _event.c.task_id, time, _event.c.change, _event.c.token_id
        ).order_by(_event.c.event_id)
        for rows in self._rows(query, "event"):
            yield [self._event(row) for row in rows]

    def _event(self, row: Any) -> ImportedEvent:
        kind, status = _change(row.event_id, row.change)
        if row.time is None:
            raise InvalidArgument(f"npg_porch's event {row.event_id} has no time")
        token_key = row.token_id if row.token_id in self._token_keys else None
        time = _utc(row.time, f"npg_porch's event {row.event_id}")
        return ImportedEvent(row.task_id, time, kind, status, token_key)

    def _time(self, column: Any) -> Any:
        """column as a time with a time zone: on PostgreSQL a timestamp
        without one is read in the session's (a no-op for one with)."""
        return cast(column, DateTime(timezone=True)) if self._postgresql else column


@contextmanager
def reading(url: str, schema: str | None) -> Iterator[NpgPorchSource]:
    """Open npg_porch's database at url (its tables in schema: by default
    npg_porch's own, DEFAULT_SCHEMA, on PostgreSQL) and read it in one
    read-only snapshot; FailedPrecondition if its tables are not npg_porch 2's."""
    url, schema = source_settings(url, schema)
    shown = shown_url(url)
    engine = _engine(url)
    postgresql = engine.dialect.name == "postgresql"
    options: dict[str, Any] = {"schema_translate_map": {None: schema}}
    if postgresql:
        options |= {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    try:
        with _connected(engine, shown) as connection:
            connection.execution_options(**options)
            source = NpgPorchSource(connection, postgresql, shown)
            with source.snapshot():
                source.check_tables(schema)
                yield source
    finally:
        engine.dispose()


def source_settings(url: str, schema: str | None) -> tuple[str, str | None]:
    """npg_porch's database URL and the schema its tables are in: on
    PostgreSQL, when none is named, npg_porch's own DEFAULT_SCHEMA."""
    if schema is None and url.startswith("postgresql"):
        return url, DEFAULT_SCHEMA
    return url, schema


def _engine(url: str) -> Engine:
    """An engine that only reads the database at url: PostgreSQL through
    porch's driver, whatever npg_porch's was; a SQLite file opened read-only
    (refused if it is not there), each read transaction begun explicitly so
    that it is one snapshot."""
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "postgresql":
            return create_engine(parsed.set(drivername="postgresql+psycopg2"), poolclass=NullPool)
    except (exc.ArgumentError, ValueError) as error:
        raise InvalidArgument(f"--from-db-url is not a database URL: {error}") from None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        raise InvalidArgument(
            f"--from-db-url must name a PostgreSQL database or a SQLite file, got {shown_url(url)}"
        )
    # A URI of sqlite3's own: SQLAlchemy would read its escapes ('%3F') once more.
    uri = f"file://{urllib.parse.quote(str(Path(parsed.database).absolute()))}?mode=ro"
    engine = create_engine(
        "sqlite://",
        creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
        poolclass=NullPool,
    )
    event.listen(engine, "connect", _leave_transactions_to_sqlalchemy)
    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN"))
    return engine


class Unreadable(Unavailable):
    """npg_porch's database cannot be read; porch's may be quite well."""


def _unreadable(shown: str, error: exc.DBAPIError, postgresql: bool) -> Unreadable:
    said = first_line(error.orig)
    if not postgresql and "readonly" in said:
        said += (
            " (a SQLite file in WAL mode, or with a journal a crash left, is read only"
            " where its directory may be written: copy its files somewhere that may be)"
        )
    return Unreadable(f"cannot read npg_porch's database {shown}", said)


def _leave_transactions_to_sqlalchemy(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.isolation_level = None  # sqlite3 would begin none before a SELECT


@contextmanager
def _connected(engine: Engine, shown: str) -> Iterator[Connection]:
    try:
        connection = engine.connect()
    except exc.DBAPIError as error:
        raise _unreadable(shown, error, engine.dialect.name == "postgresql") from None
    with connection:
        yield connection


def _check_tables(connection: Connection, schema: str | None, shown: str) -> None:
    inspector = inspect(connection)
    where = f"npg_porch's database {shown}"
    if schema is not None:
        if schema not in inspector.get_schema_names():
            raise FailedPrecondition(f"{where} has no schema {schema!r}")
        where += f", schema {schema!r},"
    for table in _TABLES.sorted_tables:
        if not inspector.has_table(table.name, schema=schema):
            raise FailedPrecondition(f"{where} holds no npg_porch table '{table.name}'")
        there = {column["name"] for column in inspector.get_columns(table.name, schema=schema)}
        for column in table.columns:
            if column.name not in there:
                raise FailedPrecondition(
                    f"{where} holds no npg_porch 2 tables: its table '{table.name}'"
                    f" has no column '{column.name}'"
                )


def _canonical_input(where: str, definition: str | None) -> str:
    """A task's definition as canonical JSON, checked as a registration's input is."""
    try:
        data = json.loads(definition or "null")
    except ValueError as error:  # not JSON, or an integer of too many digits
        raise InvalidArgument(f"{where}: its definition cannot be read: {error}") from None
    except RecursionError:
        raise InvalidArgument(f"{where}: {_TOO_DEEP}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where} has a definition that is not a JSON object")
    if _nests_deeper(data, MAX_INPUT_DEPTH):
        raise InvalidArgument(f"{where}: {_TOO_DEEP}")
    inexact = inexact_integer(data, "task_input")
    if inexact is not None:  # what porch refuses from a client, rather than rounded
        raise InvalidArgument(f"{where}: {inexact.removesuffix('; send it as a string')}")
    struct = struct_pb2.Struct()
    try:
        struct.update(data)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(f"{where} has a definition porch cannot hold: {error}") from None
    try:
        return checked_task_input("task", porch_pb2.Task(task_input=struct))
    except InvalidArgument as error:
        raise InvalidArgument(f"{where}: {error}") from None


_TOO_DEEP = f"task_input nests deeper than {MAX_INPUT_DEPTH} levels"


def _nests_deeper(data: dict[str, Any], most: int) -> bool:
    """True when objects and lists nest in data, itself one, deeper than most."""
    pending: list[tuple[Any, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        inner = value.values() if type(value) is dict else value if type(value) is list else ()
        for item in inner:
            if type(item) is dict or type(item) is list:
                if depth + 1 > most:
                    return True
                pending.append((item, depth + 1))
    return False


def _change(event_id: int, change: str | None) -> tuple[EventKind, State]:
    """The kind of an npg_porch event, and the status it left its task in."""
    if change == "Created":
        return EventKind.CREATED, State.PENDING
    if change == "Task claimed":
        return EventKind.CLAIMED, State.CLAIMED
    matched = _STATUS_CHANGE.fullmatch(change or "")
    if matched and matched.group(1) in State.__members__:
        return EventKind.STATUS_CHANGED, State(matched.group(1))
    raise InvalidArgument(
        f"npg_porch's event {event_id} records {shortened(str(change))!r}, none of the changes"
        " npg_porch 2 records ('Created', 'Task claimed', 'Task changed, new status …')"
    )


def _utc(moment: datetime, where: str) -> datetime:
    """moment in UTC; one without a time zone (SQLite's) is taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise InvalidArgument(f"{where} has a time out of range: {moment}") from None
