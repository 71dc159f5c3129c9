"""Every query porch makes, behind one class: Store.

Each public method is one transaction and returns the frozen values of
``porch_server.models``. Exactly-once rests on the database: a unique key
makes registration idempotent, row locks (PostgreSQL) or the database write
lock (SQLite, BEGIN IMMEDIATE) make claims and updates safe under any number
of concurrent callers. On PostgreSQL a claim, an update or a registration is
one statement that changes the tasks and writes their events together, run
in autocommit (one round trip, no BEGIN/COMMIT); a claim first frees lapsed
leases in a statement of its own.

Driver errors that mean the database cannot serve (it is down, unreachable,
locked for too long, or the pool is exhausted) become ``Unavailable`` in
``_translate_errors``; nothing else here knows about drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    CTE,
    BigInteger,
    Engine,
    Integer,
    Interval,
    LargeBinary,
    Row,
    Select,
    Text,
    bindparam,
    case,
    cast,
    create_engine,
    exc,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from porch_server import digest
from porch_server.coalesce import Coalescer
from porch_server.cursors import Key, Snapshot, cursor_key, make_cursor
from porch_server.db.engine import connect_apart, writer
from porch_server.db.listen import CHANNEL
from porch_server.db.pgasync import (
    AsyncStatements,
    Contended,
    LockTimedOut,
    Refused,
    RowView,
    TimedOut,
)
from porch_server.db.tables import (
    LISTED_APART,
    OUTSIDE_STATUS_INDEX,
    UtcDateTime,
    event,
    event_horizon,
    task,
    token,
)
from porch_server.db.tables import pipeline as pipeline_table
from porch_server.errors import (
    LOCK_NOT_AVAILABLE,
    LOCK_TIMED_OUT,
    QUERY_CANCELED,
    READ_ONLY_DATABASE,
    READ_ONLY_SQLSTATE,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Locked,
    NotFound,
    OutOfRange,
    PorchError,
    Unavailable,
    first_line,
    shortened,
)
from porch_server.models import (
    Actor,
    ChangedTaskId,
    Event,
    EventKind,
    ImportCounts,
    ImportedEvent,
    ImportedPipeline,
    ImportedTask,
    ImportedToken,
    Page,
    Pipeline,
    Registration,
    Role,
    Task,
    Token,
)
from porch_server.paging import Filters, decode_page_token, encode_page_token
from porch_server.states import UPDATE_TRANSITIONS, State, check_transition, is_noop

Item = TypeVar("Item")
Key_ = TypeVar("Key_", bound=Hashable)
Result_ = TypeVar("Result_")

_MAX_TOKEN_ID = 2**31 - 1  # token.id is a 32-bit integer

# How long a server trusts a token it has looked up. A revocation through
# the same Store (the same server process) takes effect at once; through
# another server, another process of `--workers` or the command line, within
# this many seconds.
TOKEN_CACHE_SECONDS = 1.0
# PostgreSQL's words when it refuses a connection for having too many
# (SQLSTATE 53300, which libpq does not pass on for a refused connection).
_TOO_MANY_CLIENTS = ("too many clients already", "remaining connection slots are reserved")
_TOKEN_CACHE_LIMIT = 10_000
# Rows an import writes a statement.
_IMPORT_BATCH = 5_000


@dataclass(frozen=True, slots=True)
class _Change:
    """One status change waiting to be applied."""

    pipeline_name: str
    task_input_id: str
    status: State
    message: str | None
    actor: Actor
    claim_number: int | None


@dataclass(frozen=True, slots=True)
class _Claim:
    """One claim waiting to be made, on a pipeline whose id is known."""

    pipeline_id: int
    num_tasks: int
    lease_seconds: int | None
    actor: Actor


# An input to register: its pipeline's id, canonical JSON text and caller;
# and what identifies it, its pipeline's id and task_input_id.
_Input = tuple[int, str, Actor]
_InputKey = tuple[int, str]


@dataclass(frozen=True, slots=True)
class _Registering:
    """One task input, as canonical JSON text, waiting to be registered."""

    pipeline_name: str
    text: str
    actor: Actor


# The parameters that many statements share.
_NOW = bindparam("now", type_=UtcDateTime)
# A change's time on PostgreSQL: the server's clock, but never before the
# task's last change. A statement that took its time and then waited (for
# its batch, a lock, a connection) may see changes stamped after it, and
# another server's clock may run ahead. A claim's lease runs from it.
# (SQLite: a claim or an update takes its time once it holds the write lock.)
_CHANGE_TIME = func.greatest(_NOW, task.c.update_time, type_=UtcDateTime)


def _lease_deadline(lease_seconds: ColumnElement[Any]) -> ColumnElement[Any]:
    """When a lease of lease_seconds, given at the change's time, lapses
    (PostgreSQL): NULL without a lease. _deadline in SQL."""
    return _CHANGE_TIME + lease_seconds * literal_column("interval '1 second'", Interval)


_PIPELINE_ID = bindparam("in_pipeline_id", type_=Integer)
# A literal rather than a parameter: both planners match a partial index's
# predicate only against the query's own text.
_PENDING: ColumnElement[str] = literal_column("'PENDING'")

_EVENT_COLUMNS = (
    "time",
    "task_id",
    "pipeline_id",
    "kind",
    "old_status",
    "new_status",
    "token_id",
    "token_description",
    "message",
)

# PostgreSQL: every transaction with a smaller id has ended, so no event
# below it can still appear.
_XMIN = func.pg_snapshot_xmin(func.pg_current_snapshot()).cast(Text).cast(BigInteger)

_NUM_TASKS = bindparam("num_tasks", type_=Integer)

_notify = select(func.pg_notify(literal(CHANNEL), literal("")))

# The task an update names. Read, not locked, to explain a refused update:
# a lock on a PENDING task, however brief, would make claims skip it.
_task_named = select(task).where(
    task.c.pipeline_id == _PIPELINE_ID,
    task.c.task_input_id == bindparam("in_task_input_id", type_=Text),
)
# How often an update that the state table allows is tried again when its
# task changed between the attempt and the look at why it was refused.
_UPDATE_ATTEMPTS = 10
# How long a change asked not to wait waits for a lock on the whole task
# table, for which PostgreSQL has no NOWAIT (and so not the role's own
# lock_timeout, which its waiting for the task's lock keeps); and how long
# a registration asked not to wait waits for a task's row, which INSERT …
# ON CONFLICT waits for when another transaction has changed it and not
# yet ended (it has no NOWAIT, nor SKIP LOCKED).
_BRIEF_LOCK = "100ms"
_BRIEF_LOCK_TIMEOUT = f"SET LOCAL lock_timeout = '{_BRIEF_LOCK}'"

_insert_event = insert(event)

_find_token = select(token).where(token.c.token_hash == bindparam("in_token_hash", type_=Text))

# A task's input is at most this many bytes, both as canonical JSON and as
# protobuf (a Struct); registration checks both.
MAX_TASK_INPUT_BYTES = 1024 * 1024
# An answer with tasks (a page of them, one claimer's claim) stops early
# once it would pass this many bytes as protobuf, so that it stays inside a
# client's 4 MiB default however large the inputs. It always holds one task;
# a page's next page goes on from there, and a claim's other candidates stay
# PENDING.
ANSWER_BYTES = 3 * 1024 * 1024
# The most a task or an event adds to an answer besides its input, message
# and texts: its id, times and numbers, and the tags and lengths of its
# fields, the texts' included (191 bytes for a task whose every field is at
# its largest).
_TASK_OVERHEAD_BYTES = 200


def _answer_bytes(json_length: int, pipeline_bytes: int) -> int:
    """At most what a task whose input is json_length characters of JSON
    takes in an answer, its pipeline's name, uri and version taking
    pipeline_bytes. As protobuf an input can take 5.5 times the bytes of
    its JSON (a small number in a list: "0," against 11 bytes), and never
    more than MAX_TASK_INPUT_BYTES."""
    input_bytes = min(json_length * 11 // 2, MAX_TASK_INPUT_BYTES)
    return input_bytes + pipeline_bytes + _TASK_OVERHEAD_BYTES


def _answer_bytes_sql(json_length: ColumnElement[int], postgresql: bool) -> ColumnElement[int]:
    """_answer_bytes in SQL, for a task of the pipeline in_pipeline_id."""
    estimate = json_length * 11 // 2
    bounded = case((estimate > MAX_TASK_INPUT_BYTES, MAX_TASK_INPUT_BYTES), else_=estimate)
    return bounded + _pipeline_bytes_sql(postgresql) + _TASK_OVERHEAD_BYTES


def _pipeline_bytes(value: Pipeline) -> int:
    """What a pipeline's name, uri and version take in UTF-8."""
    return len(value.name.encode()) + len(value.uri.encode()) + len(value.version.encode())


def _octet_length(text: ColumnElement[str], postgresql: bool) -> ColumnElement[int]:
    """A text's length in UTF-8, in SQL. SQLite before 3.43 has no octet_length."""
    if postgresql:
        return func.octet_length(text)
    return func.length(cast(text, LargeBinary))


def _pipeline_bytes_sql(postgresql: bool) -> ColumnElement[int]:
    """_pipeline_bytes of the pipeline in_pipeline_id, in SQL: looked up once
    a statement."""
    columns = pipeline_table.c
    octets = (
        _octet_length(columns.name, postgresql)
        + _octet_length(columns.uri, postgresql)
        + _octet_length(columns.version, postgresql)
    )
    return select(octets).where(columns.id == _PIPELINE_ID).scalar_subquery()


def _answer_holds(nth: ColumnElement[int], running: ColumnElement[int]) -> ColumnElement[bool]:
    """Whether one answer holds the nth task of a run whose tasks up to it
    take running bytes: the first always, the rest while within ANSWER_BYTES."""
    return or_(nth == 1, running <= ANSWER_BYTES)


def _claimed(
    token_id: ColumnElement[Any],
    lease_seconds: ColumnElement[Any],
    lease_expire_time: Any,
    at: ColumnElement[Any] = _CHANGE_TIME,
) -> dict[str, Any]:
    """The columns a claim sets on each task it takes, at being the claim's time."""
    return {
        "status": State.CLAIMED.value,
        "update_time": at,
        "claim_time": at,
        "claim_number": task.c.claim_number + 1,
        "claimed_by_token_id": token_id,
        "lease_seconds": lease_seconds,
        "lease_expire_time": lease_expire_time,
    }


def _pending(limit: int | ColumnElement[int], *columns: ColumnElement[Any]) -> Select[Any]:
    """The ids of the pipeline's oldest PENDING tasks, at most limit of them,
    and any other columns of theirs asked for."""
    return (
        select(task.c.id, *columns)
        .where(task.c.pipeline_id == _PIPELINE_ID, task.c.status == _PENDING)
        .order_by(task.c.id)
        .limit(limit)
        # SQLite keeps no statistics unless told to, and without them it
        # took the pipeline's index of every task as readily, reading its
        # finished tasks at each claim. (See db.engine's SQLite compiler.)
        .with_hint(task, "INDEXED BY ix_task_pending", "sqlite")
    )


def _previewed() -> CTE:
    """The oldest num_tasks PENDING tasks, read without a lock and numbered
    from 1, with the most the tasks up to each take in an answer (running):
    what claims merged into one statement count their shares on (see
    _claim_candidates). Materialized, as it is read once for each claimer:
    left to the planner, the preview and its sums were read again for each
    (1.3 s a statement with 64 claimers of 100)."""
    preview = _pending(_NUM_TASKS, _input_length()).cte("preview")
    size = _answer_bytes_sql(preview.c.input_length, postgresql=True)
    return (
        select(
            func.row_number().over(order_by=preview.c.id).label("number"),
            func.sum(size).over(order_by=preview.c.id).label("running"),
        )
        .cte("previewed")
        .prefix_with("MATERIALIZED")
    )


def _input_length(postgresql: bool = True) -> ColumnElement[int]:
    """A task's input length, read with its id: a candidate's size then needs
    no second look-up of its row. (Joined back to task, the candidates of a
    LIMIT the planner cannot know were planned as a hash join over every
    task: 60 ms a claim with 50,000 tasks PENDING.)

    On PostgreSQL its length in bytes, which a large input stored compressed
    gives without being decompressed; canonical JSON is ASCII, so it is the
    same number. SQLite before 3.43 has no octet_length."""
    length = func.octet_length if postgresql else func.length
    return length(task.c.task_input).label("input_length")


def _claim_candidates() -> Select[Any]:
    """The tasks one claim locks: the oldest PENDING ones, skipping those
    another claimer holds, as many as one answer holds of the oldest
    num_tasks, counted on a read without a lock. A task locked but not taken
    would be skipped by every claim running beside it, though PENDING."""
    preview = _pending(_NUM_TASKS, _input_length()).cte("preview")
    held = _within_answer(preview, "preview_sized", postgresql=True).subquery("held")
    fits = select(func.count()).select_from(held).scalar_subquery()
    return _pending(fits, _input_length()).with_for_update(skip_locked=True)


def _within_answer(candidates: CTE, name: str, postgresql: bool) -> Select[Any]:
    """The ids of the candidates (id, input_length) one answer holds: the
    oldest, then more while the answer stays within ANSWER_BYTES (name: of
    the CTE it adds)."""
    sized = select(
        candidates.c.id,
        func.row_number().over(order_by=candidates.c.id).label("nth"),
        func.sum(_answer_bytes_sql(candidates.c.input_length, postgresql))
        .over(order_by=candidates.c.id)
        .label("running"),
    ).cte(name)
    return select(sized.c.id).where(_answer_holds(sized.c.nth, sized.c.running))


# Public so that tests can EXPLAIN it.
claim_candidates = _claim_candidates()


def _claim(candidates: Select[Any], claimed: dict[str, Any], postgresql: bool) -> Any:
    """Claim those of the candidates one answer holds, setting the columns claimed."""
    held = _within_answer(candidates.cte("candidates"), "sized", postgresql)
    return update(task).where(task.c.id.in_(held)).values(**claimed).returning(*task.c)


# One claimer's claim: its token and lease, from these parameters.
_CLAIMER = bindparam("actor_token_id", type_=Integer)
_LEASE_SECONDS = bindparam("claim_lease_seconds", type_=Integer)

# SQLite: a claim holds the database's write lock, so nothing is skipped and
# the oldest PENDING tasks are the candidates; its time and deadline are
# taken under the lock.
_claim_sqlite = _claim(
    _pending(_NUM_TASKS, _input_length(postgresql=False)),
    _claimed(_CLAIMER, _LEASE_SECONDS, bindparam("claim_lease_expire_time", UtcDateTime), _NOW),
    postgresql=False,
)


class Store:
    """porch's storage: pipelines, tokens, tasks and their events."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self._postgresql = engine.dialect.name == "postgresql"
        # One-statement reads and writes need no BEGIN/COMMIT round trips on
        # PostgreSQL; on SQLite a read transaction is cheap and keeps the reads
        # consistent. The autocommit connections get a pool of their own: an
        # isolation level set per checkout (execution_options) costs two driver
        # calls a checkout, a third of update_task's CPU.
        self._reader = (
            create_engine(engine.url, pool=engine.pool.recreate(), isolation_level="AUTOCOMMIT")
            if self._postgresql
            else engine
        )
        # Pipelines are never renamed or deleted, so these never go stale.
        self._pipeline_ids: dict[str, int] = {}
        self._pipelines: dict[int, Pipeline] = {}
        # Unrevoked tokens by secret hash, with the time they were read; the
        # generation changes with every revocation, so that a lookup that
        # raced one is not cached.
        self._tokens: dict[str, tuple[float, Token]] = {}
        self._token_generation = 0
        self._token_lock = threading.Lock()
        self._async: AsyncStatements | None = None
        self._updates: Coalescer[_Change, Task | PorchError | None] | None = None
        self._registering: Coalescer[_Registering, Registration | PorchError | None] | None = None
        self._claims: Coalescer[_Claim, Sequence[RowView] | Exception | None] | None = None
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if self._postgresql else threading.Lock()
        )

    @property
    def engine(self) -> Engine:
        """The engine the store runs on."""
        return self._engine

    def close(self) -> None:
        """Close every pooled database connection."""
        self._reader.dispose()
        self._engine.dispose()

    def ping(self) -> None:
        """Raise Unavailable unless the database answers."""
        with self._read() as connection:
            connection.exec_driver_sql("SELECT 1")

    def ping_apart(self, connect_timeout: int) -> None:
        """Raise unless the database answers SELECT 1 on a connection made
        for it, outside the pools, whose connections may all be taken
        (waiting for a lock held elsewhere, say), started as theirs are, so
        that pg_stat_activity shows it as porch's. A new connection refused
        for too many clients is an answer too: the pools' connections may
        be what fills the server. SQLite's are never taken."""
        if not self._postgresql:
            self.ping()
            return
        dbapi = self._engine.dialect.loaded_dbapi
        try:
            connection = connect_apart(self._engine, connect_timeout)
        except dbapi.OperationalError as error:
            if any(words in str(error) for words in _TOO_MANY_CLIENTS):
                return
            raise
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            connection.close()

    # Pipelines

    def create_pipeline(self, pipeline: Pipeline) -> Pipeline:
        """Store a new pipeline; AlreadyExists if its name is taken."""
        statement = (
            self._insert(pipeline_table)
            .values(
                name=pipeline.name, uri=pipeline.uri, version=pipeline.version, create_time=_now()
            )
            .on_conflict_do_nothing(index_elements=[pipeline_table.c.name])
            .returning(*pipeline_table.c)
        )
        with self._write() as connection:
            row = connection.execute(statement).first()
        if row is None:
            raise AlreadyExists(f"pipeline {shortened(pipeline.name)!r} already exists")
        return self._remember_pipeline(row)

    def known_pipeline(self, name: str) -> Pipeline | None:
        """The pipeline called name if this store has met it, without asking
        the database (a pipeline does not change)."""
        pipeline_id = self._pipeline_ids.get(name)
        return None if pipeline_id is None else self._pipelines.get(pipeline_id)

    def get_pipeline(self, name: str) -> Pipeline:
        """Return the pipeline called name; NotFound if there is none."""
        with self._read() as connection:
            return self._pipelines[self._find_pipeline_id(connection, name)]

    def list_pipelines(
        self, uri: str | None, version: str | None, page_size: int, page_token: str
    ) -> Page[Pipeline]:
        """Return a page of pipelines in name order, optionally filtered."""
        filters: Filters = {"uri": uri, "version": version}
        after = decode_page_token(page_token, "pipelines", filters, str)
        query = select(pipeline_table).order_by(pipeline_table.c.name).limit(page_size + 1)
        if uri is not None:
            query = query.where(pipeline_table.c.uri == uri)
        if version is not None:
            query = query.where(pipeline_table.c.version == version)
        if after is not None:
            query = query.where(pipeline_table.c.name > after)
        with self._read() as connection:
            rows = connection.execute(query).all()
        fitting = _fitting(rows, page_size, _pipeline_row_bytes)
        return _page(rows, fitting, "pipelines", filters, "name", self._remember_pipeline)

    # Tokens

    def create_token(
        self, role: Role, pipeline_name: str | None, description: str, secret_hash: str
    ) -> Token:
        """Store a token by the hash of its secret; NotFound for an unknown pipeline."""
        with self._write() as connection:
            pipeline_id = self._pipeline_id_or_none(connection, pipeline_name)
            statement = (
                self._insert(token)
                .values(
                    token_hash=secret_hash,
                    role=role.value,
                    pipeline_id=pipeline_id,
                    description=description,
                    create_time=_now(),
                )
                .on_conflict_do_nothing(index_elements=[token.c.token_hash])
                .returning(*token.c)
            )
            row = connection.execute(statement).first()
            if row is None:
                raise AlreadyExists("a token with this secret exists already")
            self._load_pipelines(connection, [row.pipeline_id])
        return self._to_token(row)

    def cached_token(self, secret_hash: str) -> Token | None:
        """Return the unrevoked token find_token read less than TOKEN_CACHE_SECONDS ago, if any.

        Touches no database, so it can run on the event loop.
        """
        entry = self._tokens.get(secret_hash)
        if entry is None or time.monotonic() - entry[0] >= TOKEN_CACHE_SECONDS:
            return None
        return entry[1]

    def find_token(self, secret_hash: str) -> Token | None:
        """Return the token whose secret hashes to secret_hash, revoked or not."""
        generation = self._token_generation
        read_at = time.monotonic()
        with self._read() as connection:
            row = connection.execute(_find_token, {"in_token_hash": secret_hash}).first()
            if row is None:
                return None
            self._load_pipelines(connection, [row.pipeline_id])
        found = self._to_token(row)
        with self._token_lock:
            if found.revoke_time is None and generation == self._token_generation:
                if len(self._tokens) >= _TOKEN_CACHE_LIMIT:
                    self._tokens.clear()
                self._tokens[secret_hash] = (read_at, found)
        return found

    def list_tokens(
        self,
        pipeline_name: str | None,
        role: Role | None,
        include_revoked: bool,
        page_size: int,
        page_token: str,
    ) -> Page[Token]:
        """Return a page of tokens, oldest first, optionally filtered."""
        filters: Filters = {
            "pipeline": pipeline_name,
            "role": role,
            "include_revoked": include_revoked,
        }
        after = decode_page_token(page_token, "tokens", filters, int)
        query = select(token).order_by(token.c.id).limit(page_size + 1)
        if role is not None:
            query = query.where(token.c.role == role.value)
        if not include_revoked:
            query = query.where(token.c.revoke_time.is_(None))
        if after is not None:
            query = query.where(token.c.id > after)
        with self._read() as connection:
            if pipeline_name is not None:
                pipeline_id = self._find_pipeline_id(connection, pipeline_name)
                query = query.where(token.c.pipeline_id == pipeline_id)
            rows = connection.execute(query).all()
            self._load_pipelines(connection, {row.pipeline_id for row in rows})
        return _page(rows, page_size, "tokens", filters, "id", self._to_token)

    def revoke_token(self, token_id: str) -> Token:
        """Revoke a token, keeping the first revoke_time; NotFound if there is none."""
        statement = (
            update(token)
            .where(token.c.id == _token_key(token_id))
            .values(revoke_time=func.coalesce(token.c.revoke_time, _NOW))
            .returning(*token.c)
        )
        with self._write() as connection:
            row = connection.execute(statement, {"now": _now()}).first()
            if row is None:
                raise NotFound(f"token {shortened(token_id)} not found")
            self._load_pipelines(connection, [row.pipeline_id])
        revoked = self._to_token(row)
        with self._token_lock:
            self._token_generation += 1
            self._tokens = {
                key: entry
                for key, entry in self._tokens.items()
                if entry[1].token_id != revoked.token_id
            }
        return revoked

    def is_revoked(self, token_id: str) -> bool:
        """True when the token has been revoked, or is not there at all."""
        query = select(token.c.revoke_time.is_not(None)).where(token.c.id == _token_key(token_id))
        with self._read() as connection:
            return connection.scalar(query) is not False

    def has_had_admin_token(self) -> bool:
        """True once an admin token has been made, even if every one has since
        been revoked: revoking them all is for their owner to undo."""
        query = select(exists().where(token.c.role == Role.ADMIN.value))
        with self._read() as connection:
            return bool(connection.scalar(query))

    # Tasks

    def register_tasks(
        self, pipeline_name: str, task_inputs: Sequence[dict[str, Any]], actor: Actor
    ) -> list[Registration]:
        """Register tasks in one transaction; an input registered before is not created again.

        Results follow the order of task_inputs; of repeated inputs only the
        first can be created.
        """
        texts = [digest.canonical_json(task_input) for task_input in task_inputs]
        return self.register_canonical(pipeline_name, texts, actor)

    def register_canonical(
        self, pipeline_name: str, texts: Sequence[str], actor: Actor, wait: bool = True
    ) -> list[Registration]:
        """register_tasks for inputs given as their canonical JSON texts
        (digest.canonical_json), which the caller has made already. With wait
        false (PostgreSQL), Locked instead of waiting more than _BRIEF_LOCK
        for a lock: on an input's task changed by a transaction still open,
        or being registered by another, or on the whole table."""
        if wait or not self._postgresql:
            with self._statements() as connection:
                pipeline_id = self._find_pipeline_id(connection, pipeline_name)
                return self._register_in(connection, pipeline_id, texts, actor)
        with self._write_not_waiting(lambda: _input_locked(len(texts))) as connection:
            pipeline_id = self._find_pipeline_id(connection, pipeline_name)
            return self._register_in(connection, pipeline_id, texts, actor)

    def _register_blocking(self, items: Sequence[_Registering]) -> list[Registration | PorchError]:
        """Register single inputs of any pipelines and callers together: on
        SQLite one write transaction and one commit. Each input gets its
        registration or its own error."""
        results: list[Registration | PorchError | None] = [None] * len(items)
        groups = _positions((item.pipeline_name, item.actor) for item in items)
        with self._statements() as connection:
            for (pipeline_name, actor), indexes in groups.items():
                try:
                    pipeline_id = self._find_pipeline_id(connection, pipeline_name)
                except PorchError as error:
                    for index in indexes:
                        results[index] = error
                    continue
                texts = [items[index].text for index in indexes]
                registered = self._register_in(connection, pipeline_id, texts, actor)
                for index, registration in zip(indexes, registered, strict=True):
                    results[index] = registration
        return [result for result in results if result is not None]

    def _register_in(
        self, connection: Connection, pipeline_id: int, texts: Sequence[str], actor: Actor
    ) -> list[Registration]:
        ids, unique = _unique_texts(texts)
        inserted = self._insert_tasks(connection, pipeline_id, unique, actor)
        created = {row.task_input_id: row for row in inserted}
        missing = [task_input_id for task_input_id in unique if task_input_id not in created]
        existing = {
            row.task_input_id: row for row in _select_tasks(connection, pipeline_id, missing)
        }
        return self._registrations(ids, created, existing)

    def _registrations(
        self, keys: list[Key_], created: dict[Key_, Any], existing: dict[Key_, Any]
    ) -> list[Registration]:
        """One Registration per input, in order, keys naming the inputs: by
        task_input_id (one pipeline) or by (pipeline id, task_input_id).
        Only the first of repeats can be created."""
        tasks = {key: self._to_task(row) for key, row in (created | existing).items()}
        registrations = []
        for key in keys:
            registrations.append(Registration(tasks[key], key in created))
            created.pop(key, None)
        return registrations

    def get_task(self, pipeline_name: str, task_input_id: str) -> Task:
        """Return a task; NotFound if the pipeline has no such task."""
        with self._read() as connection:
            pipeline_id = self._find_pipeline_id(connection, pipeline_name)
            row = connection.execute(_select_task(pipeline_id, task_input_id)).first()
        if row is None:
            raise _task_not_found(pipeline_name, task_input_id)
        return self._to_task(row)

    def list_tasks(
        self, pipeline_name: str | None, status: State | None, page_size: int, page_token: str
    ) -> Page[Task]:
        """Return a page of tasks, oldest first, optionally filtered; none for a
        pipeline name that names no pipeline."""
        filters: Filters = {"pipeline": pipeline_name, "status": status}
        after = decode_page_token(page_token, "tasks", filters, int)
        with self._read() as connection:
            pipeline_id = None
            if pipeline_name is not None:
                try:
                    pipeline_id = self._find_pipeline_id(connection, pipeline_name)
                except NotFound:
                    # A filter that matches nothing, as npg_porch's GET /tasks answered.
                    return Page(items=[], next_page_token="")
            query = _tasks_listed(pipeline_id, status, after, page_size, not self._postgresql)
            rows = connection.execute(query).all()
            pipeline_ids = {row.pipeline_id for row in rows}
            self._load_pipelines(connection, pipeline_ids)
        # Each pipeline's texts measured once, not once a task.
        carried = {key: _pipeline_bytes(self._pipelines[key]) for key in pipeline_ids}

        def task_bytes(row: Row[Any]) -> int:
            return _answer_bytes(len(row.task_input), carried[row.pipeline_id])

        fitting = _fitting(rows, page_size, task_bytes)
        return _page(rows, fitting, "tasks", filters, "id", self._to_task)

    def claim_tasks(
        self, pipeline_name: str, num_tasks: int, lease: timedelta | None, actor: Actor
    ) -> list[Task]:
        """Claim up to num_tasks of the oldest PENDING tasks, after expiring lapsed leases."""
        with self._statements() as connection:
            now = _now()  # SQLite: the write lock held, after every change it can see
            pipeline_id = self._find_pipeline_id(connection, pipeline_name)
            self._expire_leases(connection, now, pipeline_id)
            lease_seconds = _lease_seconds(lease)
            params = _claim_params(now, pipeline_id, num_tasks, lease_seconds, actor)
            if self._postgresql:
                rows = connection.execute(_claim_with_events(), params).all()
            else:
                params["claim_lease_expire_time"] = _deadline(now, lease_seconds)
                rows = sorted(connection.execute(_claim_sqlite, params), key=lambda row: row.id)
                self._record_events(
                    connection, rows, EventKind.CLAIMED, State.PENDING, State.CLAIMED, params
                )
        return [self._to_task(row) for row in rows]

    def update_task(
        self,
        pipeline_name: str,
        task_input_id: str,
        status: State,
        message: str | None,
        actor: Actor,
        claim_number: int | None = None,
        wait: bool = True,
    ) -> Task:
        """Move a task to status, recording an event; FailedPrecondition if the
        move is illegal, or if claim_number is given and the task has been
        claimed again since that claim. With wait false (PostgreSQL), Locked
        instead of waiting when another transaction holds the task (at once)
        or the whole table (after _BRIEF_LOCK_TIMEOUT)."""
        params = _event_params(_now(), actor, message) | {
            "in_task_input_id": task_input_id,
            "in_claim_number": claim_number,
        }
        if self._postgresql and wait:
            # The move and its event are one statement: run alone, it needs no
            # BEGIN/COMMIT round trips. Only a refused move needs the transaction.
            with self._read() as connection:
                params["in_pipeline_id"] = self._find_pipeline_id(connection, pipeline_name)
                row = connection.execute(_update_with_event(status), params).first()
            if row is not None:
                return self._to_task(row)
        nowait = self._postgresql and not wait
        with self._task_write(task_input_id, wait) as connection:
            return self._update_in(
                connection, pipeline_name, task_input_id, status, params, nowait=nowait
            )

    def release_claim(
        self,
        pipeline_name: str,
        task_input_id: str,
        claim_number: int,
        message: str,
        actor: Actor,
        wait: bool = True,
    ) -> Task | None:
        """Move a task back to PENDING if it is CLAIMED still by claim
        claim_number, with the event; None, changing nothing, when it is not
        (reported on, or claimed again, meanwhile). The look and the move are
        one transaction, the task's row locked first on PostgreSQL: a report
        without the claim's number, which may move the task on from CLAIMED,
        is either seen or made after. With wait false (PostgreSQL), Locked
        as update_task raises it."""
        params = _event_params(_now(), actor, message) | {
            "in_task_input_id": task_input_id,
            "in_claim_number": claim_number,
        }
        with self._task_write(task_input_id, wait) as connection:
            params["in_pipeline_id"] = self._find_pipeline_id(connection, pipeline_name)
            looking = (
                _task_named.with_for_update(nowait=not wait) if self._postgresql else _task_named
            )
            current = connection.execute(looking, params).first()
            if current is None:
                raise _task_not_found(pipeline_name, task_input_id)
            if State(current.status) is not State.CLAIMED or current.claim_number != claim_number:
                return None
            return self._update_in(connection, pipeline_name, task_input_id, State.PENDING, params)

    def _apply_changes_blocking(self, changes: Sequence[_Change]) -> list[Task | PorchError]:
        """Apply status changes in one write transaction: one commit for all.
        Each change gets its task, or the error update_task would raise for it
        alone; a change that fails writes nothing."""
        results: list[Task | PorchError] = []
        with self._write() as connection:
            now = _now()  # SQLite: the write lock held, after every change it can see
            for change in changes:
                params = _event_params(now, change.actor, change.message) | {
                    "in_task_input_id": change.task_input_id,
                    "in_claim_number": change.claim_number,
                }
                try:
                    changed = self._update_in(
                        connection,
                        change.pipeline_name,
                        change.task_input_id,
                        change.status,
                        params,
                    )
                except PorchError as error:
                    results.append(error)
                else:
                    results.append(changed)
        return results

    def _update_in(
        self,
        connection: Connection,
        pipeline_name: str,
        task_input_id: str,
        status: State,
        params: dict[str, Any],
        nowait: bool = False,
    ) -> Task:
        """update_task inside a write transaction; it raises before writing
        anything. With nowait, PostgreSQL refuses the move at once should
        another transaction hold the task (lock_not_available)."""
        pipeline_id = self._find_pipeline_id(connection, pipeline_name)
        params["in_pipeline_id"] = pipeline_id
        if not self._postgresql:  # the write lock is held: nothing changes meanwhile
            params["now"] = _now()  # after every change the task had
            current = _named_task(connection, params, pipeline_name, task_input_id)
            if _refused(current, status, params):
                return self._to_task(current)
            return self._to_task(self._update_sqlite(connection, current, status, params))
        for _ in range(_UPDATE_ATTEMPTS):
            row = connection.execute(_update_with_event(status, nowait=nowait), params).first()
            if row is not None:
                return self._to_task(row)
            current = _named_task(connection, params, pipeline_name, task_input_id)
            if _refused(current, status, params):
                return self._to_task(current)
            # Allowed now: the task changed since the attempt, so try again.
        raise Unavailable(f"task {task_input_id} kept changing; try again")

    def expire_leases(self) -> int:
        """Put every task whose lease lapsed back to PENDING; return how many."""
        with self._write() as connection:
            return self._expire_leases(connection, _now(), None)

    def list_task_events(
        self, pipeline_name: str, task_input_id: str, page_size: int, page_token: str
    ) -> Page[Event]:
        """Return a page of a task's events, oldest first; NotFound for an unknown task."""
        filters: Filters = {"pipeline": pipeline_name, "task": task_input_id}
        after = decode_page_token(page_token, "task_events", filters, int)
        with self._read() as connection:
            pipeline_id = self._find_pipeline_id(connection, pipeline_name)
            task_id = connection.scalar(
                select(task.c.id).where(
                    task.c.pipeline_id == pipeline_id, task.c.task_input_id == task_input_id
                )
            )
            if task_id is None:
                raise _task_not_found(pipeline_name, task_input_id)
            query = (select(event).where(event.c.task_id == task_id).order_by(event.c.id)).limit(
                page_size + 1
            )
            if after is not None:
                query = query.where(event.c.id > after)
            rows = connection.execute(query).all()
        return _page(
            rows,
            _fitting(rows, page_size, functools.partial(_event_bytes, len(pipeline_name.encode()))),
            "task_events",
            filters,
            "id",
            lambda row: _to_event(row, pipeline_name, task_input_id),
        )

    # The busiest writes from the event loop, coalesced

    def use_async(
        self, statements: AsyncStatements | None, executor: Executor | None = None
    ) -> None:
        """Let the async variants below answer: on PostgreSQL on these asyncpg
        connections, on SQLite in one write transaction per batch on executor.
        Without either they answer None, and callers use the blocking methods.

        Status changes and single registrations arriving while others are in
        flight share one commit, whatever their pipelines (commit coalescing),
        and so do (PostgreSQL) claims on one pipeline; each gets its own answer.
        """
        self._async = statements if self._postgresql else None
        self._updates = self._registering = self._claims = None
        if self._async is not None:
            self._updates = Coalescer(self._apply_changes)
            self._registering = Coalescer(self._apply_registrations)
            # A claim's answer takes its callers longer to build than an
            # update's: the next claims go to PostgreSQL before that, not after.
            self._claims = Coalescer(self._apply_claims, gather_between=False)
        elif not self._postgresql and executor is not None:
            self._updates = Coalescer(_on(executor, self._apply_changes_blocking))
            self._registering = Coalescer(_on(executor, self._register_blocking))

    def _needs_blocking_path(self, pipeline_name: str) -> bool:
        """True when the blocking method must answer: nothing is coalesced, or
        (asyncpg) the statements need the id of a pipeline not read yet."""
        return self._updates is None or (
            self._async is not None and pipeline_name not in self._pipeline_ids
        )

    async def register_canonical_async(
        self, pipeline_name: str, text: str, actor: Actor
    ) -> Registration | None:
        """register_canonical of one input, from the event loop; None when
        only register_canonical can answer. Locked when the input came alone
        in its batch and waited for a lock more than _BRIEF_LOCK: its task
        changed by a transaction not yet ended, say."""
        if self._registering is None or self._needs_blocking_path(pipeline_name):
            return None
        result = await self._registering.submit(_Registering(pipeline_name, text, actor))
        if isinstance(result, PorchError):
            raise result
        return result

    async def _apply_registrations(
        self, items: Sequence[_Registering]
    ) -> Sequence[Registration | Locked | None]:
        """Register single inputs of any pipelines and callers in one
        statement, then read those that were there already. None for each
        when PostgreSQL refused the statement, which changed nothing: each
        goes the blocking way, which words its own error. When it refused
        the read, the tasks made are answered and the rest are None: each
        goes the blocking way, which finds its task. When the statement
        waited for a lock more than _BRIEF_LOCK, Locked for an input alone;
        of several, None for each, as the lock may be any one's."""
        assert self._async is not None
        inputs = [(self._pipeline_ids[item.pipeline_name], item.text, item.actor) for item in items]
        keys, unique = _unique_inputs(inputs)
        try:
            statement = _register_with_events(brief=True)
            rows = await self._async.rows(statement, _registration_params(unique))
        except LockTimedOut:
            if len(unique) == 1:  # its own lock to wait for, if anything
                return [_input_locked(1) for _ in keys]
            # Each goes the blocking way, where the one locked waits alone.
            return [None] * len(keys)
        except (Contended, Refused):
            return [None] * len(keys)
        except TimedOut:
            if len(unique) == 1:
                raise  # alone: no other caller's row to blame, nor to try again
            return [None] * len(keys)
        created: dict[_InputKey, Any] = {(row.pipeline_id, row.task_input_id): row for row in rows}
        missing = [key for key in unique if key not in created]
        existing: dict[_InputKey, Any] = {}
        if missing:
            wanted = {
                "pipeline_ids": [pipeline_id for pipeline_id, _ in missing],
                "task_input_ids": [task_input_id for _, task_input_id in missing],
            }
            try:
                found = await self._async.rows(_existing_tasks(), wanted)
            except (Contended, Refused, TimedOut) as error:
                if isinstance(error, TimedOut) and len(unique) == 1:
                    raise  # that one was there already: nothing made to answer
                made = {key: self._to_task(row) for key, row in created.items()}
                tasks = [made.pop(key, None) for key in keys]  # a repeat is not made twice
                return [None if task is None else Registration(task, True) for task in tasks]
            existing = {(row.pipeline_id, row.task_input_id): row for row in found}
        return self._registrations(keys, created, existing)

    async def claim_tasks_async(
        self, pipeline_name: str, num_tasks: int, lease: timedelta | None, actor: Actor
    ) -> list[Task] | None:
        """claim_tasks on the event loop; None when only claim_tasks can answer."""
        pipeline_id = self._pipeline_ids.get(pipeline_name)
        if self._claims is None or pipeline_id is None:
            return None
        rows = await self._claims.submit(
            _Claim(pipeline_id, num_tasks, _lease_seconds(lease), actor)
        )
        if rows is None:
            return None
        if isinstance(rows, Exception):
            raise rows
        return [self._to_task(row) for row in rows]

    async def _apply_claims(
        self, claims: Sequence[_Claim]
    ) -> list[Sequence[RowView] | Exception | None]:
        """Make claims together: per pipeline, one statement expiring lapsed
        leases and one claiming for every claimer, oldest tasks to the
        claimer that asked first. Each caller reads its own rows.

        Each pipeline's claims commit on their own, so a pipeline whose
        statements fail fails only its own claimers: those of a pipeline
        claimed before it hold tasks, and must get them. They get the error,
        or None when PostgreSQL refused the statement (which changed
        nothing) and the blocking way is to try once more."""
        assert self._async is not None
        now = _now()
        results: list[Sequence[RowView] | Exception | None] = [[] for _ in claims]
        for pipeline_id, indexes in _positions(claim.pipeline_id for claim in claims).items():
            shares: Sequence[Sequence[RowView] | Exception | None]
            try:
                shares = await self._claim_in(now, pipeline_id, [claims[i] for i in indexes])
            except (Contended, Refused):
                shares = [None] * len(indexes)
            except Exception as error:
                shares = [error] * len(indexes)
            for index, share in zip(indexes, shares, strict=True):
                results[index] = share
        return results

    async def _claim_in(
        self, now: datetime, pipeline_id: int, claims: Sequence[_Claim]
    ) -> list[Sequence[RowView]]:
        """Claims on one pipeline, expiring its lapsed leases first: each
        claimer's rows."""
        assert self._async is not None
        expire = _event_params(now, None, None) | {"in_pipeline_id": pipeline_id}
        await self._async.scalar(_expire_with_events(True), expire)
        if len(claims) == 1:
            [claim] = claims
            params = _claim_params(
                now, pipeline_id, claim.num_tasks, claim.lease_seconds, claim.actor
            )
            return [await self._async.rows(_claim_with_events(), params)]
        params = _claim_batch_params(now, pipeline_id, claims)
        shares: list[Sequence[RowView]] = [[] for _ in claims]
        for row in await self._async.rows(_claim_batch(), params):
            shares[row.position - 1].append(row)
        return shares

    async def update_task_async(
        self,
        pipeline_name: str,
        task_input_id: str,
        status: State,
        message: str | None,
        actor: Actor,
        claim_number: int | None = None,
    ) -> Task | None:
        """update_task from the event loop; None when only update_task can
        answer, which on PostgreSQL includes every move the statement refuses
        (update_task finds out why)."""
        if self._updates is None or self._needs_blocking_path(pipeline_name):
            return None
        result = await self._updates.submit(
            _Change(pipeline_name, task_input_id, status, message, actor, claim_number)
        )
        if isinstance(result, PorchError):
            raise result
        return result

    async def _apply_changes(self, changes: Sequence[_Change]) -> list[Task | None]:
        """Apply status changes in one statement; a Task per applied change, else None."""
        assert self._async is not None
        now = _now()
        if len(changes) == 1:
            [change] = changes
            params = _event_params(now, change.actor, change.message) | {
                "in_task_input_id": change.task_input_id,
                "in_pipeline_id": self._pipeline_ids[change.pipeline_name],
                "in_claim_number": change.claim_number,
            }
            try:
                rows = await self._async.rows(
                    _update_with_event(change.status, skip_locked=True), params
                )
            except (Contended, Refused):
                return [None]  # it changed nothing: update_task words the error
            return [self._to_task(rows[0]) if rows else None]
        batch = {
            "now": now,
            "batch_pipeline_ids": [self._pipeline_ids[change.pipeline_name] for change in changes],
            "batch_task_input_ids": [change.task_input_id for change in changes],
            "batch_statuses": [change.status.value for change in changes],
            "batch_messages": [change.message for change in changes],
            "batch_token_ids": [_actor_token_id(change.actor) for change in changes],
            "batch_descriptions": [change.actor.description for change in changes],
            "batch_claim_numbers": [change.claim_number for change in changes],
        }
        try:
            rows = await self._async.rows(_update_batch(), batch)
        except (Contended, Refused, TimedOut):
            # Batches lock in id order, but should one still lose a deadlock
            # it changed nothing: each change then goes alone. So too when
            # PostgreSQL refuses one change's values, or a timeout ends the
            # batch (statement_timeout on a slow statement, say).
            return [None] * len(changes)
        applied = {row.position: row for row in rows}
        return [
            self._to_task(applied[position]) if position in applied else None
            for position in range(1, len(changes) + 1)
        ]

    @property
    def coalesced(self) -> tuple[int, int]:
        """Status changes applied through the coalescer, and the batches they took."""
        return _counts(self._updates)

    @property
    def coalesced_registrations(self) -> tuple[int, int]:
        """Single registrations made through the coalescer, and the batches they took."""
        return _counts(self._registering)

    async def notify_watchers_async(self) -> bool:
        """notify_watchers on the event loop; False when only notify_watchers can."""
        if self._async is None:
            return False
        await self._async.scalar(_notify, {})
        return True

    # The event stream

    def notify_watchers(self) -> None:
        """Tell every porch server's watch hub that events were committed (PostgreSQL)."""
        if self._postgresql:
            with self._read() as connection:
                connection.execute(_notify)

    def check_cursor(self, after: str) -> None:
        """InvalidArgument when a cursor lies beyond every event written so far:
        no porch handed it out, and a stream after it would miss what comes next.
        OutOfRange when it lies before the events kept, before a stream starts."""
        xid, event_id = cursor_key(after)
        with self._read() as connection:
            _check_horizon(connection, (xid, event_id))
            last_id = _last_event_id(connection)
            next_xid = 1  # SQLite's cursors all have transaction 0
            if self._postgresql:
                next_xid = _current_snapshot(connection).xmax
        if not self._postgresql and xid != 0:  # SQLite's cursors name no transaction
            raise InvalidArgument(
                f"cursor {after} names a transaction, which this server's cursors never do:"
                " resume from a cursor porch gave, or from an empty cursor"
            )
        # A cursor "from now" names the oldest transaction still running, or
        # when none is, the next to begin: (next_xid, 0), though no event
        # has that transaction yet.
        if (xid, min(event_id, 1)) > (next_xid, 0) or event_id > last_id:
            raise InvalidArgument(
                f"cursor {after} is ahead of every event written: resume from a cursor "
                "porch gave, or from an empty cursor"
            )

    def event_start_cursor(self) -> str:
        """Return the cursor meaning "from now": every event committed later
        comes after it.

        On PostgreSQL that is (the oldest transaction still running, 0): the
        point every stream has reached, as events wait there until that
        transaction ends. So a stream from it may begin with events committed
        just before it started, but misses none of a write under way then;
        and, a cursor being a position alone, a stream resumed at any cursor
        it handed out goes on as it would have."""
        with self._read() as connection:
            if self._postgresql:
                return make_cursor(_current_snapshot(connection).xmin, 0)
            return make_cursor(0, _last_event_id(connection))

    def read_events(
        self,
        after: str,
        pipeline_name: str | None,
        limit: int,
        *,
        check_horizon: bool = True,
        message_bytes: int | None = None,
    ) -> list[Event]:
        """Return up to limit events after the cursor, in cursor order, and
        given message_bytes, only as many as keep their messages within it
        (always one): a stream replaying history holds a batch in memory
        until its client has taken it.

        On PostgreSQL only events below the oldest running transaction are
        read, so that no event can later appear before one already returned.
        OutOfRange when the cursor is older than the oldest event kept.
        """
        key = cursor_key(after)
        with self._read() as connection:
            if check_horizon:
                _check_horizon(connection, key)
            if self._postgresql:
                query = _events_after()
            else:
                query = (
                    select(event, task.c.task_input_id)
                    .join(task, task.c.id == event.c.task_id)
                    .where(event.c.id > bindparam("after_id", type_=BigInteger))
                    .order_by(event.c.id)
                    .limit(bindparam("read_limit", type_=Integer))
                )
            pipeline_id = self._pipeline_id_or_none(connection, pipeline_name)
            if pipeline_id is not None:
                query = query.where(event.c.pipeline_id == pipeline_id)
            if message_bytes is not None:
                query = self._within_message_bytes(query, message_bytes)
            rows = connection.execute(query, _after(key) | {"read_limit": limit}).all()
            self._load_pipelines(connection, {row.pipeline_id for row in rows})
        return [
            _to_event(row, self._pipelines[row.pipeline_id].name, row.task_input_id) for row in rows
        ]

    def _within_message_bytes(self, query: Select[Any], message_bytes: int) -> Select[Any]:
        """The events of query whose messages, with those before them, take
        at most message_bytes in UTF-8; the first whatever it takes. The
        sizes are summed over the events' ids and lengths alone: the
        messages of those left out are never read into a row."""
        order = (event.c.xid, event.c.id) if self._postgresql else (event.c.id,)
        size = func.coalesce(_octet_length(event.c.message, self._postgresql), 0).label("size")
        read = query.with_only_columns(*order, size).subquery("read")
        in_order = [read.c[column.name] for column in order]
        sized = select(
            read.c.id,
            func.row_number().over(order_by=in_order).label("nth"),
            func.sum(read.c.size).over(order_by=in_order).label("bytes"),
        ).subquery("sized")
        within = or_(sized.c.nth == 1, sized.c.bytes <= message_bytes)
        return query.where(event.c.id.in_(select(sized.c.id).where(within)))

    async def read_events_async(self, after: str, limit: int) -> list[Event] | None:
        """read_events of every pipeline, without the horizon check, on the event
        loop; None when only read_events can answer (SQLite, or a pipeline not
        cached yet). The watch hub reads this way: a read on the thread pool
        waits for the GIL at every step while the loop is busy sending."""
        if self._async is None:
            return None
        params = _after(cursor_key(after)) | {"read_limit": limit}
        rows = await self._async.rows(_events_after(), params)
        pipelines = self._pipelines
        if any(row.pipeline_id not in pipelines for row in rows):
            return None
        return [_to_event(row, pipelines[row.pipeline_id].name, row.task_input_id) for row in rows]

    async def has_unread_events_async(self, after: str) -> bool | None:
        """has_unread_events on the event loop; None when only it can answer."""
        if self._async is None:
            return None
        return bool(await self._async.scalar(_unread_after(), _after(cursor_key(after))))

    def has_unread_events(self, after: str) -> bool:
        """True when events after the cursor have committed but wait for an older
        transaction to end before read_events may return them (PostgreSQL)."""
        if not self._postgresql:
            return False
        with self._read() as connection:
            return bool(connection.scalar(_unread_after(), _after(cursor_key(after))))

    def prune_events(self, before: datetime) -> int:
        """Delete the events older than before; cursors older than those kept become
        OutOfRange. Returns how many were deleted."""
        order = (event.c.xid, event.c.id) if self._postgresql else (event.c.id,)
        key = tuple_(*order)
        with self._write() as connection:
            first_kept = connection.execute(
                select(*order).where(event.c.time >= before).order_by(*order).limit(1)
            ).first()
            doomed = [event.c.time < before]
            if first_kept is not None:
                doomed.append(key < tuple_(*(literal(value) for value in first_kept)))
            if self._postgresql:
                doomed.append(event.c.xid < _XMIN)
            newest = connection.execute(
                select(event.c.xid, event.c.id)
                .where(*doomed)
                .order_by(*(column.desc() for column in order))
                .limit(1)
            ).first()
            if newest is None:
                return 0
            deleted = connection.execute(event.delete().where(*doomed)).rowcount
            horizon = connection.execute(
                select(event_horizon.c.xid, event_horizon.c.event_id)
            ).first()
            new_key = (newest.xid or 0, newest.id)
            if horizon is None or tuple(horizon) < new_key:
                connection.execute(event_horizon.delete())
                connection.execute(
                    event_horizon.insert().values(id=1, xid=new_key[0], event_id=new_key[1])
                )
            return int(deleted)

    def count_events_before(self, before: datetime) -> int:
        """How many events older than before there are (prune_events keeps some
        for now: those after an event it keeps, and on PostgreSQL those that a
        transaction still open may yet write events before)."""
        with self._read() as connection:
            return int(
                connection.execute(
                    select(func.count()).select_from(event).where(event.c.time < before)
                ).scalar_one()
            )

    # Transactions

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with _translate_errors(), self._reader.connect() as connection:
            yield connection

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        # SQLite: this process's writers queue on a lock of their own rather
        # than on the database's, whose busy handler sleeps in steps of up to
        # 100 ms and let a waiting writer miss many chances to run.
        with self._write_lock, _translate_errors(), self._writer.begin() as connection:
            yield connection

    def _task_write(
        self, task_input_id: str, wait: bool
    ) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction for a change to one task; with wait false
        (PostgreSQL), one in which the task's row locked elsewhere refuses
        the change at once (a NOWAIT lock), Locked, rather than wait."""
        if wait or not self._postgresql:
            return self._write()
        return self._write_not_waiting(lambda: _task_locked(task_input_id))

    @contextmanager
    def _write_not_waiting(self, refusal: Callable[[], Locked]) -> Iterator[Connection]:
        """A write transaction (PostgreSQL) whose statements wait at most
        _BRIEF_LOCK for a lock, a NOWAIT one not at all: refusal() is raised
        for one refused so. A lock on the whole table (an index built, a
        migration) has no NOWAIT: it too is waited for only briefly."""
        with self._write() as connection:
            connection.exec_driver_sql(_BRIEF_LOCK_TIMEOUT)
            try:
                yield connection
            except exc.OperationalError as error:
                if getattr(error.orig, "pgcode", None) != LOCK_NOT_AVAILABLE:
                    raise
                raise refusal() from error

    @contextmanager
    def _statements(self) -> Iterator[Connection]:
        """A connection for writes each of which is one atomic statement: on
        PostgreSQL autocommit (no BEGIN/COMMIT round trips), on SQLite a write
        transaction."""
        if self._postgresql:
            with self._read() as connection:
                yield connection
        else:
            with self._write() as connection:
                yield connection

    def _insert(self, table: Any) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(table) if self._postgresql else sqlite.insert(table)

    # Statements whose form differs between the databases

    def _insert_tasks(
        self, connection: Connection, pipeline_id: int, unique: dict[str, str], actor: Actor
    ) -> list[Row[Any]]:
        """Insert the tasks of a pipeline that do not exist yet, given as their
        canonical texts by task_input_id, each with its CREATED event."""
        if not unique:
            return []
        if self._postgresql:
            inputs = {(pipeline_id, key): (text, actor) for key, text in unique.items()}
            return list(connection.execute(_register_with_events(), _registration_params(inputs)))
        params = _event_params(_now(), actor, None) | {"in_pipeline_id": pipeline_id}
        rows = list(
            connection.execute(
                _register_sqlite,
                [
                    params | {"new_task_input_id": key, "new_task_input": text}
                    for key, text in unique.items()
                ],
            )
        )
        self._record_events(connection, rows, EventKind.CREATED, None, State.PENDING, params)
        return rows

    def _expire_leases(self, connection: Connection, now: datetime, pipeline_id: int | None) -> int:
        """Put tasks whose lease lapsed back to PENDING, of one pipeline or of all."""
        params = _event_params(now, None, None) | {"in_pipeline_id": pipeline_id}
        if self._postgresql:
            return int(connection.scalar(_expire_with_events(pipeline_id is not None), params))
        lapsed = connection.execute(_select_lapsed(pipeline_id is not None), params).all()
        if not lapsed:
            return 0
        # The write lock is held, so this changes exactly the rows just read.
        connection.execute(
            update(task)
            .where(_lapsed(pipeline_id is not None))
            .values(status=State.PENDING.value, update_time=_NOW, **_clear_claim()),
            params,
        )
        for old in {State(row.status) for row in lapsed}:
            rows = [row for row in lapsed if row.status == old]
            self._record_events(
                connection, rows, EventKind.LEASE_EXPIRED, old, State.PENDING, params
            )
        return len(lapsed)

    def _update_sqlite(
        self, connection: Connection, current: Row[Any], status: State, params: dict[str, Any]
    ) -> Row[Any]:
        """Apply an update whose transition was checked; SQLite holds the write lock."""
        values = params | {
            "in_id": current.id,
            "renewed_lease": _deadline(params["now"], current.lease_seconds),
        }
        row = connection.execute(_update_by_id(status), values).one()
        old = State(current.status)
        self._record_events(connection, [row], EventKind.STATUS_CHANGED, old, status, params)
        return row

    @staticmethod
    def _record_events(
        connection: Connection,
        rows: Sequence[Row[Any]],
        kind: EventKind,
        old: State | None,
        new: State,
        params: dict[str, Any],
    ) -> None:
        """Write one event per changed task row (SQLite; PostgreSQL does it in-statement)."""
        if not rows:
            return
        common = {
            "time": params["now"],
            "kind": kind.value,
            "old_status": old,
            "new_status": new.value,
            "token_id": params["actor_token_id"],
            "token_description": params["actor_description"],
            "message": params["event_message"],
        }
        connection.execute(
            _insert_event,
            [common | {"task_id": row.id, "pipeline_id": row.pipeline_id} for row in rows],
        )

    # Imports

    def import_records(self, source: ImportSource, keep: bool = True) -> ImportCounts:
        """Copy source's pipelines, tokens, tasks and events in one transaction.

        What porch holds already is left as it is: a pipeline found by name
        or a token by its secret is taken as it is (FailedPrecondition if it
        differs), and a task found by its input keeps its own history, the
        source's events of it left out. With keep false the transaction is
        rolled back: the counts say what an import would do.
        """
        with self._write() as connection:
            importing = _Importing(connection, self._insert, self._postgresql)
            importing.add_pipelines(source.pipelines())
            importing.add_tokens(source.tokens())
            for tasks in source.tasks():
                importing.add_tasks(tasks)
            for events in source.events():
                importing.add_events(events)
            importing.finish_tasks()
            if not keep:
                connection.rollback()
        if keep:
            self.notify_watchers()
        return importing.counts()

    # Pipelines by name and id, cached

    def _find_pipeline_id(self, connection: Connection, name: str) -> int:
        """Return the id of the pipeline called name; NotFound if there is none."""
        pipeline_id = self._pipeline_ids.get(name)
        if pipeline_id is None:
            row = connection.execute(
                select(pipeline_table).where(pipeline_table.c.name == name)
            ).first()
            if row is None:
                raise NotFound(f"pipeline {shortened(name)!r} not found")
            self._remember_pipeline(row)
            pipeline_id = row.id
        return pipeline_id

    def _pipeline_id_or_none(self, connection: Connection, name: str | None) -> int | None:
        return None if name is None else self._find_pipeline_id(connection, name)

    def _load_pipelines(self, connection: Connection, pipeline_ids: Iterable[int | None]) -> None:
        """Make sure the pipelines with these ids are cached."""
        missing = {key for key in pipeline_ids if key is not None and key not in self._pipelines}
        if missing:
            for row in connection.execute(
                select(pipeline_table).where(pipeline_table.c.id.in_(missing))
            ):
                self._remember_pipeline(row)

    def _remember_pipeline(self, row: Row[Any]) -> Pipeline:
        value = Pipeline(name=row.name, uri=row.uri, version=row.version)
        self._pipelines[row.id] = value
        self._pipeline_ids[row.name] = row.id
        return value

    # Rows to values

    def _to_task(self, row: Row[Any] | RowView) -> Task:
        return Task(
            pipeline=self._pipelines[row.pipeline_id],
            task_input_id=row.task_input_id,
            task_input=json.loads(row.task_input),
            status=State(row.status),
            create_time=row.create_time,
            update_time=row.update_time,
            claim_time=row.claim_time,
            claimed_by_token_id=_id_text(row.claimed_by_token_id),
            lease_expire_time=row.lease_expire_time,
            claim_number=row.claim_number,
        )

    def _to_token(self, row: Row[Any]) -> Token:
        owner = None if row.pipeline_id is None else self._pipelines[row.pipeline_id]
        return Token(
            token_id=str(row.id),
            role=Role(row.role),
            pipeline_name=None if owner is None else owner.name,
            description=row.description,
            create_time=row.create_time,
            revoke_time=row.revoke_time,
        )


class ImportSource(Protocol):
    """Records read from another tracker's database, for Store.import_records:
    tasks in batches, events in batches in the order they were made."""

    def pipelines(self) -> Iterable[ImportedPipeline]: ...

    def tokens(self) -> Iterable[ImportedToken]: ...

    def tasks(self) -> Iterable[Sequence[ImportedTask]]: ...

    def events(self) -> Iterable[Sequence[ImportedEvent]]: ...


@dataclass(slots=True)
class _ImportedRow:
    """An imported task as porch stored it, and what its events replayed so far say."""

    id: int
    pipeline_id: int
    status: State
    create_time: datetime
    replayed: State | None = None
    last_change: datetime | None = None
    claims: int = 0
    claim_time: datetime | None = None
    claimed_by: int | None = None


class _Importing:
    """One import's writes, on one connection in one transaction, with what it
    has mapped so far: the source's keys to porch's ids."""

    def __init__(
        self,
        connection: Connection,
        insert: Callable[[Any], postgresql.Insert | sqlite.Insert],
        on_postgresql: bool,
    ) -> None:
        self._connection = connection
        self._insert = insert
        self._postgresql = on_postgresql
        self._pipelines: dict[int, int] = {}
        self._pipeline_names: dict[int, str] = {}
        self._tokens: dict[int, tuple[int, str]] = {}
        self._tasks: dict[int, _ImportedRow] = {}
        self._task_keys: dict[int, int] = {}  # porch's task id -> the source's key
        self._tasks_found: set[int] = set()
        self._changed_ids: list[ChangedTaskId] = []
        self._found = {"pipelines": 0, "tokens": 0}
        self._events = self._events_left = self._events_of_no_task = 0

    def add_pipelines(self, pipelines: Iterable[ImportedPipeline]) -> None:
        for item in pipelines:
            given = item.pipeline
            statement = (
                self._insert(pipeline_table)
                .values(
                    name=given.name,
                    uri=given.uri,
                    version=given.version,
                    create_time=item.create_time,
                )
                .on_conflict_do_nothing(index_elements=[pipeline_table.c.name])
                .returning(pipeline_table.c.id)
            )
            pipeline_id = self._connection.scalar(statement)
            if pipeline_id is None:
                pipeline_id = self._found_pipeline(given)
            self._pipelines[item.key] = pipeline_id
            self._pipeline_names[item.key] = given.name

    def _found_pipeline(self, given: Pipeline) -> int:
        """The id of the pipeline porch has by given's name; FailedPrecondition
        unless it has given's uri and version."""
        row = self._connection.execute(
            select(pipeline_table).where(pipeline_table.c.name == given.name)
        ).one()
        if (row.uri, row.version) != (given.uri, given.version):
            raise FailedPrecondition(
                f"pipeline {shortened(given.name)!r} is in porch already, with uri"
                f" {shortened(row.uri)!r} and version {shortened(row.version)!r},"
                f" not {shortened(given.uri)!r} and {shortened(given.version)!r}"
            )
        self._found["pipelines"] += 1
        return int(row.id)

    def add_tokens(self, tokens: Iterable[ImportedToken]) -> None:
        for item in tokens:
            pipeline_id = None if item.pipeline_key is None else self._pipelines[item.pipeline_key]
            statement = (
                self._insert(token)
                .values(
                    token_hash=item.secret_hash,
                    role=item.role.value,
                    pipeline_id=pipeline_id,
                    description=item.description,
                    create_time=item.create_time,
                    revoke_time=item.revoke_time,
                )
                .on_conflict_do_nothing(index_elements=[token.c.token_hash])
                .returning(token.c.id, token.c.description)
            )
            row = self._connection.execute(statement).first()
            if row is None:
                row = self._found_token(item, pipeline_id)
            self._tokens[item.key] = (row.id, row.description)

    def _found_token(self, item: ImportedToken, pipeline_id: int | None) -> Row[Any]:
        """The token porch has with item's secret; FailedPrecondition unless
        it has item's role and pipeline."""
        row = self._connection.execute(
            select(token).where(token.c.token_hash == item.secret_hash)
        ).one()
        if (row.role, row.pipeline_id) != (item.role.value, pipeline_id):
            raise FailedPrecondition(
                f"the source's token {item.key} has the secret of porch's token {row.id},"
                " a token of another role or pipeline"
            )
        self._found["tokens"] += 1
        return row

    def add_tasks(self, tasks: Sequence[ImportedTask]) -> None:
        """Insert the tasks porch does not have yet; FailedPrecondition for
        two of the source's that porch takes as one (the same input)."""
        if not tasks:
            return
        statement = (
            self._insert(task)
            .on_conflict_do_nothing(index_elements=[task.c.pipeline_id, task.c.task_input_id])
            .returning(task.c.id, task.c.pipeline_id, task.c.task_input_id)
        )
        wheres = [(self._pipelines[item.pipeline_key], item.task_input_id) for item in tasks]
        rows = [
            {
                "pipeline_id": pipeline_id,
                "task_input_id": task_input_id,
                "task_input": item.task_input,
                "status": item.status.value,
                "create_time": item.create_time,
                "update_time": item.create_time,
            }
            for item, (pipeline_id, task_input_id) in zip(tasks, wheres, strict=True)
        ]
        added = {
            (row.pipeline_id, row.task_input_id): row.id
            for row in self._connection.execute(statement, rows)
        }
        there = self._tasks_there(wheres, added)
        for item, where in zip(tasks, wheres, strict=True):
            task_id = added.get(where)
            twin = self._task_keys.get(task_id if task_id is not None else there[where])
            if twin is not None:
                raise FailedPrecondition(
                    f"the source's tasks {twin} and {item.key} of pipeline"
                    f" {shortened(self._pipeline_names[item.pipeline_key])!r} are one task for"
                    " porch, which computes an id from the input as it reads it:"
                    f" {shortened(item.task_input)!r}"
                )
            if task_id is None:
                self._tasks_found.add(item.key)
                continue
            self._task_keys[task_id] = item.key
            self._tasks[item.key] = _ImportedRow(task_id, where[0], item.status, item.create_time)
            if item.former_id is not None:
                name = self._pipeline_names[item.pipeline_key]
                self._changed_ids.append(ChangedTaskId(name, item.former_id, item.task_input_id))

    def _tasks_there(
        self, wheres: list[tuple[int, str]], added: dict[tuple[int, str], int]
    ) -> dict[tuple[int, str], int]:
        """The ids of the tasks at wheres that were there before this statement."""
        missing: dict[int, list[str]] = {}
        for where in wheres:
            if where not in added:
                missing.setdefault(where[0], []).append(where[1])
        there = {}
        for pipeline_id, task_input_ids in missing.items():  # by the unique index
            query = select(task.c.id, task.c.task_input_id).where(
                task.c.pipeline_id == pipeline_id, task.c.task_input_id.in_(task_input_ids)
            )
            for row in self._connection.execute(query):
                there[pipeline_id, row.task_input_id] = row.id
        return there

    def add_events(self, events: Sequence[ImportedEvent]) -> None:
        """Insert the events of the tasks this import added, in order,
        replaying each task's status and claims."""
        rows = []
        for item in events:
            imported = None if item.task_key is None else self._tasks.get(item.task_key)
            if imported is None:  # a task porch had already keeps its own history
                if item.task_key in self._tasks_found:
                    self._events_left += 1
                else:
                    self._events_of_no_task += 1
                continue
            token_id, description = (
                (None, None) if item.token_key is None else self._tokens[item.token_key]
            )
            old = None if item.kind is EventKind.CREATED else imported.replayed
            # Never before the task's last change: a clock without a time
            # zone goes back an hour a year.
            time = max(item.time, imported.last_change or imported.create_time)
            rows.append(
                {
                    "time": time,
                    "task_id": imported.id,
                    "pipeline_id": imported.pipeline_id,
                    "kind": item.kind.value,
                    "old_status": None if old is None else old.value,
                    "new_status": item.status.value,
                    "token_id": token_id,
                    "token_description": description,
                    "message": None,
                }
            )
            imported.replayed, imported.last_change = item.status, time
            if item.kind is EventKind.CLAIMED:
                imported.claims += 1
                imported.claim_time, imported.claimed_by = time, token_id
            elif item.status is State.PENDING:  # released: as porch clears a claim
                imported.claim_time = imported.claimed_by = None
        self._execute_many(_insert_event, _insert_imported_events(), rows)
        self._events += len(rows)

    def finish_tasks(self) -> None:
        """Set each imported task's update time and claim from its events."""
        changed = [row for row in self._tasks.values() if row.last_change is not None]
        for start in range(0, len(changed), _IMPORT_BATCH):
            rows = [_finished(row) for row in changed[start : start + _IMPORT_BATCH]]
            self._execute_many(_finish_imported_task, _finish_imported_tasks(), rows)

    def _execute_many(self, statement: Any, by_arrays: Any, rows: list[dict[str, Any]]) -> None:
        """statement for each of rows; on PostgreSQL by_arrays once instead,
        each of the rows' keys given as the array {key}s: one statement, not
        one a row."""
        if not rows:
            return
        if self._postgresql:
            arrays = {f"{key}s": [row[key] for row in rows] for key in rows[0]}
            self._connection.execute(by_arrays, arrays)
        else:
            self._connection.execute(statement, rows)

    def counts(self) -> ImportCounts:
        return ImportCounts(
            pipelines_added=len(self._pipelines) - self._found["pipelines"],
            pipelines_found=self._found["pipelines"],
            tokens_added=len(self._tokens) - self._found["tokens"],
            tokens_found=self._found["tokens"],
            tasks_added=len(self._tasks),
            tasks_found=len(self._tasks_found),
            events_added=self._events,
            events_left=self._events_left,
            events_of_no_task=self._events_of_no_task,
            changed_ids=tuple(self._changed_ids),
        )


_finish_imported_task = (
    update(task)
    .where(task.c.id == bindparam("in_id", type_=BigInteger))
    .values(
        update_time=bindparam("in_update_time", type_=UtcDateTime),
        claim_number=bindparam("in_claim_number", type_=Integer),
        claim_time=bindparam("in_claim_time", type_=UtcDateTime),
        claimed_by_token_id=bindparam("in_claimer", type_=Integer),
    )
)


@functools.cache
def _insert_imported_events() -> Any:
    """Insert events given as parallel arrays (PostgreSQL), in the arrays' order."""
    columns = [
        ("time", UtcDateTime),
        ("task_id", BigInteger),
        ("pipeline_id", Integer),
        ("kind", Text),
        ("old_status", Text),
        ("new_status", Text),
        ("token_id", Integer),
        ("token_description", Text),
        ("message", Text),
    ]
    given = _rows_of_arrays("given", [(f"{name}s", name, kind) for name, kind in columns])
    names = [name for name, _ in columns]
    rows = select(*(given.c[name] for name in names)).order_by(given.c.position)
    return insert(event).from_select(names, rows)


@functools.cache
def _finish_imported_tasks() -> Any:
    """_finish_imported_task for many tasks at once, as parallel arrays (PostgreSQL)."""
    finished = _rows_of_arrays(
        "finished",
        [
            ("in_ids", "id", BigInteger),
            ("in_update_times", "update_time", UtcDateTime),
            ("in_claim_numbers", "claims", Integer),
            ("in_claim_times", "claim_time", UtcDateTime),
            ("in_claimers", "claimed_by", Integer),
        ],
    )
    return (
        update(task)
        .where(task.c.id == finished.c.id)
        .values(
            update_time=finished.c.update_time,
            claim_number=finished.c.claims,
            claim_time=finished.c.claim_time,
            claimed_by_token_id=finished.c.claimed_by,
        )
    )


def _finished(row: _ImportedRow) -> dict[str, Any]:
    """An imported task's update time and claim, once its events are replayed:
    as porch keeps them, the claim's time and token only while not PENDING."""
    claimed = row.status is not State.PENDING
    return {
        "in_id": row.id,
        "in_update_time": max(row.create_time, row.last_change or row.create_time),
        "in_claim_number": row.claims,
        "in_claim_time": row.claim_time if claimed else None,
        "in_claimer": row.claimed_by if claimed else None,
    }


@contextmanager
def _translate_errors() -> Iterator[None]:
    """Turn the driver's 'the database cannot serve' errors into Unavailable."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        code = getattr(error.orig, "pgcode", None)
        if code == LOCK_NOT_AVAILABLE:  # lock_timeout
            raise Locked(LOCK_TIMED_OUT, first_line(error.orig)) from error
        if code == QUERY_CANCELED:  # statement_timeout, or a cancel: the database answered
            raise TimedOut("the database is unavailable", first_line(error.orig)) from error
        raise Unavailable("the database is unavailable", first_line(error.orig)) from error
    except exc.TimeoutError as error:
        raise Unavailable("no database connection is free", first_line(error)) from error
    except exc.DBAPIError as error:
        if error.connection_invalidated:
            cause = first_line(error.orig)
            raise Unavailable("the database connection was lost", cause) from error
        if getattr(error.orig, "pgcode", None) == READ_ONLY_SQLSTATE:
            raise Unavailable(READ_ONLY_DATABASE, first_line(error.orig)) from error
        raise


def _now() -> datetime:
    return datetime.now(UTC)


def _deadline(now: datetime, lease_seconds: int | None) -> datetime | None:
    return None if lease_seconds is None else now + timedelta(seconds=lease_seconds)


def _token_key(token_id: str) -> int:
    """Return a token's row id; InvalidArgument for an id that cannot be one."""
    if not (token_id.isascii() and token_id.isdecimal() and 1 <= int(token_id) <= _MAX_TOKEN_ID):
        raise InvalidArgument(
            f"token_id must be a token's id, a whole number from 1 to {_MAX_TOKEN_ID:,},"
            f" got {shortened(token_id)!r}"
        )
    return int(token_id)


def _id_text(value: int | None) -> str | None:
    return None if value is None else str(value)


def _actor_token_id(actor: Actor | None) -> int | None:
    if actor is None or actor.token_id is None:
        return None
    return int(actor.token_id)


def _on(
    executor: Executor, function: Callable[[Sequence[Item]], Result_]
) -> Callable[[Sequence[Item]], Awaitable[Result_]]:
    """function(items), run on executor from the event loop."""

    async def run(items: Sequence[Item]) -> Result_:
        return await asyncio.get_running_loop().run_in_executor(executor, function, items)

    return run


def _counts(coalescer: Coalescer[Any, Any] | None) -> tuple[int, int]:
    """A coalescer's items and batches so far; none without one."""
    return (0, 0) if coalescer is None else (coalescer.items, coalescer.batches)


def _positions(keys: Iterable[Key_]) -> dict[Key_, list[int]]:
    """The positions of each distinct key, keys in the order first seen."""
    positions: dict[Key_, list[int]] = {}
    for index, key in enumerate(keys):
        positions.setdefault(key, []).append(index)
    return positions


def _unique_texts(texts: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The task_input_id of each canonical text, and each distinct text by its id."""
    ids = [digest.digest_of(text) for text in texts]
    return ids, dict(zip(ids, texts, strict=True))


def _unique_inputs(
    inputs: Sequence[_Input],
) -> tuple[list[_InputKey], dict[_InputKey, tuple[str, Actor]]]:
    """The (pipeline id, task_input_id) of each input, and each distinct one's
    text and caller, the first caller of repeats."""
    keys = [(pipeline_id, digest.digest_of(text)) for pipeline_id, text, _ in inputs]
    unique: dict[_InputKey, tuple[str, Actor]] = {}
    for key, (_, text, actor) in zip(keys, inputs, strict=True):
        unique.setdefault(key, (text, actor))
    return keys, unique


def _registration_params(inputs: dict[_InputKey, tuple[str, Actor]]) -> dict[str, Any]:
    """_register_with_events' parameters: the inputs as parallel arrays."""
    return {
        "now": _now(),
        "new_pipeline_ids": [pipeline_id for pipeline_id, _ in inputs],
        "new_task_input_ids": [task_input_id for _, task_input_id in inputs],
        "new_task_inputs": [text for text, _ in inputs.values()],
        "new_token_ids": [_actor_token_id(actor) for _, actor in inputs.values()],
        "new_descriptions": [actor.description for _, actor in inputs.values()],
    }


def _lease_seconds(lease: timedelta | None) -> int | None:
    """A lease in whole seconds, at least one."""
    return None if lease is None else max(1, math.ceil(lease.total_seconds()))


def _claim_params(
    now: datetime, pipeline_id: int, num_tasks: int, lease_seconds: int | None, actor: Actor
) -> dict[str, Any]:
    return _event_params(now, actor, None) | {
        "in_pipeline_id": pipeline_id,
        "num_tasks": num_tasks,
        "claim_lease_seconds": lease_seconds,
    }


def _claim_batch_params(now: datetime, pipeline_id: int, group: Sequence[_Claim]) -> dict[str, Any]:
    """The parameters of _claim_batch: the claimers in the order they arrived."""
    return {
        "now": now,
        "in_pipeline_id": pipeline_id,
        "num_tasks": sum(claim.num_tasks for claim in group),
        "claim_counts": [claim.num_tasks for claim in group],
        "claim_token_ids": [_actor_token_id(claim.actor) for claim in group],
        "claim_descriptions": [claim.actor.description for claim in group],
        "claim_lease_seconds": [claim.lease_seconds for claim in group],
    }


def _event_params(now: datetime, actor: Actor | None, message: str | None) -> dict[str, Any]:
    return {
        "now": now,
        "actor_token_id": _actor_token_id(actor),
        "actor_description": None if actor is None else actor.description,
        "event_message": message,
    }


def _task_not_found(pipeline_name: str, task_input_id: str) -> NotFound:
    return NotFound(f"task {task_input_id} of pipeline {shortened(pipeline_name)!r} not found")


def _fitting(rows: Sequence[Row[Any]], page_size: int, size: Callable[[Row[Any]], int]) -> int:
    """How many of rows (at most page_size, at least one) a page holds, each
    taking size(row) bytes of the answer."""
    total = 0
    for count, row in enumerate(rows[:page_size]):
        total += size(row)
        if total > ANSWER_BYTES and count > 0:
            return count
    return page_size


def _event_bytes(pipeline_name_bytes: int, row: Row[Any]) -> int:
    # A message is up to 64 KiB; the ids, times and kinds take the rest.
    texts = (row.message, row.token_description)
    carried = sum(len(text.encode()) for text in texts if text) + pipeline_name_bytes
    return carried + _TASK_OVERHEAD_BYTES


def _pipeline_row_bytes(row: Row[Any]) -> int:
    return _pipeline_bytes(Pipeline(row.name, row.uri, row.version)) + _TASK_OVERHEAD_BYTES


def _page(
    rows: Sequence[Row[Any]],
    page_size: int,
    listing: str,
    filters: Filters,
    key: str,
    convert: Callable[[Row[Any]], Item],
) -> Page[Item]:
    """Turn rows fetched with one too many into a page and the token for the next."""
    next_page_token = ""
    if len(rows) > page_size:
        rows = rows[:page_size]
        next_page_token = encode_page_token(listing, filters, getattr(rows[-1], key))
    return Page([convert(row) for row in rows], next_page_token)


def _current_snapshot(connection: Connection) -> Snapshot:
    """Which transactions have committed, now (PostgreSQL)."""
    return Snapshot.parse(str(connection.scalar(select(func.pg_current_snapshot().cast(Text)))))


def _last_event_id(connection: Connection) -> int:
    """The id of the newest event written, kept or pruned; 0 before any."""
    newest = select(func.coalesce(func.max(event.c.id), 0)).scalar_subquery()
    pruned = select(func.coalesce(func.max(event_horizon.c.event_id), 0)).scalar_subquery()
    # max() of two values is SQLite's; PostgreSQL's is greatest().
    both = (
        func.greatest(newest, pruned)
        if connection.dialect.name == "postgresql"
        else func.max(newest, pruned)
    )
    return int(connection.scalar(select(both)) or 0)


def _check_horizon(connection: Connection, key: Key) -> None:
    """Raise OutOfRange when key is older than the newest event pruned."""
    horizon = connection.execute(select(event_horizon.c.xid, event_horizon.c.event_id)).first()
    if horizon is not None and key < (horizon.xid, horizon.event_id):
        oldest = make_cursor(horizon.xid, horizon.event_id)
        raise OutOfRange(
            f"cursor {make_cursor(*key)} is older than the events kept (which start after "
            f"{oldest}); resume from {oldest!r} or from an empty cursor, accepting the gap"
        )


def _to_event(row: Row[Any] | RowView, pipeline_name: str, task_input_id: str) -> Event:
    """An Event of a row of the event table (either driver's), with its names."""
    return Event(
        cursor=make_cursor(row.xid or 0, row.id),
        time=row.time,
        pipeline_name=pipeline_name,
        task_input_id=task_input_id,
        kind=EventKind(row.kind),
        old_status=None if row.old_status is None else State(row.old_status),
        new_status=None if row.new_status is None else State(row.new_status),
        token_id=_id_text(row.token_id),
        token_description=row.token_description,
        message=row.message,
    )


def _select_task(pipeline_id: int, task_input_id: str) -> Select[Any]:
    return select(task).where(
        task.c.pipeline_id == pipeline_id, task.c.task_input_id == task_input_id
    )


def _clear_claim() -> dict[str, Any]:
    return {
        "claim_time": None,
        "claimed_by_token_id": None,
        "lease_seconds": None,
        "lease_expire_time": None,
    }


@functools.cache
def _update_by_id(status: State) -> Any:
    """Move the task with id in_id to status (SQLite: the caller checked the move)."""
    renewed = bindparam("renewed_lease", type_=UtcDateTime)
    return (
        update(task)
        .where(task.c.id == bindparam("in_id", type_=Integer))
        .values(status=status.value, update_time=_NOW, **_status_effects(status, renewed))
        .returning(*task.c)
    )


def _status_effects(status: State, renewed_lease: Any) -> dict[str, Any]:
    """The columns besides status and update_time that moving to status sets."""
    if status is State.PENDING:
        return _clear_claim()
    if status in (State.CLAIMED, State.RUNNING):
        return {"lease_expire_time": renewed_lease}
    return {"lease_seconds": None, "lease_expire_time": None}


def _events_from(
    changed: CTE,
    kind: EventKind,
    old: ColumnElement[Any],
    new: ColumnElement[Any],
    who: tuple[ColumnElement[Any], ...] | None = None,
) -> CTE:
    """A data-modifying CTE writing one event per row of changed (PostgreSQL),
    at the time of the change: its row's update_time, else (a row made) now.

    who is each event's (token id, token description, message); by default
    the one caller's, from the actor_* and event_message parameters.
    """
    if who is None:
        who = (
            bindparam("actor_token_id", type_=Integer),
            bindparam("actor_description", type_=Text),
            bindparam("event_message", type_=Text),
        )
    at = changed.c.update_time if "update_time" in changed.c else _NOW
    values = select(at, changed.c.id, changed.c.pipeline_id, literal(kind.value), old, new, *who)
    return insert(event).from_select(_EVENT_COLUMNS, values).cte("events")


_register_sqlite = (
    sqlite.insert(task)
    .values(
        pipeline_id=_PIPELINE_ID,
        task_input_id=bindparam("new_task_input_id"),
        task_input=bindparam("new_task_input"),
        status=State.PENDING.value,
        create_time=_NOW,
        update_time=_NOW,
    )
    .on_conflict_do_nothing(index_elements=[task.c.pipeline_id, task.c.task_input_id])
    .returning(*task.c)
)


def _select_tasks(connection: Connection, pipeline_id: int, keys: list[str]) -> list[Row[Any]]:
    """Return the tasks of a pipeline with these task_input_ids, in chunks."""
    rows: list[Row[Any]] = []
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        query = select(task).where(
            task.c.pipeline_id == pipeline_id, task.c.task_input_id.in_(chunk)
        )
        rows.extend(connection.execute(query))
    return rows


def _after(key: Key) -> dict[str, int]:
    """The parameters of a cursor's key, for the statements that read after it."""
    return {"after_xid": key[0], "after_id": key[1]}


@functools.cache
def _events_after() -> Select[Any]:
    """Up to read_limit events after (after_xid, after_id) of every pipeline,
    below the oldest running transaction, in cursor order (PostgreSQL)."""
    after = tuple_(
        bindparam("after_xid", type_=BigInteger), bindparam("after_id", type_=BigInteger)
    )
    return (
        select(event, task.c.task_input_id)
        .join(task, task.c.id == event.c.task_id)
        .where(tuple_(event.c.xid, event.c.id) > after, event.c.xid < _XMIN)
        .order_by(event.c.xid, event.c.id)
        .limit(bindparam("read_limit", type_=Integer))
    )


@functools.cache
def _unread_after() -> Select[Any]:
    """Whether events after (after_xid, after_id) have committed but wait
    behind an older transaction (PostgreSQL)."""
    after = tuple_(
        bindparam("after_xid", type_=BigInteger), bindparam("after_id", type_=BigInteger)
    )
    return select(exists().where(tuple_(event.c.xid, event.c.id) > after, event.c.xid >= _XMIN))


def _task_locked(task_input_id: str) -> Locked:
    return Locked(f"task {task_input_id}, or the task table, is locked by another transaction")


def _input_locked(inputs: int) -> Locked:
    tasks = "a task of these inputs" if inputs > 1 else "the input's task"
    return Locked(f"{tasks}, or the task table, is locked by another transaction")


def _tasks_listed(
    pipeline_id: int | None, status: State | None, after: int | None, page_size: int, sqlite: bool
) -> Select[Any]:
    """SELECT a page of tasks, and one more, oldest first: of a pipeline, in a
    status, after an id, each when given.

    A status other than PENDING and DONE of every pipeline gets the status
    index's term on SQLite, as its planner needs to use a partial index.
    Not when a pipeline is named: with no statistics, it would then take
    that index even where the pipeline's is better (a small pipeline, its
    status common in others'). PostgreSQL's planner proves the term from
    the status, and would count it as a second filter, misjudging how many
    rows match.

    A pipeline's PENDING tasks are read on SQLite by the claims' index, named
    as the claim names it: left to choose between that and the pipeline's
    index, its planner took whichever was made last, and migration 0003
    makes them again in no set order (16 ms a page at 120,000 tasks, not 0.6).
    """
    query = select(task).order_by(task.c.id).limit(page_size + 1)
    if pipeline_id is not None:
        query = query.where(task.c.pipeline_id == pipeline_id)
    if status is State.PENDING and pipeline_id is not None and sqlite:
        # As in the index's term: SQLite does not match a bound value to it.
        query = query.where(task.c.status == _PENDING)
        query = query.with_hint(task, "INDEXED BY ix_task_pending", "sqlite")
    elif status is not None:
        query = query.where(task.c.status == status.value)
        if sqlite and pipeline_id is None and status not in OUTSIDE_STATUS_INDEX:
            query = query.where(sql_text(LISTED_APART))
    if after is not None:
        query = query.where(task.c.id > after)
    return query


@functools.cache
def _register_with_events(brief: bool = False) -> Select[Any]:
    """INSERT the new tasks ON CONFLICT DO NOTHING with their events (PostgreSQL).

    The inputs come as parallel arrays, each of its own pipeline and caller,
    so that registrations from many wrappers share one statement and one
    commit. Ids are drawn in the order given, so a batch is claimed in that
    order, but rows are inserted in (pipeline, task_input_id) order:
    concurrent registrations then wait for each other's keys in one order
    and cannot deadlock. Each CREATED event names its own input's caller.

    brief: the statement waits at most _BRIEF_LOCK for a row's lock (a
    task changed, or being registered, by a transaction not yet ended), then
    fails with lock_not_available, having changed nothing. It sets its own
    lock_timeout, for its own transaction only, before its first row is
    inserted: one statement in autocommit, with no SET and no BEGIN/COMMIT
    round trips. (A lock on a whole table is taken before the statement
    runs, so it is waited for as any statement waits.)
    """
    new = _rows_of_arrays(
        "new",
        [
            ("new_pipeline_ids", "pipeline_id", Integer),
            ("new_task_input_ids", "task_input_id", Text),
            ("new_task_inputs", "task_input", Text),
            ("new_token_ids", "token_id", Integer),
            ("new_descriptions", "token_description", Text),
        ],
    )
    sequence = select(func.pg_get_serial_sequence("task", "id")).scalar_subquery()
    numbering = select(
        func.nextval(sequence).label("id"),
        *(column for column in new.c if column.name != "position"),
    ).order_by(new.c.position)
    if brief:
        # Run once, before the first row reaches the INSERT (which takes
        # them all sorted): set_config's third argument makes it local.
        timeout = func.set_config("lock_timeout", _BRIEF_LOCK, True)
        numbering = numbering.where(select(timeout).scalar_subquery().is_not(None))
    numbered = numbering.cte("numbered")
    rows = select(
        numbered.c.id,
        numbered.c.pipeline_id,
        numbered.c.task_input_id,
        numbered.c.task_input,
        _PENDING,
        _NOW,
        _NOW,
    ).order_by(numbered.c.pipeline_id, numbered.c.task_input_id)
    inserted = (
        postgresql.insert(task)
        .from_select(
            [
                "id",
                "pipeline_id",
                "task_input_id",
                "task_input",
                "status",
                "create_time",
                "update_time",
            ],
            rows,
        )
        .on_conflict_do_nothing(index_elements=[task.c.pipeline_id, task.c.task_input_id])
        .returning(*task.c)
        .cte("inserted")
    )
    # RETURNING names only the task's columns: the caller of each comes from
    # its input's row, found by the id drawn for it.
    created = (
        select(
            inserted.c.id, inserted.c.pipeline_id, numbered.c.token_id, numbered.c.token_description
        )
        .join_from(inserted, numbered, numbered.c.id == inserted.c.id)
        .cte("created")
    )
    who = (created.c.token_id, created.c.token_description, null())
    events = _events_from(created, EventKind.CREATED, null(), _PENDING, who)
    return select(inserted).add_cte(events)


@functools.cache
def _existing_tasks() -> Select[Any]:
    """The tasks with these (pipeline id, task_input_id) pairs, given as
    parallel arrays (PostgreSQL)."""
    wanted = _rows_of_arrays(
        "wanted",
        [("pipeline_ids", "pipeline_id", Integer), ("task_input_ids", "task_input_id", Text)],
    )
    return select(task).join_from(
        task,
        wanted,
        (task.c.pipeline_id == wanted.c.pipeline_id)
        & (task.c.task_input_id == wanted.c.task_input_id),
    )


@functools.cache
def _claim_with_events() -> Select[Any]:
    """The claim and its CLAIMED events in one statement (PostgreSQL)."""
    columns = _claimed(_CLAIMER, _LEASE_SECONDS, _lease_deadline(_LEASE_SECONDS))
    claimed = _claim(claim_candidates, columns, postgresql=True).cte("claimed")
    events = _events_from(
        claimed, EventKind.CLAIMED, literal(State.PENDING.value), claimed.c.status
    )
    return select(claimed).add_cte(events).order_by(claimed.c.id)


def _rows_of_arrays(name: str, columns: Sequence[tuple[str, str, Any]]) -> Any:
    """Parallel array parameters as the rows of a table called name, each
    with its 1-based position; columns are (parameter, column, element type)."""
    return (
        func.unnest(*(bindparam(param, type_=postgresql.ARRAY(kind)) for param, _, kind in columns))
        .table_valued(*(column for _, column, _ in columns), with_ordinality="position")
        .render_derived(name=name)
    )


@functools.cache
def _claim_batch() -> Select[Any]:
    """Several claimers' claims on one pipeline, with their events, in one
    statement (PostgreSQL).

    The claimers come as parallel arrays, in the order they arrived. Each
    takes, after the tasks of the claimers before it, the oldest PENDING
    tasks, as many as it asked for (claim_counts[k]) and one answer holds
    (ANSWER_BYTES; always one); each row comes back with its claimer's
    1-based position. With fewer tasks pending, the claimers that asked
    first are served first. What a full answer leaves of its claimer's
    count goes to the next claimer, and the rest stay PENDING, unlocked:
    the shares are counted on an unlocked preview first, and only what
    they hold is locked.
    """
    claimers = _rows_of_arrays(
        "claimers",
        [
            ("claim_counts", "asked", Integer),
            ("claim_token_ids", "token_id", Integer),
            ("claim_descriptions", "token_description", Text),
            ("claim_lease_seconds", "lease_seconds", Integer),
        ],
    )
    # How many tasks each claimer's answer holds, counted on the preview:
    # claimer by claimer (a recursive CTE), each going on from where the one
    # before it stopped. A claimer whose answer is full leaves tasks of what
    # it asked for to the next; counting every claimer's share from what the
    # ones before asked for would find none left for the next while they
    # stay PENDING. The claimers' ranges are these counts end to end, and
    # only their sum is locked.
    previewed = _previewed()
    start = select(
        cast(0, BigInteger).label("position"),
        cast(0, BigInteger).label("upto"),
        cast(0, BigInteger).label("base"),
        cast(0, BigInteger).label("fit"),
    ).cte("steps", recursive=True)
    step = start.alias("step")
    held = (
        select(func.count().label("fit"), func.max(previewed.c.running).label("top"))
        .where(
            previewed.c.number > step.c.upto,
            previewed.c.number <= step.c.upto + claimers.c.asked,
            or_(
                previewed.c.number == step.c.upto + 1,
                previewed.c.running - step.c.base <= ANSWER_BYTES,
            ),
        )
        .lateral("held")
    )
    steps = start.union_all(
        select(
            claimers.c.position,
            step.c.upto + held.c.fit,
            func.coalesce(held.c.top, step.c.base),
            held.c.fit,
        )
        .join_from(step, claimers, claimers.c.position == step.c.position + 1)
        .join(held, true())
    )
    ranges = (
        select(*claimers.c, steps.c.fit, steps.c.upto)
        .join_from(claimers, steps, steps.c.position == claimers.c.position)
        .cte("ranges")
    )
    total = select(func.coalesce(func.sum(ranges.c.fit), 0)).scalar_subquery()
    candidates = (
        _pending(total, _input_length()).with_for_update(skip_locked=True).cte("candidates")
    )
    numbered = select(
        candidates.c.id,
        func.row_number().over(order_by=candidates.c.id).label("number"),
        candidates.c.input_length.label("size"),
    ).cte("numbered")
    mine, oldest = ranges.c.position, numbered.c.id
    assigned = (
        select(
            numbered.c.id,
            ranges,
            func.row_number().over(partition_by=mine, order_by=oldest).label("nth"),
            func.sum(_answer_bytes_sql(numbered.c.size, postgresql=True))
            .over(partition_by=mine, order_by=oldest)
            .label("running"),
        )
        .join_from(
            numbered,
            ranges,
            (numbered.c.number > ranges.c.upto - ranges.c.fit)
            & (numbered.c.number <= ranges.c.upto),
        )
        .cte("assigned")
    )
    claimed = (
        update(task)
        .where(task.c.id == assigned.c.id, _answer_holds(assigned.c.nth, assigned.c.running))
        .values(
            **_claimed(
                assigned.c.token_id,
                assigned.c.lease_seconds,
                _lease_deadline(assigned.c.lease_seconds),
            )
        )
        .returning(*task.c, assigned.c.position, assigned.c.token_description)
        .cte("claimed")
    )
    who = (claimed.c.claimed_by_token_id, claimed.c.token_description, null())
    pending = literal(State.PENDING.value)
    events = _events_from(claimed, EventKind.CLAIMED, pending, claimed.c.status, who)
    return select(claimed).add_cte(events).order_by(claimed.c.id)


@functools.cache
def _update_with_event(
    status: State, skip_locked: bool = False, nowait: bool = False
) -> Select[Any]:
    """Move one task to status if its current state allows it, with the event (PostgreSQL).

    Returns no row when the task is missing or the move is not allowed; the
    caller then finds out which. With skip_locked, also when another
    transaction holds the task: the coalesced changes, which run one batch at
    a time, must not wait for it, so the change goes the blocking way. With
    nowait, PostgreSQL refuses the statement then (lock_not_available).
    """
    sources = [
        old for old in State if status in UPDATE_TRANSITIONS[old] and not is_noop(old, status)
    ]
    # Only a task the update will change is locked: a claim skips locked
    # PENDING tasks, so a refused or no-op update must not lock one.
    current = (
        select(task.c.id, task.c.status)
        .where(
            task.c.pipeline_id == _PIPELINE_ID,
            task.c.task_input_id == bindparam("in_task_input_id", type_=Text),
            task.c.status.in_([old.value for old in sources]),
            _same_claim(bindparam("in_claim_number", type_=Integer), task.c.claim_number),
        )
        .with_for_update(skip_locked=skip_locked, nowait=nowait)
        .cte("current")
    )
    renewed_lease = _lease_deadline(task.c.lease_seconds)
    changed = (
        update(task)
        .where(task.c.id == current.c.id)
        .values(
            status=status.value,
            update_time=_CHANGE_TIME,
            **_status_effects(status, renewed_lease),
        )
        .returning(*task.c, current.c.status.label("old_status"))
        .cte("changed")
    )
    events = _events_from(changed, EventKind.STATUS_CHANGED, changed.c.old_status, changed.c.status)
    return select(changed).add_cte(events)


@functools.cache
def _update_batch() -> Select[Any]:
    """Several status changes with their events in one statement (PostgreSQL).

    The changes come as parallel arrays; a row comes back, with the change's
    1-based position, for each change applied. A change the state table
    refuses, one of a missing task, and all but one of several changes to
    the same task come back as nothing: the caller then asks each alone.
    Rows are locked in id order, so concurrent batches cannot deadlock. A
    task another transaction holds comes back as nothing too, as in
    _update_with_event with skip_locked: the batch does not wait for it.
    """
    requested = _rows_of_arrays(
        "requested",
        [
            ("batch_pipeline_ids", "pipeline_id", Integer),
            ("batch_task_input_ids", "task_input_id", Text),
            ("batch_statuses", "new_status", Text),
            ("batch_messages", "message", Text),
            ("batch_token_ids", "token_id", Integer),
            ("batch_descriptions", "token_description", Text),
            ("batch_claim_numbers", "expected_claim", Integer),
        ],
    )
    allowed = or_(
        *(
            (task.c.status == literal(old.value)) & (requested.c.new_status == literal(new.value))
            for old in State
            for new in sorted(UPDATE_TRANSITIONS[old])
            if not is_noop(old, new)
        )
    )
    # Only tasks a change will move are locked: a claim skips locked PENDING
    # tasks, so a refused or no-op change must not lock one.
    current = (
        select(
            task.c.id,
            task.c.status,
            *(
                column
                for column in requested.c
                if column.name != "pipeline_id" and column.name != "task_input_id"
            ),
        )
        .join_from(
            task,
            requested,
            (task.c.pipeline_id == requested.c.pipeline_id)
            & (task.c.task_input_id == requested.c.task_input_id),
        )
        .where(allowed, _same_claim(requested.c.expected_claim, task.c.claim_number))
        .order_by(task.c.id)
        .with_for_update(of=task, skip_locked=True)
        .cte("current")
    )
    new_status = current.c.new_status
    renewed_lease = _lease_deadline(task.c.lease_seconds)
    effects: dict[str, list[tuple[ColumnElement[bool], Any]]] = {}
    for status in sorted({new for targets in UPDATE_TRANSITIONS.values() for new in targets}):
        for name, value in _status_effects(status, renewed_lease).items():
            effect = null() if value is None else value
            effects.setdefault(name, []).append((new_status == literal(status.value), effect))
    changed = (
        update(task)
        .where(task.c.id == current.c.id)
        .values(
            status=new_status,
            update_time=_CHANGE_TIME,
            **{name: case(*whens, else_=task.c[name]) for name, whens in effects.items()},
        )
        .returning(
            *task.c,
            current.c.status.label("old_status"),
            current.c.position,
            current.c.message,
            current.c.token_id,
            current.c.token_description,
        )
        .cte("changed")
    )
    who = (changed.c.token_id, changed.c.token_description, changed.c.message)
    kind = EventKind.STATUS_CHANGED
    events = _events_from(changed, kind, changed.c.old_status, changed.c.status, who)
    return select(changed).add_cte(events)


def _same_claim(expected: ColumnElement[Any], claim_number: ColumnElement[int]) -> Any:
    """SQL for _check_claim: true when no claim is named or it is the task's latest."""
    return func.coalesce(expected, claim_number) == claim_number


def _named_task(
    connection: Connection, params: dict[str, Any], pipeline_name: str, task_input_id: str
) -> Row[Any]:
    """The task an update names, read without a lock; NotFound if there is none."""
    current = connection.execute(_task_named, params).first()
    if current is None:
        raise _task_not_found(pipeline_name, task_input_id)
    return current


def _refused(current: Row[Any], status: State, params: dict[str, Any]) -> bool:
    """Raise the error of an update of the current task to status, if it has
    one; True when the update is the no-op, False when it may be made."""
    _check_claim(params["in_claim_number"], current.claim_number)
    old = State(current.status)
    if is_noop(old, status):
        return True
    if old is State.PENDING and status not in UPDATE_TRANSITIONS[old] | {State.CLAIMED}:
        refused = f"a task cannot go from PENDING to {status}"
        if params["in_claim_number"] is not None:
            # The claim named is still the latest, but no longer holds the task.
            raise FailedPrecondition(
                f"{refused}: claim {current.claim_number} no longer holds it (its lease"
                " lapsed, or it was released, and the task went back to PENDING); claim it"
                " again"
            )
        if current.claim_number:
            # A wrapper that names no claim (npg_porch's PUT /tasks) learns why.
            raise FailedPrecondition(
                f"{refused}: it waits to be claimed again (claim {current.claim_number}, its"
                " latest, no longer holds it: its lease lapsed, it was released, or it was"
                " put back to PENDING); claim it first"
            )
        raise FailedPrecondition(f"{refused}: it is not claimed; claim it first")
    check_transition(old, status)
    return False


def _check_claim(expected: int | None, claim_number: int) -> None:
    """FailedPrecondition unless expected is None or the task's latest claim."""
    if expected is None or expected == claim_number:
        return
    if expected > claim_number:
        made = {0: "it has never been claimed", 1: "it has been claimed once"}.get(
            claim_number, f"it has been claimed {claim_number} times"
        )
        raise FailedPrecondition(f"claim {expected} of this task was never made: {made}")
    raise FailedPrecondition(
        f"the task has been claimed again since claim {expected} (its latest claim is"
        f" {claim_number}): that claim no longer holds it, so its update is refused"
    )


def _lapsed(per_pipeline: bool) -> ColumnElement[bool]:
    """The condition of tasks whose lease lapsed, of one pipeline or of all.

    Found through the index of leases, which holds only the lapsed ones
    before now: few, however many tasks there are. The pipeline is
    compared as pipeline_id + 0, which no index serves, so that the planner
    cannot take the pipeline's index of every task instead. With statistics
    that have not seen a new pipeline (PostgreSQL), or none at all
    (SQLite, which keeps none unless told to), it did, and read every task
    of the pipeline at each claim: 76 ms a claim with 150,000 of them.
    """
    condition = task.c.lease_expire_time < _NOW
    if not per_pipeline:
        return condition
    return condition & (task.c.pipeline_id + literal_column("0") == _PIPELINE_ID)


@functools.cache
def _select_lapsed(per_pipeline: bool) -> Select[Any]:
    return select(task.c.id, task.c.pipeline_id, task.c.status).where(_lapsed(per_pipeline))


@functools.cache
def _expire_with_events(per_pipeline: bool) -> Select[Any]:
    """Put lapsed tasks back to PENDING with their events; count them (PostgreSQL).

    Tasks another transaction holds are skipped: it is expiring, claiming
    or updating them, and a later call sees what it left.
    """
    lapsed = _select_lapsed(per_pipeline).with_for_update(skip_locked=True).cte("lapsed")
    expired = (
        update(task)
        .where(task.c.id == lapsed.c.id)
        .values(status=State.PENDING.value, update_time=_CHANGE_TIME, **_clear_claim())
        .returning(
            task.c.id, task.c.pipeline_id, task.c.update_time, lapsed.c.status.label("old_status")
        )
        .cte("expired")
    )
    events = _events_from(expired, EventKind.LEASE_EXPIRED, expired.c.old_status, _PENDING)
    return select(func.count()).select_from(expired).add_cte(events)
