"""Lossless resume under concurrent writers: porch servers, writers and a
watcher in separate OS processes on one PostgreSQL database."""

from __future__ import annotations

import multiprocessing
import random
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import grpc
import pytest
from sqlalchemy import text

from porch_server import auth
from porch_server.cursors import make_cursor
from porch_server.models import SYSTEM, Pipeline, Role
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2 as pb
from porch_stubs.v1 import porch_pb2_grpc

from .conftest import server_processes

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TASKS_PER_PIPELINE = 300


def run_lifecycles(target: str, tokens: dict[str, str], seed: int) -> int:
    """Claim, run and finish tasks of both pipelines until none is left."""
    rng = random.Random(seed)
    finished = 0
    with grpc.insecure_channel(target) as channel:
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        pipelines = list(tokens)
        while pipelines:
            name = rng.choice(pipelines)
            metadata = [("authorization", f"Bearer {tokens[name]}")]
            claim = pb.ClaimTasksRequest(
                pipeline=pb.Pipeline(name=name), num_tasks=rng.randint(1, 5)
            )
            tasks = stub.ClaimTasks(claim, metadata=metadata, timeout=60).tasks
            if not tasks:
                pipelines.remove(name)
            for task in tasks:
                for status in (pb.Task.RUNNING, pb.Task.DONE):
                    update = pb.Task(
                        pipeline=task.pipeline, task_input_id=task.task_input_id, status=status
                    )
                    stub.UpdateTask(pb.UpdateTaskRequest(task=update), metadata=metadata)
                finished += 1
    return finished


@pytest.fixture
def servers(pg_url: str) -> Iterator[tuple[Store, list[str]]]:
    with server_processes(pg_url, 3) as started:
        yield started


def test_watcher_reconnecting_at_random_sees_every_event_once(
    servers: tuple[Store, list[str]],
) -> None:
    store, targets = servers
    tokens = {}
    for name in ("p", "q"):
        store.create_pipeline(Pipeline(name, "https://example.org", "1"))
        secret = auth.new_secret()
        store.create_token(Role.PIPELINE, name, f"{name} writer", auth.hash_secret(secret))
        tokens[name] = secret
    reader = auth.new_secret()
    store.create_token(Role.READER, None, "watcher", auth.hash_secret(reader))
    start = store.event_start_cursor()
    for name in tokens:
        store.register_tasks(name, [{"n": n} for n in range(TASKS_PER_PIPELINE)], SYSTEM)

    rng = random.Random(7)
    seen: list[pb.Event] = []
    last = start
    reconnects = 0
    metadata = [("authorization", f"Bearer {reader}")]
    context = multiprocessing.get_context("spawn")
    with (
        grpc.insecure_channel(targets[2]) as channel,
        ProcessPoolExecutor(8, mp_context=context) as pool,
    ):
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        writers = [pool.submit(run_lifecycles, targets[i % 2], tokens, i) for i in range(8)]
        expected_total = TASKS_PER_PIPELINE * 4  # CREATED, CLAIMED, RUNNING, DONE
        deadline = time.monotonic() + 120
        while len(seen) < expected_total and time.monotonic() < deadline:
            call = stub.WatchEvents(
                pb.WatchEventsRequest(pipeline_name="p", after=last), metadata=metadata
            )
            budget = rng.randint(1, 150)
            for event in call:
                last = event.cursor
                if event.kind != pb.Event.BOOKMARK:
                    seen.append(event)
                    budget -= 1
                if budget <= 0 or len(seen) >= expected_total:
                    break
            call.cancel()
            reconnects += 1
        assert sum(w.result() for w in writers) == 2 * TASKS_PER_PIPELINE

    with store.engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT e.xid, e.id FROM event e JOIN pipeline p ON p.id = e.pipeline_id "
                "WHERE p.name = 'p' ORDER BY e.xid, e.id"
            )
        ).all()
    expected = [make_cursor(xid, event_id) for xid, event_id in rows]
    assert len(expected) == expected_total
    assert [e.cursor for e in seen] == expected  # every event, once, in cursor order
    assert reconnects > 10
    history: dict[str, list[int]] = {}
    for event in seen:
        history.setdefault(event.task_input_id, []).append(event.kind)
    lifecycle = [
        pb.Event.CREATED,
        pb.Event.CLAIMED,
        pb.Event.STATUS_CHANGED,
        pb.Event.STATUS_CHANGED,
    ]
    assert all(kinds == lifecycle for kinds in history.values())
    assert len(history) == TASKS_PER_PIPELINE
