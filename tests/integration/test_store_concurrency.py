"""Exactly-once under concurrency: many OS processes against one PostgreSQL database."""

from __future__ import annotations

import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
from sqlalchemy import text

from porch_server import digest
from porch_server import store as store_module
from porch_server.db.engine import make_engine
from porch_server.errors import FailedPrecondition
from porch_server.models import SYSTEM, Actor, Pipeline
from porch_server.states import State
from porch_server.store import Store, claim_candidates

pytestmark = pytest.mark.postgres

PROCESSES = 16
INPUTS = [{"id_run": n, "path": f"/seq/{n}"} for n in range(1000)]


def register_worker(url: str, barrier: Barrier, actor: Actor) -> list[tuple[str, bool]]:
    """Register INPUTS, shuffled, in batches of 100, starting with every other worker."""
    inputs = list(INPUTS)
    random.Random(actor.description).shuffle(inputs)
    store = Store(make_engine(url, pool_size=1))
    try:
        store.ping()
        barrier.wait(timeout=60)
        results: list[tuple[str, bool]] = []
        for start in range(0, len(inputs), 100):
            registrations = store.register_tasks("p1", inputs[start : start + 100], actor)
            results += [(r.task.task_input_id, r.created) for r in registrations]
        return results
    finally:
        store.close()


def claim_worker(url: str, barrier: Barrier, actor: Actor) -> list[str]:
    """Claim batches until none are left; return the task_input_ids claimed."""
    store = Store(make_engine(url, pool_size=1))
    try:
        store.ping()
        barrier.wait(timeout=60)
        claimed: list[str] = []
        while batch := store.claim_tasks("p1", 25, None, actor):
            claimed += [task.task_input_id for task in batch]
        return claimed
    finally:
        store.close()


def _child(
    worker: Callable[[str, Barrier, Actor], Any],
    url: str,
    barrier: Barrier,
    results: multiprocessing.Queue[tuple[bool, Any]],
    number: int,
) -> None:
    try:
        results.put((True, worker(url, barrier, Actor(token_id=None, description=f"w{number}"))))
    except BaseException as error:
        barrier.abort()
        results.put((False, repr(error)))


def run_processes(worker: Callable[[str, Barrier, Actor], Any], url: str) -> list[Any]:
    """Run worker in PROCESSES fresh interpreters at once; return their results."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results: multiprocessing.Queue[tuple[bool, Any]] = context.Queue()
    processes = [
        context.Process(target=_child, args=(worker, url, barrier, results, number))
        for number in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    failures = [value for ok, value in outcomes if not ok]
    assert not failures, failures
    return [value for _, value in outcomes]


@pytest.fixture
def store(pg_url: str) -> Iterator[Store]:
    """A Store on a fresh database holding the pipeline p1."""
    store = Store(make_engine(pg_url))
    store.create_pipeline(Pipeline(name="p1", uri="u", version="1"))
    yield store
    store.close()


def test_concurrent_registrations_create_each_task_once(store: Store, pg_url: str) -> None:
    outcomes = run_processes(register_worker, pg_url)
    created = Counter(key for outcome in outcomes for key, was_created in outcome if was_created)
    keys = sorted(digest.task_input_id(task_input) for task_input in INPUTS)
    assert all(sorted(key for key, _ in outcome) == keys for outcome in outcomes)
    assert created == Counter(keys)
    listed = store.list_tasks("p1", None, 5000, "").items
    assert sorted(task.task_input_id for task in listed) == sorted(keys)
    events = [store.list_task_events("p1", key, 10, "").items for key in keys[:50]]
    assert all(len(history) == 1 for history in events)


def test_concurrent_claimers_take_each_task_exactly_once(store: Store, pg_url: str) -> None:
    inputs = [{"n": n} for n in range(10_000)]
    keys = [r.task.task_input_id for r in store.register_tasks("p1", inputs, SYSTEM)]
    outcomes = run_processes(claim_worker, pg_url)
    claimed = Counter(key for outcome in outcomes for key in outcome)
    assert claimed == Counter(keys)
    position = {key: index for index, key in enumerate(keys)}
    for outcome in outcomes:
        assert outcome == sorted(outcome, key=position.__getitem__)
    assert store.list_tasks("p1", State.PENDING, 1, "").items == []


def _two_claimers(pipeline_id: int, each: int) -> list[store_module._Claim]:
    """Two claims of each tasks, without a lease, merged in one statement."""
    return [
        store_module._Claim(pipeline_id, each, None, Actor(None, description))
        for description in ("a", "b")
    ]


def _bulk_insert(engine: Any, count: int, status: State) -> int:
    """Insert count tasks of pipeline p1 in status with one statement; return p1's id."""
    with engine.begin() as connection:
        pipeline_id = int(connection.scalar(text("SELECT id FROM pipeline WHERE name = 'p1'")))
        connection.execute(
            text(
                "INSERT INTO task (pipeline_id, task_input_id, task_input, status,"
                " create_time, update_time)"
                " SELECT :pipeline_id, md5(n::text) || md5((-n)::text), '{\"n\":' || n || '}',"
                " :status, now(), now() FROM generate_series(1, :count) AS n"
            ),
            {"pipeline_id": pipeline_id, "status": status.value, "count": count},
        )
    return pipeline_id


def test_claim_uses_the_partial_index_on_a_large_backlog(store: Store, pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        pipeline_id = _bulk_insert(engine, 100_000, State.DONE)
        store.register_tasks("p1", [{"n": n} for n in range(5)], SYSTEM)
        with engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE task")
            query = claim_candidates.compile(dialect=engine.dialect)
            params = query.params | {"in_pipeline_id": pipeline_id, "num_tasks": 10}
            plan = "\n".join(connection.exec_driver_sql(f"EXPLAIN {query}", params).scalars())
        # Both the unlocked preview and the locking read.
        assert plan.count("ix_task_pending") == 2, plan
        assert len(store.claim_tasks("p1", 10, None, SYSTEM)) == 5
    finally:
        engine.dispose()


def test_the_lease_check_of_a_claim_reads_the_lapsed_not_the_pipeline(
    store: Store, pg_url: str
) -> None:
    # Statistics taken before the pipeline filled (autovacuum had not run)
    # made the pipeline's index of every task look as cheap as the index of
    # leases: each claim then read every task of the pipeline.
    engine = make_engine(pg_url)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE task")
        pipeline_id = _bulk_insert(engine, 50_000, State.PENDING)
        statement = store_module._expire_with_events(True)
        params = store_module._event_params(datetime.now(UTC), None, None)
        with engine.connect() as connection:
            query = statement.compile(dialect=engine.dialect)
            arguments = query.params | params | {"in_pipeline_id": pipeline_id}
            plan = "\n".join(connection.exec_driver_sql(f"EXPLAIN {query}", arguments).scalars())
        assert "ix_task_lease_expire_time" in plan and "ix_task_pipeline_id_id" not in plan, plan
    finally:
        engine.dispose()


def test_claims_read_only_the_tasks_they_take_on_a_large_pending_backlog(
    store: Store, pg_url: str
) -> None:
    # With many tasks PENDING the planner cannot know how few a claim takes:
    # joined back to task, its candidates were planned as a hash join over
    # a scan of the whole table, 60 ms a claim at 50,000 PENDING.
    engine = make_engine(pg_url)
    try:
        pipeline_id = _bulk_insert(engine, 50_000, State.PENDING)
        one = store_module._claim_with_events()
        merged = store_module._claim_batch()
        now = datetime.now(UTC)
        claimers = _two_claimers(pipeline_id, 100)
        with engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE task")
            for statement, params in (
                (one, store_module._claim_params(now, pipeline_id, 100, None, SYSTEM)),
                (merged, store_module._claim_batch_params(now, pipeline_id, claimers)),
            ):
                query = statement.compile(dialect=engine.dialect)
                plan = "\n".join(
                    connection.exec_driver_sql(f"EXPLAIN {query}", query.params | params).scalars()
                )
                assert "Seq Scan on task" not in plan, plan
        assert len(store.claim_tasks("p1", 100, None, SYSTEM)) == 100
    finally:
        engine.dispose()


def test_updates_that_change_nothing_lock_nothing_a_claim_would_skip(
    store: Store, pg_url: str
) -> None:
    keys = [r.task.task_input_id for r in store.register_tasks("p1", [{"n": 0}, {"n": 1}], SYSTEM)]
    engine = make_engine(pg_url)
    try:
        with engine.connect() as held, held.begin():
            pipeline_id = held.scalar(text("SELECT id FROM pipeline WHERE name = 'p1'"))
            now = datetime.now(UTC)
            one = store_module._event_params(now, SYSTEM, None) | {
                "in_pipeline_id": pipeline_id,
                "in_claim_number": None,
            }
            # A no-op, a move the state table refuses and one naming a claim
            # never made, each alone, then together in one batch statement ...
            for key, status, claim_number in (
                (keys[0], State.PENDING, None),
                (keys[1], State.DONE, None),
                (keys[0], State.CANCELLED, 5),
            ):
                params = one | {"in_task_input_id": key, "in_claim_number": claim_number}
                assert held.execute(store_module._update_with_event(status), params).all() == []
            batch = {
                "now": now,
                "batch_pipeline_ids": [pipeline_id] * 3,
                "batch_task_input_ids": [keys[0], keys[1], keys[1]],
                "batch_statuses": ["PENDING", "DONE", "CANCELLED"],
                "batch_messages": [None] * 3,
                "batch_token_ids": [None] * 3,
                "batch_descriptions": ["system"] * 3,
                "batch_claim_numbers": [None, None, 5],
            }
            assert held.execute(store_module._update_batch(), batch).all() == []
            # ... and the look at why, in a transaction, as the thread path takes it.
            store._update_in(
                held, "p1", keys[0], State.PENDING, one | {"in_task_input_id": keys[0]}
            )
            with pytest.raises(FailedPrecondition):
                store._update_in(
                    held, "p1", keys[1], State.DONE, one | {"in_task_input_id": keys[1]}
                )
            # With all of that still uncommitted, a claim gets both tasks.
            claimed = store.claim_tasks("p1", 2, None, SYSTEM)
            assert [task.task_input_id for task in claimed] == keys
    finally:
        engine.dispose()


def test_a_claim_locks_only_what_its_answer_holds(store: Store, pg_url: str) -> None:
    large = "x" * (700 * 1024)  # an answer holds two of these
    registered = store.register_tasks("p1", [{"n": n, "blob": large} for n in range(9)], SYSTEM)
    keys = [r.task.task_input_id for r in registered]
    engine = make_engine(pg_url)
    try:
        with engine.connect() as held, held.begin():
            pipeline_id = held.scalar(text("SELECT id FROM pipeline WHERE name = 'p1'"))
            now = datetime.now(UTC)
            # One claim of 5, and two claimers of 3 together, uncommitted ...
            alone = store_module._claim_params(now, pipeline_id, 5, None, SYSTEM)
            taken = held.execute(store_module._claim_with_events(), alone).all()
            claimers = _two_claimers(pipeline_id, 3)
            together = store_module._claim_batch_params(now, pipeline_id, claimers)
            taken += held.execute(store_module._claim_batch(), together).all()
            assert [row.task_input_id for row in taken] == keys[:6]
            # ... leave the next two oldest to a claim beside them.
            claimed = store.claim_tasks("p1", 5, None, SYSTEM)
            assert [task.task_input_id for task in claimed] == keys[6:8]
    finally:
        engine.dispose()
