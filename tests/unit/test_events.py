"""The watch hub hands each stream only the events of its topic, and wakes it
for each batch, a tick, an overflow or the end."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest

from porch_server import errors
from porch_server.errors import Unavailable
from porch_server.events import EventHub, Subscription
from porch_server.models import Event, EventKind
from porch_server.states import State


def event(number: int, pipeline: str, message: str | None = None) -> Event:
    return Event(
        cursor=f"0.{number}",
        time=datetime.now(UTC),
        pipeline_name=pipeline,
        task_input_id=f"{number:064x}",
        kind=EventKind.CREATED,
        old_status=None,
        new_status=State.PENDING,
        token_id=None,
        token_description=None,
        message=message,
    )


@contextlib.asynccontextmanager
async def running_hub(
    read_events: Callable[[str, int], Awaitable[list[Event]]],
    **options: int,
) -> AsyncIterator[EventHub]:
    """A started hub reading with read_events from cursor 0.0, polling rarely."""

    async def start_cursor() -> str:
        return "0.0"

    hub = EventHub(read_events, start_cursor, poll_seconds=60, **options)
    hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


async def test_each_subscription_gets_its_topic_and_unfiltered_ones_get_all() -> None:
    written = [event(1, "p1"), event(2, "p2"), event(3, "p1")]

    async def read_events(after: str, limit: int) -> list[Event]:
        return [each for each in written if int(each.cursor[2:]) > int(after[2:])]

    async with running_hub(read_events) as hub:
        everything = await hub.subscribe()
        first = await hub.subscribe("p1")
        second = await hub.subscribe("p2")
        third = await hub.subscribe("p3")
        hub.wake()
        got_all = await asyncio.wait_for(everything.get(), 5)
        assert [each.cursor for _, each in got_all] == ["0.1", "0.2", "0.3"]
        # Each comes with its cursor's key, parsed once for every stream.
        assert [key for key, _ in got_all] == [(0, 1), (0, 2), (0, 3)]
        assert [each.cursor for _, each in await first.get()] == ["0.1", "0.3"]
        assert [each.cursor for _, each in await second.get()] == ["0.2"]
        # Nothing for p3: its stream stays asleep but can see how far the hub read.
        assert third.caught_up() and hub.position == "0.3"
        hub.unsubscribe(third)
        for subscription in (everything, first, second):
            hub.unsubscribe(subscription)
        assert hub.watchers == 0 and hub.position is None


async def test_a_subscription_wakes_for_events_ticks_overflow_and_close() -> None:
    live = [((0, n), event(n, "p1")) for n in range(1, 4)]

    subscription = Subscription(limit=2)
    waiting = asyncio.create_task(subscription.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    subscription.put(live[:1], 0)
    assert await asyncio.wait_for(waiting, 5) == live[:1]

    # What came while the stream was busy is there at once, a tick included.
    subscription.put(live[1:2], 0)
    assert await asyncio.wait_for(subscription.get(), 5) == live[1:2]
    subscription.tick()
    assert await asyncio.wait_for(subscription.get(), 5) == []
    asleep = asyncio.create_task(subscription.get())
    await asyncio.sleep(0.01)
    assert not asleep.done(), "a tick wakes the stream once, not for good"
    subscription.tick()
    assert await asyncio.wait_for(asleep, 5) == []

    # Past the bound the events are dropped and the stream told to replay.
    subscription.put(live, 0)
    assert subscription.overflowed and await asyncio.wait_for(subscription.get(), 5) == []
    subscription.resume()
    closing = asyncio.create_task(subscription.get())
    await asyncio.sleep(0)
    subscription.close()
    assert await asyncio.wait_for(closing, 5) == [] and subscription.closed


async def test_a_backlog_is_bounded_by_its_messages_too() -> None:
    subscription = Subscription(limit=10, message_chars=100)
    subscription.put([((0, 1), event(1, "p1"))], 60)
    subscription.put([((0, 2), event(2, "p1"))], 40)
    assert not subscription.overflowed
    assert len(await asyncio.wait_for(subscription.get(), 5)) == 2  # taken: room again
    subscription.put([((0, 3), event(3, "p1"))], 100)
    subscription.put([((0, 4), event(4, "p1"))], 1)
    assert subscription.overflowed and await asyncio.wait_for(subscription.get(), 5) == []


async def test_the_hub_counts_what_each_stream_is_handed() -> None:
    big = [event(n, "p1", message="m" * 3000) for n in range(1, 4)]

    async def read_events(after: str, limit: int) -> list[Event]:
        return big if after == "0.0" else []

    async with running_hub(read_events, backlog_message_chars=8000) as hub:  # two of three
        narrow = await hub.subscribe("p1")
        wide = await hub.subscribe()
        hub.wake()
        for subscription in (narrow, wide):
            await asyncio.wait_for(subscription.get(), 5)
            assert subscription.overflowed


async def test_a_cancelled_wait_leaves_the_subscription_usable() -> None:
    subscription = Subscription(limit=10)
    waiting = asyncio.create_task(subscription.get())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    subscription.put([((0, 1), event(1, "p1"))], 0)  # nobody waits: no error
    assert [key for key, _ in await asyncio.wait_for(subscription.get(), 5)] == [(0, 1)]


async def test_the_reader_goes_on_after_a_read_fails_unexpectedly() -> None:
    failures = ["cannot switch to state 12; another operation (2) is in progress"]

    async def read_events(after: str, limit: int) -> list[Event]:
        if failures:
            raise RuntimeError(failures.pop())
        return [event(1, "p1")] if after == "0.0" else []

    async with running_hub(read_events) as hub:
        stream = await hub.subscribe()
        hub.wake()  # the read fails ...
        await asyncio.sleep(0.05)
        hub.wake()  # ... and the next one delivers
        assert [each.cursor for _, each in await asyncio.wait_for(stream.get(), 5)] == ["0.1"]
        hub.unsubscribe(stream)


async def test_a_read_that_keeps_failing_is_logged_once_not_every_pass(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(errors, "_logged_at", {})  # what other tests logged is not in the way
    reads = 0

    async def read_events(after: str, limit: int) -> list[Event]:
        nonlocal reads
        reads += 1
        raise Unavailable("the database is unavailable", "connection refused")

    with caplog.at_level(logging.WARNING, logger="porch"):
        async with running_hub(read_events) as hub:
            stream = await hub.subscribe()
            for _ in range(20):  # as many polls as a database down for a while gives
                hub.wake()
                await asyncio.sleep(0.01)
            hub.unsubscribe(stream)
    assert reads >= 10
    failed = [r for r in caplog.records if "reading new events failed" in r.getMessage()]
    assert len(failed) == 1, failed


@contextlib.asynccontextmanager
async def held_back_hub(poll_seconds: float) -> AsyncIterator[EventHub]:
    """A started hub with one stream, on a database whose new events are all
    held back behind a transaction that stays open."""

    async def read_events(after: str, limit: int) -> list[Event]:
        return []

    async def start_cursor() -> str:
        return "0.0"

    async def has_unread(after: str) -> bool:
        return True

    hub = EventHub(read_events, start_cursor, poll_seconds=poll_seconds, has_unread=has_unread)
    hub.start()
    try:
        stream = await hub.subscribe()
        yield hub
        hub.unsubscribe(stream)
    finally:
        await hub.stop()


async def test_events_held_back_are_looked_for_less_often_the_longer_they_wait() -> None:
    # A transaction open for minutes (pg_dump, a report) holds back every
    # event committed after it began: the hub must not ask 100 times a second.
    async with held_back_hub(poll_seconds=0.5) as hub:
        hub.wake()
        await asyncio.sleep(0.5)
        soon = hub.reads  # 10 ms apart: porch's own transactions end soon
        await asyncio.sleep(2.0)
        # Held back past a second, then only every polling interval: about
        # 50 reads until 1 s and 3 after it, where every 10 ms would be 200.
        assert soon >= 20 and hub.reads - soon <= 80, (soon, hub.reads)


async def test_wake_ups_while_events_are_held_back_do_not_pile_up_rechecks() -> None:
    # Each read that finds events held back asks to look again soon: many
    # wake-ups (writes, notifications) must not leave a timer each, every
    # one of which would read again.
    async with held_back_hub(poll_seconds=60) as hub:
        for _ in range(200):
            hub.wake()
            await asyncio.sleep(0)
        await asyncio.sleep(0.3)
        woken_reads, rechecks = hub.reads, hub.rechecks
        # The wake-ups read at most once each; then one recheck is due at a
        # time, 10 ms apart: about 30 in 0.3 s, where a timer left by each
        # read would read hundreds of times.
        assert rechecks <= 45 and woken_reads <= 200 + 45, (woken_reads, rechecks)
        before = hub.reads
        await asyncio.sleep(0.3)
        assert hub.reads - before <= 45, hub.reads - before


def test_serialized_events_kept_for_streams_stay_within_their_bytes() -> None:
    from porch_server import service as service_module

    service = service_module.PorchService(None, None, None, 15.0)  # type: ignore[arg-type]
    heartbeat = "x" * 60_000  # a wrapper's RUNNING message may be 64 KiB
    events = [dataclasses.replace(event(number, "p"), message=heartbeat) for number in range(300)]
    encoded = [service._encoded(each) for each in events]
    kept = service._encoded_events
    assert sum(len(each) for each in kept.values()) == service._encoded_bytes
    assert service._encoded_bytes <= service_module.ENCODED_EVENT_BYTES_KEPT
    assert len(kept) == service_module.ENCODED_EVENT_BYTES_KEPT // len(encoded[-1])
    assert list(kept) == [each.cursor for each in events[-len(kept) :]]  # the newest
    assert service._encoded(events[-1]) is encoded[-1]  # served from what is kept


async def test_a_notify_that_keeps_failing_is_logged_now_and_then(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tries = 0

    async def read_events(after: str, limit: int) -> list[Event]:
        return []

    async def notify() -> None:
        nonlocal tries
        tries += 1
        raise Unavailable("the database is unavailable", "too many clients (notify test)")

    async with running_hub(read_events, notify=notify) as hub:
        for _ in range(5):
            hub.committed()
            await asyncio.sleep(0.05)
    assert tries == 5
    failed = [r for r in caplog.records if "notifying other servers failed" in r.getMessage()]
    assert len(failed) == 1, caplog.text
