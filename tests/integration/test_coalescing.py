"""Calls that arrive together share a commit, and each still gets its own answer
(on SQLite and PostgreSQL, through the gRPC service and in the store)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from porch_server.db.engine import make_engine
from porch_server.errors import FailedPrecondition, NotFound
from porch_server.models import SYSTEM, Pipeline, Registration, Task
from porch_server.states import State
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2 as pb

from .conftest import Porch

State_ = pb.Task.State


@pytest.fixture
async def sqlite_store(sqlite_url: str) -> AsyncIterator[Store]:
    """A SQLite store that coalesces on a thread pool, as a server sets it up."""
    store = Store(make_engine(sqlite_url))
    with ThreadPoolExecutor(4) as executor:
        store.use_async(None, executor)
        yield store
    store.close()


async def test_store_applies_a_batch_of_changes_each_with_its_own_answer(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    store.create_pipeline(Pipeline(name="p1", uri="https://example.org/p", version="1"))
    tasks = [r.task for r in store.register_tasks("p1", [{"i": i} for i in range(4)], SYSTEM)]
    store.claim_tasks("p1", 2, None, SYSTEM)
    key = [task.task_input_id for task in tasks]
    changes = [
        ("p1", key[0], State.RUNNING, "go"),
        ("p1", key[2], State.DONE, "refused"),  # PENDING -> DONE
        ("p1", key[0], State.DONE, "then done"),  # the same task again
        ("p1", "0" * 64, State.RUNNING, None),
        ("nope", key[1], State.RUNNING, None),
        ("p1", key[3], State.PENDING, None),  # a no-op
    ]
    results = await asyncio.gather(
        *(store.update_task_async(*change, SYSTEM) for change in changes),
        return_exceptions=True,
    )
    assert store.coalesced == (6, 1)  # one write transaction for all
    assert isinstance(results[0], Task) and results[0].status is State.RUNNING
    assert isinstance(results[1], FailedPrecondition)
    assert isinstance(results[2], Task) and results[2].status is State.DONE
    assert isinstance(results[3], NotFound) and isinstance(results[4], NotFound)
    assert isinstance(results[5], Task) and results[5].status is State.PENDING
    assert store.get_task("p1", key[2]).status is State.PENDING
    messages = [e.message for e in store.list_task_events("p1", key[0], 10, "").items]
    assert messages == [None, None, "go", "then done"]
    assert len(store.list_task_events("p1", key[2], 10, "").items) == 1


async def test_a_stale_claim_in_a_batch_fails_only_its_own_change(sqlite_store: Store) -> None:
    store = sqlite_store
    store.create_pipeline(Pipeline(name="p1", uri="https://example.org/p", version="1"))
    store.register_tasks("p1", [{"i": i} for i in range(2)], SYSTEM)
    first, second = (task.task_input_id for task in store.claim_tasks("p1", 2, None, SYSTEM))
    store.update_task("p1", second, State.PENDING, None, SYSTEM)
    assert store.claim_tasks("p1", 1, None, SYSTEM)[0].claim_number == 2
    results = await asyncio.gather(
        store.update_task_async("p1", first, State.DONE, None, SYSTEM, 1),
        store.update_task_async("p1", second, State.DONE, None, SYSTEM, 1),
        return_exceptions=True,
    )
    assert store.coalesced == (2, 1)
    assert isinstance(results[0], Task) and results[0].status is State.DONE
    assert isinstance(results[1], FailedPrecondition) and "since claim 1" in str(results[1])
    assert store.get_task("p1", second).status is State.CLAIMED


async def test_store_registers_single_inputs_of_several_pipelines_together(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    for name in ("p1", "p2"):
        store.create_pipeline(Pipeline(name=name, uri="https://example.org/p", version="1"))
    one = '{"i":1}'
    inputs = [("p1", one), ("p2", one), ("nope", "{}"), ("p1", one)]
    results = await asyncio.gather(
        *(store.register_canonical_async(name, text, SYSTEM) for name, text in inputs),
        return_exceptions=True,
    )
    first, second, missing, repeat = results
    assert isinstance(first, Registration) and first.created
    assert isinstance(second, Registration) and second.created
    assert second.task.pipeline.name == "p2"
    assert isinstance(missing, NotFound)
    assert isinstance(repeat, Registration) and not repeat.created
    assert repeat.task == first.task


def test_wrappers_of_several_pipelines_register_together(porch: Porch) -> None:
    names = ["p1", "p2", "p3", "p4"]
    wrappers = {name: porch.stub(porch.pipeline(name)) for name in names}

    def register(n: int) -> tuple[str, Any]:
        name = names[n % 4]
        task = pb.Task(pipeline=pb.Pipeline(name=name))
        task.task_input.update({"n": n // 4 % 5})  # every input twice in every pipeline
        return name, wrappers[name].RegisterTask(pb.RegisterTaskRequest(task=task))

    with ThreadPoolExecutor(16) as pool:
        registered = list(pool.map(register, range(40)))

    store = porch.server.store
    for name in names:
        answers = [response for pipeline, response in registered if pipeline == name]
        assert {response.task.pipeline.name for response in answers} == {name}
        assert sum(response.created for response in answers) == 5
        keys = {response.task.task_input_id for response in answers}
        assert len(keys) == 5
        for key in keys:
            events = store.list_task_events(name, key, 10, "").items
            assert [(e.kind.value, e.token_description) for e in events] == [
                ("CREATED", f"{name} wrapper")
            ]
    # The same inputs in every pipeline: four tasks for each.
    listed = porch.stub(porch.admin).ListTasks(pb.ListTasksRequest(page_size=100)).tasks
    assert len(listed) == 20
    assert len({task.task_input_id for task in listed}) == 5


def test_concurrent_calls_each_get_their_own_answer(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    registered = []
    with ThreadPoolExecutor(16) as pool:

        def register(n: int) -> Any:
            task = pb.Task(pipeline=pb.Pipeline(name="p1"))
            task.task_input.update({"n": n % 30})  # 10 repeats among 40 calls
            return wrapper.RegisterTask(pb.RegisterTaskRequest(task=task))

        registered = list(pool.map(register, range(40)))
        assert sum(response.created for response in registered) == 30
        claimed = wrapper.ClaimTasks(
            pb.ClaimTasksRequest(pipeline=pb.Pipeline(name="p1"), num_tasks=20)
        ).tasks
        pending = {r.task.task_input_id for r in registered} - {t.task_input_id for t in claimed}

        def update(task_input_id: str, status: int) -> Any:
            given = pb.Task(
                pipeline=pb.Pipeline(name="p1"), task_input_id=task_input_id, status=status
            )
            try:
                return wrapper.UpdateTask(pb.UpdateTaskRequest(task=given, message="m"))
            except grpc.RpcError as error:
                return error.code()

        changes = [(task.task_input_id, State_.RUNNING) for task in claimed]
        changes += [(key, State_.DONE) for key in sorted(pending)[:5]]  # refused
        results = list(pool.map(lambda change: update(*change), changes))
    assert [r.status for r in results[:20]] == [State_.RUNNING] * 20
    assert results[20:] == [grpc.StatusCode.FAILED_PRECONDITION] * 5
    listed = wrapper.ListTasks(pb.ListTasksRequest(pipeline_name="p1", page_size=100)).tasks
    assert sorted(State_.Name(t.status) for t in listed) == ["PENDING"] * 10 + ["RUNNING"] * 20
