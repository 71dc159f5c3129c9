"""PorchService: porch.v1 requests in, store calls, porch.v1 messages out.

Authentication, authorization and the mapping of porch errors to status
codes happen in the interceptor; the methods here validate requests and
raise porch errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from gateway import json_leaves
from porch_server import auth, messages
from porch_server.config import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_STREAMS_PER_TOKEN,
    GRPC_MESSAGE_BYTES,
)
from porch_server.cursors import Key
from porch_server.digest import canonical_json, digest_of
from porch_server.errors import (
    InvalidArgument,
    Locked,
    PorchError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    shortened,
)
from porch_server.events import EventHub, follow
from porch_server.models import Actor, Event, Pipeline, Registration, Role, Task
from porch_server.status import ANSWERED
from porch_server.store import MAX_TASK_INPUT_BYTES, Store
from porch_stubs.v1 import porch_pb2, porch_pb2_grpc

T = TypeVar("T")

log = logging.getLogger("porch.server")
Context = grpc.aio.ServicerContext[Any, Any]

MAX_NAME = 255
# A new pipeline's uri and version, in characters: every task an answer holds
# carries them, and a task must fit a client's 4 MiB answer with its input.
MAX_PIPELINE_TEXT = {"uri": 2048, "version": MAX_NAME}
MAX_MESSAGE_BYTES = 64 * 1024
MAX_BATCH = 10_000
MAX_LEASE = timedelta(days=30)
# The most of its events' messages a stream replaying history reads at once
# (always one event): a stream whose client reads slowly holds its batch.
REPLAY_MESSAGE_BYTES = 1024 * 1024
# Sent with the response, as trailing metadata: the gateway answers 201 Created.
CREATED = (("x-http-code", "201"),)
# Serialized events kept for the streams that carry the same events: at
# most this many, and this many bytes (an event's message may be 64 KiB).
ENCODED_EVENTS_KEPT = 10_000
ENCODED_EVENT_BYTES_KEPT = 8 * 1024 * 1024
# How often an open stream asks whether its token has been revoked since,
# and for how many tokens the answers are kept.
REVOCATION_CHECK_SECONDS = 5.0
REVOCATIONS_KEPT = 10_000
# The message of the event that puts back a task whose claim was never answered.
UNANSWERED_CLAIM = "released: the call that claimed it ended before its answer"
LATE_CLAIM = (
    "the call's deadline passed as its claim was made: what it claimed is being put back to PENDING"
)
# Seconds between tries to release an unanswered claim's tasks while the
# database is out of reach (too many connections, say): about 3 minutes in
# all, after which they stay CLAIMED and the log says so. Each try, the
# first too, moves a task only if it is CLAIMED still by that claim, seen in
# the same transaction (Store.release_claim): a report made since the claim
# committed without the claim's number (npg_porch's routes make them so)
# may have moved it on, to DONE, say, which a release would undo.
RELEASE_RETRY_PAUSES = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 60.0)
# With no thread to wait on for a lock (one database thread), a write that
# found its task locked is tried again, without waiting, after each pause.
LOCKED_RETRY_PAUSES = (0.05, 0.1, 0.2, 0.4)
_TASK_ID_CHARS = frozenset("0123456789abcdef")
# What a pipeline's uri and version and a token's description may not hold:
# control characters and anything else that breaks a line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The bidirectional embedding, override and isolate controls: the text after
# one reads in another order than it is stored ("Trojan Source").
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def page_size(requested: int, default: int, maximum: int) -> int:
    """Apply AIP-158: unset means the default, too large is lowered to the maximum."""
    if requested < 0:
        raise InvalidArgument(f"page_size must not be negative, got {requested}")
    return min(requested or default, maximum)


def check_text(field: str, value: str) -> str:
    """Return value unless it holds a NUL character, which a database text
    cannot store (PostgreSQL refuses it)."""
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL (U+0000) characters")
    return value


def checked_new_pipeline(given: porch_pb2.Pipeline) -> Pipeline:
    """Return the pipeline to create, if its name, uri and version are usable."""
    name = check_name("pipeline.name", given.name)
    if name in (".", ".."):  # HTTP clients remove such path segments
        raise InvalidArgument(f"pipeline.name must not be {name!r}: no URL could name it")
    if name != name.strip():  # " p1" would pass for "p1" in every list
        raise InvalidArgument(
            f"pipeline.name must not begin or end with white space, got {shortened(name)!r}"
        )
    for field, longest in MAX_PIPELINE_TEXT.items():
        value = getattr(given, field)
        if not value.strip():
            raise InvalidArgument(f"pipeline.{field} is required to create a pipeline")
        if len(value) > longest:
            raise InvalidArgument(f"pipeline.{field} is longer than {longest} characters")
        check_text(f"pipeline.{field}", value)
        _check_characters(
            f"pipeline.{field}",
            value,
            _hidden,
            "control characters, line breaks or format characters",
        )
    return Pipeline(name=name, uri=given.uri, version=given.version)


def check_name(field: str, value: str) -> str:
    """Return value if it is a usable name (1 to 255 characters, no '/')."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{field} is longer than {MAX_NAME} characters")
    if "/" in value or not value.isprintable():
        raise InvalidArgument(f"{field} {_unusable_character(value)}")
    return value


# What a character without a Unicode name that does not print is, by its category.
_UNNAMED = {
    "Cc": "a control character",
    "Co": "a private-use character",
    "Cs": "a surrogate",
    "Cn": "an unassigned code point",
}


def _unusable_character(name: str) -> str:
    """What is wrong with the first character of name that no name may hold:
    '/', or one that does not print (control and format characters, and
    white space but the space), which a reader could not tell apart."""
    for position, character in enumerate(name, start=1):
        if character == "/":
            return f"must not contain '/' at character {position}"
        if not character.isprintable():
            return (
                f"must not contain {_named(character)} at character {position}:"
                " a name may hold only printing characters and the plain space"
            )
    raise ValueError(f"{name!r} holds no character a name may not")


def _named(character: str) -> str:
    """The character's code point and its Unicode name, or what it is."""
    what = unicodedata.name(character, "") or _UNNAMED[unicodedata.category(character)]
    return f"U+{ord(character):04X} ({what})"


def _check_characters(field: str, value: str, refused: Callable[[str], bool], what: str) -> None:
    """Refuse value if it holds a refused character, naming the first and where it is."""
    for position, character in enumerate(value, start=1):
        if refused(character):
            raise InvalidArgument(
                f"{field} must not contain {what}: {_named(character)} at character {position}"
            )


def _hidden(character: str) -> bool:
    """Whether a pipeline's uri or version may not hold character: a line
    break, or a control or format character, which a listing would show as
    something else or not at all (a uri that reads as another's)."""
    return _CONTROL.match(character) is not None or unicodedata.category(character) == "Cf"


def _reordering(character: str) -> bool:
    """Whether a token description may not hold character: a line break, a
    control character, or a bidirectional control. Other format characters
    are kept: a description is free text in any language, and the zero width
    joiner (in emoji sequences and Indic scripts), the zero width non-joiner
    (Persian) and the marks U+200E and U+200F (which set the direction of
    the punctuation beside them, and override nothing) are part of writing
    it."""
    return _CONTROL.match(character) is not None or character in BIDI_CONTROLS


def _count_down(counter: Counter[Any], key: Any) -> None:
    """One fewer of key in counter, which then keeps no key it has none of."""
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


def _registration_answer_bytes(
    pipeline: porch_pb2.Pipeline, tasks: Sequence[porch_pb2.Task]
) -> int:
    """At most the bytes of the answer to registering tasks of pipeline: each
    comes back with its input, id, status, times and pipeline."""
    full = porch_pb2.Task(pipeline=pipeline, task_input_id="0" * 64, status=porch_pb2.Task.PENDING)
    for stamp in (full.create_time, full.update_time):
        stamp.seconds, stamp.nanos = 2**40, 999_999_999
    # Besides its input: the input's tag and length, the longer lengths of the
    # task and of the result around it, and the result's own tag and length.
    each = porch_pb2.RegisterTaskResponse(task=full, created=True).ByteSize() + 16
    return sum(each + task.task_input.ByteSize() for task in tasks)


def checked_task_input(field: str, task: porch_pb2.Task) -> str:
    """Return the task's input as canonical JSON, checking that it is there and
    not too large."""
    if not task.HasField("task_input"):
        raise InvalidArgument(
            f"{field}.task_input is required (an empty input, {{}}, counts once it is set)"
        )
    # Numbers take up to 11 bytes each in protobuf against 2 in JSON: bound
    # both forms, so that any task fits in a client's 4 MiB answer.
    if task.task_input.ByteSize() > MAX_TASK_INPUT_BYTES:
        raise InvalidArgument(
            f"{field}.task_input is larger than {MAX_TASK_INPUT_BYTES} bytes as protobuf"
        )
    try:
        data = messages.to_dict(task.task_input)
    except InvalidArgument as error:  # "task_input nests deeper than ..."
        raise InvalidArgument(f"{field}.{error}") from None
    try:
        canonical = canonical_json(data)
    except InvalidArgument:  # a number that is not finite: say where
        where = _not_finite(f"{field}.task_input", data)
        raise InvalidArgument(f"{where}; JSON has no such number") from None
    if len(canonical) > MAX_TASK_INPUT_BYTES:
        raise InvalidArgument(f"{field}.task_input is larger than {MAX_TASK_INPUT_BYTES} bytes")
    return canonical


def _not_finite(path: str, data: Any) -> str:
    """Where in data, the JSON of a Struct found at path, its first number
    that is not finite is (keys taken in order, as in the canonical JSON),
    and which it is."""
    for where, value in json_leaves(data, path, sort_keys=True):
        if type(value) is float and not math.isfinite(value):
            number = "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
            return f"{where} holds a number that is not finite ({number})"
    return f"{path} holds a number that is not finite"


def check_lease(duration: duration_pb2.Duration) -> timedelta:
    """A claim's lease as a timedelta (whole microseconds, rounded up);
    InvalidArgument unless it is a valid Duration, positive, at most MAX_LEASE."""
    seconds, nanos = duration.seconds, duration.nanos
    if not -1_000_000_000 < nanos < 1_000_000_000 or seconds * nanos < 0:
        raise InvalidArgument(
            f"lease is not a valid Duration: seconds {seconds} and nanos {nanos} "
            "must have the same sign, and nanos fewer than 10^9"
        )
    # Same signs: the total is positive only when both parts are at least 0.
    if not 0 < seconds * 1_000_000_000 + nanos <= MAX_LEASE.days * 86_400 * 1_000_000_000:
        sign = "-" if seconds < 0 or nanos < 0 else ""
        fraction = f".{abs(nanos):09d}".rstrip("0") if nanos else ""
        given = f"{sign}{abs(seconds):,}{fraction}"
        raise InvalidArgument(
            f"lease must be positive and at most {MAX_LEASE.days} days"
            f" ({MAX_LEASE.days * 86_400:,} s), got {given} s"
        )
    return timedelta(seconds=seconds, microseconds=-(-nanos // 1000))


def _looks_like_task_input_id(value: str) -> bool:
    return len(value) == 64 and _TASK_ID_CHARS.issuperset(value)


def check_task_input_id(value: str) -> str:
    """Return value if it looks like a task_input_id: 64 lowercase hex digits."""
    if not value:
        raise InvalidArgument("task_input_id is required")
    if not _looks_like_task_input_id(value):
        raise InvalidArgument(
            f"task_input_id must be 64 lowercase hex digits, got {shortened(value)!r}"
        )
    return value


def check_state(field: str, value: int, *, required: bool) -> Any:
    """Return the State for a proto enum value; None when unset and not required."""
    try:
        state = messages.state_of(value)
    except ValueError:
        raise InvalidArgument(f"{field} has no such value: {value}") from None
    if state is None and required:
        raise InvalidArgument(f"{field} is required")
    return state


class PorchService(porch_pb2_grpc.PorchServiceServicer):
    """The porch.v1 service, over a Store whose calls run on an executor."""

    def __init__(
        self,
        store: Store,
        executor: Executor,
        hub: EventHub,
        keepalive_seconds: float,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_streams_per_token: int = DEFAULT_MAX_STREAMS_PER_TOKEN,
        lock_waits: int = 1,
    ) -> None:
        self._store = store
        self._executor = executor
        self._hub = hub
        self._keepalive_seconds = keepalive_seconds
        # Writes waiting for a lock at once (see _wait_for_lock), and of
        # the single registrations among them, (pipeline name, input) -> how
        # many.
        self._lock_waits = lock_waits
        self._waiting_places = asyncio.Semaphore(lock_waits)
        self._inputs_waiting: Counter[Hashable] = Counter()
        # WatchEvents streams open, and how many may be: each holds memory.
        self._streams = 0
        self._max_streams = max_streams
        # ... by token id (None: the anonymous readers), and how many one may hold.
        self._streams_of: Counter[str | None] = Counter()
        self._max_streams_per_token = max_streams_per_token
        self._encoded_events: OrderedDict[str, bytes] = OrderedDict()
        self._encoded_bytes = 0
        # token id -> (when asked, revoked): one question for every stream
        # of a token.
        self._revocations: dict[str, tuple[float, bool]] = {}
        self._revocation_lookups: dict[str, asyncio.Future[bool]] = {}
        # Releases of claims whose calls ended first, kept until they finish.
        self._releasing: set[asyncio.Future[None]] = set()

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    async def _change(self, *args: Any) -> Task:
        """store.update_task(*args), for a change the coalesced way did not
        make: refused (which it words), or its task locked by another
        transaction (see _write)."""
        return await self._write(self._store.update_task, *args)

    async def _write(self, write: Callable[..., T], *args: Any, waiting: Hashable = None) -> T:
        """write(*args, wait=False) (update_task, register_canonical or
        release_claim) on the executor; should a task it writes be locked by
        another transaction, write(*args) waiting for the lock in
        _wait_for_lock."""
        try:
            return await self._run(functools.partial(write, wait=False), *args)
        except Locked:
            return await self._wait_for_lock(write, *args, waiting=waiting)

    async def _register_one(self, name: str, text: str, actor: Actor) -> Registration:
        """A single registration: in a batch with others' (the store's
        coalescer), or the blocking way when that leaves it (see _write).
        While another call of the same input holds a place in _wait_for_lock,
        it goes straight there too: each such call would otherwise hold a
        batch of other registrations back for the lock's brief wait."""
        key = (name, text)
        register = self._store.register_canonical
        if not (self._inputs_waiting and key in self._inputs_waiting):
            try:
                result = await self._store.register_canonical_async(name, text, actor)
            except Locked:  # alone in its batch, the lock its own
                pass
            else:
                if result is None:
                    [result] = await self._write(register, name, [text], actor, waiting=key)
                return result
        [result] = await self._wait_for_lock(register, name, [text], actor, waiting=key)
        return result

    async def _wait_for_lock(
        self, write: Callable[..., T], *args: Any, waiting: Hashable = None
    ) -> T:
        """write(*args) (a store method that waits for locks) on the executor,
        for a write that was Locked trying not to wait. Only so many wait at
        once, each holding its place until its thread is done (a cancelled
        call's thread goes on waiting): however many wait, the executor keeps
        threads for reads, token checks and the other writes. waiting, when
        given, is in _inputs_waiting while the call holds its place.

        With no place at all (one database thread), write(*args, wait=False)
        is tried again after each of LOCKED_RETRY_PAUSES (another transaction
        registering or changing the same task ends soon; a session left open
        does not), and the last try's Locked raised."""
        if self._lock_waits == 0:
            attempt = functools.partial(write, wait=False)
            for pause in LOCKED_RETRY_PAUSES[:-1]:
                await asyncio.sleep(pause)
                with contextlib.suppress(Locked):
                    return await self._run(attempt, *args)
            await asyncio.sleep(LOCKED_RETRY_PAUSES[-1])
            return await self._run(attempt, *args)
        await self._waiting_places.acquire()
        # Counted once it has a place: while queued for one (behind writes
        # waiting for other tasks' locks), its own task may be free again.
        if waiting is not None:
            self._inputs_waiting[waiting] += 1
        try:
            done = self._executor.submit(write, *args)
        except BaseException:
            self._leave_place(waiting)
            raise
        loop = asyncio.get_running_loop()

        def finished(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed at exit
                loop.call_soon_threadsafe(self._leave_place, waiting)

        done.add_done_callback(finished)
        return await asyncio.wrap_future(done)

    def _leave_place(self, waiting: Hashable) -> None:
        self._waiting_places.release()
        if waiting is not None:
            _count_down(self._inputs_waiting, waiting)

    async def CreatePipeline(
        self, request: porch_pb2.CreatePipelineRequest, context: Context
    ) -> porch_pb2.Pipeline:
        pipeline = checked_new_pipeline(request.pipeline)
        created = await self._run(self._store.create_pipeline, pipeline)
        context.set_trailing_metadata(CREATED)
        return messages.pipeline_message(created)

    async def GetPipeline(
        self, request: porch_pb2.GetPipelineRequest, context: Context
    ) -> porch_pb2.Pipeline:
        pipeline = await self._run(self._store.get_pipeline, check_name("name", request.name))
        return messages.pipeline_message(pipeline)

    async def ListPipelines(
        self, request: porch_pb2.ListPipelinesRequest, context: Context
    ) -> porch_pb2.ListPipelinesResponse:
        size = page_size(request.page_size, 100, 1000)
        page = await self._run(
            self._store.list_pipelines,
            check_text("uri", request.uri) or None,
            check_text("version", request.version) or None,
            size,
            request.page_token,
        )
        return porch_pb2.ListPipelinesResponse(
            pipelines=[messages.pipeline_message(p) for p in page.items],
            next_page_token=page.next_page_token,
        )

    async def CreateToken(
        self, request: porch_pb2.CreateTokenRequest, context: Context
    ) -> porch_pb2.CreateTokenResponse:
        if request.role not in porch_pb2.Token.Role.values():
            raise InvalidArgument(f"role has no such value: {request.role}")
        role = messages.role_of(request.role)
        pipeline_name = request.pipeline_name or None
        role = role or (Role.PIPELINE if pipeline_name else None)
        description = check_description(request.description)
        check_role_binding(role, pipeline_name)
        secret = auth.new_secret()
        token = await self._run(
            self._store.create_token, role, pipeline_name, description, auth.hash_secret(secret)
        )
        context.set_trailing_metadata(CREATED)
        return porch_pb2.CreateTokenResponse(
            token=secret,
            name=token.pipeline_name or "",
            description=token.description,
            token_id=token.token_id,
            role=porch_pb2.Token.Role.Value(token.role),
        )

    async def ListTokens(
        self, request: porch_pb2.ListTokensRequest, context: Context
    ) -> porch_pb2.ListTokensResponse:
        if request.role not in porch_pb2.Token.Role.values():
            raise InvalidArgument(f"role has no such value: {request.role}")
        page = await self._run(
            self._store.list_tokens,
            check_text("pipeline_name", request.pipeline_name) or None,
            messages.role_of(request.role),
            request.include_revoked,
            page_size(request.page_size, 100, 1000),
            request.page_token,
        )
        return porch_pb2.ListTokensResponse(
            tokens=[messages.token_message(t) for t in page.items],
            next_page_token=page.next_page_token,
        )

    async def RevokeToken(
        self, request: porch_pb2.RevokeTokenRequest, context: Context
    ) -> porch_pb2.Token:
        if not request.token_id:
            raise InvalidArgument("token_id is required")
        token = await self._run(self._store.revoke_token, request.token_id)
        return messages.token_message(token)

    async def RegisterTask(
        self, request: porch_pb2.RegisterTaskRequest, context: Context
    ) -> porch_pb2.RegisterTaskResponse:
        name = check_name("task.pipeline.name", request.task.pipeline.name)
        text = checked_task_input("task", request.task)
        actor = auth.caller_actor()
        result = await self._register_one(name, text, actor)
        if result.created:
            self._hub.committed()
            context.set_trailing_metadata(CREATED)
        return porch_pb2.RegisterTaskResponse(
            task=messages.task_message(result.task), created=result.created
        )

    async def RegisterTasks(
        self, request: porch_pb2.RegisterTasksRequest, context: Context
    ) -> porch_pb2.RegisterTasksResponse:
        if not request.tasks:
            raise InvalidArgument("tasks is required: give at least one task")
        if len(request.tasks) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} tasks per call, got {len(request.tasks)}")
        name = request.pipeline_name or request.tasks[0].pipeline.name
        check_name("pipeline_name", name)
        texts = []
        for index, task in enumerate(request.tasks):
            if task.pipeline.name not in ("", name):
                raise InvalidArgument(
                    f"tasks[{index}] is of pipeline {shortened(task.pipeline.name)!r},"
                    f" not {shortened(name)!r}"
                )
            texts.append(checked_task_input(f"tasks[{index}]", task))
        pipeline = self._store.known_pipeline(name)
        if pipeline is None:
            pipeline = await self._run(self._store.get_pipeline, name)
        answer = _registration_answer_bytes(messages.pipeline_message(pipeline), request.tasks)
        if answer > GRPC_MESSAGE_BYTES:
            raise InvalidArgument(
                f"the answer to these {len(request.tasks)} tasks would take about {answer:,} "
                f"bytes, more than the {GRPC_MESSAGE_BYTES:,} a gRPC client accepts by default: "
                "send them in smaller batches"
            )
        results = await self._write(
            self._store.register_canonical, name, texts, auth.caller_actor()
        )
        if any(r.created for r in results):
            self._hub.committed()
            context.set_trailing_metadata(CREATED)  # 201 through the gateway
        return porch_pb2.RegisterTasksResponse(
            results=[
                porch_pb2.RegisterTaskResponse(
                    task=messages.task_message(r.task), created=r.created
                )
                for r in results
            ]
        )

    async def GetTask(self, request: porch_pb2.GetTaskRequest, context: Context) -> porch_pb2.Task:
        name = check_name("pipeline_name", request.pipeline_name)
        task = await self._run(
            self._store.get_task, name, check_task_input_id(request.task_input_id)
        )
        return messages.task_message(task)

    async def ListTasks(
        self, request: porch_pb2.ListTasksRequest, context: Context
    ) -> porch_pb2.ListTasksResponse:
        name = request.pipeline_name or None
        status = check_state("status", request.status, required=False)
        size = page_size(request.page_size, 1000, 10_000)
        if name is not None:
            try:
                check_name("pipeline_name", name)
            except InvalidArgument:
                # A filter: no pipeline has such a name, as none has an unknown one.
                return porch_pb2.ListTasksResponse()
        page = await self._run(self._store.list_tasks, name, status, size, request.page_token)
        return porch_pb2.ListTasksResponse(
            tasks=[messages.task_message(t) for t in page.items],
            next_page_token=page.next_page_token,
        )

    async def ClaimTasks(
        self, request: porch_pb2.ClaimTasksRequest, context: Context
    ) -> porch_pb2.ClaimTasksResponse:
        name = check_name("pipeline.name", request.pipeline.name)
        num_tasks = request.num_tasks if request.HasField("num_tasks") else 1
        if num_tasks < 1:
            raise InvalidArgument(f"num_tasks must be at least 1, got {num_tasks}")
        # Claims return up to num_tasks: a larger number than one call
        # carries (npg_porch took any) claims as many as that.
        num_tasks = min(num_tasks, MAX_BATCH)
        lease = check_lease(request.lease) if request.HasField("lease") else None
        actor = auth.caller_actor()
        claiming = asyncio.ensure_future(self._claim(name, num_tasks, lease, actor))
        try:
            tasks = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # The call ended (its deadline passed, its client left) with the
            # claim under way: what it claimed goes back to PENDING, or it
            # would stay CLAIMED by a launcher that never saw it.
            claiming.add_done_callback(functools.partial(self._release, name, actor))
            raise
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # ... or with the answer ready but the caller's deadline passed.
            self._release(name, actor, claiming)
            try:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, LATE_CLAIM, ANSWERED)
            except grpc.aio.AbortError:
                raise
            except Exception:  # gRPC had ended the call already: nobody is left to tell
                raise asyncio.CancelledError from None
        return porch_pb2.ClaimTasksResponse(tasks=[messages.task_message(t) for t in tasks])

    async def _claim(
        self, name: str, num_tasks: int, lease: timedelta | None, actor: Actor
    ) -> list[Task]:
        tasks = await self._store.claim_tasks_async(name, num_tasks, lease, actor)
        if tasks is None:
            tasks = await self._run(self._store.claim_tasks, name, num_tasks, lease, actor)
        self._hub.committed()  # lapsed leases may have been freed even when none was claimed
        return tasks

    def _release(self, name: str, actor: Actor, claiming: asyncio.Future[list[Task]]) -> None:
        if claiming.cancelled() or claiming.exception() is not None or not claiming.result():
            return
        releasing = asyncio.ensure_future(self._release_all(name, claiming.result(), actor))
        self._releasing.add(releasing)
        releasing.add_done_callback(self._releasing.discard)

    async def _release_all(self, name: str, tasks: list[Task], actor: Actor) -> None:
        failed: list[tuple[str, PorchError]] = []
        left = list(tasks)
        for pause in (*RELEASE_RETRY_PAUSES, None):
            unreached: list[Task] = []
            for task in left:
                try:
                    await self._write(
                        self._store.release_claim,
                        name,
                        task.task_input_id,
                        task.claim_number,
                        UNANSWERED_CLAIM,
                        actor,
                    )
                except Unavailable as error:  # the database out of reach: again, later
                    if pause is None:
                        failed.append((task.task_input_id, error))
                    unreached.append(task)
                except PorchError as error:  # its task gone (one moved on is left as it is)
                    failed.append((task.task_input_id, error))
            if not unreached or pause is None:
                break
            left = unreached
            try:
                await asyncio.sleep(pause)
            except asyncio.CancelledError:  # the server stopping
                log.warning(
                    "releasing %d of the %d tasks of an unanswered claim was cut short by"
                    " the server stopping; they stay CLAIMED, the first (%s)",
                    len(left),
                    len(tasks),
                    left[0].task_input_id,
                )
                raise
        if failed:  # one line for the claim, however many tasks it held
            first, why = failed[0]
            log.warning(
                "releasing %d of the %d tasks of an unanswered claim failed, the first (%s): %s",
                len(failed),
                len(tasks),
                first,
                why,
            )
        self._hub.committed()

    async def UpdateTask(
        self, request: porch_pb2.UpdateTaskRequest, context: Context
    ) -> porch_pb2.Task:
        given = request.task
        name = check_name("task.pipeline.name", given.pipeline.name)
        status = check_state("task.status", given.status, required=True)
        named = request.task_input_id and check_task_input_id(request.task_input_id)
        if given.HasField("task_input"):
            # The task's own id beside its input is ignored, as npg_porch
            # ignored it (PUT /tasks); but the id a PATCH's path names must
            # be the input's, or the call would change another task.
            task_id = digest_of(checked_task_input("task", given))
            if named and named != task_id:
                raise InvalidArgument(
                    f"task_input_id {named} is not the id of task.task_input, {task_id}"
                )
        elif named or given.task_input_id:
            task_id = named or check_task_input_id(given.task_input_id)
            if given.task_input_id and given.task_input_id != task_id:
                raise InvalidArgument(
                    f"task_input_id {task_id} and task.task_input_id "
                    f"{shortened(given.task_input_id)!r} name different tasks"
                )
        else:
            raise InvalidArgument("name the task with task.task_input or task.task_input_id")
        if len(request.message.encode()) > MAX_MESSAGE_BYTES:
            raise InvalidArgument(f"message is longer than {MAX_MESSAGE_BYTES} bytes")
        check_text("message", request.message)
        if given.claim_number < 0:
            raise InvalidArgument(
                f"task.claim_number must be a claim's number, from 1, got {given.claim_number}"
            )
        claim = given.claim_number or None
        message, actor = request.message or None, auth.caller_actor()
        task = await self._store.update_task_async(name, task_id, status, message, actor, claim)
        if task is None:
            task = await self._change(name, task_id, status, message, actor, claim)
        self._hub.committed()
        return messages.task_message(task)

    async def ListTaskEvents(
        self, request: porch_pb2.ListTaskEventsRequest, context: Context
    ) -> porch_pb2.ListTaskEventsResponse:
        page = await self._run(
            self._store.list_task_events,
            check_name("pipeline_name", request.pipeline_name),
            check_task_input_id(request.task_input_id),
            page_size(request.page_size, 100, 1000),
            request.page_token,
        )
        return porch_pb2.ListTaskEventsResponse(
            events=[messages.event_message(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    # Writes serialized Events: the interceptor passes bytes through as they are.
    async def WatchEvents(  # type: ignore[override]
        self, request: porch_pb2.WatchEventsRequest, context: Context
    ) -> None:
        if self._streams >= self._max_streams:
            raise ResourceExhausted(
                f"this server has {self._streams:,} WatchEvents streams open, as many as it"
                " keeps (porch serve --max-streams): try again later, or on another server"
            )
        token_id = auth.caller_actor().token_id
        held = self._streams_of[token_id]
        if held >= self._max_streams_per_token:
            limit = "porch serve --max-streams-per-token"
            if token_id is None:
                raise ResourceExhausted(
                    f"the anonymous readers have {held:,} WatchEvents streams open on this"
                    f" server, as many as they may together ({limit}): wait, or send a token"
                )
            raise ResourceExhausted(
                f"token {token_id} has {held:,} WatchEvents streams open on this server,"
                f" as many as one token may ({limit}): close one, or wait"
            )
        self._streams += 1
        self._streams_of[token_id] += 1
        try:
            await self._watch(request, context)
        finally:
            self._streams -= 1
            _count_down(self._streams_of, token_id)

    async def _watch(self, request: porch_pb2.WatchEventsRequest, context: Context) -> None:
        pipeline_name = request.pipeline_name or None
        if pipeline_name is not None:
            await self._run(self._store.get_pipeline, check_name("pipeline_name", pipeline_name))
        if request.after:
            await self._run(self._store.check_cursor, request.after)

        async def replay(after: str) -> list[Event]:
            read = functools.partial(self._store.read_events, message_bytes=REPLAY_MESSAGE_BYTES)
            return await self._run(read, after, pipeline_name, 500)

        def matches(event: Event, key: Key) -> bool:
            return pipeline_name is None or event.pipeline_name == pipeline_name

        async def start_cursor() -> str:
            return await self._run(self._store.event_start_cursor)

        stream = follow(
            self._hub,
            request.after,
            start_cursor,
            replay,
            matches,
            bookmark_message,
            self._keepalive_seconds,
            topic=pipeline_name,
        )
        caller = auth.CALLER.get()
        if caller is not None:  # the interceptor has just found it unrevoked
            self._revocations.setdefault(caller.token_id, (time.monotonic(), False))
        # Written with context.write rather than yielded: each message then
        # skips the async generators that yielding passes it through.
        async for item in stream:
            # Asked before each message: an idle stream asks at its keep-alives.
            if caller is not None and await self._revoked(caller.token_id):
                raise Unauthenticated(
                    f"token {caller.token_id} was revoked while the stream was open"
                )
            await context.write(self._encoded(item))
        if self._hub.stopped:
            # Say why the stream ends: gRPC's code for "try again elsewhere or later".
            raise Unavailable("the server is shutting down: resume after the last cursor")

    async def _revoked(self, token_id: str) -> bool:
        """Whether the token has been revoked, as the database said within
        REVOCATION_CHECK_SECONDS; not while the database cannot say. One
        stream asks the database at a time; meanwhile the token's other
        streams wait for its answer: the one before may be out of date."""
        asked = self._revocations.get(token_id)
        if asked is not None and time.monotonic() - asked[0] < REVOCATION_CHECK_SECONDS:
            return asked[1]
        lookup = self._revocation_lookups.get(token_id)
        if lookup is None:
            before = asked is not None and asked[1]
            lookup = asyncio.ensure_future(self._look_up_revocation(token_id, before))
            self._revocation_lookups[token_id] = lookup
            lookup.add_done_callback(lambda _: self._revocation_lookups.pop(token_id, None))
        # Shielded: a stream that ends meanwhile leaves the others their answer.
        return await asyncio.shield(lookup)

    async def _look_up_revocation(self, token_id: str, before: bool) -> bool:
        """Ask the database whether the token has been revoked, and keep the
        answer; before (the last answer) while the database cannot say."""
        now = time.monotonic()
        try:
            revoked = await self._run(self._store.is_revoked, token_id)
        except Unavailable:
            revoked = before  # asked again once REVOCATION_CHECK_SECONDS have passed
        if len(self._revocations) >= REVOCATIONS_KEPT:
            self._revocations.clear()
        self._revocations[token_id] = (now, revoked)
        return revoked

    def _encoded(self, item: Event | porch_pb2.Event) -> bytes:
        """Serialize an event once for every stream that carries it."""
        if isinstance(item, porch_pb2.Event):
            return item.SerializeToString()
        encoded = self._encoded_events.get(item.cursor)
        if encoded is None:
            encoded = messages.event_message(item).SerializeToString()
            self._encoded_events[item.cursor] = encoded
            self._encoded_bytes += len(encoded)
            while len(self._encoded_events) > 1 and (
                len(self._encoded_events) > ENCODED_EVENTS_KEPT
                or self._encoded_bytes > ENCODED_EVENT_BYTES_KEPT
            ):
                self._encoded_bytes -= len(self._encoded_events.popitem(last=False)[1])
        return encoded


def bookmark_message(cursor: str) -> porch_pb2.Event:
    """Return a BOOKMARK event: no change, only a cursor to resume from."""
    event = porch_pb2.Event(cursor=cursor, kind=porch_pb2.Event.BOOKMARK)
    event.time.GetCurrentTime()
    return event


def check_description(value: str) -> str:
    """Return a token description if it is 1 to 255 characters on one line."""
    if not value.strip():
        raise InvalidArgument("description is required")
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"description is longer than {MAX_NAME} characters")
    _check_characters(
        "description",
        value,
        _reordering,
        "control characters, line breaks or bidirectional controls",
    )
    return value


def check_role_binding(role: Role | None, pipeline_name: str | None) -> None:
    """Check that a PIPELINE token names a pipeline and other roles do not."""
    if role is None:
        raise InvalidArgument("role is required when pipeline_name is empty")
    if role is Role.PIPELINE and not pipeline_name:
        raise InvalidArgument("a PIPELINE token needs pipeline_name")
    if role is not Role.PIPELINE and pipeline_name:
        raise InvalidArgument(
            f"{'an' if role is Role.ADMIN else 'a'} {role} token is not bound to a pipeline;"
            " leave pipeline_name empty"
        )
    if pipeline_name:
        check_name("pipeline_name", pipeline_name)
