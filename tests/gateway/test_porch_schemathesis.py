"""Property-based: schemathesis generates requests from porch's served document.

A live porch (SQLite) behind its gateway, called with an admin token: no
request may produce a 5xx, and no response may contradict the document.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import schemathesis
from hypothesis import given
from schemathesis import GenerationMode

from tests.gateway.conftest import (
    SCHEMATHESIS_CHECKS as CHECKS,
)
from tests.gateway.conftest import (
    PorchHttp,
    schemathesis_settings,
    start_porch_http,
    stop_porch_http,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

EXCLUDED = [
    # Streams until the client goes away: schemathesis reads a whole body.
    "PorchService_WatchEvents",
    "PorchService_WatchEvents2",
]
EXAMPLES = 25


@pytest.fixture
async def porch_sqlite(sqlite_url: str) -> AsyncIterator[PorchHttp]:
    # In-process, as `porch serve` runs its gateway.
    running = await start_porch_http(sqlite_url, "in-process")
    yield running
    await stop_porch_http(running)


def check_every_operation(base_url: str, headers: dict[str, str]) -> int:
    """Run the checks on every operation; return how many operations ran."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json").exclude(
        operation_id=EXCLUDED
    )
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | (
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        )

        @given(case=strategy)
        @schemathesis_settings(EXAMPLES)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=10)

        check()
        ran += 1
    return ran


async def test_generated_requests_find_no_server_error_or_contradiction(
    porch_sqlite: PorchHttp,
) -> None:
    # Something to find: a pipeline with a task, which generated names rarely hit.
    wrapper = await porch_sqlite.pipeline("0")
    task = {"pipeline": {"name": "0"}, "task_input": {"id_run": 1, "ratio": 0.5}}
    await porch_sqlite.client.post("/tasks", json=task, headers=wrapper)
    ran = await asyncio.to_thread(check_every_operation, porch_sqlite.base_url, porch_sqlite.admin)
    assert ran > 20
