"""The watch hub hands each stream only the events of its topic."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from porch_server.events import EventHub
from porch_server.models import Event, EventKind
from porch_server.states import State


def event(number: int, pipeline: str) -> Event:
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
        message=None,
    )


async def test_each_subscription_gets_its_topic_and_unfiltered_ones_get_all() -> None:
    written = [event(1, "p1"), event(2, "p2"), event(3, "p1")]

    async def read_events(after: str, limit: int) -> list[Event]:
        return [each for each in written if int(each.cursor[2:]) > int(after[2:])]

    async def start_cursor() -> str:
        return "0.0"

    hub = EventHub(read_events, start_cursor, poll_seconds=60)
    hub.start()
    try:
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
    finally:
        await hub.stop()
