"""The watch hub: one reader of new events per server, fanned out to every stream.

However many WatchEvents streams a server has, it reads new events from the
database once per wake-up and hands each batch to the streams that want it:
a stream following one pipeline gets only that pipeline's events, so a
server whose streams watch many pipelines wakes only the streams an event
concerns. Such a stream learns how far the hub has read when it sends a
keep-alive, so its cursor still moves past other pipelines' events.

A stream first replays what it missed from the database by itself, then
follows the hub; one whose backlog grows past a bound (of events, and of
their messages' characters) goes back to replaying, so a slow client costs
memory only up to that bound.

Wake-ups come from this server's own writes (``wake``), from PostgreSQL's
LISTEN/NOTIFY when a listener is attached, and from a periodic poll, which
alone is enough for correctness: notifications only make delivery faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

from porch_server.cursors import Key, cursor_key
from porch_server.errors import PorchError, due_in_log, first_line, warn_now_and_then
from porch_server.models import Event

log = logging.getLogger("porch.events")

READ_BATCH = 1000
# A stream's backlog of live events: at most this many, whose messages
# take at most this many characters, enough for one read of the largest
# messages (64 KiB): a read the hub hands to every stream must not send
# them all back to replaying, each on its own. The events are the hub's,
# shared by every stream that holds them.
BACKLOG_EVENTS = 10_000
BACKLOG_MESSAGE_CHARS = READ_BATCH * 64 * 1024
# Notifications to other servers are sent at most this often.
NOTIFY_DELAY_SECONDS = 0.02
# How soon to read again when committed events wait behind an older
# transaction. Once they have waited HELD_LONG_SECONDS (not porch's own
# transactions, then, but another program's that has written and stays
# open, which may hold them back for minutes), only every polling interval.
RECHECK_SECONDS = 0.01
HELD_LONG_SECONDS = 1.0
# How long to wait before listening again after the listening connection failed.
RELISTEN_SECONDS = 5.0

# An event the hub read, with its cursor's key: parsed once for every stream.
Live = tuple[Key, Event]


class Listening(Protocol):
    """A connection that receives other servers' notifications."""

    def fileno(self) -> int: ...
    def drain(self) -> int: ...
    def close(self) -> None: ...


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait until event is set or seconds pass.

    Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation
    that arrives as the event is set, and a task would then never stop.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


class Subscription:
    """The events the hub read since a stream subscribed, up to a bound (limit
    events, whose messages take message_chars characters): every event, or
    those of one pipeline (topic)."""

    def __init__(
        self, limit: int, topic: str | None = None, message_chars: int = BACKLOG_MESSAGE_CHARS
    ) -> None:
        self.topic = topic
        self._limit = limit
        self._message_chars = message_chars
        self._chars = 0  # of the messages of the events held
        self._events: deque[Live] = deque()
        # The stream waiting in get(), if it is: one future, not an
        # asyncio.Event, as this is woken once per delivery on every stream.
        self._waiter: asyncio.Future[None] | None = None
        self._ticked = False  # a tick came while the stream was not waiting
        self.overflowed = False
        self.closed = False

    def put(self, events: list[Live], message_chars: int) -> None:
        """Append events, whose messages take message_chars characters; past
        the bound, drop them all and mark the overflow."""
        if self.overflowed:
            return
        chars = self._chars + message_chars
        if len(self._events) + len(events) > self._limit or chars > self._message_chars:
            self._events.clear()
            self._chars = 0
            self.overflowed = True
        else:
            self._events.extend(events)
            self._chars = chars
        self._wake()

    def close(self) -> None:
        """End the stream: the server is shutting down."""
        self.closed = True
        self._wake()

    def resume(self) -> None:
        """Accept events again after a replay caught up."""
        self.overflowed = False

    def caught_up(self) -> bool:
        """True when every event the hub has handed over was taken."""
        return not self._events and not self.overflowed

    def tick(self) -> None:
        """Wake the stream with no events, so it can see whether a keep-alive is due."""
        self._ticked = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> list[Live]:
        """Return the events waiting, after waiting for some or for a tick."""
        if not (self._events or self.closed or self.overflowed or self._ticked):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._ticked = False
        events = list(self._events)
        self._events.clear()
        self._chars = 0
        return events


class EventHub:
    """Reads new events once per wake-up and fans them out to subscriptions."""

    def __init__(
        self,
        read_events: Callable[[str, int], Awaitable[list[Event]]],
        start_cursor: Callable[[], Awaitable[str]],
        poll_seconds: float,
        tick_seconds: float = 1.0,
        backlog_limit: int = BACKLOG_EVENTS,
        backlog_message_chars: int = BACKLOG_MESSAGE_CHARS,
        notify: Callable[[], Awaitable[None]] | None = None,
        listen: Callable[[], Listening] | None = None,
        has_unread: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._read_events = read_events
        self._start_cursor = start_cursor
        self._poll_seconds = poll_seconds
        self._tick_seconds = tick_seconds
        self._backlog_limit = backlog_limit
        self._backlog_message_chars = backlog_message_chars
        self._notify = notify
        self._notify_timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self._listen = listen
        self._has_unread = has_unread
        self._listener: Listening | None = None
        self._listener_fd = -1
        # Every subscription, by topic; None holds the streams that want every event.
        self._topics: dict[str | None, set[Subscription]] = {}
        self._cursor: str | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # When the events now held back were first seen to be.
        self._held_since: float | None = None
        # Reads of new events, and of those the reads that looked again for
        # events held back behind an open transaction.
        self.reads = 0
        self.rechecks = 0
        # The one recheck due, if any: reads while events are held back
        # must not pile up timers, each of which would read again.
        self._recheck_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start reading, and listening when the database can notify."""
        self._tasks.append(asyncio.create_task(self._run(), name="porch-event-hub"))
        self._tasks.append(asyncio.create_task(self._tick(), name="porch-event-tick"))
        if self._listen is not None:
            self._tasks.append(asyncio.create_task(self._keep_listening(), name="porch-listen"))

    @property
    def stopped(self) -> bool:
        """True once stop() began: the server is shutting down."""
        return self._stopped

    async def stop(self) -> None:
        """End every subscription, then reading and listening."""
        self._stopped = True
        if self._notify_timer is not None:
            self._notify_timer.cancel()
        if self._recheck_timer is not None:
            self._recheck_timer.cancel()
        for subscription in self._all():
            subscription.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._stop_listening()

    def wake(self) -> None:
        """Read new events now."""
        self._wake.set()

    def committed(self) -> None:
        """This server committed events: wake here (if anyone watches), and soon
        every other server too."""
        if self._cursor is not None:
            self._wake.set()
        if self._notify is not None and self._notify_timer is None and not self._stopped:
            loop = asyncio.get_running_loop()
            self._notify_timer = loop.call_later(NOTIFY_DELAY_SECONDS, self._send_notify)

    def _send_notify(self) -> None:
        async def send() -> None:
            assert self._notify is not None
            try:
                await self._notify()
            except PorchError as error:
                warn_now_and_then(log, f"notifying other servers failed: {first_line(error)}")
            finally:
                self._notify_timer = None

        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.create_task(send()))

    async def _keep_listening(self) -> None:
        """Hold a listening connection; after a failure, poll until it is back."""
        assert self._listen is not None
        loop = asyncio.get_running_loop()
        while True:
            if self._listener is None:
                try:
                    self._listener = await loop.run_in_executor(None, self._listen)
                    self._listener_fd = self._listener.fileno()
                    loop.add_reader(self._listener_fd, self._on_notification)
                    self.wake()  # anything sent while not listening
                except Exception as error:  # the driver's own errors; polling goes on
                    said = f"cannot listen for events, polling instead: {first_line(error)}"
                    warn_now_and_then(log, said)
            await asyncio.sleep(RELISTEN_SECONDS)

    def _on_notification(self) -> None:
        assert self._listener is not None
        try:
            if self._listener.drain():
                self.wake()
        except Exception as error:  # a lost connection; _keep_listening reconnects
            warn_now_and_then(log, f"lost the listening connection: {first_line(error)}")
            self._stop_listening()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._listener_fd)
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None

    @property
    def watchers(self) -> int:
        """How many streams follow the hub."""
        return sum(len(followers) for followers in self._topics.values())

    @property
    def position(self) -> str | None:
        """The cursor of the last event read and handed out; None while no one follows."""
        return self._cursor

    async def subscribe(self, topic: str | None = None) -> Subscription:
        """Follow the hub; events it reads from now on reach the subscription:
        all of them, or only those of the pipeline named topic."""
        if self._cursor is None:
            # Reading must start no later than the new stream's replay ends.
            self._cursor = await self._start_cursor()
        subscription = Subscription(self._backlog_limit, topic, self._backlog_message_chars)
        self._topics.setdefault(topic, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop following the hub; with no one left, stop reading."""
        followers = self._topics.get(subscription.topic)
        if followers is not None:
            followers.discard(subscription)
            if not followers:
                del self._topics[subscription.topic]
        if not self._topics:
            self._cursor = None

    async def _tick(self) -> None:
        """Wake every stream now and then: one timer for all, not one per stream."""
        while True:
            await asyncio.sleep(self._tick_seconds)
            for subscription in self._all():
                subscription.tick()

    async def _run(self) -> None:
        while True:
            await _wait(self._wake, self._poll_seconds)
            self._wake.clear()
            if self._cursor is None:
                continue
            try:
                await self._read_new()
            except PorchError as error:
                warn_now_and_then(log, f"reading new events failed: {first_line(error)}")
            except Exception as error:
                # Whatever it was, the reader must go on: every stream of
                # this server waits on it. The next pass reads again.
                if due_in_log(f"reading new events failed: {error!r}"):
                    log.exception("reading new events failed")

    def _all(self) -> Iterator[Subscription]:
        for followers in self._topics.values():
            yield from followers

    def _hand_out(self, events: list[Event]) -> None:
        """Give each subscription the events of its topic."""
        live = [(cursor_key(event.cursor), event) for event in events]
        for subscription in self._topics.get(None, ()):
            subscription.put(live, _message_chars(live))
        if all(topic is None for topic in self._topics):
            return  # no stream follows a single pipeline
        by_topic: dict[str, list[Live]] = {}
        for item in live:
            by_topic.setdefault(item[1].pipeline_name, []).append(item)
        for topic, batch in by_topic.items():
            chars = _message_chars(batch)
            for subscription in self._topics.get(topic, ()):
                subscription.put(batch, chars)

    def _recheck_by(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        """Read again by due: one timer, moved earlier when need be."""
        timer = self._recheck_timer
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._recheck_timer = loop.call_at(due, self._recheck)

    def _recheck(self) -> None:
        self._recheck_timer = None
        self.rechecks += 1
        self._wake.set()

    async def _read_new(self) -> None:
        while self._cursor is not None:
            cursor = self._cursor
            events = await self._read_events(cursor, READ_BATCH)
            self.reads += 1
            if self._cursor != cursor:  # everyone left (and maybe came back) meanwhile
                return
            if events:
                self._cursor = events[-1].cursor
                self._hand_out(events)
            if len(events) < READ_BATCH:
                if self._has_unread is not None and await self._has_unread(self._cursor):
                    # Their notification has come and gone: look again soon.
                    loop = asyncio.get_running_loop()
                    now = loop.time()
                    if events or self._held_since is None:
                        self._held_since = now
                    delay = RECHECK_SECONDS
                    if now - self._held_since >= HELD_LONG_SECONDS:
                        delay = max(self._poll_seconds, RECHECK_SECONDS)
                    self._recheck_by(loop, now + delay)
                else:
                    self._held_since = None
                return


def _message_chars(events: list[Live]) -> int:
    return sum(len(event.message) for _, event in events if event.message)


async def follow(
    hub: EventHub,
    after: str,
    start_cursor: Callable[[], Awaitable[str]],
    replay: Callable[[str], Awaitable[list[Event]]],
    matches: Callable[[Event, Key], bool],
    bookmark: Callable[[str], Any],
    keepalive_seconds: float,
    topic: str | None = None,
) -> AsyncIterator[Any]:
    """Yield every matching event after the cursor `after` (or from now when it
    is empty), then new ones as the hub reads them.

    A bookmark(cursor) comes first, so a client has a cursor to resume from
    at once, and again whenever nothing matched for keepalive_seconds (give
    the hub a tick no longer than that). With a topic (a pipeline name) only
    that pipeline's events reach the stream live, and `matches` must accept
    no event of another pipeline. `matches` is given each event's cursor key.
    """
    subscription = await hub.subscribe(topic)
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    try:
        # Subscribed first: the hub reads from no later than this start.
        last = after or await start_cursor()
        yield bookmark(last)
        while not subscription.closed:
            # Accept live events before replaying, so none falls between the two.
            subscription.resume()
            while events := await replay(last):
                for event in events:
                    last = event.cursor
                    if matches(event, cursor_key(last)):
                        quiet_since = loop.time()
                        yield event
            last_key = cursor_key(last)
            while not (subscription.overflowed or subscription.closed):
                live = await subscription.get()
                now = loop.time()
                for key, event in live:
                    if key <= last_key:
                        continue
                    last, last_key = event.cursor, key
                    if matches(event, key):
                        quiet_since = now
                        yield event
                if now - quiet_since >= keepalive_seconds and not subscription.closed:
                    quiet_since = now
                    position = hub.position
                    # Everything the hub read up to its position was handed
                    # over and taken: no matching event lies before it.
                    if subscription.caught_up() and position is not None:
                        key = cursor_key(position)
                        if key > last_key:
                            last, last_key = position, key
                    yield bookmark(last)
    finally:
        hub.unsubscribe(subscription)
