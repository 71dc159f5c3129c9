"""Commit coalescing: concurrent requests share one statement and one commit.

A `Coalescer` runs the first request at once. Requests that arrive while a
batch is in flight wait and then go together in the next one, so under
load many changes share a round trip and a commit, and an idle server adds
no delay at all. Each caller gets its own result; a batch that fails fails
each of its callers with the same error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from porch_server.errors import Unavailable

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """Runs items in batches through run(items) -> one result per item, in order."""

    def __init__(
        self, run: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]], max_batch: int = 100
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._draining = False
        # What the batches did, for benchmarks: items per batch = items / batches.
        self.batches = 0
        self.items = 0

    async def submit(self, item: Item) -> Result:
        """Run item in the next batch and return its result."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                self.batches += 1
                self.items += len(batch)
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as error:
                    _fail(batch, error)
                    continue
                except BaseException:
                    _fail(batch, Unavailable("the server is stopping"))
                    raise
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._draining = False
            waiting, self._waiting = self._waiting, []
            _fail(waiting, Unavailable("the server is stopping"))


def _fail(batch: Sequence[tuple[object, asyncio.Future[Result]]], error: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
