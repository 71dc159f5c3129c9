"""The store against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from inspect import signature as python_signature
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from porch_server import digest, messages
from porch_server import store as store_module
from porch_server.cursors import cursor_key
from porch_server.db import migrate, tables
from porch_server.db.engine import connections_in_use, make_engine
from porch_server.db.pgasync import TimedOut
from porch_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from porch_server.models import SYSTEM, Actor, EventKind, Page, Pipeline, Role, Task, Token
from porch_server.service import MAX_PIPELINE_TEXT
from porch_server.states import UPDATE_TRANSITIONS, State
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2 as pb
from tests.conftest import PostgresServer, SchemaDatabase
from tests.integration.conftest import every_task, run_sql

HASH = "a" * 64


def add_pipeline(store: Store, name: str = "p1") -> Pipeline:
    return store.create_pipeline(
        Pipeline(name=name, uri=f"https://example.org/{name}", version="1")
    )


def add_actor(store: Store, pipeline: str = "p1", description: str = "wrapper") -> Actor:
    secret_hash = digest.task_input_id({"token": pipeline, "d": description})
    found = store.find_token(secret_hash)
    if found is None:
        found = store.create_token(Role.PIPELINE, pipeline, description, secret_hash)
    return Actor(token_id=found.token_id, description=found.description)


def task_in(store: Store, pipeline: str, state: State, actor: Actor) -> Task:
    """Register a task in a pipeline of its own and drive it into state."""
    (registration,) = store.register_tasks(pipeline, [{"state": state.value}], actor)
    key = registration.task.task_input_id
    if state is State.PENDING:
        return registration.task
    (claimed,) = store.claim_tasks(pipeline, 1, None, actor)
    assert claimed.task_input_id == key
    if state is State.CLAIMED:
        return claimed
    if state is not State.RUNNING:
        store.update_task(pipeline, key, State.RUNNING, None, actor)
    return store.update_task(pipeline, key, state, None, actor)


# Pipelines


def test_create_get_and_list_pipelines(store: Store) -> None:
    created = add_pipeline(store, "p1")
    add_pipeline(store, "p0")
    store.create_pipeline(Pipeline(name="p2", uri="https://example.org/p1", version="2"))
    assert store.get_pipeline("p1") == created
    assert [p.name for p in store.list_pipelines(None, None, 10, "").items] == ["p0", "p1", "p2"]
    by_uri = store.list_pipelines("https://example.org/p1", None, 10, "").items
    assert [p.name for p in by_uri] == ["p1", "p2"]
    assert [p.name for p in store.list_pipelines(None, "2", 10, "").items] == ["p2"]


def test_a_ping_apart_is_answered_with_every_pooled_connection_taken(db_url: str) -> None:
    # The health check's SELECT 1, for when the pools' connections may all
    # be waiting for a lock held elsewhere.
    engine = make_engine(db_url, pool_size=1)
    store = Store(engine)
    try:
        with contextlib.ExitStack() as held:
            if engine.dialect.name == "postgresql":
                for _ in range(2):  # the pool and its overflow
                    held.enter_context(engine.connect())
                assert engine.pool.checkedout() == 2  # type: ignore[attr-defined]
            store.ping_apart(5)
            if engine.dialect.name == "postgresql":
                # Refused for too many clients, the pools' own perhaps: an answer.
                dbapi = engine.dialect.loaded_dbapi
                for words, answers in (
                    ("FATAL:  sorry, too many clients already", True),
                    ("FATAL:  remaining connection slots are reserved for superusers", True),
                    ("could not connect to server: Connection refused", False),
                ):

                    def refuse(*args: Any, words: str = words, **kwargs: Any) -> None:
                        raise dbapi.OperationalError(words)

                    with mock.patch.object(dbapi, "connect", refuse):
                        if answers:
                            store.ping_apart(5)
                        else:
                            with pytest.raises(dbapi.OperationalError):
                                store.ping_apart(5)
    finally:
        store.close()


@pytest.mark.postgres
def test_a_statement_timeout_is_told_apart(pg_url: str) -> None:
    # From a database out of reach: the sweep asks SELECT 1 before it
    # takes the server out of service for it.
    url = make_url(pg_url).update_query_dict({"options": "-c statement_timeout=200"})
    store = Store(make_engine(url.render_as_string(hide_password=False)))
    locking = make_engine(pg_url)
    try:
        with locking.connect() as locker:
            locker.execute(text("LOCK TABLE task IN ACCESS EXCLUSIVE MODE"))
            with pytest.raises(TimedOut, match="the database is unavailable"):
                store.expire_leases()
            locker.rollback()
    finally:
        locking.dispose()
        store.close()


@pytest.mark.postgres
def test_a_ping_apart_connects_as_porch_with_the_pools_settings(
    pg_schema_db: SchemaDatabase,
) -> None:
    # An operator reading pg_stat_activity sees the health check's
    # connection as porch's, and its session is set up as the pools' are.
    url = make_url(pg_schema_db.url).update_query_dict({"options": "-c statement_timeout=4321"})
    engine = make_engine(url.render_as_string(hide_password=False), pg_schema_db.schema)
    store = Store(engine)
    dbapi = engine.dialect.loaded_dbapi
    connect, seen, in_use = dbapi.connect, [], []

    class Counted:
        """A connection that notes, as each cursor is made, how many are in use."""

        def __init__(self, connection: Any) -> None:
            self._connection = connection

        def __getattr__(self, name: str) -> Any:
            return getattr(self._connection, name)

        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            in_use.append(connections_in_use())
            return self._connection.cursor(*args, **kwargs)

    def connect_and_look(*args: Any, **kwargs: Any) -> Any:
        connection = connect(*args, **kwargs)
        seen.append(
            operator.execute(
                text("SELECT application_name FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": connection.get_backend_pid()},
            ).scalar_one()
        )
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('search_path'), current_setting('statement_timeout'),"
                " current_setting('TimeZone')"
            )
            seen.extend(cursor.fetchone())
        return Counted(connection)

    try:
        with engine.connect() as operator, mock.patch.object(dbapi, "connect", connect_and_look):
            store.ping_apart(5)
    finally:
        store.close()
    assert seen == ["porch", f'"{pg_schema_db.schema}"', "4321ms", "UTC"]
    # Not among the connections in use as it asks, which a stopping server
    # waits for and cancels: the operator's own is the one.
    assert in_use[-1] == 1


def test_pipeline_errors(store: Store) -> None:
    add_pipeline(store, "p1")
    with pytest.raises(AlreadyExists, match="pipeline 'p1' already exists"):
        add_pipeline(store, "p1")
    with pytest.raises(NotFound, match="pipeline 'nope' not found"):
        store.get_pipeline("nope")


def test_pipeline_created_by_another_store_is_found(store: Store, db_url: str) -> None:
    other = Store(make_engine(db_url))
    try:
        assert other.list_pipelines(None, None, 10, "").items == []
        add_pipeline(store, "p1")
        assert other.get_pipeline("p1").name == "p1"
    finally:
        other.close()


# Tokens


def test_a_claim_is_released_only_while_it_holds_its_task(store: Store) -> None:
    add_pipeline(store)
    actor = add_actor(store)
    claimed = task_in(store, "p1", State.CLAIMED, actor)
    key = claimed.task_input_id
    # Reported on meanwhile, without the claim's number: left as it is.
    store.update_task("p1", key, State.DONE, "done", actor)
    assert store.release_claim("p1", key, claimed.claim_number, "released", actor) is None
    assert store.get_task("p1", key).status is State.DONE
    # Claimed again: the old claim holds it no longer.
    store.update_task("p1", key, State.PENDING, "again", actor)
    (again,) = store.claim_tasks("p1", 1, None, actor)
    assert store.release_claim("p1", key, claimed.claim_number, "released", actor) is None
    released = store.release_claim("p1", key, again.claim_number, "released", actor)
    assert released is not None and released.status is State.PENDING
    messages = [event.message for event in store.list_task_events("p1", key, 20, "").items]
    assert messages[-1] == "released" and messages.count("released") == 1


def test_a_release_waits_for_a_report_under_way_and_sees_it(store: Store, db_url: str) -> None:
    # The look and the move are one transaction, the row locked first: a
    # report committing meanwhile is seen, not undone.
    add_pipeline(store)
    actor = add_actor(store)
    claimed = task_in(store, "p1", State.CLAIMED, actor)
    key = claimed.task_input_id
    if not db_url.startswith("postgresql"):  # writes take the whole database in turn
        store.update_task("p1", key, State.DONE, None, actor)
        assert store.release_claim("p1", key, claimed.claim_number, "released", actor) is None
        assert store.get_task("p1", key).status is State.DONE
        return
    other = Store(make_engine(db_url))
    executor = ThreadPoolExecutor(1)
    try:
        with other.engine.begin() as connection:
            connection.execute(
                text("SELECT id FROM task WHERE task_input_id = :key FOR UPDATE"), {"key": key}
            )
            releasing = executor.submit(
                store.release_claim, "p1", key, claimed.claim_number, "released", actor
            )
            time.sleep(0.3)
            assert not releasing.done()  # waiting for the row
            connection.execute(
                text("UPDATE task SET status = 'DONE' WHERE task_input_id = :key"), {"key": key}
            )
        assert releasing.result(timeout=10) is None
        assert store.get_task("p1", key).status is State.DONE
    finally:
        executor.shutdown()
        other.close()


def test_token_lifecycle(store: Store) -> None:
    add_pipeline(store)
    assert not store.has_had_admin_token()
    admin = store.create_token(Role.ADMIN, None, "the admin", "1" * 64)
    assert store.has_had_admin_token()
    wrapper = store.create_token(Role.PIPELINE, "p1", "wrapper", "2" * 64)
    assert (wrapper.role, wrapper.pipeline_name, wrapper.revoke_time) == (Role.PIPELINE, "p1", None)
    assert wrapper.create_time.tzinfo is UTC
    assert store.find_token("2" * 64) == wrapper
    assert store.find_token("3" * 64) is None

    revoked = store.revoke_token(admin.token_id)
    assert revoked.revoke_time is not None
    assert store.revoke_token(admin.token_id).revoke_time == revoked.revoke_time
    assert store.find_token("1" * 64) == revoked
    assert store.has_had_admin_token()


def test_revocation_reaches_cached_tokens(
    store: Store, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_pipeline(store)
    wrapper = store.create_token(Role.PIPELINE, "p1", "wrapper", "2" * 64)
    assert store.cached_token("2" * 64) is None
    assert store.find_token("2" * 64) == wrapper
    assert store.cached_token("2" * 64) == wrapper
    other = Store(make_engine(db_url))
    try:
        # Through another server, the revocation shows once the cache entry lapses.
        other.revoke_token(wrapper.token_id)
        assert store.cached_token("2" * 64) == wrapper
        later = time.monotonic() + store_module.TOKEN_CACHE_SECONDS
        monkeypatch.setattr(store_module.time, "monotonic", lambda: later)
        assert store.cached_token("2" * 64) is None
        assert store.find_token("2" * 64).revoke_time is not None  # type: ignore[union-attr]
        assert store.cached_token("2" * 64) is None
        monkeypatch.undo()
        # Through the same server, at once.
        reader = store.create_token(Role.READER, None, "reader", "3" * 64)
        assert store.find_token("3" * 64) == store.cached_token("3" * 64) == reader
        store.revoke_token(reader.token_id)
        assert store.cached_token("3" * 64) is None
    finally:
        other.close()


def test_token_errors(store: Store) -> None:
    with pytest.raises(NotFound, match="pipeline 'nope' not found"):
        store.create_token(Role.PIPELINE, "nope", "x", HASH)
    # A filter is not checked as a name is: what it holds is quoted escaped.
    with pytest.raises(NotFound, match=r"^pipeline 'no\\x1b\[31mpe\\u202e' not found$"):
        store.list_tokens("no\x1b[31mpe\u202e", None, False, 10, "")
    store.create_token(Role.READER, None, "reader", HASH)
    with pytest.raises(AlreadyExists):
        store.create_token(Role.READER, None, "again", HASH)
    with pytest.raises(NotFound, match="token 999 not found"):
        store.revoke_token("999")
    for impossible in ("x1", "", "-1", "0", "2147483648", "99999999999999999999", "\u0661"):
        shown = re.escape(f"from 1 to 2,147,483,647, got {impossible!r}")
        with pytest.raises(InvalidArgument, match=shown):
            store.revoke_token(impossible)
    assert store.list_tokens(None, None, True, 10, None).items[0].revoke_time is None


def test_list_tokens_filters_and_pages(store: Store) -> None:
    add_pipeline(store, "p1")
    add_pipeline(store, "p2")
    tokens = [
        store.create_token(Role.ADMIN, None, "admin", "0" * 64),
        store.create_token(Role.PIPELINE, "p1", "w1", "1" * 64),
        store.create_token(Role.PIPELINE, "p2", "w2", "2" * 64),
        store.create_token(Role.READER, None, "reader", "3" * 64),
    ]
    store.revoke_token(tokens[3].token_id)

    def listed(pipeline: str | None, role: Role | None, include_revoked: bool) -> list[str]:
        page = store.list_tokens(pipeline, role, include_revoked, 10, "")
        return [token.description for token in page.items]

    assert listed(None, None, False) == ["admin", "w1", "w2"]
    assert listed(None, None, True) == ["admin", "w1", "w2", "reader"]
    assert listed("p2", None, True) == ["w2"]
    assert listed(None, Role.PIPELINE, False) == ["w1", "w2"]
    with pytest.raises(NotFound):
        store.list_tokens("nope", None, False, 10, "")

    seen: list[Token] = []
    page_token = ""
    while True:
        page = store.list_tokens(None, None, True, 3, page_token)
        seen += page.items
        if not (page_token := page.next_page_token):
            break
    assert [token.token_id for token in seen] == [token.token_id for token in tokens]


# Registration


def test_a_from_now_cursor_is_taken_back_at_once(store: Store) -> None:
    # With no transaction running, "from now" names the next transaction to
    # begin, which has written nothing yet.
    for _ in range(20):
        store.check_cursor(store.event_start_cursor())


def test_a_cursor_no_porch_gave_is_refused(store: Store, db_url: str) -> None:
    add_pipeline(store)
    store.register_tasks("p1", [{"n": 1}], add_actor(store))
    ahead = "99999999.0" if db_url.startswith("postgresql") else "0.99"
    with pytest.raises(InvalidArgument, match="ahead of every event written"):
        store.check_cursor(ahead)
    if not db_url.startswith("postgresql"):  # its cursors name no transaction
        with pytest.raises(InvalidArgument, match="names a transaction"):
            store.check_cursor("1.0")


def test_register_is_idempotent_also_within_a_batch(store: Store) -> None:
    add_pipeline(store)
    actor = add_actor(store)
    first = store.register_tasks("p1", [{"n": 1}, {"n": 2}, {"n": 1.0}, {"n": 1}], actor)
    assert [r.created for r in first] == [True, True, False, False]
    assert first[0].task == first[2].task == first[3].task
    assert first[0].task.task_input_id == digest.task_input_id({"n": 1})
    assert first[0].task.task_input == {"n": 1}
    assert first[0].task.status is State.PENDING

    again = store.register_tasks("p1", [{"n": 3}, {"n": 2}], actor)
    assert [r.created for r in again] == [True, False]
    assert again[1].task == first[1].task
    assert len(store.list_tasks("p1", None, 100, "").items) == 3
    assert store.register_tasks("p1", [], actor) == []

    events = store.list_task_events("p1", first[0].task.task_input_id, 10, "").items
    assert [(e.kind, e.old_status, e.new_status) for e in events] == [
        (EventKind.CREATED, None, State.PENDING)
    ]
    assert (events[0].token_id, events[0].token_description) == (actor.token_id, "wrapper")


def test_same_input_in_two_pipelines_is_two_tasks(store: Store) -> None:
    add_pipeline(store, "p1")
    add_pipeline(store, "p2")
    assert store.register_tasks("p1", [{"a": "/x"}], SYSTEM)[0].created
    assert store.register_tasks("p2", [{"a": "/x"}], SYSTEM)[0].created


def test_register_errors(store: Store) -> None:
    with pytest.raises(NotFound, match="pipeline 'nope' not found"):
        store.register_tasks("nope", [{"a": 1}], SYSTEM)
    add_pipeline(store)
    with pytest.raises(InvalidArgument):
        store.register_tasks("p1", [{"a": float("nan")}], SYSTEM)


def test_get_task(store: Store) -> None:
    add_pipeline(store)
    registered = store.register_tasks("p1", [{"path": "/seq/1", "name": "é"}], SYSTEM)[0].task
    assert store.get_task("p1", registered.task_input_id) == registered
    assert registered.create_time.tzinfo is UTC
    assert registered.pipeline.name == "p1"
    with pytest.raises(NotFound, match=f"task {'0' * 64} of pipeline 'p1' not found"):
        store.get_task("p1", "0" * 64)
    with pytest.raises(NotFound, match="pipeline 'nope' not found"):
        store.get_task("nope", registered.task_input_id)


# Listing


def test_list_tasks_walks_250_without_gaps_or_repeats(store: Store) -> None:
    add_pipeline(store, "p1")
    add_pipeline(store, "p2")
    inputs = [{"i": i} for i in range(250)]
    registered = [r.task.task_input_id for r in store.register_tasks("p1", inputs, SYSTEM)]
    store.register_tasks("p2", [{"i": -1}], SYSTEM)
    walked: list[str] = []
    page_token = ""
    while True:
        page = store.list_tasks("p1", State.PENDING, 40, page_token)
        assert len(page.items) <= 40
        walked += [task.task_input_id for task in page.items]
        if not (page_token := page.next_page_token):
            break
    assert walked == sorted(registered, key=registered.index)
    assert len(store.list_tasks(None, None, 1000, "").items) == 251
    assert store.list_tasks("p1", State.DONE, 10, "").items == []
    # A filter naming no pipeline matches nothing (npg_porch's GET /tasks).
    assert store.list_tasks("nope", None, 10, "") == Page(items=[], next_page_token="")


def test_list_tasks_is_oldest_first_across_pipelines(store: Store) -> None:
    for name in ("b", "a"):
        add_pipeline(store, name)
        store.register_tasks(name, [{"in": name}], SYSTEM)
    assert [t.pipeline.name for t in store.list_tasks(None, None, 10, "").items] == ["b", "a"]


def test_page_tokens_only_continue_their_own_listing(store: Store) -> None:
    add_pipeline(store, "p1")
    add_pipeline(store, "p2")
    store.register_tasks("p1", [{"i": i} for i in range(5)], SYSTEM)
    page_token = store.list_tasks("p1", None, 2, "").next_page_token
    assert page_token
    assert len(store.list_tasks("p1", None, 2, page_token).items) == 2
    invalid = "page_token is invalid or does not match the filters"
    with pytest.raises(InvalidArgument, match=invalid):
        store.list_tasks("p1", State.PENDING, 2, page_token)
    with pytest.raises(InvalidArgument, match=invalid):
        store.list_tasks("p2", None, 2, page_token)
    with pytest.raises(InvalidArgument, match=invalid):
        store.list_pipelines(None, None, 2, page_token)
    with pytest.raises(InvalidArgument, match=invalid):
        store.list_tasks("p1", None, 2, "garbage!")
    pipelines_token = store.list_pipelines(None, None, 1, "").next_page_token
    assert [p.name for p in store.list_pipelines(None, None, 1, pipelines_token).items] == ["p2"]
    with pytest.raises(InvalidArgument, match=invalid):
        store.list_pipelines("https://example.org/p1", None, 1, pipelines_token)


# Claims


def test_a_sqlite_claim_takes_its_time_once_it_holds_the_write_lock(sqlite_url: str) -> None:
    # Two server processes on one file: one's claim waits for the write lock
    # while the other registers a task. The claim that then takes the task
    # is not stamped before the task was made.
    engines = [make_engine(sqlite_url) for _ in "ab"]
    claiming, registering = (Store(engine) for engine in engines)
    try:
        add_pipeline(claiming, "p1")
        actor = add_actor(claiming)
        with ThreadPoolExecutor(1) as thread:
            with claiming._write_lock:
                claim = thread.submit(claiming.claim_tasks, "p1", 1, timedelta(seconds=60), actor)
                time.sleep(0.05)  # the claim is waiting
                [made] = registering.register_tasks("p1", [{"i": 1}], actor)
            [claimed] = claim.result(timeout=30)
        assert claimed.task_input_id == made.task.task_input_id
        assert claimed.claim_time is not None and claimed.claim_time >= made.task.create_time
        assert claimed.lease_expire_time == claimed.claim_time + timedelta(seconds=60)
        events = claiming.list_task_events("p1", claimed.task_input_id, 10, "").items
        assert [event.time for event in events] == [made.task.create_time, claimed.claim_time]
    finally:
        for store, engine in zip((claiming, registering), engines, strict=True):
            store.close()
            engine.dispose()


def test_claim_oldest_first_with_events(store: Store) -> None:
    add_pipeline(store, "p1")
    add_pipeline(store, "p2")
    actor = add_actor(store)
    registered = store.register_tasks("p1", [{"i": i} for i in range(5)], actor)
    store.register_tasks("p2", [{"i": 0}], actor)
    before = datetime.now(UTC)
    claimed = store.claim_tasks("p1", 3, None, actor)
    assert [t.task_input_id for t in claimed] == [r.task.task_input_id for r in registered[:3]]
    for task in claimed:
        assert task.status is State.CLAIMED
        assert task.claimed_by_token_id == actor.token_id
        assert task.claim_time is not None and task.claim_time >= before
        assert task.lease_expire_time is None
    events = store.list_task_events("p1", claimed[0].task_input_id, 10, "").items
    assert [(e.kind, e.old_status, e.new_status, e.token_id) for e in events[1:]] == [
        (EventKind.CLAIMED, State.PENDING, State.CLAIMED, actor.token_id)
    ]
    rest = store.claim_tasks("p1", 10, None, actor)
    assert [t.task_input_id for t in rest] == [r.task.task_input_id for r in registered[3:]]
    assert store.claim_tasks("p1", 10, None, actor) == []
    with pytest.raises(NotFound):
        store.claim_tasks("nope", 1, None, actor)


def test_claim_with_lease_sets_the_expiry(store: Store) -> None:
    add_pipeline(store)
    store.register_tasks("p1", [{"i": 0}], SYSTEM)
    (task,) = store.claim_tasks("p1", 1, timedelta(minutes=5), add_actor(store))
    assert task.claim_time is not None and task.lease_expire_time is not None
    assert task.lease_expire_time - task.claim_time == timedelta(minutes=5)


def test_lapsed_leases_go_back_to_pending(store: Store) -> None:
    add_pipeline(store)
    actor = add_actor(store)
    store.register_tasks("p1", [{"i": 0}, {"i": 1}], actor)
    lapsing, renewed = store.claim_tasks("p1", 2, timedelta(seconds=1), actor)
    assert store.expire_leases() == 0
    time.sleep(0.5)
    running = store.update_task("p1", renewed.task_input_id, State.RUNNING, "started", actor)
    assert running.lease_expire_time is not None and renewed.lease_expire_time is not None
    assert running.lease_expire_time > renewed.lease_expire_time
    time.sleep(0.6)

    assert store.expire_leases() == 1
    expired = store.get_task("p1", lapsing.task_input_id)
    assert expired.status is State.PENDING
    assert (expired.claim_time, expired.claimed_by_token_id, expired.lease_expire_time) == (
        None,
        None,
        None,
    )
    last = store.list_task_events("p1", lapsing.task_input_id, 10, "").items[-1]
    assert (last.kind, last.old_status, last.new_status) == (
        EventKind.LEASE_EXPIRED,
        State.CLAIMED,
        State.PENDING,
    )
    assert (last.token_id, last.token_description) == (None, None)
    assert store.get_task("p1", renewed.task_input_id).status is State.RUNNING

    # The renewed lease lapses too; the next claim takes both back, oldest first.
    time.sleep(0.6)
    again = store.claim_tasks("p1", 5, None, actor)
    assert [t.task_input_id for t in again] == [lapsing.task_input_id, renewed.task_input_id]
    kinds = [e.kind for e in store.list_task_events("p1", renewed.task_input_id, 10, "").items]
    assert kinds[-2:] == [EventKind.LEASE_EXPIRED, EventKind.CLAIMED]
    assert store.expire_leases() == 0


def test_a_claimer_whose_lease_lapsed_is_told_so(store: Store) -> None:
    add_pipeline(store)
    actor = add_actor(store)
    store.register_tasks("p1", [{"i": 0}], actor)
    [claimed] = store.claim_tasks("p1", 1, timedelta(seconds=1), actor)
    time.sleep(1.1)
    assert store.expire_leases() == 1
    # Its late report, naming its claim, is told why it is refused ...
    with pytest.raises(FailedPrecondition, match=r"claim 1 no longer holds it \(its lease lapsed"):
        store.update_task("p1", claimed.task_input_id, State.RUNNING, None, actor, 1)
    # ... as is one naming no claim (npg_porch's PUT /tasks), and one of a
    # task never claimed.
    waits = r"PENDING to DONE: it waits to be claimed again \(claim 1, its latest, no longer"
    with pytest.raises(FailedPrecondition, match=waits):
        store.update_task("p1", claimed.task_input_id, State.DONE, None, actor)
    [new] = store.register_tasks("p1", [{"i": 1}], actor)
    never = r"^a task cannot go from PENDING to RUNNING: it is not claimed; claim it first$"
    with pytest.raises(FailedPrecondition, match=never):
        store.update_task("p1", new.task.task_input_id, State.RUNNING, None, actor)
    with pytest.raises(FailedPrecondition, match=r"CLAIMED \(only ClaimTasks claims a task\)$"):
        store.update_task("p1", new.task.task_input_id, State.CLAIMED, None, actor)
    # ... and a move the table allows from PENDING is not refused for it.
    cancelled = store.update_task("p1", claimed.task_input_id, State.CANCELLED, None, actor, 1)
    assert cancelled.status is State.CANCELLED


def test_finishing_clears_the_lease(store: Store) -> None:
    add_pipeline(store)
    actor = add_actor(store)
    store.register_tasks("p1", [{"i": 0}], actor)
    (task,) = store.claim_tasks("p1", 1, timedelta(seconds=1), actor)
    done = store.update_task("p1", task.task_input_id, State.DONE, None, actor)
    assert done.lease_expire_time is None
    assert done.claimed_by_token_id == actor.token_id
    time.sleep(1.1)
    assert store.expire_leases() == 0


# Updates


def test_every_transition_through_update_task(store: Store) -> None:
    actor = add_actor(store, "p0") if add_pipeline(store, "p0") else SYSTEM
    for old, new in itertools.product(State, State):
        pipeline = f"{old}-{new}"
        add_pipeline(store, pipeline)
        before = task_in(store, pipeline, old, actor)
        events_before = store.list_task_events(pipeline, before.task_input_id, 100, "").items
        if new not in UPDATE_TRANSITIONS[old]:
            with pytest.raises(FailedPrecondition, match=f"from {old} to {new}"):
                store.update_task(pipeline, before.task_input_id, new, "no", actor)
            assert store.get_task(pipeline, before.task_input_id) == before
            continue
        after = store.update_task(pipeline, before.task_input_id, new, f"{old}>{new}", actor)
        assert after.status is new
        assert store.get_task(pipeline, before.task_input_id) == after
        events = store.list_task_events(pipeline, before.task_input_id, 100, "").items
        if old is new is State.PENDING:
            assert after == before
            assert events == events_before
            continue
        assert after.update_time >= before.update_time
        assert len(events) == len(events_before) + 1
        last = events[-1]
        assert (last.kind, last.old_status, last.new_status, last.message) == (
            EventKind.STATUS_CHANGED,
            old,
            new,
            f"{old}>{new}",
        )
        assert (last.token_id, last.token_description) == (actor.token_id, "wrapper")
        if new is State.PENDING:
            assert (after.claim_time, after.claimed_by_token_id) == (None, None)


def test_pending_task_goes_back_into_the_claim_queue(store: Store) -> None:
    add_pipeline(store)
    actor = add_actor(store)
    store.register_tasks("p1", [{"i": 0}, {"i": 1}], actor)
    first, _ = store.claim_tasks("p1", 2, None, actor)
    store.update_task("p1", first.task_input_id, State.FAILED, "boom", actor)
    store.update_task("p1", first.task_input_id, State.PENDING, "retry", actor)
    (again,) = store.claim_tasks("p1", 5, None, actor)
    assert again.task_input_id == first.task_input_id


def test_update_errors(store: Store) -> None:
    add_pipeline(store)
    with pytest.raises(NotFound, match=f"task {'0' * 64} of pipeline 'p1' not found"):
        store.update_task("p1", "0" * 64, State.DONE, None, SYSTEM)
    with pytest.raises(NotFound, match="pipeline 'nope' not found"):
        store.update_task("nope", "0" * 64, State.DONE, None, SYSTEM)


def test_list_task_events_pages_oldest_first(store: Store) -> None:
    add_pipeline(store)
    actor = add_actor(store)
    key = store.register_tasks("p1", [{"i": 0}], actor)[0].task.task_input_id
    store.claim_tasks("p1", 1, None, actor)
    for heartbeat in range(5):
        store.update_task("p1", key, State.RUNNING, f"beat {heartbeat}", actor)
    first = store.list_task_events("p1", key, 4, "")
    second = store.list_task_events("p1", key, 4, first.next_page_token)
    assert second.next_page_token == ""
    events = first.items + second.items
    assert [e.kind for e in events[:2]] == [EventKind.CREATED, EventKind.CLAIMED]
    assert [e.message for e in events[2:]] == [f"beat {n}" for n in range(5)]
    keys = [cursor_key(e.cursor) for e in events]
    assert keys == sorted(set(keys))
    assert all(e.pipeline_name == "p1" and e.task_input_id == key for e in events)
    with pytest.raises(NotFound, match="not found"):
        store.list_task_events("p1", "0" * 64, 4, "")
    with pytest.raises(InvalidArgument):
        store.list_task_events("p1", "1" * 64, 4, first.next_page_token)


# The database itself


def test_ping_and_unavailable_database(store: Store, tmp_path: Path) -> None:
    store.ping()
    for url in (
        f"sqlite:///{tmp_path}/missing/dir/porch.db",
        "postgresql+psycopg2://postgres@127.0.0.1:1/porch",
    ):
        down = Store(make_engine(url))
        with pytest.raises(Unavailable, match="the database is unavailable"):
            down.ping()
        with pytest.raises(Unavailable):
            down.get_pipeline("p1")
        down.close()


def test_upgrade_is_idempotent(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert migrate.is_at_head(engine)
    finally:
        engine.dispose()


def test_empty_databases_are_not_at_head(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/empty.db")
    try:
        assert migrate.current_revision(engine) is None
        assert not migrate.is_at_head(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_empty_postgresql_database_is_not_at_head(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    engine = make_engine(url)
    try:
        assert not migrate.is_at_head(engine)
        migrate.upgrade(url)
        assert migrate.is_at_head(engine)
    finally:
        engine.dispose()
        postgres_server.drop_database(url)


@pytest.mark.postgres
def test_schema_option_keeps_everything_in_the_schema(pg_schema_db: SchemaDatabase) -> None:
    migrate.upgrade(pg_schema_db.url, pg_schema_db.schema)
    engine = make_engine(pg_schema_db.url, pg_schema_db.schema)
    plain = make_engine(pg_schema_db.url)
    try:
        assert migrate.is_at_head(engine)
        assert not migrate.is_at_head(plain)
        tables = set(inspect(plain).get_table_names(schema=pg_schema_db.schema))
        assert tables == {"alembic_version", "pipeline", "token", "task", "event", "event_horizon"}
        assert inspect(plain).get_table_names(schema="public") == []
        store = Store(engine)
        add_pipeline(store)
        store.register_tasks("p1", [{"i": 0}], SYSTEM)
        assert len(store.claim_tasks("p1", 1, None, SYSTEM)) == 1
    finally:
        plain.dispose()
        engine.dispose()


def test_schema_is_refused_for_sqlite_and_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        make_engine(f"sqlite:///{tmp_path}/x.db", "porch")
    with pytest.raises(ValueError, match="invalid schema name"):
        make_engine("postgresql+psycopg2://postgres@127.0.0.1/x", 'a"; DROP')
    with pytest.raises(ValueError, match="unsupported database URL"):
        make_engine("mysql://localhost/x")


def test_a_page_of_large_tasks_stops_before_a_client_would_refuse_it(store: Store) -> None:
    add_pipeline(store, "p1")
    large = "x" * (700 * 1024)  # five of these are 3.5 MB: past a client's 4 MiB with the rest
    store.register_tasks("p1", [{"n": n, "blob": large} for n in range(5)], SYSTEM)
    pages, token = [], ""
    while True:
        page = store.list_tasks("p1", None, 1000, token)
        pages.append([task.task_input["n"] for task in page.items])
        if not (token := page.next_page_token):
            break
    assert pages == [[0, 1], [2, 3], [4]]  # 2 MiB of inputs a page at most, in order
    assert [t.task_input["n"] for t in store.list_tasks("p1", None, 1, "").items] == [0]


def test_a_claim_of_large_tasks_takes_what_one_answer_holds(store: Store) -> None:
    add_pipeline(store, "p1")
    large = "x" * (700 * 1024)  # three of these pass 2 MiB: a claim takes two
    store.register_tasks("p1", [{"n": n, "blob": large} for n in range(5)], SYSTEM)
    claimed = store.claim_tasks("p1", 5, None, SYSTEM)
    assert [task.task_input["n"] for task in claimed] == [0, 1]
    pending = [t for t in every_task(store, "p1") if t.status is State.PENDING]
    assert [task.task_input["n"] for task in pending] == [2, 3, 4]  # left as they were
    for task in pending:
        assert len(store.list_task_events("p1", task.task_input_id, 10, "").items) == 1
    huge = "y" * (1000 * 1024)  # one alone passes the budget: it is still claimed
    store.register_tasks("p1", [{"huge": huge}], SYSTEM)
    assert [t.task_input["n"] for t in store.claim_tasks("p1", 1, None, SYSTEM)] == [2]


def test_a_replay_reads_what_its_messages_allow(store: Store) -> None:
    add_pipeline(store, "p1")
    start = store.event_start_cursor()
    [registered] = store.register_tasks("p1", [{"n": 1}], SYSTEM)
    key = registered.task.task_input_id
    store.claim_tasks("p1", 1, None, SYSTEM)
    for message in ("é" * 3000, "b" * 4000, "c" * 1000, None):  # 6,000 bytes, then 4,000
        store.update_task("p1", key, State.RUNNING, message, SYSTEM)
    # On PostgreSQL events wait below the oldest transaction open anywhere on
    # the server, such as another xdist worker's: wait for it to end.
    deadline = time.monotonic() + 30
    while store.has_unread_events(start) and time.monotonic() < deadline:
        time.sleep(0.05)
    every = store.read_events(start, "p1", 100)
    assert len(every) == 6
    read = store.read_events(start, "p1", 100, message_bytes=10_000)
    assert read == every[:4]  # CREATED, CLAIMED, and 10,000 bytes of messages
    assert store.read_events(every[2].cursor, None, 100, message_bytes=1) == every[3:4]
    assert store.read_events(every[3].cursor, None, 100, message_bytes=1) == every[4:5]
    assert store.read_events(every[4].cursor, None, 100, message_bytes=1) == every[5:]


# A pipeline whose name, uri and version take 3 KB in every task of an
# answer: 1,500 such tasks pass a client's 4 MiB, however small their inputs.
LONG = Pipeline(name="€" * 255, uri="u" * MAX_PIPELINE_TEXT["uri"], version="v" * 255)


def answer_bytes(tasks: Sequence[Task]) -> int:
    return pb.ClaimTasksResponse(tasks=[messages.task_message(t) for t in tasks]).ByteSize()


def test_answers_count_the_pipeline_each_task_carries(store: Store) -> None:
    store.create_pipeline(LONG)
    store.register_tasks(LONG.name, [{"n": n} for n in range(2000)], SYSTEM)
    claimed = store.claim_tasks(LONG.name, 10_000, None, SYSTEM)
    assert 900 < len(claimed) < 2000 and answer_bytes(claimed) < 4 * 1024 * 1024
    page = store.list_tasks(LONG.name, None, 10_000, "")
    assert 900 < len(page.items) < 2000 and answer_bytes(page.items) < 4 * 1024 * 1024
    assert page.next_page_token
    # Pipelines whose uris take 6 KB each: 700 of them pass 4 MiB.
    for n in range(700):
        store.create_pipeline(Pipeline(name=f"p{n:03}", uri="€" * 2048, version="1"))
    pipelines = store.list_pipelines("€" * 2048, None, 1000, "")
    listed = pb.ListPipelinesResponse(pipelines=map(messages.pipeline_message, pipelines.items))
    assert 400 < len(pipelines.items) < 700 and listed.ByteSize() < 4 * 1024 * 1024
    rest = store.list_pipelines("€" * 2048, None, 1000, pipelines.next_page_token)
    assert len(pipelines.items) + len(rest.items) == 700 and not rest.next_page_token


@pytest.fixture
def bare_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database, once on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bare.db"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


def store_old_tasks(url: str, tasks: Sequence[tuple[str, str, datetime | None]]) -> None:
    """Store pipeline p and its tasks (canonical text, status, claim time)
    as an older porch did, straight into a database at an older revision."""
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO pipeline (name, uri, version, create_time)"
            " VALUES ('p', 'u', '1', CURRENT_TIMESTAMP)"
        )
        insert = text(
            "INSERT INTO task (pipeline_id, task_input_id, task_input, status, create_time,"
            " update_time, claim_time) VALUES ((SELECT id FROM pipeline), :id, :text, :status,"
            " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :claimed)"
        )
        # Each with its CREATED event, which points at its task.
        created = text(
            "INSERT INTO event (time, task_id, pipeline_id, kind, new_status) SELECT"
            " CURRENT_TIMESTAMP, id, pipeline_id, 'CREATED', 'PENDING' FROM task"
            " WHERE task_input_id = :id"
        )
        for canonical, status, claimed in tasks:
            values = {"id": digest.digest_of(canonical), "text": canonical}
            connection.execute(insert, values | {"status": status, "claimed": claimed})
            connection.execute(created, values)
    engine.dispose()


@pytest.mark.parametrize(
    "bare_db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_upgrade_gives_old_ids_of_small_numbers_and_del_npg_porchs(bare_db_url: str) -> None:
    migrate.upgrade(bare_db_url, revision="0001")
    # As porch wrote them before: 1e-05, and DEL escaped; and one that stays.
    old = {
        '{"f":1e-05}': "756157f652758d1156a7d170db12cb0c7057f7442b387fab4b42e35dbfe4e804",
        '{"s":"a\\u007fb"}': "8f8675bc3c1b43644730acf12db2473c92a6a1668eb2b89c20b9d5a6930148f7",
        '{"d":"date-01","f":0.5}': None,
        # Registered twice before: as porch wrote it, and under npg_porch's id.
        '{"g":2e-05}': None,
        '{"g":2e-5}': None,
    }
    store_old_tasks(bare_db_url, [(canonical, "PENDING", None) for canonical in old])

    migrate.upgrade(bare_db_url)

    store = Store(make_engine(bare_db_url))
    try:
        stored = {task.task_input_id: task for task in every_task(store, "p")}
        unchanged = [digest.digest_of(text) for text, new in old.items() if new is None]
        assert set(stored) == {*filter(None, old.values()), *unchanged}
        # Registering the same inputs again finds them: no second task.
        inputs = [{"f": 1e-5}, {"s": "a\x7fb"}, {"g": 2e-5}]
        again = store.register_tasks("p", inputs, SYSTEM)
        assert [registered.created for registered in again] == [False, False, False]
        assert len(every_task(store, "p")) == 5
    finally:
        store.close()


# Two of npg_porch's tables, as its own schema names them.
NPG_PORCH_TABLES = (
    "CREATE TABLE pipeline (pipeline_id INTEGER PRIMARY KEY, name VARCHAR(50) UNIQUE)",
    "CREATE TABLE token (token_id INTEGER PRIMARY KEY, token CHAR(32), pipeline_id INTEGER)",
    "INSERT INTO pipeline VALUES (1, 'npg')",
)


def assert_npg_porch_tables_untouched(url: str) -> None:
    engine = make_engine(url)
    try:
        assert sorted(inspect(engine).get_table_names()) == ["pipeline", "token"]
        columns = [column["name"] for column in inspect(engine).get_columns("pipeline")]
        assert columns == ["pipeline_id", "name"]
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT * FROM pipeline").all() == [(1, "npg")]
    finally:
        engine.dispose()


def current_schema(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return str(connection.exec_driver_sql("SELECT current_schema()").scalar())
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "bare_db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_upgrade_refuses_tables_of_porchs_names_that_are_not_porchs(bare_db_url: str) -> None:
    run_sql(bare_db_url, *NPG_PORCH_TABLES)
    if bare_db_url.startswith("sqlite"):
        then = "None of its tables was changed. Give porch a database file of its own"
        where = "the database"
    else:
        then = "Nothing was changed. Give porch a schema of its own [(]--db-schema"
        where = f"schema {current_schema(bare_db_url)}"
    with pytest.raises(
        FailedPrecondition,
        match=rf"^{where} already holds tables porch would create \(pipeline, token\) with no "
        rf"record of porch's migrations: another program's, npg_porch's perhaps. {then}",
    ):
        migrate.upgrade(bare_db_url)
    assert_npg_porch_tables_untouched(bare_db_url)


@pytest.mark.parametrize(
    "bare_db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_upgrade_looks_only_in_the_schema_porchs_tables_go_in(bare_db_url: str) -> None:
    # With a search_path of two schemas, porch's tables go in the first:
    # npg_porch's in the second are no obstacle, and are left alone.
    database = make_url(bare_db_url).database
    run_sql(
        bare_db_url,
        *NPG_PORCH_TABLES,
        "CREATE SCHEMA s2",
        f'ALTER DATABASE "{database}" SET search_path = s2, public',
    )
    migrate.upgrade(bare_db_url)
    engine = make_engine(bare_db_url)
    try:
        assert migrate.is_at_head(engine)
        assert "task" in inspect(engine).get_table_names(schema="s2")
        with engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT * FROM public.pipeline").all()
            assert rows == [(1, "npg")]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "bare_db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_schema_of_its_own_keeps_porch_beside_npg_porchs_tables(bare_db_url: str) -> None:
    run_sql(bare_db_url, *NPG_PORCH_TABLES)
    migrate.upgrade(bare_db_url, "porch")
    engine = make_engine(bare_db_url, "porch")
    try:
        assert migrate.is_at_head(engine)
    finally:
        engine.dispose()
    assert_npg_porch_tables_untouched(bare_db_url)


@pytest.mark.parametrize(
    "bare_db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_upgrade_refuses_a_migration_it_does_not_know(bare_db_url: str) -> None:
    migrate.upgrade(bare_db_url)
    run_sql(bare_db_url, "UPDATE alembic_version SET version_num = '9999'")
    engine = make_engine(bare_db_url)
    try:
        with pytest.raises(
            FailedPrecondition, match=r"records migration '9999', which this porch does not know"
        ):
            migrate.upgrade(bare_db_url)
        assert migrate.current_revision(engine) == "9999"
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "bare_db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_upgrade_refuses_porchs_revision_without_porchs_tables(bare_db_url: str) -> None:
    # Another program's alembic record, numbered as porch's migrations are.
    run_sql(
        bare_db_url,
        "CREATE TABLE alembic_version (version_num VARCHAR(32))",
        "INSERT INTO alembic_version VALUES ('0003')",
    )
    engine = make_engine(bare_db_url)
    try:
        with pytest.raises(
            FailedPrecondition, match=r"records migration '0003' but has no tables pipeline and"
        ):
            migrate.upgrade(bare_db_url)
        assert inspect(engine).get_table_names() == ["alembic_version"]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "bare_db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_upgrade_counts_a_claim_already_made_as_the_first(bare_db_url: str) -> None:
    migrate.upgrade(bare_db_url, revision="0002")
    claimed = datetime.now(UTC)
    texts = [digest.canonical_json({"n": n}) for n in range(2)]
    store_old_tasks(bare_db_url, [(texts[0], "PENDING", None), (texts[1], "RUNNING", claimed)])

    migrate.upgrade(bare_db_url)

    store = Store(make_engine(bare_db_url))
    try:
        pending, running = every_task(store, "p")
        assert (pending.claim_number, running.claim_number) == (0, 1)
        assert store.claim_tasks("p", 1, None, SYSTEM)[0].claim_number == 1
        with pytest.raises(FailedPrecondition, match=r"never made: it has been claimed once$"):
            store.update_task("p", running.task_input_id, State.DONE, None, SYSTEM, 2)
        done = store.update_task("p", running.task_input_id, State.DONE, None, SYSTEM, 1)
        assert done.status is State.DONE
        # The events of the tasks stored before are kept (SQLite copies the
        # task table to add its column).
        kinds = [e.kind.value for e in store.list_task_events("p", done.task_input_id, 9, "").items]
        assert kinds == ["CREATED", "STATUS_CHANGED"]
    finally:
        store.close()


@pytest.mark.parametrize(
    "bare_db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_the_migrations_make_the_tables_as_tables_py_defines_them(bare_db_url: str) -> None:
    migrate.upgrade(bare_db_url)
    engine = make_engine(bare_db_url)
    postgresql = engine.dialect.name == "postgresql"
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, tables.metadata)
            # Alembic compares no partial index's terms: those of the tables
            # made from tables.py beside them, as the database words them.
            if postgresql:
                connection.exec_driver_sql("CREATE SCHEMA made")
            else:
                database = make_url(bare_db_url).database
                assert database is not None
                path = Path(database).with_name("made.db")
                connection.exec_driver_sql(f"ATTACH DATABASE '{path}' AS made")
            made = connection.execution_options(schema_translate_map={None: "made"})
            tables.metadata.create_all(made)
            migrated, from_tables = (index_terms(connection, schema) for schema in (None, "made"))
            connection.commit()
    finally:
        engine.dispose()
    # The event indexes each backend reads cursors by, which tables.py
    # leaves to the migration; nothing else differs.
    if postgresql:
        by_backend = ["ix_event_pipeline_id_xid_id", "ix_event_xid_id"]
    else:
        by_backend = ["ix_event_pipeline_id_id"]
    found = sorted((difference[0], difference[1].name) for difference in differences)
    assert found == [("remove_index", name) for name in by_backend]
    assert {name: migrated[name] for name in from_tables} == from_tables
    assert from_tables["ix_task_status_id"] is not None


def index_terms(connection: Any, schema: str | None) -> dict[str, str | None]:
    """Each index of a schema (None: the default) by name: the WHERE of a
    partial index as the database words it, None for the others."""
    if connection.dialect.name == "postgresql":
        rows = connection.exec_driver_sql(
            "SELECT c.relname, pg_get_expr(i.indpred, i.indrelid) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %(schema)s AND NOT i.indisprimary",
            {"schema": schema or "public"},
        )
        return {name: where for name, where in rows if not name.startswith("uq_")}
    master = "sqlite_master" if schema is None else f"{schema}.sqlite_master"
    rows = connection.exec_driver_sql(
        f"SELECT name, sql FROM {master} WHERE type = 'index' AND sql IS NOT NULL"
    )
    return {name: sql.partition(" WHERE ")[2] or None for name, sql in rows}


@pytest.mark.parametrize("bare_db_url", ["sqlite"], indirect=True)
def test_rows_pointing_at_none_before_a_migration_do_not_stop_it(bare_db_url: str) -> None:
    # As a row deleted by hand in sqlite3's shell, whose foreign keys are off.
    migrate.upgrade(bare_db_url, revision="0002")
    store_old_tasks(bare_db_url, [(digest.canonical_json({"n": 1}), "PENDING", None)])
    dangling = "INSERT INTO event (time, task_id, pipeline_id, kind) VALUES (?, 99, 1, 'CREATED')"
    path = make_url(bare_db_url).database
    assert path is not None
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute(dangling, (datetime.now(UTC).isoformat(),))
        raw.commit()
    migrate.upgrade(bare_db_url)  # to head, past 0003's copy of the task table
    migrate.upgrade(bare_db_url)  # at head: nothing to do, nothing refused
    store = Store(make_engine(bare_db_url))
    try:
        assert [task.claim_number for task in every_task(store, "p")] == [0]
    finally:
        store.close()


def test_a_migration_that_leaves_a_row_pointing_at_none_is_refused(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            with migrate.foreign_keys_unchecked(connection), connection.begin():
                connection.exec_driver_sql(
                    "INSERT INTO event (time, task_id, pipeline_id, kind)"
                    " VALUES (CURRENT_TIMESTAMP, 7, 1, 'CREATED')"
                )
                with pytest.raises(FailedPrecondition, match="row 1 of event, which points"):
                    migrate.check_foreign_keys(connection)
                connection.rollback()
            # Checked again once the block ends.
            with pytest.raises(IntegrityError), connection.begin():
                connection.exec_driver_sql(
                    "INSERT INTO event (time, task_id, pipeline_id, kind)"
                    " VALUES (CURRENT_TIMESTAMP, 7, 1, 'CREATED')"
                )
    finally:
        engine.dispose()


def test_the_stores_cached_statements_take_no_value_of_a_call() -> None:
    # A statement cached per id or page token would be kept for ever.
    cached = {
        name: value
        for name, value in vars(store_module).items()
        if isinstance(value, functools._lru_cache_wrapper)
    }
    assert "_register_with_events" in cached
    for name, function in cached.items():
        parameters = python_signature(function.__wrapped__).parameters.values()
        assert all(parameter.annotation in ("bool", "State") for parameter in parameters), name


_LISTED_APART = [State.CLAIMED, State.RUNNING, State.FAILED, State.CANCELLED]


@pytest.mark.parametrize("pipeline", [None, "p1"])
@pytest.mark.parametrize("state", _LISTED_APART)
def test_a_listing_by_status_reads_its_index_not_every_task(
    store: Store, pipeline: str | None, state: State
) -> None:
    # Without the status index, a listing of FAILED tasks read every task
    # (of its pipeline): 130 ms a page with two million on PostgreSQL.
    for name in ("p1", "p2"):
        add_pipeline(store, name)
        actor = add_actor(store, name)
        # One task in each status, in order: all but the last claimed.
        store.register_tasks(name, [{"n": n} for n in range(len(_LISTED_APART) + 2)], actor)
        claimed = store.claim_tasks(name, len(_LISTED_APART) + 1, None, actor)
        for task, moved_to in zip(claimed[1:], [State.DONE, *_LISTED_APART[1:]], strict=True):
            if moved_to is not State.RUNNING:
                store.update_task(name, task.task_input_id, State.RUNNING, None, actor)
            store.update_task(name, task.task_input_id, moved_to, None, actor)
    sqlite = store.engine.dialect.name == "sqlite"
    with store.engine.connect() as connection:
        pipeline_id = None if pipeline is None else store._find_pipeline_id(connection, pipeline)
        query = store_module._tasks_listed(pipeline_id, state, 0, 10, sqlite)
        dialect = store.engine.dialect
        compiled = query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        if sqlite:
            plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
            lines = [row[3] for row in plan]
        else:
            # Few tasks: reading them all would cost less. Show that the
            # index serves the listing, its term proved from the status.
            connection.exec_driver_sql("SET enable_seqscan = off")
            connection.exec_driver_sql("SET enable_bitmapscan = off")
            lines = [row[0] for row in connection.exec_driver_sql(f"EXPLAIN {compiled}")]
        listed = [row.task_input_id for row in connection.execute(query)]
    # Tasks in the status, in id order, without a sort. A pipeline's on
    # SQLite by the pipeline's index, as before (see _tasks_listed); on
    # PostgreSQL by either, as its planner judges.
    if pipeline is None:
        indexes = ["ix_task_status_id"]
    else:
        indexes = ["ix_task_pipeline_id_id"] + ([] if sqlite else ["ix_task_status_id"])
    assert any(index in line for index in indexes for line in lines), lines
    assert not any("TEMP B-TREE" in line or "Sort" in line for line in lines), lines
    page = store.list_tasks(pipeline, state, 10, "")
    assert [task.task_input_id for task in page.items] == listed
    assert [task.status for task in page.items] == [state] * (1 if pipeline else 2)


def test_on_sqlite_a_claim_reads_pending_tasks_and_lapsed_leases_by_their_indexes(
    sqlite_url: str,
) -> None:
    # SQLite keeps no statistics unless told to: without them it took the
    # pipeline's index of every task for the lease check, and each claim
    # read every finished task (150 ms a claim past 200,000 of them).
    store = Store(make_engine(sqlite_url))
    try:
        add_pipeline(store)
        store.register_tasks("p1", [{"n": n} for n in range(3)], SYSTEM)
        params = store_module._claim_params(datetime.now(UTC), 1, 10, None, SYSTEM)
        params["claim_lease_expire_time"] = None
        plans = []
        with store.engine.connect() as connection:
            raw = connection.connection.driver_connection
            assert raw is not None
            for statement in (store_module._claim_sqlite, store_module._select_lapsed(True)):
                query = statement.compile(dialect=store.engine.dialect)
                values = query.construct_params(params)
                arguments = [values[name] for name in query.positiontup or ()]
                rows = raw.execute(f"EXPLAIN QUERY PLAN {query}", arguments).fetchall()
                plans.append([row[3] for row in rows if " task " in f"{row[3]} "])
        claim, lapsed = plans
        assert "SEARCH task USING INDEX ix_task_pending (pipeline_id=?)" in claim, claim
        assert lapsed == ["SEARCH task USING INDEX ix_task_lease_expire_time (lease_expire_time<?)"]
        assert len(store.claim_tasks("p1", 10, None, SYSTEM)) == 3
    finally:
        store.close()


@pytest.mark.parametrize("made_first", ["ix_task_pending", "ix_task_pipeline_id_id"])
def test_on_sqlite_a_pipelines_pending_tasks_are_listed_by_the_claims_index(
    sqlite_url: str, made_first: str
) -> None:
    # Left to choose, SQLite took whichever index was made last, and
    # migration 0003 makes them again in no set order: on some databases a
    # page read every finished task of the pipeline (16 ms at 120,000).
    path = make_url(sqlite_url).database
    assert path is not None
    with contextlib.closing(sqlite3.connect(path)) as raw:
        made = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
        for name in sorted(("ix_task_pending", "ix_task_pipeline_id_id"), key=made_first.__ne__):
            raw.execute(f"DROP INDEX {name}")
            raw.execute(made[name])
        raw.commit()
    store = Store(make_engine(sqlite_url))
    try:
        add_pipeline(store)
        store.register_tasks("p1", [{"n": n} for n in range(4)], SYSTEM)
        store.claim_tasks("p1", 2, None, SYSTEM)
        with store.engine.connect() as connection:
            pipeline_id = store._find_pipeline_id(connection, "p1")
            query = store_module._tasks_listed(pipeline_id, State.PENDING, 0, 10, True)
            compiled = query.compile(
                dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}
            )
            plan = [row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")]
        assert plan == ["SEARCH task USING INDEX ix_task_pending (pipeline_id=? AND id>?)"]
        page = store.list_tasks("p1", State.PENDING, 10, "")
        assert [task.task_input for task in page.items] == [{"n": 2}, {"n": 3}]
    finally:
        store.close()
