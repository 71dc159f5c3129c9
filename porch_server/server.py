"""Builds and runs a porch gRPC server: PorchService, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

import gateway
from porch_server.config import GRPC_MESSAGE_BYTES, Config, host_port
from porch_server.db.engine import backend_pids, connections_in_use
from porch_server.db.listen import Listener
from porch_server.db.pgasync import AsyncStatements, TimedOut
from porch_server.errors import Locked, PorchError, first_line, warn_now_and_then
from porch_server.events import EventHub
from porch_server.interceptor import PorchInterceptor
from porch_server.models import Event
from porch_server.service import PorchService
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2, porch_pb2_grpc

T = TypeVar("T")

log = logging.getLogger("porch.server")

SERVICE_NAME = porch_pb2.DESCRIPTOR.services_by_name["PorchService"].full_name
PRUNE_INTERVAL_SECONDS = 3600
# How long the sweep's lease expiry, or its hourly event pruning, may take
# before the server asks the database for SELECT 1, and how long that may
# take before the server reports NOT_SERVING while it waits: the database is
# not answering.
HOUSEKEEPING_SECONDS = 10.0
PING_SECONDS = 5.0
# How often SELECT 1 is asked for while the database leaves it unanswered
# (calls are refused meanwhile), so that they are served soon after it answers.
SILENT_PING_SECONDS = 1.0
# What a ping of the database found (_ping).
ANSWERED, REFUSED, SILENT = "answered", "refused", "silent"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
# After the grace period: how long the asyncpg connections have to come
# back before they are closed in use.
CLOSE_SECONDS = 2.0
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class StoppingHealth(HealthServicer):  # type: ignore[misc]  # grpc_health has no types
    """grpc's health service, but for its Watch streams, which end as the
    server stops: NOT_SERVING, then UNAVAILABLE. grpc's stay open, and one
    (a client balancing by health, say) would hold the stop for its whole
    grace period."""

    def __init__(self) -> None:
        super().__init__()
        # Each status as set, kept here for Watch (SERVICE_UNKNOWN if never
        # set); the server as a whole SERVING from the start, as grpc's.
        self._statuses: dict[str, int] = {"": SERVING}
        self._stopping = False
        # Set, and replaced, at each change: a Watch waits on the one it
        # took before it read the status, so it misses none.
        self._changed = asyncio.Event()

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        if not self._stopping:
            self._statuses[service] = status
            self._change()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._stopping = True
        for service in self._statuses:
            self._statuses[service] = NOT_SERVING
        self._change()

    def _change(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        sent = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if self._stopping:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
            await changed.wait()


@dataclass
class Running:
    """A started server: its bound port and the pieces stop() needs."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    executor: ThreadPoolExecutor
    sweeper: asyncio.Task[None]
    hub: EventHub
    # The server's services behind its interceptor, for a gateway in this
    # process to call without a connection.
    local: gateway.LocalUpstream
    # asyncpg connections for the busiest statements (PostgreSQL), or None.
    statements: AsyncStatements | None
    interceptor: PorchInterceptor


def _credentials(config: Config) -> grpc.ServerCredentials | None:
    if config.tls is None:
        return None
    cert, key, client_ca = config.tls.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def start(config: Config, store: Store) -> Running:
    """Start serving PorchService on config's host and gRPC port (0 picks a free one)."""
    executor = ThreadPoolExecutor(max_workers=config.db_pool_size, thread_name_prefix="porch-db")
    statements = await _async_statements(config, store)
    store.use_async(statements, executor)
    hub = _make_hub(config, store, executor)
    services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    interceptor = PorchInterceptor(store, executor, config.anonymous_reads, services)
    # Worker processes share the port; one server alone must not share it
    # with another that happens to use the same one.
    reuse_port = ("grpc.so_reuseport", 1 if config.workers > 1 else 0)
    server = grpc.aio.server(interceptors=[interceptor], options=[*GRPC_OPTIONS, reuse_port])
    service = PorchService(
        store,
        executor,
        hub,
        config.watch_keepalive_seconds,
        config.max_streams,
        config.max_streams_per_token,
        # Half the threads at most for writes that wait for a lock.
        lock_waits=config.db_pool_size // 2,
    )
    health_servicer = StoppingHealth()
    registry = gateway.HandlerRegistry()
    for target in (server, registry.as_server):
        porch_pb2_grpc.add_PorchServiceServicer_to_server(service, target)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, target)
    reflection.enable_server_reflection(services, server)
    address = host_port(config.host, config.grpc_port)
    credentials = _credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:  # grpc's "Failed to bind"
        executor.shutdown(wait=False)
        also = "" if credentials is None else ", or the TLS certificate, key or CA cannot be used"
        raise OSError(
            f"cannot serve gRPC on {address}: the port is in use or not allowed{also}"
        ) from error
    await server.start()
    hub.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    sweeper = asyncio.create_task(_sweep(config, store, executor, health_servicer, interceptor))
    # The address the index page names: where clients reach this server's gRPC.
    local = gateway.LocalUpstream(registry.handlers, [interceptor], host_port(config.host, port))
    return Running(
        server, port, health_servicer, executor, sweeper, hub, local, statements, interceptor
    )


async def stop(
    running: Running, grace: float, stop_http: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Stop taking calls, let calls in flight finish for up to grace seconds, then end.
    stop_http, which stops an HTTP server whose calls this server serves in
    process, runs beside the gRPC server's stop, within the same grace."""
    await running.health.enter_graceful_shutdown()
    await running.hub.stop()  # ends every WatchEvents stream, UNAVAILABLE
    running.sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running.sweeper
    # Marked before grpc.aio's own timer for the same moment cuts the calls,
    # and the HTTP server's, which starts later and waits whole seconds.
    grace_over = asyncio.get_running_loop().call_later(grace, _grace_over, running.interceptor)
    stopping: list[Awaitable[None]] = [running.server.stop(grace)]
    if stop_http is not None:
        stopping.append(stop_http())
    for failed in await asyncio.gather(*stopping, return_exceptions=True):
        if isinstance(failed, Exception):  # the rest of the stop must still run
            log.error("stopping failed: %r", failed)
    grace_over.cancel()
    # The calls have ended, every caller answered. A statement still running
    # (a claim's release, or one waiting for a lock held elsewhere) has
    # CLOSE_SECONDS to end; then it is cancelled, so that none commits after
    # its caller was told the call ended. A thread left running is not
    # waited for here: see cli.leave_stuck_statements.
    running.executor.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + CLOSE_SECONDS
    if running.statements is not None:
        await running.statements.close(CLOSE_SECONDS)
    # Given back on the executor's threads: there is no event to wait for.
    while connections_in_use() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    pids = backend_pids()
    if pids and running.statements is not None:
        try:
            cancelled = await running.statements.cancel_backends(pids)
        except (TimeoutError, OSError, asyncpg.PostgresError) as error:
            log.warning("could not cancel the statements left running: %s", first_line(error))
        else:
            if cancelled:
                log.warning("cancelled %d database statement(s) left running", cancelled)


def _grace_over(interceptor: PorchInterceptor) -> None:
    interceptor.grace_over = True


async def _async_statements(config: Config, store: Store) -> AsyncStatements | None:
    """asyncpg connections for the store's busiest statements, on PostgreSQL.

    Should they fail to connect, every statement keeps to the thread pool.
    """
    if store.engine.dialect.name != "postgresql":
        return None
    statements = AsyncStatements(config.db_url, config.db_schema, config.db_pool_size)
    try:
        await statements.open()
    except PorchError as error:
        log.warning(
            "asyncpg cannot connect, every statement runs on threads: %s", first_line(error)
        )
        return None
    return statements


def _make_hub(config: Config, store: Store, executor: ThreadPoolExecutor) -> EventHub:
    loop = asyncio.get_running_loop()

    async def read_events(cursor: str, limit: int) -> list[Event]:
        events = await store.read_events_async(cursor, limit)
        if events is not None:
            return events
        read = functools.partial(store.read_events, cursor, None, limit, check_horizon=False)
        return await loop.run_in_executor(executor, read)

    async def start_cursor() -> str:
        return await loop.run_in_executor(executor, store.event_start_cursor)

    async def notify() -> None:
        if not await store.notify_watchers_async():
            await loop.run_in_executor(executor, store.notify_watchers)

    async def has_unread(cursor: str) -> bool:
        unread = await store.has_unread_events_async(cursor)
        if unread is not None:
            return unread
        return await loop.run_in_executor(executor, store.has_unread_events, cursor)

    postgresql = store.engine.dialect.name == "postgresql"
    return EventHub(
        read_events,
        start_cursor,
        config.watch_poll_seconds,
        tick_seconds=min(1.0, config.watch_keepalive_seconds / 2),
        notify=notify if postgresql else None,
        listen=functools.partial(Listener, store.engine) if postgresql else None,
        has_unread=has_unread if postgresql else None,
    )


class _Health:
    """The health the server reports, and what its housekeeping last found."""

    def __init__(self, servicer: HealthServicer, interceptor: PorchInterceptor) -> None:
        self._servicer = servicer
        self._interceptor = interceptor
        self.reported = SERVING
        # What the last housekeeping to end found: what is reported again
        # once a database that left SELECT 1 unanswered answers it.
        self.found = SERVING

    @property
    def is_silent(self) -> bool:
        """Whether calls are refused for the database's silence."""
        return bool(self._interceptor.database_silent)

    def silent(self, silent: bool) -> None:
        """Note whether the database leaves SELECT 1 unanswered: while it
        does, calls are refused at once (UNAVAILABLE), not left to wait on
        it as long as the network lets them, and as it begins to, the calls
        waiting on it are ended (UNAVAILABLE; what they asked may have been
        done)."""
        if silent != self._interceptor.database_silent:
            self._interceptor.database_silent = silent
            if not silent:
                log.warning("the database answers again")
            elif cut := self._interceptor.cut_waiting():
                log.warning("%d call(s) waiting on the database ended, UNAVAILABLE", cut)

    async def report(self, status: int) -> None:
        """Report status, if it is not reported already."""
        if status != self.reported:
            for name in ("", SERVICE_NAME):
                await self._servicer.set(name, status)
            self.reported = status

    async def settle(self, status: int, silent: bool = False) -> None:
        """Report status, what a housekeeping that ended found, and whether
        the database leaves SELECT 1 unanswered (see silent)."""
        self.found = status
        self.silent(silent)
        await self.report(status)


async def _sweep(
    config: Config,
    store: Store,
    executor: ThreadPoolExecutor,
    health_servicer: HealthServicer,
    interceptor: PorchInterceptor,
) -> None:
    """Free tasks whose lease lapsed, prune events past their retention, and
    report the database's health."""
    loop = asyncio.get_running_loop()
    health = _Health(health_servicer, interceptor)
    next_prune = loop.time()
    while True:
        await asyncio.sleep(config.lease_sweep_seconds)
        try:
            expired = await _watched(store.expire_leases, store, executor, health)
            if expired:
                log.info("%d task lease(s) expired", expired)
            if config.event_retention_days is not None and loop.time() >= next_prune:
                next_prune = loop.time() + PRUNE_INTERVAL_SECONDS
                cutoff = datetime.now(UTC) - timedelta(days=config.event_retention_days)
                prune = functools.partial(store.prune_events, cutoff)
                pruned = await _watched(prune, store, executor, health)
                if pruned:
                    log.info("pruned %d event(s) older than %s", pruned, f"{cutoff:%Y-%m-%d %H:%M}")
            new_status, silent = SERVING, False
        except PorchError as error:
            warn_now_and_then(log, f"database housekeeping failed: {first_line(error)}")
            # But the database answers when a lock held elsewhere (an index
            # being built, say) is the cause: it holds every server alike,
            # and none of them is to be taken out of service for it. A
            # statement_timeout may be such a lock's, or a database's that
            # hangs: only the second leaves SELECT 1 unanswered. (One too
            # slow to serve answers it, and stays in service, as it would
            # without the timeout.)
            pinged = await _ping(store) if isinstance(error, TimedOut) else None
            if pinged is None and health.is_silent and not isinstance(error, Locked):
                # A failure (to connect, say) while SELECT 1 went unanswered:
                # asked again, so as not to take the database to answer.
                pinged = SILENT if await _ping(store) == SILENT else None
            # A timeout whose SELECT 1 goes unanswered too: a database that hangs.
            silent = pinged == SILENT
            answers = isinstance(error, Locked) or pinged == ANSWERED
            new_status = health.found if answers else NOT_SERVING
        await health.settle(new_status, silent)
        while health.is_silent:  # asked again soon: calls are refused meanwhile
            await asyncio.sleep(SILENT_PING_SECONDS)
            health.silent(await _ping(store) == SILENT)


async def _watched(
    job: Callable[[], T], store: Store, executor: ThreadPoolExecutor, health: _Health
) -> T:
    """job(), a housekeeping statement, on the executor. Every
    HOUSEKEEPING_SECONDS it goes on, SELECT 1 is asked for: NOT_SERVING while
    that goes unanswered, and what was found before once it is answered."""
    running = asyncio.get_running_loop().run_in_executor(executor, job)
    while True:
        # Asked again sooner while calls are refused for want of an answer.
        wait = SILENT_PING_SECONDS if health.is_silent else HOUSEKEEPING_SECONDS
        try:
            return await asyncio.wait_for(asyncio.shield(running), wait)
        except TimeoutError:
            pass
        # Waiting for a lock held elsewhere, which changes nothing (as in
        # _sweep), or for a database that hangs (stopped, or cut off
        # without a reset), which fails nothing: the calls on its
        # connections wait as long. Only the second leaves SELECT 1
        # unanswered too, and a database may begin to hang, or stop, at
        # any time in a long statement.
        pinged = await _ping(store)
        health.silent(pinged == SILENT)
        if pinged == ANSWERED:
            await health.report(health.found)
            continue
        if pinged == SILENT:
            warn_now_and_then(
                log,
                f"database housekeeping has not finished in {HOUSEKEEPING_SECONDS:g} s"
                f" and SELECT 1 not in {PING_SECONDS:g} s: the database does not answer;"
                " calls are refused until it does",
            )
        await health.report(NOT_SERVING)


async def _ping(store: Store) -> str:
    """ANSWERED when the database answers SELECT 1 within PING_SECONDS, on a
    connection and a thread of its own (the pools' connections and the
    database threads may all be waiting for a lock held elsewhere);
    REFUSED when it answers with a refusal (too many connections for the
    role, say, or no server there); SILENT when no answer comes. The thread
    is a daemon: a database that stops answering once connected would hold
    it, and a stopping server must not wait for it."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[str] = loop.create_future()

    def tell(result: str) -> None:
        if not answered.done():
            answered.set_result(result)

    def ping() -> None:
        try:
            store.ping_apart(math.ceil(PING_SECONDS))
            result = ANSWERED
        except Exception as error:  # refused, or its connection timed out
            result = SILENT if "timeout expired" in str(error) else REFUSED
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(tell, result)

    threading.Thread(target=ping, name="porch-ping", daemon=True).start()
    try:
        return await asyncio.wait_for(answered, PING_SECONDS)
    except TimeoutError:
        return SILENT
