"""Commit coalescing: requests that arrive while a batch runs share the next."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest

from porch_server.coalesce import Coalescer


def echoing() -> tuple[list[list[int]], Callable[[Sequence[int]], Awaitable[list[int]]]]:
    """A batch runner that answers each item with itself, and the batches it ran."""
    seen: list[list[int]] = []

    async def run(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        return list(items)

    return seen, run


def first_held() -> tuple[
    list[list[int]], asyncio.Event, Callable[[Sequence[int]], Awaitable[list[int]]]
]:
    """A batch runner that answers each item with ten times itself and holds
    its first batch until the event is set, and the batches it ran."""
    release = asyncio.Event()
    seen: list[list[int]] = []

    async def run(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        if len(seen) == 1:
            await release.wait()
        return [item * 10 for item in items]

    return seen, release, run


async def test_requests_arriving_during_a_batch_share_the_next_one() -> None:
    seen, release, run = first_held()
    coalescer: Coalescer[int, int] = Coalescer(run, gather_passes=0)
    first = asyncio.create_task(coalescer.submit(1))
    await asyncio.sleep(0)  # the first batch starts, with the first request alone
    await asyncio.sleep(0)
    later = [asyncio.create_task(coalescer.submit(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    release.set()
    assert await first == 10
    assert [await task for task in later] == [20, 30, 40]
    assert seen == [[1], [2, 3, 4]]
    assert (coalescer.items, coalescer.batches) == (4, 2)


async def test_requests_a_few_loop_passes_behind_the_first_join_its_batch() -> None:
    seen, run = echoing()

    coalescer: Coalescer[int, int] = Coalescer(run, gather_passes=4)

    async def submit_after(passes: int, item: int) -> int:
        for _ in range(passes):
            await asyncio.sleep(0)
        return await coalescer.submit(item)

    # 1 starts the batch; 2 and 3 arrive within its four passes, 4 long after.
    results = await asyncio.gather(
        submit_after(0, 1), submit_after(2, 2), submit_after(3, 3), submit_after(20, 4)
    )
    assert list(results) == [1, 2, 3, 4]
    assert seen == [[1, 2, 3], [4]]


@pytest.mark.parametrize(
    ("gather_between", "batches"), [(True, [[1], [2, 3]]), (False, [[1], [2], [3]])]
)
async def test_without_gathering_between_batches_the_next_is_cut_at_once(
    gather_between: bool, batches: list[list[int]]
) -> None:
    seen, release, run = first_held()
    coalescer: Coalescer[int, int] = Coalescer(run, gather_passes=6, gather_between=gather_between)
    first = asyncio.create_task(coalescer.submit(1))
    for _ in range(10):  # the first batch is cut after its six passes
        await asyncio.sleep(0)
    second = asyncio.create_task(coalescer.submit(2))  # waits while the first runs
    await asyncio.sleep(0)
    release.set()
    await asyncio.sleep(0)
    # One pass after the first batch ended: too late, unless the next gathers.
    third = asyncio.create_task(coalescer.submit(3))
    assert [await first, await second, await third] == [10, 20, 30]
    assert seen == batches


async def test_a_full_batch_is_cut_without_waiting_for_more() -> None:
    seen, run = echoing()

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=2, gather_passes=1000)
    submitted = [asyncio.create_task(coalescer.submit(n)) for n in (1, 2)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert seen == [[1, 2]]
    assert [await task for task in submitted] == [1, 2]


async def test_a_busy_loop_cuts_the_batch_after_the_time_bound() -> None:
    seen, run = echoing()

    loop = asyncio.get_running_loop()
    pending: list[asyncio.Handle] = []

    def other_work() -> None:
        time.sleep(0.002)  # holds the loop: every pass takes 2 ms
        pending[:] = [loop.call_soon(other_work)]

    other_work()
    coalescer: Coalescer[int, int] = Coalescer(run, gather_passes=1000, gather_seconds=0.01)
    try:
        # 1,000 passes would take 2 s; the bound cuts the batch after about 10 ms.
        assert await asyncio.wait_for(coalescer.submit(1), timeout=0.5) == 1
    finally:
        pending[0].cancel()
    assert seen == [[1]]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_runs() -> None:
    async def run(items: Sequence[int]) -> list[int]:
        if 0 in items:
            raise ValueError("bad batch")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=2)
    results = await asyncio.gather(
        *(coalescer.submit(n) for n in (0, 1, 2, 3)), return_exceptions=True
    )
    assert [str(r) if isinstance(r, Exception) else r for r in results] == [
        "bad batch",
        "bad batch",
        2,
        3,
    ]
    assert await coalescer.submit(5) == 5


async def test_a_cancelled_batch_leaves_no_caller_waiting() -> None:
    started = asyncio.Event()

    async def run(items: Sequence[int]) -> list[int]:
        started.set()
        await asyncio.sleep(60)
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(run)
    calls = [asyncio.create_task(coalescer.submit(n)) for n in range(3)]
    await started.wait()
    for task in asyncio.all_tasks():
        if task.get_coro().__qualname__.startswith("Coalescer._drain"):  # type: ignore[union-attr]
            task.cancel()
    for call in calls:
        with pytest.raises(Exception, match="stopping"):
            await asyncio.wait_for(call, 5)


async def test_a_caller_cancelled_before_its_batch_is_cut_is_left_out() -> None:
    seen, run = echoing()

    coalescer: Coalescer[int, int] = Coalescer(run, gather_passes=4)
    kept = asyncio.create_task(coalescer.submit(1))
    gone = asyncio.create_task(coalescer.submit(2))
    await asyncio.sleep(0)  # both wait in the batch being gathered
    gone.cancel()
    assert await kept == 1
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert seen == [[1]]
    assert (coalescer.items, coalescer.batches) == (1, 1)
    # A batch of callers who all left runs nothing.
    alone = asyncio.create_task(coalescer.submit(3))
    await asyncio.sleep(0)
    alone.cancel()
    await asyncio.sleep(0.01)
    assert seen == [[1]]
