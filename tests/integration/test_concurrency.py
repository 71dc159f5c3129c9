"""Exactly-once under real concurrency: porch servers and clients in separate OS
processes, all on one PostgreSQL database."""

from __future__ import annotations

import collections
import multiprocessing
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import grpc
import pytest

from porch_server import auth
from porch_server.models import SYSTEM, Pipeline, Role
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2 as pb
from porch_stubs.v1 import porch_pb2_grpc

from .conftest import server_processes

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def two_servers(pg_url: str) -> Iterator[tuple[Store, list[str]]]:
    with server_processes(pg_url, 2) as servers:
        yield servers


def setup_pipeline(store: Store) -> str:
    store.create_pipeline(Pipeline("p", "https://example.org/p", "1"))
    secret = auth.new_secret()
    store.create_token(Role.PIPELINE, "p", "claimer", auth.hash_secret(secret))
    return secret


def claim_until_empty(target: str, secret: str, batch: int) -> list[str]:
    """Claim batches from one server until none is left; return the ids claimed."""
    metadata = [("authorization", f"Bearer {secret}")]
    with grpc.insecure_channel(target) as channel:
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        claimed: list[str] = []
        request = pb.ClaimTasksRequest(pipeline=pb.Pipeline(name="p"), num_tasks=batch)
        while tasks := stub.ClaimTasks(request, metadata=metadata, timeout=60).tasks:
            claimed += [t.task_input_id for t in tasks]
        return claimed


def register_all(target: str, secret: str, seed: int) -> list[tuple[str, bool]]:
    """Register the same 1,000 inputs in a shuffled order, in batches and one by one."""
    metadata = [("authorization", f"Bearer {secret}")]
    order = list(range(1000))
    random.Random(seed).shuffle(order)
    results: list[tuple[str, bool]] = []
    with grpc.insecure_channel(target) as channel:
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        for start in range(0, 1000, 50):
            tasks = []
            for n in order[start : start + 50]:
                task = pb.Task()
                task.task_input.update({"n": n})
                tasks.append(task)
            if start % 100:
                request = pb.RegisterTasksRequest(pipeline_name="p", tasks=tasks)
                response = stub.RegisterTasks(request, metadata=metadata, timeout=60)
                results += [(r.task.task_input_id, r.created) for r in response.results]
            else:
                for task in tasks:
                    task.pipeline.name = "p"
                    one = stub.RegisterTask(pb.RegisterTaskRequest(task=task), metadata=metadata)
                    results.append((one.task.task_input_id, one.created))
    return results


def processes(count: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))


def test_16_claimers_on_two_servers_claim_each_task_once(
    two_servers: tuple[Store, list[str]],
) -> None:
    store, targets = two_servers
    secret = setup_pipeline(store)
    registered = store.register_tasks("p", [{"n": n} for n in range(10_000)], SYSTEM)
    every_id = {r.task.task_input_id for r in registered}
    with processes(16) as pool:
        futures = [
            pool.submit(claim_until_empty, targets[i % 2], secret, random.choice([1, 7, 25, 50]))
            for i in range(16)
        ]
        claimed = [task_id for future in futures for task_id in future.result()]
    counts = collections.Counter(claimed)
    assert [task_id for task_id, n in counts.items() if n > 1] == []
    assert set(claimed) == every_id and len(claimed) == 10_000


def test_16_registrars_create_each_task_once(two_servers: tuple[Store, list[str]]) -> None:
    store, targets = two_servers
    secret = setup_pipeline(store)
    with processes(16) as pool:
        futures = [pool.submit(register_all, targets[i % 2], secret, i) for i in range(16)]
        results = [result for future in futures for result in future.result()]
    assert len(results) == 16_000
    created = collections.Counter(task_id for task_id, was_created in results if was_created)
    assert len(created) == 1000 and set(created.values()) == {1}
    page = store.list_tasks("p", None, 10_000, "")
    assert len(page.items) == 1000 and not page.next_page_token
