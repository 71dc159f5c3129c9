"""WatchEvents through a real gRPC server: replay, live delivery, cursors,
filters, pruning, shutdown and cancellation, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg2
import pytest
from sqlalchemy.engine import make_url

from porch_server import auth, service
from porch_server.cursors import cursor_key
from porch_server.models import Role
from porch_stubs.v1 import porch_pb2 as pb

from .conftest import Client, Porch, start_porch

State = pb.Task.State


class Watcher:
    """Reads a WatchEvents stream in a thread; events (not bookmarks) land in a queue."""

    def __init__(self, client: Client, pipeline: str = "", after: str = "") -> None:
        request = pb.WatchEventsRequest(pipeline_name=pipeline, after=after)
        self.call: Any = client.WatchEvents(request)
        self.events: queue.Queue[pb.Event] = queue.Queue()
        self.bookmarks: list[pb.Event] = []
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                if event.kind == pb.Event.BOOKMARK:
                    self.bookmarks.append(event)
                else:
                    self.events.put(event)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()

    def take(self, count: int, seconds: float = 10) -> list[pb.Event]:
        deadline = time.monotonic() + seconds
        taken = []
        while len(taken) < count:
            taken.append(self.events.get(timeout=max(0.01, deadline - time.monotonic())))
        return taken

    def quiet(self, seconds: float = 0.7) -> bool:
        """True when no event arrives within seconds."""
        try:
            self.events.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def wait_for_bookmark(self, seconds: float = 10) -> pb.Event:
        deadline = time.monotonic() + seconds
        while not self.bookmarks:
            assert time.monotonic() < deadline, "no bookmark arrived"
            time.sleep(0.01)
        return self.bookmarks[0]

    def close(self) -> None:
        self.call.cancel()
        self.ended.wait(10)


def register(client: Client, pipeline: str, **task_input: Any) -> pb.Task:
    task = pb.Task(pipeline=pb.Pipeline(name=pipeline))
    task.task_input.update(task_input)
    return client.RegisterTask(pb.RegisterTaskRequest(task=task)).task


def set_status(client: Client, task: pb.Task, status: int, message: str = "") -> None:
    update = pb.Task(pipeline=task.pipeline, task_input_id=task.task_input_id, status=status)
    client.UpdateTask(pb.UpdateTaskRequest(task=update, message=message))


@pytest.fixture
def fast_porch(db_url: str) -> Any:
    porch = start_porch(db_url, watch_poll_seconds=0.2, watch_keepalive_seconds=0.5)
    yield porch
    porch.stop()


def test_from_now_sees_only_new_events(fast_porch: Porch) -> None:
    wrapper = fast_porch.stub(fast_porch.pipeline("p1"))
    old = register(wrapper, "p1", n=0)
    watcher = Watcher(fast_porch.stub(fast_porch.admin))
    watcher.wait_for_bookmark()
    task = register(wrapper, "p1", n=1)
    arrived = watcher.take(1)
    while arrived[-1].task_input_id != task.task_input_id:
        arrived += watcher.take(1)
    *before, created = arrived
    if fast_porch.server.store.engine.dialect.name == "sqlite":
        assert before == []
    else:
        # A stream from now starts where every stream has got to: below the
        # oldest write open on the server, another test's say, which may have
        # begun before n=0 was registered.
        assert [e.task_input_id for e in before] in ([], [old.task_input_id])
    assert created.kind == pb.Event.CREATED and created.task_input_id == task.task_input_id
    assert created.new_status == State.PENDING and created.token_description == "p1 wrapper"
    watcher.close()


def test_replay_then_live_each_once_in_order(fast_porch: Porch) -> None:
    wrapper = fast_porch.stub(fast_porch.pipeline("p1"))
    task = register(wrapper, "p1", n=0)
    wrapper.ClaimTasks(pb.ClaimTasksRequest(pipeline=pb.Pipeline(name="p1")))
    first = Watcher(fast_porch.stub(fast_porch.admin), after="0.0")
    created, claimed = first.take(2)
    assert [created.kind, claimed.kind] == [pb.Event.CREATED, pb.Event.CLAIMED]
    set_status(wrapper, task, State.RUNNING, "started")
    [running] = first.take(1)
    assert running.message == "started"
    first.close()
    # resume after the second event: exactly the third, then live ones
    second = Watcher(fast_porch.stub(fast_porch.admin), after=claimed.cursor)
    [again] = second.take(1)
    assert again.cursor == running.cursor
    set_status(wrapper, task, State.DONE, "finished")
    [done] = second.take(1)
    assert done.new_status == State.DONE and cursor_key(done.cursor) > cursor_key(again.cursor)
    assert second.quiet()
    second.close()


def test_filter_by_pipeline_and_bookmarks_advance(fast_porch: Porch) -> None:
    one = fast_porch.stub(fast_porch.pipeline("p1"))
    two = fast_porch.stub(fast_porch.pipeline("p2"))
    watcher = Watcher(fast_porch.stub(fast_porch.admin), pipeline="p2")
    watcher.wait_for_bookmark()
    for n in range(3):
        register(one, "p1", n=n)
    register(two, "p2", n=0)
    [only] = watcher.take(1)
    assert only.pipeline_name == "p2"
    for n in range(3, 6):
        register(one, "p1", n=n)
    # the keep-alive bookmark moves past the filtered events
    time.sleep(1.2)
    newest = max(cursor_key(b.cursor) for b in watcher.bookmarks)
    assert newest > cursor_key(only.cursor)
    assert watcher.quiet(0.1)
    watcher.close()


def test_watch_errors(fast_porch: Porch) -> None:
    admin = fast_porch.stub(fast_porch.admin)
    for request, code in (
        (pb.WatchEventsRequest(pipeline_name="nope"), grpc.StatusCode.NOT_FOUND),
        (pb.WatchEventsRequest(after="garbage"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.WatchEventsRequest(after="0.9223372036854775808"), grpc.StatusCode.INVALID_ARGUMENT),
        # Ahead of every event: a stream after it would miss the next ones.
        (pb.WatchEventsRequest(after="0.99999999"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.WatchEventsRequest(after="9223372036854775807.0"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            next(iter(admin.WatchEvents(request)))
        assert raised.value.code() == code  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as raised:
        next(iter(fast_porch.stub().WatchEvents(pb.WatchEventsRequest())))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_every_cursor_a_stream_hands_out_resumes(fast_porch: Porch) -> None:
    # On an idle PostgreSQL server the first bookmark's cursor names the
    # next transaction to begin, which has written nothing yet.
    admin = fast_porch.stub(fast_porch.admin)
    wrapper = fast_porch.stub(fast_porch.pipeline("p1"))
    watcher = Watcher(admin)
    first = watcher.wait_for_bookmark()
    register(wrapper, "p1", n=1)
    [created] = watcher.take(1)
    time.sleep(1.2)  # a keep-alive bookmark after the event
    watcher.close()
    cursors = (first.cursor, created.cursor, watcher.bookmarks[-1].cursor)
    for number, cursor in enumerate(cursors, start=2):
        resumed = Watcher(admin, after=cursor)
        assert not resumed.ended.wait(0.3), resumed.error
        task = register(wrapper, "p1", n=number)
        arrived: list[pb.Event] = []
        while task.task_input_id not in {event.task_input_id for event in arrived}:
            arrived += resumed.take(1)
        resumed.close()


@pytest.mark.postgres
def test_a_stream_from_now_resumed_at_any_of_its_cursors_goes_on_as_it_would_have(
    pg_url: str,
) -> None:
    # Transaction `held` took its id before the stream started and ends
    # after it; the registration of n=0 began after `held` and committed
    # before the stream started. The stream starts where every stream has
    # got to, below `held`: with n=0. Resumed at any cursor it handed out,
    # a stream brings what the first one went on to bring, nothing else.
    porch = start_porch(pg_url, watch_poll_seconds=0.2, watch_keepalive_seconds=0.5)
    held = psycopg2.connect(
        make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        admin = porch.stub(porch.admin)
        wrapper = porch.stub(porch.pipeline("p1"))
        held.cursor().execute("SELECT pg_current_xact_id()")
        registered = [register(wrapper, "p1", n=0)]
        watcher = Watcher(admin)
        start = watcher.wait_for_bookmark()
        held.rollback()
        registered.append(register(wrapper, "p1", n=1))
        streamed = watcher.take(2)
        watcher.close()
        ids = [t.task_input_id for t in registered]
        assert [e.task_input_id for e in streamed] == ids
        cursors = [start.cursor] + [e.cursor for e in streamed]
        for number, cursor in enumerate(cursors):
            resumed = Watcher(admin, after=cursor)
            registered.append(register(wrapper, "p1", n=cursor))
            expected = ids[number:] + [t.task_input_id for t in registered[2:]]
            arrived = resumed.take(len(expected))
            assert [e.task_input_id for e in arrived] == expected, cursor
            resumed.close()
    finally:
        held.close()
        porch.stop()


def dashboard(porch: Porch) -> tuple[str, str]:
    """A new reader token: its secret and id."""
    secret = auth.new_secret()
    made = porch.server.store.create_token(Role.READER, None, "dashboard", auth.hash_secret(secret))
    return secret, made.token_id


def test_a_stream_ends_when_its_token_is_revoked(
    fast_porch: Porch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "REVOCATION_CHECK_SECONDS", 0.2)
    secret, token_id = dashboard(fast_porch)
    revoked, kept = Watcher(fast_porch.stub(secret)), Watcher(fast_porch.stub(fast_porch.admin))
    revoked.wait_for_bookmark()
    fast_porch.stub(fast_porch.admin).RevokeToken(pb.RevokeTokenRequest(token_id=token_id))
    # Idle, the stream asks at its next keep-alive (0.5 s here).
    assert revoked.ended.wait(5)
    assert revoked.error is not None
    assert revoked.error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert revoked.error.details() == (  # type: ignore[attr-defined]
        f"token {token_id} was revoked while the stream was open"
    )
    assert not kept.ended.wait(1)
    kept.close()


def test_a_stream_whose_token_was_revoked_delivers_no_later_event(
    fast_porch: Porch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "REVOCATION_CHECK_SECONDS", 0.2)
    secret, token_id = dashboard(fast_porch)
    wrapper = fast_porch.stub(fast_porch.pipeline("p1"))
    watcher = Watcher(fast_porch.stub(secret), pipeline="p1")
    watcher.wait_for_bookmark()
    register(wrapper, "p1", n=0)
    assert len(watcher.take(1)) == 1
    fast_porch.stub(fast_porch.admin).RevokeToken(pb.RevokeTokenRequest(token_id=token_id))
    time.sleep(0.3)  # longer than a revocation takes to be seen
    register(wrapper, "p1", n=1)
    assert watcher.ended.wait(5)
    assert watcher.error is not None
    assert watcher.error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert watcher.events.empty()


def test_a_tokens_streams_wait_for_the_revocation_check_in_flight(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two streams of one token, an event after its revocation: the first
    # stream asks the database, slowly; the second must not send the event
    # on the answer from before the revocation while it waits.
    monkeypatch.setattr(service, "REVOCATION_CHECK_SECONDS", 0.1)
    porch = start_porch(db_url, watch_poll_seconds=0.2, watch_keepalive_seconds=30)
    try:
        store = porch.server.store
        asked = store.is_revoked

        def slowly(token_id: str) -> bool:
            time.sleep(0.5)
            return asked(token_id)

        monkeypatch.setattr(store, "is_revoked", slowly)
        secret, token_id = dashboard(porch)
        wrapper = porch.stub(porch.pipeline("p1"))
        watchers = [Watcher(porch.stub(secret)) for _ in range(2)]
        for watcher in watchers:
            watcher.wait_for_bookmark()
        porch.stub(porch.admin).RevokeToken(pb.RevokeTokenRequest(token_id=token_id))
        time.sleep(0.2)  # what the streams were told at their start is out of date
        register(wrapper, "p1", n=0)
        for watcher in watchers:
            assert watcher.ended.wait(5)
            assert watcher.error is not None
            assert watcher.error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert watcher.events.empty()
    finally:
        porch.stop()


def test_pruned_cursor_is_out_of_range(fast_porch: Porch) -> None:
    wrapper = fast_porch.stub(fast_porch.pipeline("p1"))
    register(wrapper, "p1", n=0)
    old = Watcher(fast_porch.stub(fast_porch.admin), after="0.0")
    [first] = old.take(1)
    old.close()
    register(wrapper, "p1", n=1)
    # Other transactions on the PostgreSQL server (other tests', say) hold
    # events back from pruning while they are open, but not for long.
    cutoff = datetime.now(UTC) + timedelta(seconds=1)
    pruned = fast_porch.server.store.prune_events(cutoff)
    deadline = time.monotonic() + 30
    while pruned < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        pruned += fast_porch.server.store.prune_events(cutoff)
    assert pruned == 2
    with pytest.raises(grpc.RpcError) as raised:
        # Refused before any message: not even a bookmark holding the cursor.
        next(
            iter(
                fast_porch.stub(fast_porch.admin).WatchEvents(
                    pb.WatchEventsRequest(after=first.cursor)
                )
            )
        )
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE  # type: ignore[attr-defined]
    assert "older than the events kept" in raised.value.details()  # type: ignore[attr-defined]
    # from now still works, and sees what comes next
    watcher = Watcher(fast_porch.stub(fast_porch.admin))
    watcher.wait_for_bookmark()
    register(wrapper, "p1", n=2)
    assert watcher.take(1)[0].kind == pb.Event.CREATED
    watcher.close()


def test_cancelled_streams_free_the_hub(fast_porch: Porch) -> None:
    hub = fast_porch.server.running.hub
    watchers = [Watcher(fast_porch.stub(fast_porch.admin)) for _ in range(20)]
    for watcher in watchers:
        watcher.wait_for_bookmark()
    assert hub.watchers == 20
    for watcher in watchers:
        watcher.close()
    deadline = time.monotonic() + 10
    while hub.watchers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.watchers == 0


def test_streams_past_the_servers_most_are_refused_until_one_ends(db_url: str) -> None:
    porch = start_porch(db_url, watch_keepalive_seconds=0.5, max_streams=2)
    try:
        client = porch.stub(porch.admin)
        kept = [Watcher(client), Watcher(client, pipeline="nope")]  # refused: no such pipeline
        kept[1].ended.wait(10)
        assert kept[1].error is not None and kept[1].error.code() == grpc.StatusCode.NOT_FOUND
        kept[1] = Watcher(client)
        for watcher in kept:
            watcher.wait_for_bookmark()
        assert "has 2 WatchEvents streams open, as many as it keeps" in refused_stream(client)
        kept[0].close()
        reopened(client).close()
        kept[1].close()
    finally:
        porch.stop()


def refused_stream(client: Client) -> str:
    """The details of the RESOURCE_EXHAUSTED a new stream of client's gets."""
    refused = Watcher(client)
    assert refused.ended.wait(10) and refused.error is not None
    assert refused.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return str(refused.error.details())


def reopened(client: Client) -> Watcher:
    """A stream of client's, opened once a stream that held its place has
    ended: the server notices a stream's end a moment after its client."""
    deadline = time.monotonic() + 10
    while True:
        again = Watcher(client)
        while not (again.bookmarks or again.ended.is_set()):
            time.sleep(0.01)
        if again.bookmarks:
            return again
        assert again.error is not None
        assert again.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() < deadline


def test_one_token_holds_at_most_its_share_of_a_servers_streams(db_url: str) -> None:
    porch = start_porch(
        db_url, watch_keepalive_seconds=0.5, max_streams_per_token=2, anonymous_reads=True
    )
    try:
        reader, anonymous = porch.stub(porch.token(Role.READER)), porch.stub()
        kept = [Watcher(reader), Watcher(reader)]
        for watcher in kept:
            watcher.wait_for_bookmark()
        details = refused_stream(reader)
        assert " has 2 WatchEvents streams open on this server, as many as one token" in details
        assert "--max-streams-per-token" in details
        # Another token has a share of its own; the anonymous readers one together.
        kept.append(Watcher(porch.stub(porch.admin)))
        kept += [Watcher(anonymous), Watcher(anonymous)]
        for watcher in kept:
            watcher.wait_for_bookmark()
        details = refused_stream(anonymous)
        assert "the anonymous readers have 2 WatchEvents streams open on this server" in details
        assert "as many as they may together" in details and "send a token" in details
        kept[0].close()
        kept.append(reopened(reader))
        for watcher in kept:
            watcher.close()
    finally:
        porch.stop()


def test_a_stream_left_while_its_writes_wait_is_cancelled(
    fast_porch: Porch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "porch.access")
    wrapper = fast_porch.stub(fast_porch.pipeline("p1"))
    task = register(wrapper, "p1", n=0)
    wrapper.ClaimTasks(pb.ClaimTasksRequest(pipeline=pb.Pipeline(name="p1")))
    # About 10 MB of events: more than the transport holds for a client that
    # does not read (about 4 MB), so the server's writes wait for room.
    for _ in range(150):
        set_status(wrapper, task, State.RUNNING, "x" * service.MAX_MESSAGE_BYTES)
    call: Any = fast_porch.stub(fast_porch.admin).WatchEvents(pb.WatchEventsRequest(after="0.0"))
    next(call)
    time.sleep(1)
    call.cancel()
    deadline = time.monotonic() + 10
    while not (lines := watch_lines(caplog)):
        assert time.monotonic() < deadline, "the stream was never logged"
        time.sleep(0.05)
    assert len(lines) == 1 and lines[0].startswith("WatchEvents CANCELLED "), lines
    # A client that left is no fault of the server's: no error, no traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def watch_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The access lines of WatchEvents calls."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "porch.access" and r.getMessage().startswith("WatchEvents ")
    ]


def test_many_watchers_share_one_read_per_wake_up(fast_porch: Porch) -> None:
    wrapper = fast_porch.stub(fast_porch.pipeline("p1"))
    hub = fast_porch.server.running.hub
    watchers = [Watcher(fast_porch.stub(fast_porch.admin)) for _ in range(50)]
    for watcher in watchers:
        watcher.wait_for_bookmark()
    reads_before, rechecks_before = hub.reads, hub.rechecks
    started = time.monotonic()
    for n in range(10):
        register(wrapper, "p1", n=n)
    for watcher in watchers:
        assert len(watcher.take(10)) == 10
    elapsed = time.monotonic() - started
    # A read per wake-up: a local write, on PostgreSQL its notification too,
    # and a poll interval; not one per watcher (500 and more). Not counted:
    # looking again for events held back behind a transaction still open,
    # which any on the PostgreSQL server makes (other tests' too), every
    # 10 ms for their first second.
    reads = hub.reads - reads_before - (hub.rechecks - rechecks_before)
    assert reads <= 5 * 10 + elapsed / 0.2 + 5, reads
    for watcher in watchers:
        watcher.close()


def test_shutdown_ends_streams_as_unavailable(db_url: str) -> None:
    porch = start_porch(db_url, watch_poll_seconds=0.2)
    watcher = Watcher(porch.stub(porch.admin))
    watcher.wait_for_bookmark()
    porch.server.stop(grace=5)
    assert watcher.ended.wait(10)
    # Not OK, which a client could take for the end of all events: the code
    # that tells it to come back (to this server or another) and resume.
    error: Any = watcher.error
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in error.details()
    for channel in porch.channels:
        channel.close()
