"""The busiest statements on asyncpg: same answers as the SQLAlchemy path, and
the thread path kept for what only it can answer (PostgreSQL only)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from porch_server import service as service_module
from porch_server import store as store_module
from porch_server.db.engine import connections_in_use, make_engine
from porch_server.db.listen import Listener
from porch_server.db.pgasync import (
    AsyncStatements,
    Contended,
    Refused,
    RowView,
    _compile,
    row_class,
)
from porch_server.digest import canonical_json, digest_of
from porch_server.errors import LOCK_TIMED_OUT, FailedPrecondition, Locked, Unavailable
from porch_server.models import Actor, EventKind, Pipeline, Registration, Role
from porch_server.service import LATE_CLAIM, LOCKED_RETRY_PAUSES, UNANSWERED_CLAIM, PorchService
from porch_server.states import State
from porch_server.status import ANSWERED
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2
from tests.conftest import PostgresServer, SchemaDatabase
from tests.integration.conftest import every_task
from tests.integration.test_store import LONG, answer_bytes

pytestmark = pytest.mark.postgres

ONE = canonical_json({"n": 1})


async def open_store(url: str, schema: str | None = None) -> tuple[Store, AsyncStatements, Actor]:
    store = Store(make_engine(url, schema))
    statements = AsyncStatements(url, schema, pool_size=4)
    await statements.open()
    store.use_async(statements)
    store.create_pipeline(Pipeline(name="p", uri="https://example.org/p", version="1"))
    token = store.create_token(Role.PIPELINE, "p", "wrapper", "h" * 64)
    return store, statements, Actor(token.token_id, token.description)


@pytest.fixture
async def async_store(pg_url: str) -> AsyncIterator[tuple[Store, Actor]]:
    store, statements, actor = await open_store(pg_url)
    yield store, actor
    await statements.close()
    store.close()


async def register_one(store: Store, name: str, text: str, actor: Actor) -> Registration:
    """What the event loop's path answers for one input: it must answer."""
    registration = await store.register_canonical_async(name, text, actor)
    assert registration is not None, "the event loop's path left the input to the blocking one"
    return registration


def never(*args: Any) -> Any:
    raise AssertionError("the thread path ran")


async def test_register_claim_update_run_on_asyncpg(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, actor = async_store
    for name in ("register_tasks", "register_canonical", "claim_tasks", "update_task"):
        monkeypatch.setattr(store, name, never)
    first = await register_one(store, "p", ONE, actor)
    again = await register_one(store, "p", ONE, actor)
    assert first.created and not again.created
    assert again.task == first.task and first.task.status is State.PENDING
    claimed = await store.claim_tasks_async("p", 5, timedelta(minutes=5), actor)
    assert claimed is not None and [task.task_input_id for task in claimed] == [
        first.task.task_input_id
    ]
    assert claimed[0].claimed_by_token_id == actor.token_id
    assert claimed[0].lease_expire_time is not None
    assert claimed[0].update_time.tzinfo is not None
    running = await store.update_task_async(
        "p", first.task.task_input_id, State.RUNNING, "started", actor
    )
    assert running is not None and running.status is State.RUNNING
    assert await store.claim_tasks_async("p", 5, None, actor) == []


async def test_the_busiest_statements_are_built_and_compiled_once(pg_url: str) -> None:
    # Statements are compiled once per object: one built anew for each
    # batch was compiled again each time (0.7 ms) and kept for ever.
    store, statements, actor = await open_store(pg_url)
    try:

        async def lifecycles(first: int) -> None:
            # Eight at once, so that batches of several callers are made.
            texts = [canonical_json({"n": n}) for n in range(first, first + 8)]
            for _ in range(2):  # new, then registered already
                await asyncio.gather(*(register_one(store, "p", text, actor) for text in texts))
            lease = timedelta(minutes=5)
            claims = [store.claim_tasks_async("p", 1, lease, actor) for _ in texts]
            claimed = [task for tasks in await asyncio.gather(*claims) for task in tasks or []]
            assert len(claimed) == len(texts)
            for state in (State.RUNNING, State.DONE):
                moves = [
                    store.update_task_async("p", task.task_input_id, state, None, actor)
                    for task in claimed
                ]
                assert None not in await asyncio.gather(*moves)

        await lifecycles(0)
        await lifecycles(8)
        compiled = len(statements._compiled)
        await lifecycles(16)
        assert len(statements._compiled) == compiled
    finally:
        await statements.close()
        store.close()


async def test_what_asyncpg_cannot_answer_is_left_to_the_thread_path(
    async_store: tuple[Store, Actor],
) -> None:
    store, actor = async_store
    registered = await register_one(store, "p", ONE, actor)
    task_id = registered.task.task_input_id
    # An illegal move: the one statement refuses it, update_task says why.
    assert await store.update_task_async("p", task_id, State.DONE, None, actor) is None
    assert await store.update_task_async("p", "0" * 64, State.RUNNING, None, actor) is None
    # A pipeline this store has not read yet.
    assert await store.claim_tasks_async("elsewhere", 1, None, actor) is None
    assert await store.register_canonical_async("elsewhere", "{}", actor) is None
    assert store.get_task("p", task_id).status is State.PENDING
    assert len(store.list_task_events("p", task_id, 10, "").items) == 1


async def test_concurrent_claims_on_asyncpg_take_each_task_once(
    async_store: tuple[Store, Actor],
) -> None:
    store, actor = async_store
    store.register_tasks("p", [{"n": n} for n in range(200)], actor)

    async def claim_all() -> list[str]:
        taken: list[str] = []
        while batch := await store.claim_tasks_async("p", 7, None, actor):
            taken += [task.task_input_id for task in batch]
        return taken

    results = await asyncio.gather(*(claim_all() for _ in range(8)))
    claimed = [task_id for taken in results for task_id in taken]
    assert len(claimed) == len(set(claimed)) == 200


async def test_concurrent_claims_share_a_statement_each_with_its_own_tasks(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, actor = async_store
    token = store.create_token(Role.PIPELINE, "p", "second launcher", "k" * 64)
    other = Actor(token.token_id, token.description)
    registered = store.register_tasks("p", [{"n": n} for n in range(10)], actor)
    oldest_first = [r.task.task_input_id for r in registered]
    store.create_pipeline(Pipeline(name="q", uri="https://example.org/q", version="1"))
    [elsewhere] = store.register_tasks("q", [{"n": 0}], actor)
    statements = store._async
    assert statements is not None
    run, ran = statements.rows, []

    async def count(statement: Any, params: Any) -> Any:
        ran.append(statement)
        return await run(statement, params)

    monkeypatch.setattr(statements, "rows", count)
    # Asked for 3 + 4 + 2 + 5 = 14 of 10: the last claimer gets what is left.
    claims = [
        (3, None, actor),
        (4, timedelta(minutes=5), other),
        (2, None, other),
        (5, None, actor),
    ]
    *results, other_pipeline = await asyncio.gather(
        *(store.claim_tasks_async("p", n, lease, who) for n, lease, who in claims),
        store.claim_tasks_async("q", 2, None, actor),
    )

    assert len(ran) == 2  # one claim statement for p's four claimers, one for q's
    assert [task.task_input_id for task in other_pipeline or []] == [elsewhere.task.task_input_id]
    taken = [[task.task_input_id for task in result or []] for result in results]
    assert taken == [oldest_first[0:3], oldest_first[3:7], oldest_first[7:9], oldest_first[9:]]
    for result, (_, lease, who) in zip(results, claims, strict=True):
        for task in result or []:
            assert task.status is State.CLAIMED
            assert task.claimed_by_token_id == who.token_id
            assert (task.lease_expire_time is not None) == (lease is not None)
            stored = store.get_task("p", task.task_input_id)
            assert stored.claimed_by_token_id == who.token_id
            assert stored.lease_expire_time == task.lease_expire_time
            events = store.list_task_events("p", task.task_input_id, 10, "").items
            assert [(e.kind.value, e.token_id, e.token_description) for e in events[1:]] == [
                ("CLAIMED", who.token_id, who.description)
            ]
    assert await store.claim_tasks_async("p", 1, None, actor) == []


async def test_claimers_together_each_take_what_one_answer_holds(
    async_store: tuple[Store, Actor],
) -> None:
    store, actor = async_store
    large = "x" * (700 * 1024)  # three of these pass the 2 MiB an answer holds
    store.register_tasks("p", [{"n": n, "blob": large} for n in range(7)], actor)
    first, second = await asyncio.gather(
        store.claim_tasks_async("p", 3, None, actor), store.claim_tasks_async("p", 3, None, actor)
    )
    # Each answer holds two: the claimers take the four oldest in turn, and
    # leave no older task behind.
    assert [t.task_input["n"] for t in first or []] == [0, 1]
    assert [t.task_input["n"] for t in second or []] == [2, 3]
    pending = [t for t in every_task(store, "p") if t.status is State.PENDING]
    assert [task.task_input["n"] for task in pending] == [4, 5, 6]


async def test_a_claimer_after_one_whose_answer_is_full_takes_what_it_left(
    async_store: tuple[Store, Actor],
) -> None:
    store, actor = async_store
    large = "x" * (700 * 1024)  # an answer holds two of these
    store.register_tasks("p", [{"n": n, "blob": large} for n in range(5)], actor)
    first, second, third = await asyncio.gather(
        store.claim_tasks_async("p", 5, None, actor),
        store.claim_tasks_async("p", 3, None, actor),
        store.claim_tasks_async("p", 1, None, actor),
    )
    assert store._claims is not None and store._claims.batches == 1  # one statement
    # The first asked for every task but holds two: the others go on from
    # there rather than from the five it asked for, and find tasks PENDING.
    assert [t.task_input["n"] for t in first or []] == [0, 1]
    assert [t.task_input["n"] for t in second or []] == [2, 3]
    assert [t.task_input["n"] for t in third or []] == [4]


async def test_a_schema_is_honoured(pg_schema_db: SchemaDatabase) -> None:
    store, statements, actor = await open_store(pg_schema_db.url, pg_schema_db.schema)
    try:
        registered = await register_one(store, "p", ONE, actor)
        assert registered.created
        assert store.get_task("p", registered.task.task_input_id).status is State.PENDING
    finally:
        await statements.close()
        store.close()


async def test_the_urls_own_connection_settings_reach_every_connection(
    pg_schema_db: SchemaDatabase,
) -> None:
    # The schema is named in the URL's options, not given apart: the engine,
    # asyncpg and the listening connection must all look in it.
    settings = {
        "options": f"-c search_path={pg_schema_db.schema} -c statement_timeout=4321",
        "application_name": "porch-test",
        "connect_timeout": "5",  # libpq's, which asyncpg would send PostgreSQL as a setting
        # libpq's alone, which psycopg2 keeps and asyncpg's connections leave out.
        "keepalives": "1",
        "keepalives_idle": "30",
        "gssencmode": "disable",  # asyncpg has no GSS encryption to turn off
    }
    url = make_url(pg_schema_db.url).update_query_dict(settings)
    store, statements, actor = await open_store(url.render_as_string(hide_password=False))
    listener = Listener(store.engine)
    try:
        registered = await register_one(store, "p", ONE, actor)
        assert store.get_task("p", registered.task.task_input_id).status is State.PENDING
        shown = text(
            "SELECT current_setting('statement_timeout'), current_setting('application_name'),"
            " current_setting('TimeZone')"
        )
        [on_asyncpg] = await statements.rows(shown, {})
        with store.engine.connect() as connection:
            on_engine = connection.execute(shown).one()
            listening = connection.execute(
                text(
                    "SELECT application_name FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                )
            ).scalars()
            assert [*listening] == ["porch-test"]
        assert tuple(on_asyncpg) == tuple(on_engine) == ("4321ms", "porch-test", "UTC")
    finally:
        listener.close()
        await statements.close()
        store.close()


async def test_claims_together_count_the_pipeline_each_task_carries(
    async_store: tuple[Store, Actor],
) -> None:
    store, actor = async_store
    store.create_pipeline(LONG)  # 3 KB in every task: 1,500 tasks pass 4 MiB
    store.register_tasks(LONG.name, [{"n": n} for n in range(4000)], actor)
    claims = [store.claim_tasks_async(LONG.name, 1500, None, actor) for _ in range(2)]
    answers = await asyncio.gather(*claims)  # one statement: the claimers' shares
    for claimed in answers:
        assert claimed is not None and 900 < len(claimed) < 1500
        assert answer_bytes(claimed) < 4 * 1024 * 1024


async def test_a_read_only_database_is_unavailable_not_an_internal_error(pg_url: str) -> None:
    # As after a fail-over that left the URL naming a standby.
    store, statements, actor = await open_store(pg_url)
    database = make_url(pg_url).database
    try:
        with store.engine.connect() as connection:
            connection.execute(
                text(f"ALTER DATABASE {database} SET default_transaction_read_only = on")
            )
            connection.commit()
        await statements.close()
        store.engine.dispose()  # new sessions take the setting
        statements = AsyncStatements(pg_url, None, pool_size=2)
        await statements.open()
        store.use_async(statements)
        with pytest.raises(Unavailable, match=r"^the database is read-only \(a standby\?\)"):
            await store.register_canonical_async("p", ONE, actor)
        with pytest.raises(Unavailable, match="read-only"):
            store.register_tasks("p", [{"n": 1}], actor)
        assert store.get_pipeline("p").name == "p"  # reads go on
    finally:
        await statements.close()
        store.close()


async def cancel(store: Store, actor: Actor, task_id: str) -> Any:
    """Cancel a task as the service does: the coalesced way, else the blocking way."""
    changed = await store.update_task_async("p", task_id, State.CANCELLED, None, actor)
    if changed is None:
        return await asyncio.to_thread(
            store.update_task, "p", task_id, State.CANCELLED, None, actor
        )
    return changed


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("lock_timeout=200", "^another transaction held a lock longer than PostgreSQL's lock_"),
        ("statement_timeout=200", "^the database is unavailable: "),
    ],
)
async def test_a_change_timed_out_waiting_is_unavailable_not_an_internal_error(
    pg_url: str, setting: str, words: str
) -> None:
    # A timeout the operator set in the URL (the README's statement_timeout,
    # say) ends a change waiting for a lock held elsewhere: try again.
    url = make_url(pg_url).update_query_dict({"options": f"-c {setting}"})
    store, statements, actor = await open_store(url.render_as_string(hide_password=False))
    [made] = store.register_tasks("p", [{"n": 1}], actor)
    holder = create_engine(pg_url)
    try:
        with holder.begin() as connection:
            connection.execute(text("SELECT 1 FROM task FOR UPDATE"))
            # The coalesced way does not wait for the lock: the blocking way does.
            task_id = made.task.task_input_id
            assert await store.update_task_async("p", task_id, State.CANCELLED, None, actor) is None
            with pytest.raises(Unavailable, match=words):
                await asyncio.to_thread(
                    store.update_task, "p", task_id, State.CANCELLED, None, actor
                )
        assert store.get_task("p", made.task.task_input_id).status is State.PENDING
    finally:
        holder.dispose()
        await statements.close()
        store.close()


async def test_a_statement_postgresqls_lock_timeout_ends_says_so(pg_url: str) -> None:
    url = make_url(pg_url).update_query_dict({"options": "-c lock_timeout=200"})
    store, statements, actor = await open_store(url.render_as_string(hide_password=False))
    [made] = store.register_tasks("p", [{"n": 1}], actor)
    holder = create_engine(pg_url)
    try:
        with holder.begin() as connection:
            connection.execute(text("LOCK TABLE task IN SHARE MODE"))  # writes wait
            task_id = made.task.task_input_id
            changing = store.update_task_async("p", task_id, State.CANCELLED, None, actor)
            with pytest.raises(Unavailable) as ended:
                await asyncio.wait_for(changing, 10)
            assert ended.value.message == LOCK_TIMED_OUT
            claiming = store.claim_tasks_async("p", 1, None, actor)
            with pytest.raises(Unavailable) as ended:
                await asyncio.wait_for(claiming, 10)
            assert ended.value.message == LOCK_TIMED_OUT
    finally:
        holder.dispose()
        await statements.close()
        store.close()


async def test_a_change_timed_out_waiting_for_a_lock_fails_only_its_own_caller(
    pg_url: str,
) -> None:
    url = make_url(pg_url).update_query_dict({"options": "-c lock_timeout=200"})
    store, statements, actor = await open_store(url.render_as_string(hide_password=False))
    store.register_tasks("p", [{"n": n} for n in range(4)], actor)
    locked, *others = every_task(store, "p")
    holder = create_engine(pg_url)

    try:
        with holder.begin() as connection:
            connection.execute(
                text("SELECT 1 FROM task WHERE task_input_id = :id FOR UPDATE"),
                {"id": locked.task_input_id},
            )
            results = await asyncio.gather(
                *(cancel(store, actor, t.task_input_id) for t in [locked, *others]),
                return_exceptions=True,
            )
        assert isinstance(results[0], Unavailable), results[0]
        assert [r.status for r in results[1:]] == [State.CANCELLED] * 3, results
    finally:
        holder.dispose()
        await statements.close()
        store.close()


async def test_a_task_locked_elsewhere_holds_back_only_its_own_change(pg_url: str) -> None:
    store, statements, actor = await open_store(pg_url)
    store.register_tasks("p", [{"n": n} for n in range(4)], actor)
    locked, *others = every_task(store, "p")
    holder = create_engine(pg_url)

    try:
        with holder.connect() as connection:
            transaction = connection.begin()
            connection.execute(
                text("SELECT 1 FROM task WHERE task_input_id = :id FOR UPDATE"),
                {"id": locked.task_input_id},
            )
            waiting = asyncio.ensure_future(cancel(store, actor, locked.task_input_id))
            await asyncio.sleep(0.2)  # its batch cut, or its statement sent
            for batch in ([others[0]], others[1:]):  # a change alone, then a batch
                done = await asyncio.wait_for(
                    asyncio.gather(*(cancel(store, actor, t.task_input_id) for t in batch)), 10
                )
                assert [t.status for t in done] == [State.CANCELLED] * len(batch)
            assert not waiting.done()
            transaction.rollback()
        assert (await asyncio.wait_for(waiting, 10)).status is State.CANCELLED
    finally:
        holder.dispose()
        await statements.close()
        store.close()


async def test_a_release_of_a_task_locked_elsewhere_not_to_wait_is_locked(
    async_store: tuple[Store, Actor], pg_url: str
) -> None:
    # So that the service waits for it in one of the places kept for such waits.
    store, actor = async_store
    store.register_tasks("p", [{"n": 1}], actor)
    [claimed] = store.claim_tasks("p", 1, None, actor)
    holder = create_engine(pg_url)
    try:
        with holder.connect() as connection, connection.begin():
            connection.execute(
                text("SELECT 1 FROM task WHERE task_input_id = :id FOR UPDATE"),
                {"id": claimed.task_input_id},
            )
            with pytest.raises(Locked, match=f"task {claimed.task_input_id}.* is locked"):
                store.release_claim(
                    "p", claimed.task_input_id, claimed.claim_number, "back", actor, wait=False
                )
    finally:
        holder.dispose()
    released = store.release_claim("p", claimed.task_input_id, claimed.claim_number, "back", actor)
    assert released is not None and released.status is State.PENDING


def change_left_open(connection: sa.Connection, task_input_id: str) -> None:
    """Change the task's row in connection's transaction, as a session left
    open after an update would: a registration of its input waits for it."""
    connection.execute(
        text("UPDATE task SET update_time = update_time WHERE task_input_id = :id"),
        {"id": task_input_id},
    )


async def test_a_registration_of_a_task_locked_elsewhere_waits_only_briefly(pg_url: str) -> None:
    # INSERT ... ON CONFLICT waits for a row changed by a transaction still
    # open; a row only locked FOR UPDATE it passes.
    store, statements, actor = await open_store(pg_url)
    [locked, _] = store.register_tasks("p", [{"n": 1}, {"n": 2}], actor)
    locked_text = canonical_json({"n": 1})
    holder = create_engine(pg_url)
    try:
        with holder.begin() as connection:
            change_left_open(connection, locked.task.task_input_id)
            # Alone, it is Locked; in a batch with others, each goes the
            # blocking way. Either after 100 ms, not the role's lock_timeout.
            start = asyncio.get_running_loop().time()
            alone = store.register_canonical_async("p", locked_text, actor)
            with pytest.raises(
                Locked, match="the input's task, or the task table, is locked by another"
            ):
                await asyncio.wait_for(alone, 5)
            batch = [
                store.register_canonical_async("p", text_, actor)
                for text_ in (locked_text, canonical_json({"n": 2}), canonical_json({"n": 3}))
            ]
            assert await asyncio.wait_for(asyncio.gather(*batch), 5) == [None] * 3
            assert asyncio.get_running_loop().time() - start < 1.5
            with pytest.raises(
                Locked, match="the input's task, or the task table, is locked by another"
            ):
                await asyncio.to_thread(
                    store.register_canonical, "p", [locked_text], actor, wait=False
                )
            texts = [canonical_json({"n": 3}), locked_text]
            with pytest.raises(
                Locked, match="a task of these inputs, or the task table, is locked by"
            ):
                await asyncio.to_thread(store.register_canonical, "p", texts, actor, wait=False)
            # Nothing of the batch refused was made; another input is.
            assert len(every_task(store, "p")) == 2
            four = await register_one(store, "p", canonical_json({"n": 4}), actor)
            assert four.created
            waiting = asyncio.ensure_future(
                asyncio.to_thread(store.register_canonical, "p", texts, actor)
            )
            await asyncio.sleep(0.5)
            assert not waiting.done()
            connection.rollback()
        made, found = await asyncio.wait_for(waiting, 10)
        assert made.created and not found.created and found.task == locked.task
        assert (await register_one(store, "p", locked_text, actor)).task == locked.task
    finally:
        holder.dispose()
        await statements.close()
        store.close()


@contextlib.asynccontextmanager
async def left_to_wait(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, lock_waits: int
) -> AsyncIterator[tuple[Store, PorchService, Actor, sa.Connection]]:
    """A store whose task of ONE another transaction (the connection's) has
    changed and not ended, and a PorchService on it with lock_waits places
    to wait. Single registrations are left to the blocking way, as when
    their batch held other inputs and waited past its brief lock_timeout."""
    store, statements, actor = await open_store(pg_url)
    [locked] = store.register_tasks("p", [{"n": 1}], actor)
    monkeypatch.setattr(store, "register_canonical_async", lambda *args: asyncio.sleep(0))
    executor = ThreadPoolExecutor(4)
    service = PorchService(store, executor, Hub(), 15.0, lock_waits=lock_waits)  # type: ignore[arg-type]
    holder = create_engine(pg_url)
    try:
        with holder.begin() as connection:
            change_left_open(connection, locked.task.task_input_id)
            yield store, service, actor, connection
    finally:
        holder.dispose()
        executor.shutdown()
        await statements.close()
        store.close()


async def test_a_registration_locked_in_a_batch_with_no_place_to_wait_is_tried_again_once_over(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with left_to_wait(pg_url, monkeypatch, lock_waits=0) as (store, service, actor, _):
        tries = []
        register = store.register_canonical

        def counted(*args: Any, **kwargs: Any) -> Any:
            tries.append(kwargs)
            return register(*args, **kwargs)

        monkeypatch.setattr(store, "register_canonical", counted)
        with pytest.raises(Locked, match="the input's task, or the task table, is locked"):
            await service._register_one("p", ONE, actor)
        # Once without waiting, then again after each pause: not twice over.
        assert tries == [{"wait": False}] * (1 + len(LOCKED_RETRY_PAUSES))


async def test_a_registration_left_to_the_blocking_way_that_waits_is_known_to_wait(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with left_to_wait(pg_url, monkeypatch, lock_waits=2) as (_, service, actor, holding):
        waiting = asyncio.ensure_future(service._register_one("p", ONE, actor))
        await asyncio.sleep(0.5)
        # So that more calls of its input go straight to wait behind it.
        assert dict(service._inputs_waiting) == {("p", ONE): 1}
        holding.rollback()
        assert (await asyncio.wait_for(waiting, 10)).task.task_input_id == digest_of(ONE)
        await asyncio.sleep(0.1)  # the place is left from the executor's thread
        assert not service._inputs_waiting


async def test_a_single_change_postgresql_refuses_goes_the_blocking_way(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, actor = async_store
    [made] = store.register_tasks("p", [{"n": 1}], actor)

    async def refuse(*args: Any) -> Any:
        raise Refused("a value PostgreSQL refused")

    assert store._async is not None
    monkeypatch.setattr(store._async, "rows", refuse)
    task_id = made.task.task_input_id
    assert await store.update_task_async("p", task_id, State.CANCELLED, None, actor) is None
    assert store.get_task("p", task_id).status is State.PENDING


async def test_an_unreachable_database_is_unavailable(unused_port: int) -> None:
    statements = AsyncStatements(
        f"postgresql+psycopg2://postgres@127.0.0.1:{unused_port}/none", None, pool_size=1
    )
    with pytest.raises(Unavailable, match="the database is unavailable: "):
        await statements.open()


async def test_a_database_dropped_under_the_pool_is_unavailable(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database()
    statements = AsyncStatements(url, None, pool_size=1)
    try:
        await statements.open()
        assert await statements.scalar(sa.select(sa.literal(1)), {}) == 1
        postgres_server.drop_database(url)  # ending its sessions
        with contextlib.suppress(Unavailable):  # the connection lost, maybe
            await statements.scalar(sa.select(sa.literal(1)), {})
        with pytest.raises(Unavailable, match="does not exist"):  # a new one refused
            await statements.scalar(sa.select(sa.literal(1)), {})
    finally:
        await statements.close()
        postgres_server.drop_database(url)


async def test_a_write_not_to_wait_waits_briefly_for_a_lock_on_the_table(pg_url: str) -> None:
    # PostgreSQL has no NOWAIT for the table's lock (an index built, say).
    store, statements, actor = await open_store(pg_url)
    [made] = store.register_tasks("p", [{"n": 1}], actor)
    task_id = made.task.task_input_id
    holder = create_engine(pg_url)
    try:
        with holder.begin() as connection:
            connection.execute(text("LOCK TABLE task IN EXCLUSIVE MODE"))  # reads go on
            with pytest.raises(Locked, match="is locked by another transaction"):
                await asyncio.wait_for(
                    asyncio.to_thread(
                        store.update_task, "p", task_id, State.CANCELLED, None, actor, wait=False
                    ),
                    10,
                )
            with pytest.raises(
                Locked, match="the input's task, or the task table, is locked by another"
            ):
                await asyncio.wait_for(
                    asyncio.to_thread(store.register_canonical, "p", [ONE], actor, wait=False),
                    10,
                )
        assert store.update_task("p", task_id, State.CANCELLED, None, actor, wait=False)
        [again] = store.register_canonical("p", [ONE], actor, wait=False)
        assert not again.created
    finally:
        holder.dispose()
        await statements.close()
        store.close()


async def test_a_pool_of_one_connection_runs_statements_that_overlap(pg_url: str) -> None:
    statements = AsyncStatements(pg_url, None, pool_size=1)
    await statements.open()
    try:
        slow = asyncio.ensure_future(statements.scalar(sa.select(sa.func.pg_sleep(0.2)), {}))
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(statements.scalar(sa.select(sa.literal(1)), {}), 10) == 1
        await slow
    finally:
        await statements.close()


def test_rows_read_by_attribute() -> None:
    row = row_class(("id", "count"))((3, 4))
    assert isinstance(row, RowView)
    assert (row.id, row.count) == (3, 4)
    assert row_class(("id", "count")) is type(row)
    with pytest.raises(AttributeError):
        _ = row.missing


async def test_values_a_statement_fixes_are_written_into_its_text(pg_url: str) -> None:
    """Plain fixed values (text, numbers, NULL, booleans) become literals;
    the caller's parameters stay $n, renumbered in order, and so does a
    fixed text that is not plain. The answers are those of the values."""
    values = sa.values(sa.column("word", sa.Text), sa.column("number", sa.Integer), name="v").data(
        [("DONE", 3), ("it's", 4), ("a\\b", 5)]
    )
    statement = (
        sa.select(values.c.number, sa.literal(None, sa.Text).label("nothing"), sa.true())
        .where(
            sa.or_(
                values.c.word.in_(["DONE", "it's", sa.bindparam("word", type_=sa.Text)]),
                values.c.number == sa.bindparam("number", type_=sa.Integer),
            )
        )
        .order_by(values.c.number)
    )
    compiled = _compile(statement)
    assert "'DONE'" in compiled.sql and "'it''s'" not in compiled.sql
    assert compiled.names.count(None) == len(compiled.fixed) - 2
    assert set(compiled.names) == {None, "word", "number"}
    assert "it's" in compiled.fixed and "a\\b" in compiled.fixed
    # Each remaining $n once: the fixed texts that are not plain, then the caller's.
    assert len(compiled.names) == 5
    assert all(compiled.sql.count(f"${n}") == 1 for n in range(1, 6))

    statements = AsyncStatements(pg_url, None, 2)
    await statements.open()
    try:
        rows = await statements.rows(statement, {"word": "a\\b", "number": 0})
        assert [(row.number, row.nothing) for row in rows] == [(3, None), (4, None), (5, None)]
        rows = await statements.rows(statement, {"word": "none", "number": 5})
        assert [row.number for row in rows] == [3, 4, 5]
        rows = await statements.rows(statement, {"word": "none", "number": 0})
        assert [row.number for row in rows] == [3, 4]
    finally:
        await statements.close()


async def test_statements_one_after_another_share_a_connection_kept_from_the_pool(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held connection serves each statement that finds it free, without
    going through the pool; one that comes meanwhile runs on a connection
    from the pool; one cancelled midway gives the held connection back, and
    the next takes one again."""
    backend = sa.select(sa.func.pg_backend_pid())
    slow = sa.select(sa.func.pg_backend_pid(), sa.func.pg_sleep(sa.bindparam("seconds")))
    statements = AsyncStatements(pg_url, None, 4)
    await statements.open()
    taken = []
    acquire = asyncpg.Pool.acquire

    def counted(*args: Any, **kwargs: Any) -> Any:
        taken.append(1)
        return acquire(*args, **kwargs)

    monkeypatch.setattr(asyncpg.Pool, "acquire", counted)
    try:
        held = {await statements.scalar(backend, {}) for _ in range(5)}
        assert len(held) == 1 and len(taken) == 1
        both = await asyncio.gather(
            statements.scalar(slow, {"seconds": 0.2}), statements.scalar(slow, {"seconds": 0})
        )
        assert both[0] in held and both[1] not in held and len(taken) == 2

        sleeping = asyncio.ensure_future(statements.scalar(slow, {"seconds": 30}))
        await asyncio.sleep(0.3)
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        after = await asyncio.wait_for(statements.scalar(backend, {}), timeout=10)
        assert await statements.scalar(backend, {}) == after
        assert len(taken) == 3

        # Closing waits for the statement on the held connection to end.
        last = asyncio.ensure_future(statements.scalar(slow, {"seconds": 0.3}))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(statements.close(), timeout=10)
        assert await last == after
    finally:
        await asyncio.wait_for(statements.close(), timeout=10)


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_concurrent_updates_share_statements_and_each_gets_its_answer(
    async_store: tuple[Store, Actor],
) -> None:
    store, actor = async_store
    store.register_tasks("p", [{"n": n} for n in range(40)], actor)
    claimed = await store.claim_tasks_async("p", 30, timedelta(minutes=5), actor) or []
    pending = [task for task in store.list_tasks("p", State.PENDING, 100, "").items]
    changes = [(task.task_input_id, State.RUNNING, f"run {i}") for i, task in enumerate(claimed)]
    # Refused: PENDING -> DONE. A no-op: PENDING -> PENDING. A missing task.
    changes.append((pending[0].task_input_id, State.DONE, "refused"))
    changes.append((pending[1].task_input_id, State.PENDING, "no-op"))
    changes.append(("f" * 64, State.RUNNING, "missing"))
    # Two changes to one task in one batch: only one can be applied with it.
    changes.append((claimed[0].task_input_id, State.DONE, "second"))
    items_before, batches_before = store.coalesced

    results = await asyncio.gather(
        *(store.update_task_async("p", key, status, note, actor) for key, status, note in changes)
    )

    items, batches = store.coalesced
    assert items - items_before == len(changes)
    # All arrived before the first batch started: one statement for all.
    assert batches - batches_before == 1
    for (key, status, _), result in zip(changes[1:30], results[1:30], strict=True):
        assert result is not None and result.task_input_id == key and result.status is status
    assert results[30:33] == [None, None, None]
    # The task changed twice: exactly one of the two changes was applied.
    first, second = results[0], results[33]
    assert (first is None) != (second is None)
    for key, status, note in changes[1:30]:
        events = store.list_task_events("p", key, 10, "").items
        assert [(e.kind.value, e.new_status, e.message, e.token_id) for e in events[2:]] == [
            ("STATUS_CHANGED", status, note, actor.token_id)
        ]
    assert store.get_task("p", pending[0].task_input_id).status is State.PENDING
    assert len(store.list_task_events("p", pending[0].task_input_id, 10, "").items) == 1
    running = store.get_task("p", claimed[1].task_input_id)
    assert running.lease_expire_time is not None and running.claim_time is not None


async def test_concurrent_registrations_of_any_pipelines_and_callers_share_one_statement(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, actor = async_store
    store.create_pipeline(Pipeline(name="q", uri="https://example.org/q", version="1"))
    token = store.create_token(Role.PIPELINE, "q", "other wrapper", "k" * 64)
    other = Actor(token.token_id, token.description)
    token = store.create_token(Role.PIPELINE, "p", "second wrapper", "m" * 64)
    second = Actor(token.token_id, token.description)
    # The same input, registered before the batch in each pipeline.
    [kept_p] = store.register_tasks("p", [{"kept": 1}], actor)
    [kept_q] = store.register_tasks("q", [{"kept": 1}], other)
    calls = [("p", {"n": n}, actor) for n in range(10)]
    calls += [("q", {"n": n}, other) for n in range(5)]
    calls += [("p", {"n": 3}, actor), ("q", {"n": 0}, other)]  # repeats within the batch
    calls += [("p", {"n": 4}, second)]  # a repeat from another caller
    calls += [("q", {"kept": 1}, other), ("p", {"kept": 1}, second)]
    calls += [("p", {"second": n}, second) for n in range(3)]
    items, batches = store.coalesced_registrations
    statements = store._async
    assert statements is not None
    sent = []
    rows = statements.rows

    async def counted(statement: Any, params: Any) -> Any:
        sent.append(statement)
        return await rows(statement, params)

    monkeypatch.setattr(statements, "rows", counted)

    results = await asyncio.gather(
        *(
            store.register_canonical_async(name, canonical_json(task_input), who)
            for name, task_input, who in calls
        )
    )

    registrations = [result for result in results if result is not None]
    assert len(registrations) == len(calls)
    for (name, task_input, _), registration in zip(calls, registrations, strict=True):
        assert registration.task.pipeline.name == name
        assert registration.task.task_input == task_input
    created = [True] * 15 + [False] * 5 + [True] * 3
    assert [r.created for r in registrations] == created
    assert store.coalesced_registrations == (items + len(calls), batches + 1)
    # One statement registers them all; one more reads the tasks there before.
    assert len(sent) == 2
    assert registrations[15].task == registrations[3].task
    assert registrations[17].task == registrations[4].task
    assert registrations[18].task == kept_q.task
    assert registrations[19].task == kept_p.task
    # Each CREATED event names its own input's caller.
    for (name, _, who), registration in zip(calls, registrations, strict=True):
        if not registration.created:
            continue
        key = registration.task.task_input_id
        events = store.list_task_events(name, key, 10, "").items
        assert [(e.kind.value, e.token_id, e.token_description) for e in events] == [
            ("CREATED", who.token_id, who.description)
        ]
    events = store.list_task_events("p", registrations[4].task.task_input_id, 10, "").items
    assert [e.token_id for e in events] == [actor.token_id]  # the first caller's
    for kept in (kept_p, kept_q):
        key = kept.task.task_input_id
        assert len(store.list_task_events(kept.task.pipeline.name, key, 10, "").items) == 1
    # A pipeline's new tasks are claimed after its older one, in the order given.
    made = [
        r.task.task_input_id for r in registrations if r.created and r.task.pipeline.name == "p"
    ]
    claimed = store.claim_tasks("p", 100, None, actor)
    assert [task.task_input_id for task in claimed] == [kept_p.task.task_input_id, *made]


async def test_a_batch_that_loses_a_deadlock_sends_each_change_alone(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, actor = async_store
    store.register_tasks("p", [{"n": n} for n in range(3)], actor)
    claimed = await store.claim_tasks_async("p", 3, None, actor) or []
    statements = store._async
    assert statements is not None
    run = statements.rows

    async def lose_batches(statement: Any, params: Any) -> Any:
        if "batch_statuses" in params:
            raise Contended("deadlock detected")
        return await run(statement, params)

    monkeypatch.setattr(statements, "rows", lose_batches)
    results = await asyncio.gather(
        *(
            store.update_task_async("p", task.task_input_id, State.RUNNING, None, actor)
            for task in claimed
        )
    )
    # All three went in one batch, which changed nothing: each comes back
    # for the one-change path, which the service then takes.
    assert results == [None, None, None]
    assert {store.get_task("p", t.task_input_id).status for t in claimed} == {State.CLAIMED}


@pytest.mark.parametrize("failure", [Unavailable("database unavailable: lost"), Refused("no")])
async def test_claims_on_a_pipeline_that_fail_leave_those_made_on_another_in_their_hands(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    store, actor = async_store
    store.create_pipeline(Pipeline(name="q", uri="https://example.org/q", version="1"))
    store.register_tasks("p", [{"n": n} for n in range(2)], actor)
    store.register_tasks("q", [{"n": n} for n in range(2)], actor)
    statements = store._async
    assert statements is not None and store._claims is not None
    q_id = store._pipeline_ids["q"]
    run = statements.rows

    async def fail_on_q(statement: Any, params: Any) -> Any:
        if params.get("in_pipeline_id") == q_id:
            raise failure
        return await run(statement, params)

    monkeypatch.setattr(statements, "rows", fail_on_q)
    on_p, on_q = await asyncio.gather(
        store.claim_tasks_async("p", 2, None, actor),
        store.claim_tasks_async("q", 2, None, actor),
        return_exceptions=True,
    )
    assert store._claims.batches == 1  # p's claim committed first, in the same batch
    # The claim on p was made: its caller holds the tasks, and gets them.
    assert isinstance(on_p, list) and len(on_p) == 2
    assert [task.task_input_id for task in on_p] == [
        t.task_input_id for t in every_task(store, "p")
    ]
    assert {task.status for task in every_task(store, "p")} == {State.CLAIMED}
    # The claim on q failed alone: its caller gets the error, or None (the
    # blocking path tries again) when PostgreSQL refused, changing nothing.
    assert on_q is (failure if isinstance(failure, Unavailable) else None)
    assert {task.status for task in every_task(store, "q")} == {State.PENDING}


async def test_registrations_postgresql_refuses_go_the_blocking_way(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, actor = async_store
    statements = store._async
    assert statements is not None

    async def refuse(statement: Any, params: Any) -> Any:
        raise Refused("canceling statement due to user request")

    monkeypatch.setattr(statements, "rows", refuse)
    assert await store.register_canonical_async("p", ONE, actor) is None
    assert every_task(store, "p") == []


async def test_registrations_made_are_answered_when_the_read_after_is_refused(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, actor = async_store
    there = await register_one(store, "p", ONE, actor)
    statements = store._async
    assert statements is not None
    run = statements.rows

    async def refuse_the_read(statement: Any, params: Any) -> Any:
        if "task_input_ids" in params:  # the read of tasks that were there
            raise Refused("canceling statement due to statement timeout")
        return await run(statement, params)

    monkeypatch.setattr(statements, "rows", refuse_the_read)
    new = canonical_json({"n": 2})
    again, made = await asyncio.gather(
        store.register_canonical_async("p", ONE, actor),
        store.register_canonical_async("p", new, actor),
    )
    assert store._registering is not None and store._registering.batches == 2  # the two together
    assert again is None  # the blocking way answers it
    assert made is not None and made.created
    assert made.task.task_input_id != there.task.task_input_id


async def test_claims_and_changes_made_together_keep_count_of_claims(
    async_store: tuple[Store, Actor],
) -> None:
    store, actor = async_store
    store.register_tasks("p", [{"n": n} for n in range(4)], actor)
    together = await asyncio.gather(*(store.claim_tasks_async("p", 2, None, actor) for _ in "ab"))
    assert store._claims is not None and store._claims.batches == 1  # one statement for both
    claimed = [task for tasks in together for task in tasks or []]
    assert [task.claim_number for task in claimed] == [1, 1, 1, 1]
    keys = [task.task_input_id for task in claimed]
    store.update_task("p", keys[3], State.PENDING, "released", actor)
    [again] = await store.claim_tasks_async("p", 1, None, actor) or []
    assert (again.task_input_id, again.claim_number) == (keys[3], 2)

    changes = [(keys[0], 1), (keys[1], None), (keys[2], 2), (keys[3], 1)]
    results = await asyncio.gather(
        *(
            store.update_task_async("p", key, State.RUNNING, None, actor, claim_number)
            for key, claim_number in changes
        )
    )
    assert store.coalesced == (4, 1)  # one statement for all four
    assert [None if task is None else (task.status, task.claim_number) for task in results] == [
        (State.RUNNING, 1),
        (State.RUNNING, 1),
        None,  # claim 2 of a task claimed once: left for the thread path to explain
        None,  # claim 1 of a task claimed again
    ]
    for key, claim_number, match in ((keys[2], 2, "never made"), (keys[3], 1, "since claim 1")):
        with pytest.raises(FailedPrecondition, match=match):
            store.update_task("p", key, State.RUNNING, None, actor, claim_number)
    assert [store.get_task("p", key).status for key in keys[2:]] == [State.CLAIMED] * 2
    running = await store.update_task_async("p", keys[3], State.RUNNING, None, actor, 2)
    assert running is not None and running.status is State.RUNNING


async def test_the_watch_hubs_reads_answer_as_the_thread_path_does(
    async_store: tuple[Store, Actor], pg_url: str
) -> None:
    store, actor = async_store
    start = store.event_start_cursor()
    await asyncio.gather(
        *(store.register_canonical_async("p", canonical_json({"n": n}), actor) for n in range(5))
    )
    await store.claim_tasks_async("p", 2, None, actor)
    # Events wait for the oldest transaction open anywhere on the server: one
    # of another session holds them back until it ends, so give it time to.
    for _ in range(300):
        every = await store.read_events_async(start, 100) or []
        if len(every) == 7 and not await store.has_unread_events_async(start):
            break
        await asyncio.sleep(0.1)

    for after, limit in ((start, 100), (start, 3), ("0.0", 100)):
        expected = store.read_events(after, None, limit, check_horizon=False)
        assert await store.read_events_async(after, limit) == expected
    every = await store.read_events_async(start, 100) or []
    assert [event.kind.value for event in every] == ["CREATED"] * 5 + ["CLAIMED"] * 2
    assert await store.has_unread_events_async(start) is False
    assert store.has_unread_events(start) is False

    # An event of a pipeline this store has not seen yet: only the thread path
    # loads pipelines, so the event-loop read says it cannot answer.
    other = Store(make_engine(pg_url))
    try:
        other.create_pipeline(Pipeline(name="q", uri="https://example.org/q", version="1"))
        token = other.create_token(Role.PIPELINE, "q", "q wrapper", "i" * 64)
        other.register_canonical("q", [ONE], Actor(token.token_id, token.description))
    finally:
        other.close()
    # Held back by another session's transaction, the event is not read at all
    # ([]); wait for it without the thread path's read, which loads pipeline q.
    for _ in range(300):
        if not await store.has_unread_events_async(every[-1].cursor):
            break
        await asyncio.sleep(0.1)
    assert await store.read_events_async(every[-1].cursor, 100) is None
    [event] = store.read_events(every[-1].cursor, None, 100, check_horizon=False)
    assert event.pipeline_name == "q"
    assert await store.read_events_async(every[-1].cursor, 100) == [event]


def end_porch_sessions(url: str) -> int:
    """End every session porch has open on url's database, as a restart would."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            ended = connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'porch'"
                )
            ).all()
    finally:
        engine.dispose()
    return len(ended)


async def test_sessions_the_database_ended_are_replaced_unseen(
    async_store: tuple[Store, Actor], pg_url: str
) -> None:
    store, actor = async_store
    first = await register_one(store, "p", ONE, actor)
    assert store.get_task("p", first.task.task_input_id).status is State.PENDING
    # One session on asyncpg and at least one in SQLAlchemy's pool.
    assert end_porch_sessions(pg_url) >= 2
    await asyncio.sleep(0.2)  # a serving loop sees the closed sockets meanwhile
    # Nothing reconnects on its own (and logs a failure for each try while a
    # restarting database refuses); the next statement opens what it needs.
    assert end_porch_sessions(pg_url) == 0

    second = await register_one(store, "p", canonical_json({"n": 2}), actor)
    assert second.created
    assert store.get_task("p", second.task.task_input_id).status is State.PENDING


async def test_a_change_postgresql_refuses_fails_only_its_own_caller(
    async_store: tuple[Store, Actor],
) -> None:
    store, actor = async_store
    store.register_tasks("p", [{"n": n} for n in range(8)], actor)
    tasks = every_task(store, "p")
    # A NUL in the message: PostgreSQL refuses the batch's one statement.
    messages = ["fine"] * 7 + ["a\x00b"]
    results = await asyncio.gather(
        *(
            store.update_task_async("p", task.task_input_id, State.CANCELLED, message, actor)
            for task, message in zip(tasks, messages, strict=True)
        ),
        return_exceptions=True,
    )
    # The batch changed nothing; each change was then made alone.
    assert all(result is None for result in results)
    for task, message in zip(tasks[:7], messages[:7], strict=True):
        assert store.update_task("p", task.task_input_id, State.CANCELLED, message, actor)
    with pytest.raises(ValueError, match="NUL"):
        store.update_task("p", tasks[7].task_input_id, State.CANCELLED, messages[7], actor)
    assert [task.status for task in every_task(store, "p")] == [State.CANCELLED] * 7 + [
        State.PENDING
    ]


class Hub:
    def committed(self) -> None:
        pass


class EndedCall:
    """A call's context whose deadline has passed (remaining -1 s) or not
    (None); with ended, gRPC has ended the call already, and an abort fails
    to send its status."""

    def __init__(self, remaining: float | None, ended: bool = False) -> None:
        self.remaining = remaining
        self.ended = ended
        self.aborted: tuple[Any, str, Any] | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: Any, details: str, metadata: Any = ()) -> None:
        self.aborted = (code, details, metadata)
        if self.ended:
            raise RuntimeError('Failed "execute_batch"')  # as grpc's ExecuteBatchError
        raise asyncio.CancelledError  # as grpc.aio's abort ends the handler


async def released(store: Store, task_id: str) -> list[str | None]:
    """Wait until the task is PENDING again; the messages of its events."""
    for _ in range(100):
        if store.get_task("p", task_id).status is State.PENDING:
            break
        await asyncio.sleep(0.05)
    return [event.message for event in store.list_task_events("p", task_id, 10, "").items]


async def release_begun(service: PorchService) -> asyncio.Future[None]:
    """The release of an unanswered claim the service has begun, once it has."""
    for _ in range(200):
        if service._releasing:
            [releasing] = service._releasing
            return releasing
        await asyncio.sleep(0.01)
    raise AssertionError("no release began")


def assert_report_kept(store: Store, task_id: str) -> None:
    """The task is DONE by the report made during its claim's release, whose
    event is its last: the release undid nothing."""
    assert store.get_task("p", task_id).status is State.DONE
    events = store.list_task_events("p", task_id, 10, "").items
    assert [event.message for event in events] == [None, None, "done all the same"]


async def claim_unheard(
    service: PorchService,
    store: Store,
    task_id: str,
    monkeypatch: pytest.MonkeyPatch,
    context: EndedCall,
    cancel: bool,
) -> None:
    """ClaimTasks of pipeline p, whose caller never hears of the claim: its
    call is cancelled (cancel: the client left) while the claim is made, or
    ends by its context (its deadline passed) as the answer is ready."""
    claim_all, made, answered = store.claim_tasks_async, asyncio.Event(), asyncio.Event()

    async def claim_then_wait(*args: Any) -> Any:
        claimed = await claim_all(*args)
        made.set()
        await answered.wait()
        return claimed

    monkeypatch.setattr(store, "claim_tasks_async", claim_then_wait)
    request = porch_pb2.ClaimTasksRequest(pipeline=porch_pb2.Pipeline(name="p"))
    call = asyncio.ensure_future(service.ClaimTasks(request, context))  # type: ignore[arg-type]
    await made.wait()
    assert store.get_task("p", task_id).status is State.CLAIMED
    if cancel:
        call.cancel()  # the client left while its claim was being made
    answered.set()
    with pytest.raises(asyncio.CancelledError):
        await call


@pytest.mark.parametrize("how", ["cancelled", "past its deadline", "ended by gRPC"])
async def test_a_claim_whose_call_ended_first_puts_its_tasks_back(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    store, actor = async_store
    [registered] = store.register_tasks("p", [{"n": 1}], actor)
    task_id = registered.task.task_input_id
    executor = ThreadPoolExecutor(2)
    service = PorchService(store, executor, Hub(), 15.0)  # type: ignore[arg-type]
    context = EndedCall(None if how == "cancelled" else -1.0, ended=how == "ended by gRPC")
    await claim_unheard(service, store, task_id, monkeypatch, context, how == "cancelled")

    assert await released(store, task_id) == [None, None, UNANSWERED_CLAIM]
    assert store.get_task("p", task_id).claimed_by_token_id is None
    if how != "cancelled":
        assert context.aborted == (grpc.StatusCode.DEADLINE_EXCEEDED, LATE_CLAIM, ANSWERED)
    executor.shutdown()


async def test_a_release_the_database_refuses_for_now_is_tried_again(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of connections, say: the tasks of a claim nobody heard of would
    # stay CLAIMED, with no lease to bring them back.
    store, actor = async_store
    [registered] = store.register_tasks("p", [{"n": 1}], actor)
    task_id = registered.task.task_input_id
    executor = ThreadPoolExecutor(2)
    service = PorchService(store, executor, Hub(), 15.0)  # type: ignore[arg-type]
    monkeypatch.setattr(service_module, "RELEASE_RETRY_PAUSES", (0.01, 0.01, 0.01))
    release, refusals = store.release_claim, [2]

    def refused_twice(*args: Any, **kwargs: Any) -> Any:
        if refusals[0]:
            refusals[0] -= 1
            raise Unavailable("the database is unavailable", "too many clients already")
        return release(*args, **kwargs)

    monkeypatch.setattr(store, "release_claim", refused_twice)
    await claim_unheard(service, store, task_id, monkeypatch, EndedCall(None), cancel=True)
    assert await released(store, task_id) == [None, None, UNANSWERED_CLAIM]
    assert refusals == [0]
    executor.shutdown()


async def test_a_release_tried_again_leaves_a_task_reported_on_meanwhile(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A report without the claim's number (npg_porch's PUT /tasks, say) moves
    # the task on from CLAIMED: a release would undo it, and the task run twice.
    store, actor = async_store
    [registered] = store.register_tasks("p", [{"n": 1}], actor)
    task_id = registered.task.task_input_id
    executor = ThreadPoolExecutor(2)
    service = PorchService(store, executor, Hub(), 15.0)  # type: ignore[arg-type]
    monkeypatch.setattr(service_module, "RELEASE_RETRY_PAUSES", (0.3,))
    release, refused, reported = store.release_claim, threading.Event(), threading.Event()

    def refused_once(*args: Any, **kwargs: Any) -> Any:
        if not refused.is_set():
            refused.set()
            raise Unavailable("the database is unavailable", "too many clients already")
        reported.wait(10)  # the second try comes after the report, however slow the machine
        return release(*args, **kwargs)

    monkeypatch.setattr(store, "release_claim", refused_once)
    await claim_unheard(service, store, task_id, monkeypatch, EndedCall(None), cancel=True)
    releasing = await release_begun(service)
    assert await asyncio.to_thread(refused.wait, 10)
    store.update_task("p", task_id, State.DONE, "done all the same", actor)
    reported.set()
    await releasing  # past the release's second try
    assert_report_kept(store, task_id)
    executor.shutdown()


async def test_a_report_made_before_a_claims_first_release_is_kept(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same report, made in the moment between the claim's commit and
    # its release's first try.
    store, actor = async_store
    [registered] = store.register_tasks("p", [{"n": 1}], actor)
    task_id = registered.task.task_input_id
    executor, held = ThreadPoolExecutor(1), threading.Event()
    executor.submit(held.wait, 10)  # the release waits for the one database thread
    service = PorchService(store, executor, Hub(), 15.0)  # type: ignore[arg-type]
    await claim_unheard(service, store, task_id, monkeypatch, EndedCall(None), cancel=True)
    releasing = await release_begun(service)
    store.update_task("p", task_id, State.DONE, "done all the same", actor)
    held.set()
    await releasing
    assert_report_kept(store, task_id)
    executor.shutdown()


class EndedConnection:
    """A connection to a session PostgreSQL ended, not yet seen closed:
    asyncpg refuses to send on it (or, with words of its own, fails)."""

    def __init__(self, words: str = "cannot switch to state 12; another operation (2)") -> None:
        self.words = words

    def is_closed(self) -> bool:
        return False

    async def fetch(self, *args: Any) -> Any:
        raise asyncpg.InternalClientError(self.words)


@pytest.mark.parametrize("held_busy", [False, True])
@pytest.mark.parametrize(
    "words", ["cannot switch to state 12; another operation (2)", "not connected"]
)
async def test_a_statement_asyncpg_would_not_send_goes_once_more_on_another_connection(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch, held_busy: bool, words: str
) -> None:
    # A session PostgreSQL has just ended, whose connection asyncpg has not
    # yet seen closed: it refuses to send the statement, so nothing ran.
    # Through the connection held, or the pool when that one is busy.
    store, actor = async_store
    statements = store._async
    assert statements is not None and statements._pool is not None
    pool = statements._pool
    once_ended = EndedFirst(pool, EndedConnection(words))
    statements._give_back_held(pool)  # the next statement takes a connection
    monkeypatch.setattr(statements, "_pool", once_ended)
    monkeypatch.setattr(statements, "_held_busy", held_busy)
    registered = await register_one(store, "p", ONE, actor)
    assert registered.created and once_ended.given == 2


class EndedFirst:
    """A pool whose first connections (or fetches), times of them, are an
    EndedConnection; the real pool after them."""

    def __init__(self, pool: Any, ended: EndedConnection, times: int = 1) -> None:
        self.pool, self.ended, self.times, self.given = pool, ended, times, 0

    async def acquire(self) -> Any:
        self.given += 1
        return self.ended if self.given <= self.times else await self.pool.acquire()

    async def release(self, connection: Any) -> None:
        if connection is not self.ended:
            await self.pool.release(connection)

    async def fetch(self, *args: Any) -> Any:
        self.given += 1
        if self.given <= self.times:
            return await self.ended.fetch(*args)
        return await self.pool.fetch(*args)


@pytest.mark.parametrize(
    ("words", "times", "tries"),
    [
        # Refused to send, then lost again on the second connection.
        ("cannot switch to state 12; another operation (2)", 2, 2),
        # asyncpg's other internal errors come from reading an answer: the
        # statement may have run, and must not run twice.
        ("no decoder for OID 99999", 1, 1),
    ],
)
async def test_a_connection_lost_in_use_is_unavailable_with_a_message_to_act_on(
    async_store: tuple[Store, Actor],
    monkeypatch: pytest.MonkeyPatch,
    words: str,
    times: int,
    tries: int,
) -> None:
    store, actor = async_store
    statements = store._async
    assert statements is not None and statements._pool is not None
    pool = statements._pool
    lost = EndedFirst(pool, EndedConnection(words), times)
    statements._give_back_held(pool)
    monkeypatch.setattr(statements, "_pool", lost)
    with pytest.raises(Unavailable, match="the connection was lost during the call; try again"):
        await store.claim_tasks_async("p", 1, None, actor)
    assert lost.given == tries


async def test_a_statement_refused_as_the_pool_closes_is_not_sent_again(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server is stopping: its pool closes while asyncpg refuses the
    # statement. There is no pool to try another connection of.
    store, actor = async_store
    statements = store._async
    assert statements is not None and statements._pool is not None
    pool = statements._pool

    class EndedAsThePoolCloses(EndedConnection):
        async def fetch(self, *args: Any) -> Any:
            statements._pool = None
            return await super().fetch(*args)

    closing = EndedFirst(pool, EndedAsThePoolCloses("not connected"))
    statements._give_back_held(pool)
    monkeypatch.setattr(statements, "_pool", closing)
    with pytest.raises(Unavailable, match="the connection was lost during the call; try again"):
        await store.claim_tasks_async("p", 1, None, actor)
    assert closing.given == 1


async def test_a_change_is_never_stamped_before_the_tasks_last(
    async_store: tuple[Store, Actor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A statement takes its time, then may wait (for its batch, a lock, a
    # connection) while another change to the task commits; or another
    # server's clock runs ahead of this one's. A task's history, and a claim's
    # lease, still run forward from its last change: claims and updates
    # alone and in batches, with a lease and without.
    store, actor = async_store
    store.register_tasks("p", [{"n": n} for n in range(6)], actor)
    behind = datetime.now(UTC) - timedelta(seconds=30)
    monkeypatch.setattr(store_module, "_now", lambda: behind)
    minute = timedelta(seconds=60)
    leases = [minute, None, minute, None, minute]
    assert store._claims is not None and store._updates is not None
    together = await asyncio.gather(
        *(store.claim_tasks_async("p", 1, lease, actor) for lease in leases[:4])
    )
    assert store._claims.batches < 4  # some went together
    claimed = [task for tasks in together for task in tasks or []]
    claimed += store.claim_tasks("p", 1, leases[4], actor)
    assert len(claimed) == 5
    for task, lease in zip(claimed, leases, strict=True):
        assert task.claim_time is not None and task.claim_time >= task.create_time
        assert task.update_time == task.claim_time
        expected = None if lease is None else task.claim_time + lease
        assert task.lease_expire_time == expected
    updated = await asyncio.gather(
        *(
            store.update_task_async("p", task.task_input_id, State.RUNNING, None, actor)
            for task in claimed[:4]
        )
    )
    assert store.coalesced[1] < 4  # some went together
    updated.append(store.update_task("p", claimed[4].task_input_id, State.RUNNING, None, actor))
    for task, before, lease in zip(updated, claimed, leases, strict=True):
        assert task is not None and task.update_time >= before.update_time
        expected = None if lease is None else task.update_time + lease
        assert task.lease_expire_time == expected
    for task in claimed:
        events = store.list_task_events("p", task.task_input_id, 10, "").items
        assert [event.kind for event in events][1] is EventKind.CLAIMED
        assert events[1].time == task.claim_time
        times = [event.time for event in events]
        assert times == sorted(times)
        assert store.get_task("p", task.task_input_id).update_time == times[-1]


def test_a_psycopg2_connection_is_counted_in_use_until_given_back_or_lost(pg_url: str) -> None:
    # A stopping server cancels what runs on the connections counted; one
    # lost in use (invalidated, then given back as None) must leave the
    # count, or every later stop would wait for it.
    engine = make_engine(pg_url)
    before = connections_in_use()
    with engine.connect():
        assert connections_in_use() == before + 1
    assert connections_in_use() == before
    with engine.connect() as lost:
        pid = lost.execute(text("SELECT pg_backend_pid()")).scalar()
        with engine.connect() as killer:
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            killer.commit()
        with pytest.raises(sa.exc.OperationalError):
            lost.execute(text("SELECT 1"))
    assert connections_in_use() == before
    engine.dispose()


@pytest.mark.parametrize(
    ("options", "interval"),
    [
        (None, "1s"),
        ("-c client_connection_check_interval=0", "0"),
        # In every form PostgreSQL reads.
        ("-c CLIENT_CONNECTION_CHECK_INTERVAL=2s", "2s"),
        ("--client-connection-check-interval=0", "0"),
        # The words elsewhere are not the setting.
        ("-c application_name=client_connection_check_interval", "1s"),
    ],
)
async def test_postgresql_looks_for_a_client_gone_unless_the_url_says_otherwise(
    pg_url: str, options: str | None, interval: str
) -> None:
    # Every connection of both pools: a statement of a process killed, or
    # stopped at once, is ended within a second, not left waiting for a lock.
    url = make_url(pg_url)
    if options is not None:
        url = url.update_query_dict({"options": options})
    rendered = url.render_as_string(hide_password=False)
    engine = make_engine(rendered)
    statements = AsyncStatements(rendered, None, pool_size=1)
    await statements.open()
    try:
        raw: Any = engine.raw_connection()
        try:
            # Nothing left open by setting it: the connection comes idle.
            assert raw.driver_connection.get_transaction_status() == 0  # TRANSACTION_STATUS_IDLE
            with raw.cursor() as cursor:
                cursor.execute("SHOW client_connection_check_interval")
                assert cursor.fetchone() == (interval,)
        finally:
            raw.close()
        pool: Any = statements._pool
        assert await pool.fetchval("SHOW client_connection_check_interval") == interval
    finally:
        await statements.close()
        engine.dispose()
