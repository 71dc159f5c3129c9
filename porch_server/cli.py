"""The `porch` command: parses flags, builds a Config, calls in."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import importlib.metadata
import io
import ipaddress
import json
import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import sqlalchemy.exc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import Engine

import gateway
from gateway import access
from porch_server import auth, client, npg_porch, server, web
from porch_server.config import (
    DEFAULT_MAX_STREAMS,
    NPG_PORCH_VARIABLES,
    STREAMS_PER_TOKEN_SHARE,
    TLS,
    Config,
    db_settings,
    finite_number,
    host_port,
    option_file,
    streams_per_token,
)
from porch_server.db import migrate
from porch_server.db.engine import make_engine, shown_url, sqlite_file
from porch_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    PorchError,
    Unavailable,
    first_line,
    shortened,
)
from porch_server.models import ImportCounts, Role, Token
from porch_server.service import check_description, check_role_binding
from porch_server.store import Store

EVENT_LOOPS = ("auto", "uvloop", "asyncio")

log = logging.getLogger("porch")

# A worker process that ran this long before it failed is restarted at once.
WORKER_STEADY_SECONDS = 30.0
# The most open files a server asks for (a connection is one), when the
# system's hard limit allows it.
FILE_LIMIT = 65_536
# The largest --db-pool-size, far past what a PostgreSQL server allows by
# default (max_connections is 100).
MAX_POOL_SIZE = 1_000
# The largest --max-streams: as many WatchEvents streams would hold about
# 14 GB of a server's memory.
MAX_STREAMS = 1_000_000
# After the grace period, how long a stopping server waits for statements
# still running on its threads before it ends without them.
STUCK_STATEMENT_SECONDS = 2.0
# How long `porch gateway` waits, as it starts, for its server to answer.
TARGET_CHECK_SECONDS = 5.0


T = TypeVar("T")


class StopWorkers(Protocol):
    """Stops the worker processes beside this one (see _extra_workers)."""

    def __call__(self, now: bool = False) -> None: ...


def _add_grace_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shutdown-grace-seconds",
        type=_positive,
        default=10.0,
        help="on SIGTERM, SIGINT or SIGHUP, how long calls in flight may go on (default 10)",
    )


def _add_db_flags(parser: argparse.ArgumentParser, npg_porchs: bool = True) -> None:
    """--db-url and --db-schema, whose defaults are npg_porch's variables too
    unless those name another database (npg_porchs false)."""
    url, schema = (
        ("$PORCH_DB_URL, $DB_URL,", " or $DB_SCHEMA") if npg_porchs else ("$PORCH_DB_URL", "")
    )
    parser.add_argument("--db-url", help=f"SQLAlchemy URL (default: {url} or sqlite:///porch.db)")
    parser.add_argument(
        "--db-schema", help=f"PostgreSQL schema (default: $PORCH_DB_SCHEMA{schema})"
    )


def _version() -> str:
    try:
        return importlib.metadata.version("porch")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="porch", description="Run each definition of pipeline work once and only once."
    )
    parser.add_argument("--version", action="version", version=f"porch {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server and the HTTP gateway")
    _add_db_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=_port, default=50051, help="gRPC port (default 50051)")
    serve.add_argument("--http-port", type=_port, help="HTTP gateway port (default 8080)")
    serve.add_argument("--no-http", action="store_true", help="serve gRPC only")
    serve.add_argument("--anonymous-reads", action="store_true", help="allow reads without a token")
    serve.add_argument(
        "--workers", type=int, default=1, help="server processes (SO_REUSEPORT; default 1)"
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate for both ports")
    serve.add_argument("--tls-key", type=Path, help="PEM private key for both ports")
    serve.add_argument("--tls-client-ca", type=Path, help="PEM CA that client certificates need")
    serve.add_argument("--log-config", type=Path, help="logging dictConfig file (JSON)")
    serve.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="auto (default): uvloop where it is installed, else asyncio's own",
    )
    serve.add_argument(
        "--lease-sweep-seconds",
        type=_positive,
        default=5.0,
        help="how often lapsed leases are freed (default 5)",
    )
    serve.add_argument(
        "--watch-poll-seconds",
        type=_positive,
        default=0.5,
        help="how often WatchEvents looks for events without a notification (default 0.5)",
    )
    serve.add_argument(
        "--watch-keepalive-seconds",
        type=_positive,
        default=15.0,
        help="a quiet WatchEvents stream gets a BOOKMARK this often (default 15)",
    )
    serve.add_argument(
        "--max-streams",
        type=_from_one_to(MAX_STREAMS),
        default=DEFAULT_MAX_STREAMS,
        metavar="N",
        help="WatchEvents streams a server process keeps open at once; more are refused"
        f" (default {DEFAULT_MAX_STREAMS:,})",
    )
    serve.add_argument(
        "--max-streams-per-token",
        type=_from_one_to(MAX_STREAMS),
        metavar="N",
        help="of those, the streams one token may hold (the anonymous readers of"
        f" --anonymous-reads count as one) (default: 1/{STREAMS_PER_TOKEN_SHARE} of"
        " --max-streams, at least 1)",
    )
    serve.add_argument(
        "--db-pool-size",
        type=_from_one_to(MAX_POOL_SIZE),
        default=10,
        metavar="N",
        help="database connections per pool; a server process holds at most 3 x N + 2 (default 10)",
    )
    _add_grace_flag(serve)
    serve.add_argument(
        "--event-retention-days",
        type=_positive_days,
        help="prune events older than this, hourly (default: keep them forever)",
    )

    web = commands.add_parser(
        "gateway", help="run the HTTP/JSON gateway alone, in front of a server"
    )
    web.add_argument(
        "--target", required=True, type=client.grpc_target, help="the porch gRPC server, HOST:PORT"
    )
    web.add_argument(
        "--target-tls",
        action="store_true",
        help="reach the gRPC server over TLS, verified with the system's CAs "
        "(implied by the --target-tls-* files)",
    )
    web.add_argument("--target-tls-ca", type=Path, help="PEM CA to verify a TLS gRPC server with")
    web.add_argument(
        "--target-tls-cert", type=Path, help="PEM client certificate, for a server that asks"
    )
    web.add_argument("--target-tls-key", type=Path, help="PEM private key of --target-tls-cert")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    web.add_argument("--http-port", type=_port, default=8080, help="HTTP port (default 8080)")
    web.add_argument(
        "--workers", type=int, default=1, help="gateway processes (SO_REUSEPORT; default 1)"
    )
    web.add_argument("--tls-cert", type=Path, help="PEM certificate to serve HTTPS with")
    web.add_argument("--tls-key", type=Path, help="PEM private key to serve HTTPS with")
    web.add_argument("--tls-client-ca", type=Path, help="PEM CA that client certificates need")
    web.add_argument("--log-config", type=Path, help="logging dictConfig file (JSON)")
    _add_grace_flag(web)

    commands.add_parser("openapi", help="print the OpenAPI 3.1 document")

    events = commands.add_parser("events", help="manage the event log")
    event_commands = events.add_subparsers(dest="events_command", required=True, metavar="COMMAND")
    prune = event_commands.add_parser("prune", help="delete events older than some days")
    prune.add_argument(
        "--older-than-days",
        type=_days,
        required=True,
        metavar="DAYS",
        help="delete events older than this many days",
    )
    _add_db_flags(prune)

    db = commands.add_parser("db", help="manage the database: its schema, an import from npg_porch")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="create or upgrade the schema")
    _add_db_flags(upgrade)
    imports = db_commands.add_parser(
        "import-npg-porch",
        help="copy an npg_porch database's pipelines, tokens, tasks and events into porch's",
        description="Copy an npg_porch 2 database's pipelines, tokens, tasks and events into"
        " porch's database, in one transaction: all of it or, on any error, nothing."
        " What porch has already is left as it is, so a second run adds only what is new."
        " Stop npg_porch first: its later changes are not copied.",
    )
    imports.add_argument(
        "--from-db-url",
        required=True,
        metavar="URL",
        help="npg_porch's database, as its DB_URL names it (read only)",
    )
    imports.add_argument(
        "--from-db-schema",
        metavar="SCHEMA",
        help="npg_porch's schema, as its DB_SCHEMA names it (default, on PostgreSQL:"
        f" {npg_porch.DEFAULT_SCHEMA}, npg_porch's own)",
    )
    imports.add_argument(
        "--dry-run", action="store_true", help="check and count everything, then write nothing"
    )
    _add_db_flags(imports, npg_porchs=False)

    token = commands.add_parser("token", help="manage tokens directly in the database")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_commands.add_parser(
        "create", help="create a token; prints the secret on stdout, its id on stderr"
    )
    role = create.add_mutually_exclusive_group(required=True)
    role.add_argument("--admin", action="store_true", help="an admin token")
    role.add_argument("--pipeline", metavar="NAME", help="a token for one pipeline's tasks")
    role.add_argument("--reader", action="store_true", help="a read-only token")
    create.add_argument("--description", required=True, help="what the token is for")
    _add_db_flags(create)
    listing = token_commands.add_parser(
        "list",
        help="list tokens (never their secrets), a tab-separated line each:"
        " id, role, pipeline, created, revoked, description",
    )
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    listing.add_argument("--pipeline", metavar="NAME", help="only this pipeline's tokens")
    _add_db_flags(listing)
    revoke = token_commands.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id", help="the id `porch token list` shows")
    _add_db_flags(revoke)

    client.add_commands(commands)
    return parser


def _open_store(
    args: argparse.Namespace, create: bool = False, environ: Mapping[str, str] = os.environ
) -> Store:
    """Open the store named by the flags (or environ), refusing a schema that
    is not up to date. A SQLite file of porch's is brought up to date by any
    command, but made only when create is set (porch serve): a command run
    from another directory would otherwise make a database of its own beside
    the server's, and one given another program's file, or an empty one,
    would put porch's tables in it."""
    url, schema = db_settings(args.db_url, args.db_schema, environ)
    engine = make_engine(url, schema)
    if url.startswith("sqlite"):
        if not create:
            _check_sqlite_file(url)
            found = migrate.current_revision(engine)
            engine.dispose()  # its connection, as the migrations change the file
            if found is None:
                raise SystemExit(
                    f"porch: {url} is not a porch database (it records no migration of"
                    " porch's): give the --db-url that porch serve uses, or make one with"
                    " `porch db upgrade`. Nothing was changed."
                )
        migrate.upgrade(url, schema)
    found = migrate.current_revision(engine)
    if found != migrate.head_revision():
        _refuse_outdated(engine, url, schema, found)
    return Store(engine)


def _refuse_outdated(engine: Engine, url: str, schema: str | None, found: str | None) -> NoReturn:
    """Exit naming why the database (at revision found) cannot be served
    from, and what to do: `porch db upgrade`, unless that would refuse too."""
    where = shown_url(url)
    also = ""
    if schema is not None:
        where, also = f"{where}, schema {schema},", " and --db-schema"
    try:
        if found is not None and found not in migrate.revisions():
            raise SystemExit(
                f"porch: the database at {where} records migration {found!r}, which this "
                "porch does not know: a newer porch or another program set it up"
            )
        # Tables that are not porch's (npg_porch's, say), or no schema to put
        # porch's in: `porch db upgrade` would refuse, so say why now. A schema
        # named here that is not there yet is one the upgrade will create.
        with engine.connect() as connection:
            if schema is None or migrate.schema_exists(connection, schema):
                migrate.check_tables_are_porchs(connection, found)
    except PorchError as error:
        raise SystemExit(f"porch: {error}") from None
    finally:
        engine.dispose()
    elsewhere = ""
    if found is None and schema is None and engine.dialect.name == "postgresql":
        # Its own schema forgotten, an upgrade would make a second, empty porch.
        elsewhere = (
            "; if porch's tables are in a schema of their own, name it with --db-schema"
            " (or PORCH_DB_SCHEMA) instead"
        )
    raise SystemExit(
        f"porch: the database at {where} is not at the latest migration (or not "
        f"there at all); run `porch db upgrade` with the same --db-url{also}{elsewhere}"
    )


def _check_sqlite_file(url: str) -> None:
    path = sqlite_file(url)  # None, in memory: make_engine refuses it
    if path is not None and not Path(path).exists():
        raise SystemExit(
            f"porch: no database at {url}: give the --db-url that porch serve uses "
            "(the default is porch.db in the current directory), or make one with "
            "`porch db upgrade`"
        )


def _config(args: argparse.Namespace) -> Config:
    url, schema = db_settings(args.db_url, args.db_schema)
    tls = _tls(args)
    if args.workers < 1:
        raise SystemExit("porch: --workers must be at least 1")
    if args.no_http and args.http_port is not None:
        raise SystemExit(
            "porch: --no-http and --http-port ask for no HTTP port and for one: give one of them"
        )
    http_port = None if args.no_http else 8080 if args.http_port is None else args.http_port
    if http_port and http_port == args.grpc_port:
        raise SystemExit(f"porch: --grpc-port and --http-port are both {http_port}: give two ports")
    if args.workers > 1 and (args.grpc_port == 0 or http_port == 0):
        raise SystemExit(
            "porch: --workers share their ports: give a fixed --grpc-port and --http-port"
        )
    per_token = args.max_streams_per_token
    if per_token is None:
        per_token = streams_per_token(args.max_streams)
    elif per_token > args.max_streams:
        raise SystemExit(
            f"porch: --max-streams-per-token {per_token:,} is more than --max-streams"
            f" {args.max_streams:,}: a token can hold no more streams than the server keeps"
        )
    return Config(
        db_url=url,
        db_schema=schema,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=http_port,
        anonymous_reads=args.anonymous_reads,
        tls=tls,
        workers=args.workers,
        log_config=args.log_config,
        lease_sweep_seconds=args.lease_sweep_seconds,
        event_retention_days=args.event_retention_days,
        watch_poll_seconds=args.watch_poll_seconds,
        watch_keepalive_seconds=args.watch_keepalive_seconds,
        max_streams=args.max_streams,
        max_streams_per_token=per_token,
        grace_seconds=args.shutdown_grace_seconds,
        event_loop=args.event_loop,
        db_pool_size=args.db_pool_size,
    )


def run_loop(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """Run main to completion on a new event loop of the kind asked for, and
    return what it returns.

    uvloop runs the same asyncio code (grpc.aio, uvicorn) with less CPU per
    call; "auto" takes it where it is installed (not on Windows).
    """
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise SystemExit("porch: --event-loop uvloop needs the uvloop package") from None
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _setup_logging(log_config: Path | None) -> None:
    if log_config is not None:
        where = f"--log-config {log_config}"
        try:
            config = json.loads(option_file("--log-config", log_config))
        except ValueError as error:
            raise ValueError(f"{where}: not JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{where}: a logging dictConfig is a JSON object")
        # dictConfig would otherwise silence every logger that exists already:
        # porch's own, the access log among them, unless the file names them.
        config.setdefault("disable_existing_loggers", False)
        try:
            logging.config.dictConfig(config)
        except (ValueError, TypeError, AttributeError, ImportError) as error:
            cause = f" ({error.__cause__})" if error.__cause__ else ""
            raise ValueError(f"{where}: {error}{cause}") from None
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def _serve(args: argparse.Namespace) -> None:
    config = _config(args)
    _setup_logging(config.log_config)
    _raise_file_limit()
    # A URL porch cannot use is refused before the ports are tried, and
    # before the database is: it takes neither to find out.
    make_engine(*db_settings(args.db_url, args.db_schema)).dispose()
    if config.tls is not None:
        config.tls.read()  # likewise a file that cannot be read
    ports = [config.grpc_port] if config.http_port is None else [config.grpc_port, config.http_port]
    _check_ports_free(config.host, ports, config.workers > 1)
    _warn_if_in_clear(config.host, config.tls)
    store = _open_store(args, create=True)
    try:
        if not store.has_had_admin_token():
            secret = auth.new_secret()
            store.create_token(Role.ADMIN, None, "first admin token", auth.hash_secret(secret))
            print(f"porch: created the first admin token (shown only now): {secret}", flush=True)
    finally:
        store.close()
    with _extra_workers(_run_worker, (config,), config.workers - 1) as stop_workers:
        failed = _run_worker(config, stop_workers)
    leave_stuck_statements(exit_code=1 if failed else 0)
    if failed:  # its supervisor starts it again
        raise SystemExit(1)


@contextlib.contextmanager
def _extra_workers(
    target: Callable[..., object], args: tuple[Any, ...], count: int
) -> Iterator[StopWorkers]:
    """Run count more processes of target(*args) beside this one while the block
    runs; then stop them (SIGTERM) and wait for them. The block is given a
    function that stops them (SIGTERM) at once, without waiting: call it as
    this process begins to stop, so that every process stops taking calls
    at the same moment and they share one grace period; with now=True it
    ends them (SIGKILL), their grace period cut short.

    A process that ends on its own with an exit code other than 0 (killed, or
    crashed) is replaced, so the port keeps as many servers as asked for; one
    that ends with 0 was asked to stop. A process that fails again soon after
    its start waits longer before each new try, up to a minute.
    """
    if count < 1:
        yield lambda now=False: None
        return
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    workers = [context.Process(target=target, args=args) for _ in range(count)]
    started = [time.monotonic()] * count
    delays = [0.0] * count
    for worker in workers:
        worker.start()

    stopped: set[int] = set()  # indexes of workers that ended with 0
    # Held while a replacement starts: stop() sees it started, or never made.
    replacing = threading.Lock()

    def replace_the_failed() -> None:
        while not stopping.is_set():
            watched = [w.sentinel for i, w in enumerate(workers) if i not in stopped]
            ended = multiprocessing.connection.wait(watched, timeout=0.5)
            for index, worker in enumerate(workers):
                if worker.sentinel not in ended or stopping.is_set():
                    continue
                worker.join()
                if worker.exitcode == 0:
                    log.info("worker process %d stopped", worker.pid)
                    stopped.add(index)
                    continue
                lived = time.monotonic() - started[index]
                delays[index] = (
                    0.0 if lived > WORKER_STEADY_SECONDS else min(2 * delays[index] or 1.0, 60.0)
                )
                log.warning(
                    "worker process %d ended with exit code %s; starting another%s",
                    worker.pid,
                    worker.exitcode,
                    f" in {delays[index]:g} s" if delays[index] else "",
                )
                if stopping.wait(delays[index]):
                    return
                with replacing:
                    if stopping.is_set():
                        return
                    workers[index] = context.Process(target=target, args=args)
                    workers[index].start()
                started[index] = time.monotonic()

    def stop(now: bool = False) -> None:
        if now:
            # From a signal handler, maybe while this thread is in stop()
            # below: no lock is taken. A worker started meanwhile ends with
            # this process (it watches it).
            for worker in list(workers):
                with contextlib.suppress(ValueError, AttributeError):  # closed, or not started
                    worker.kill()
            return
        with replacing:
            stopping.set()  # so no worker stopped now is replaced
            for worker in workers:
                worker.terminate()

    watcher = threading.Thread(target=replace_the_failed, name="porch-workers", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        stop()
        watcher.join()
        for worker in workers:
            worker.join()


def _run_worker(config: Config, on_stop: StopWorkers | None = None) -> bool:
    """Serve until SIGTERM or SIGINT in this process; then call on_stop
    first. True if the gRPC server stopped of its own accord instead (see
    _until_stopped): a worker then ends with exit code 1, for the first
    process to start another."""
    worker = multiprocessing.parent_process() is not None
    if worker:
        _setup_logging(config.log_config)
    failed = run_loop(_serve_async(config, on_stop), config.event_loop)
    _after_the_loop(on_stop)
    if worker:
        leave_stuck_statements(exit_code=1 if failed else 0)
        if failed:
            raise SystemExit(1)
    return failed


def leave_stuck_statements(wait: float = STUCK_STATEMENT_SECONDS, exit_code: int = 0) -> None:
    """End the process now, with exit_code, if, its calls ended, statements
    still run on its threads after wait seconds.

    Python waits for such threads at exit: a statement waiting for a lock
    held elsewhere would hold a stopping server open as long as the lock is
    held, whatever its grace period. Their callers were answered when the
    grace period ended, and server.stop has asked PostgreSQL to cancel
    their statements; one that goes on all the same, or a SQLite write
    waiting for its lock, is abandoned with the process.
    """
    deadline = time.monotonic() + wait
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]
    if stuck:
        log.warning(
            "stopping with %d thread(s) still running (database statements): they are"
            " abandoned with the process",
            len(stuck),
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def _freeze_startup_objects() -> None:
    """Keep what start-up built, which lives as long as the process, out of
    the garbage collector's full passes.

    Each full pass scans every tracked object and holds up every call while
    it runs: 40-80 ms with 1,000 watch streams when the modules, the
    descriptors and the pools are scanned too, a quarter of that without.
    """
    gc.collect()
    gc.freeze()


async def _serve_async(config: Config, on_stop: StopWorkers | None = None) -> bool:
    """Serve until signalled (see _stop_on_signals), then stop; True if the
    gRPC server stopped of its own accord instead."""
    store = Store(make_engine(config.db_url, config.db_schema, pool_size=config.db_pool_size))
    stopping = _stop_on_signals(on_stop)
    running = await server.start(config, store)
    print(f"porch: gRPC listening on {host_port(config.host, running.port)}", flush=True)
    http_server = None
    try:
        if config.http_port is not None:
            # The gateway calls the service in this process: no connection, no
            # second serialization round trip over a socket.
            http_server = _http_server(
                web.gateway_options(running.local.target),
                config.host,
                config.http_port,
                config.tls,
                config.workers > 1,
                config.grace_seconds,
                upstream=running.local,
            )
            await http_server.start()
            scheme = "https" if config.tls else "http"
            address = f"{scheme}://{host_port(config.host, http_server.port)}/"
            print(f"porch: HTTP gateway on {address}", flush=True)
        _freeze_startup_objects()
        failed = await _until_stopped(stopping, running.server)
        if not failed:
            log.info("shutting down: finishing calls in flight")
        if on_stop is not None:
            on_stop()
    finally:
        # Both stop taking calls at once and share one grace period.
        await server.stop(running, config.grace_seconds, http_server.stop if http_server else None)
        store.close()
    return failed


async def _until_stopped(stopping: asyncio.Event, grpc_server: grpc.aio.Server) -> bool:
    """Wait for a signal to stop; True if the gRPC server stopped first, of
    its own accord. grpc.aio stops a server whose serving loop fails (on a
    request whose method name is not UTF-8, in grpc 1.85): its port then
    refuses every connection while the process, and its HTTP port, would
    go on as though all were well."""
    signalled = asyncio.ensure_future(stopping.wait())
    # Never cancelled: grpc's wait awaits the server's own future of its
    # shutdown, and cancelling it would end the stop's grace period at once.
    ended = asyncio.ensure_future(grpc_server.wait_for_termination())
    ended.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await asyncio.wait((signalled, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
    if stopping.is_set():
        return False
    log.error(
        "the gRPC server stopped serving of its own accord (grpc's serving loop failed, as"
        " logged above): stopping this process, with exit code 1, to be started again"
    )
    return True


def _stop_on_signals(on_stop: StopWorkers | None = None) -> asyncio.Event:
    """Return an event that SIGTERM, SIGINT or SIGHUP sets, or in a worker
    process the end of the process that started it (killed, say), so that
    no worker goes on serving the port alone.

    Another such signal once the event is set (a second Ctrl-C, say) ends the
    process at once, and its workers (on_stop(now=True)), without the rest
    of the grace period. A worker takes none as its second: a terminal's
    Ctrl-C reaches each worker beside the SIGTERM its parent sends it, and
    its parent, signalled again, ends it."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    worker = multiprocessing.parent_process() is not None

    def signalled() -> None:
        if not stopping.is_set():
            stopping.set()
        elif not worker:
            _stop_now(on_stop)

    for signum in _stop_signals():
        loop.add_signal_handler(signum, signalled)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        loop.add_reader(parent.sentinel, stopping.set)
    return stopping


def _after_the_loop(on_stop: StopWorkers | None) -> None:
    """Once the event loop is gone, which handled the signals (see
    _stop_on_signals): the first process ends at once on a signal, as it
    may still wait for its workers or for statements left running on its
    threads; a worker, which its parent ends, takes none (Python's own
    handlers would end it with a traceback)."""
    worker = multiprocessing.parent_process() is not None
    for signum in _stop_signals():
        if worker:
            signal.signal(signum, signal.SIG_IGN)
        else:
            signal.signal(signum, lambda *_: _stop_now(on_stop))


def _stop_signals() -> list[signal.Signals]:
    """The signals that stop a server: SIGTERM, SIGINT and SIGHUP (its
    terminal closed), but a SIGHUP ignored (nohup, a supervisor) stays ignored."""
    return [
        signum
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN
    ]


# Set once _stop_now has begun.
_STOPPING_NOW = False


def _stop_now(on_stop: StopWorkers | None) -> None:
    """End this process, and its workers, at once: the calls in flight are
    cut off with the connections (their clients told UNAVAILABLE; what they
    asked may have been done), as though the grace period were over."""
    global _STOPPING_NOW
    if _STOPPING_NOW:  # a third signal, in the second's handler: nothing more to wait for
        os._exit(1)
    _STOPPING_NOW = True
    log.warning(
        "signalled again while stopping: stopping now, without the rest of the grace"
        " period; calls still in flight are cut off with their connections"
    )
    if on_stop is not None:
        on_stop(now=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _raise_file_limit() -> None:
    """Let this process (and the workers it starts) open as many files as
    the system allows it, up to FILE_LIMIT: each connection takes one, and
    the usual soft limit of 1,024 would stop a server holding a thousand
    idle HTTP connections or streams from accepting any more, on either port."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, FILE_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        log.debug("raised the open file limit from %d to %d", soft, wanted)


def _check_ports_free(host: str, ports: Sequence[int], shared: bool) -> None:
    """Refuse to start on a host or port this machine cannot serve on, saying
    why: the name does not resolve, the address is not this machine's, the
    port is in use or needs privileges. A plain bind also fails on a port
    another `--workers` deployment holds: workers share their ports
    (SO_REUSEPORT) with whatever else asks to, another porch on another
    database included, which would then take half the calls."""
    if not host:
        raise SystemExit("porch: --host is empty: give 0.0.0.0 or :: for every address")
    try:
        addresses = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise SystemExit(f"porch: --host {host}: {error.strerror}") from None
    family, _, _, _, address = addresses[0]
    for port in ports:
        if port == 0:  # any free port: nothing to check
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address[0], port, *address[2:]))
            except OSError as error:
                hint = ""
                if shared and error.errno == errno.EADDRINUSE:
                    hint = ": --workers share their ports with no one else"
                raise SystemExit(
                    f"porch: cannot serve on {host} port {port}: {error.strerror}{hint}"
                ) from None


def _warn_if_in_clear(host: str, tls: TLS | None) -> None:
    """Warn that a server other machines can reach without TLS (on an address
    not a loopback one) lets anyone on the way read its callers' tokens: it
    may stand behind a proxy that ends TLS, so it is not refused. With TLS,
    warn of a certificate clients will refuse, or soon will (TLS.warnings):
    its clients may not check it, so it is not refused either."""
    if tls is not None:
        for warning in tls.warnings():
            log.warning("%s", warning)
        return
    addresses = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if all(ipaddress.ip_address(address[4][0]).is_loopback for address in addresses):
        return
    log.warning(
        "serving on %s without TLS: tokens and tasks cross the network in clear text;"
        " give --tls-cert and --tls-key, unless a proxy in front of porch ends TLS",
        host,
    )


def _warn_if_target_in_clear(target: str, tls: gateway.ClientTLS | None) -> None:
    """Warn that a gateway passing its callers' tokens to a server on another
    machine without TLS lets anyone on the way read them, whatever TLS its
    callers came with. A target whose host is not known yet, or that gRPC
    resolves its own way (xds:, say), is left alone."""
    if tls is not None or target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return
    hosts = _target_hosts(target)
    if not hosts:
        return
    try:
        addresses = [
            address[4][0]
            for host in hosts
            for address in socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
        ]
    except (socket.gaierror, UnicodeError):
        return  # cannot be reached now: _check_target says so
    if all(_this_machine(str(address)) for address in addresses):
        return
    log.warning(
        "passing calls to %s without TLS: callers' tokens and tasks cross the network in"
        " clear text; give --target-tls (with --target-tls-ca for a private CA), unless that"
        " network is one you trust",
        target,
    )


def _this_machine(address: str) -> bool:
    """Whether a connection to address stays on this machine: a loopback
    address (IPv4-mapped too), or the unspecified one (0.0.0.0, ::), which
    a connection takes for this machine's."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names: HOST:PORT, [IPv6]:PORT, dns:[//AUTHORITY/]HOST[:PORT],
    ipv4:ADDRESS:PORT,… or ipv6:[ADDRESS]:PORT,…; none for a target of another form."""
    if target.startswith("dns:"):
        name = target.removeprefix("dns:")
        if name.startswith("//"):
            name = name[2:].partition("/")[2]
        names = [name]
    elif target.startswith(("ipv4:", "ipv6:")):
        names = target[5:].split(",")
    elif ":" in target and not target.startswith(client.GRPC_SCHEMES):
        names = [target]
    else:
        return []
    hosts = []
    for name in names:
        if name.startswith("["):
            host = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            host = name.partition(":")[0]
        else:
            host = name
        if host:
            hosts.append(host)
    return hosts


def _http_server(
    options: gateway.GatewayOptions,
    host: str,
    port: int,
    tls: TLS | None,
    reuse_port: bool,
    grace: float,
    upstream: gateway.LocalUpstream | None = None,
) -> gateway.HttpServer:
    server_tls = None
    if tls is not None:
        client_ca = str(tls.client_ca_file) if tls.client_ca_file else None
        server_tls = gateway.ServerTLS(str(tls.cert_file), str(tls.key_file), client_ca)
    try:
        return gateway.HttpServer(
            gateway.create_app(options, upstream),
            host=host,
            port=port,
            tls=server_tls,
            reuse_port=reuse_port,
            grace=grace,
        )
    except OSError as error:
        raise OSError(
            f"cannot serve HTTP on {host_port(host, port)}: {error.strerror or error}"
        ) from None


def _tls(args: argparse.Namespace) -> TLS | None:
    """The server's TLS files from the flags; None for plaintext."""
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("porch: --tls-cert and --tls-key go together (--tls-client-ca needs both)")
    return TLS(args.tls_cert, args.tls_key, args.tls_client_ca)


def _gateway(args: argparse.Namespace) -> None:
    _setup_logging(args.log_config)
    _raise_file_limit()
    tls = _tls(args)
    if tls is not None:
        tls.read()  # a file that cannot be used is named now, as `porch serve` does
    if args.workers < 1:
        raise SystemExit("porch: --workers must be at least 1")
    if args.workers > 1 and args.http_port == 0:
        raise SystemExit("porch: --workers share their port: give a fixed --http-port")
    target_tls = client.client_tls(
        "--target-tls",
        args.target_tls,
        args.target_tls_ca,
        args.target_tls_cert,
        args.target_tls_key,
    )
    # Each process builds its own options: descriptors do not pickle.
    run = (
        args.target,
        target_tls,
        args.host,
        args.http_port,
        tls,
        args.workers > 1,
        args.log_config,
        args.shutdown_grace_seconds,
    )
    _check_ports_free(args.host, [args.http_port], args.workers > 1)
    _warn_if_in_clear(args.host, tls)
    _warn_if_target_in_clear(args.target, target_tls)
    with _extra_workers(_run_gateway, run, args.workers - 1) as stop_workers:
        _run_gateway(*run, on_stop=stop_workers)


def _run_gateway(
    target: str,
    client_tls: gateway.ClientTLS | None,
    host: str,
    port: int,
    tls: TLS | None,
    reuse_port: bool,
    log_config: Path | None,
    grace: float,
    on_stop: StopWorkers | None = None,
) -> None:
    """Serve the gateway until SIGTERM or SIGINT in this process; then call on_stop first."""
    if multiprocessing.parent_process() is not None:
        _setup_logging(log_config)
    options = web.gateway_options(target, client_tls)

    async def run() -> None:
        stopping = _stop_on_signals(on_stop)
        web = _http_server(options, host, port, tls, reuse_port, grace)
        await web.start()
        scheme = "https" if tls else "http"
        print(
            f"porch: HTTP gateway on {scheme}://{host_port(host, web.port)}/ for {options.target}",
            flush=True,
        )
        checking = asyncio.ensure_future(_check_target(options))
        try:
            await stopping.wait()
            if on_stop is not None:
                on_stop()
        finally:
            checking.cancel()
            await web.stop()

    run_loop(run(), "auto")
    _after_the_loop(on_stop)


async def _check_target(options: gateway.GatewayOptions) -> None:
    """Log, with a hint where one fits, that the gateway's server cannot be
    reached as it starts: else its only sign is each request's 503."""
    upstream = gateway.Upstream(options.target, options.tls, options.channel_options)
    try:
        health = health_pb2_grpc.HealthStub(upstream.channel)
        checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=TARGET_CHECK_SECONDS)
        if checked.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(checked.status)
            log.warning(
                "the server at %s answers %s now (its database unreachable, say; its log says"
                " why); /healthz answers 503 until it serves",
                options.target,
                status,
            )
    except grpc.aio.AioRpcError as error:
        tls = options.tls
        certificate = tls is not None and tls.certificate_chain is not None
        hint = client.tls_hint(error, "--target-tls", tls is not None, certificate)
        log.warning(
            "the server at %s cannot be reached now (%s: %s)%s; requests are answered 503 until"
            " it can be",
            options.target,
            error.code().name,
            error.details(),
            hint,
        )
    finally:
        await upstream.close()


def _prune(args: argparse.Namespace) -> None:
    store = _open_store(args)
    try:
        cutoff = datetime.now(UTC) - timedelta(days=args.older_than_days)
        pruned = store.prune_events(cutoff)
        print(f"porch: deleted {pruned} event(s) older than {cutoff:%Y-%m-%d %H:%M:%S} UTC")
        kept = store.count_events_before(cutoff)
        if kept:
            why = " they follow an event still kept, as a clock behind another's writes them"
            if store.engine.dialect.name == "postgresql":
                why = (
                    " a transaction still open on the PostgreSQL server, in any database, may"
                    " yet write events before them (run this again once it has ended), or" + why
                )
            print(f"porch: {kept} older event(s) kept, so that no stream misses one:{why}")
    finally:
        store.close()


def _db_upgrade(args: argparse.Namespace) -> None:
    url, schema = db_settings(args.db_url, args.db_schema)
    migrate.upgrade(url, schema)
    print(f"porch: database schema is at {migrate.head_revision()}")


def _import_npg_porch(args: argparse.Namespace) -> None:
    if not args.from_db_url.strip():  # "$DB_URL" with DB_URL not set
        raise InvalidArgument("--from-db-url is empty: give npg_porch's database URL, its DB_URL")
    source = npg_porch.source_settings(
        *db_settings(args.from_db_url, args.from_db_schema, environ={})
    )
    # npg_porch's own variables name the database read here, never porch's.
    environ = {key: value for key, value in os.environ.items() if key not in NPG_PORCH_VARIABLES}
    target = db_settings(args.db_url, args.db_schema, environ)
    if _same_tables(source, target):
        raise FailedPrecondition(
            "npg_porch's database and porch's are the same: name porch's with --db-url and"
            " --db-schema, or PORCH_DB_URL and PORCH_DB_SCHEMA"
        )
    read, written = _described(*source), _described(*target)
    print(f"porch: copying npg_porch's database {read} into porch's {written}")
    try:
        store = _open_store(args, environ=environ)
    except sqlalchemy.exc.DBAPIError as error:
        said = first_line(error.orig or error)
        _not_imported(f"cannot use porch's database {written}: {said}")
    try:
        with npg_porch.reading(*source) as npg:
            zone = npg.time_zone()
            counts = store.import_records(npg, keep=not args.dry_run)
    except npg_porch.Unreadable as error:
        _not_imported(str(error))
    except Unavailable as error:  # read-only, say, which the source is meant to be
        _not_imported(f"porch's database {written}: {error}")
    except PorchError as error:
        _not_imported(str(error))
    finally:
        store.close()
    _print_import(counts, zone, args.dry_run)


def _same_tables(one: tuple[str, str | None], other: tuple[str, str | None]) -> bool:
    """True when two databases and schemas (PostgreSQL's public when none is
    named) are the same."""
    return (one[0], one[1] or "public") == (other[0], other[1] or "public")


def _described(url: str, schema: str | None) -> str:
    return shown_url(url) + (f", schema {schema}" if schema else "")


def _not_imported(why: str) -> NoReturn:
    print(f"porch: {why}; nothing was imported", file=sys.stderr)
    raise SystemExit(1)


def _print_import(counts: ImportCounts, zone: str, dry_run: bool) -> None:
    print(f"porch: npg_porch's times were read as {zone}")
    print(
        f"porch: {'would import' if dry_run else 'imported'} {counts.pipelines_added:,}"
        f" pipeline(s), {counts.tokens_added:,} token(s), {counts.tasks_added:,} task(s) and"
        f" {counts.events_added:,} event(s)"
    )
    if counts.pipelines_found or counts.tokens_found or counts.tasks_found:
        print(
            f"porch: left as they were in porch: {counts.pipelines_found:,} pipeline(s),"
            f" {counts.tokens_found:,} token(s), {counts.tasks_found:,} task(s) with their own"
            f" events ({counts.events_left:,} of npg_porch's events of them not copied)"
        )
    if counts.events_of_no_task:
        print(
            f"porch: {counts.events_of_no_task:,} of npg_porch's events are of no task there,"
            " and were not copied"
        )
    for changed in counts.changed_ids:
        print(
            f"porch: task {changed.former_id} of pipeline {changed.pipeline_name}"
            f" is task {changed.task_input_id} in porch"
        )
    if counts.changed_ids:
        print(
            f"porch: {len(counts.changed_ids):,} task(s) have ids of porch's own: porch computes"
            " a task's id from its input, where npg_porch wrote a whole number sent with a"
            " fraction (100.0) as it was sent, or computed the id otherwise"
        )
    if dry_run:
        print("porch: nothing was written (--dry-run)")


def _token(args: argparse.Namespace) -> None:
    store = _open_store(args)
    try:
        if args.token_command == "create":
            role = Role.ADMIN if args.admin else Role.READER if args.reader else Role.PIPELINE
            check_description(args.description)
            check_role_binding(role, args.pipeline)
            secret = auth.new_secret()
            made = store.create_token(
                role, args.pipeline, args.description, auth.hash_secret(secret)
            )
            try:
                print(secret, flush=True)
            except OSError as error:  # a full disk, a reader gone (`| true`)
                _drop_stdout()
                store.revoke_token(made.token_id)
                raise SystemExit(
                    f"porch: could not write the new token's secret ({error.strerror}):"
                    f" token {made.token_id}, which nobody could have had, was revoked"
                ) from None
            owner = f" of pipeline {made.pipeline_name}" if made.pipeline_name else ""
            described = access.escape(made.description)
            print(
                f"porch: created {made.role} token {made.token_id}{owner}: {described}",
                file=sys.stderr,
            )
        elif args.token_command == "list":
            page_token = ""
            header = sys.stdout.isatty()
            while True:
                page = store.list_tokens(args.pipeline, None, args.all, 1000, page_token)
                if header:  # once the pipeline is known to exist
                    print("ID\tROLE\tPIPELINE\tCREATED\tREVOKED\tDESCRIPTION")
                    header = False
                for token in page.items:
                    print(f"{token.token_id}\t{_token_line(token)}")
                page_token = page.next_page_token
                if not page_token:
                    break
        else:
            before = datetime.now(UTC)
            token = store.revoke_token(args.token_id)
            named = f"token {token.token_id} ({access.escape(token.description)})"
            if token.revoke_time is not None and token.revoke_time < before:
                print(f"porch: {named} was already revoked on {_utc(token.revoke_time)}")
            else:
                print(f"porch: revoked {named}")
    finally:
        store.close()


def _token_line(token: Token) -> str:
    """A token's role, pipeline, times and description, tab-separated; "-" for none."""
    revoked = _utc(token.revoke_time) if token.revoke_time else "-"
    description = access.escape(token.description)
    pipeline = token.pipeline_name or "-"
    return f"{token.role}\t{pipeline}\t{_utc(token.create_time)}\t{revoked}\t{description}"


def _utc(moment: datetime) -> str:
    """A time in UTC to the second, as ISO 8601 writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _port(text: str) -> int:
    """A TCP port number from the command line (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number from 0 to 65535: {text!r}")
    return port


# Days as far back as any event goes: larger counts overflow a date.
_MAX_DAYS = 36_500


def _days(text: str, above_zero: bool = False) -> float:
    """A number of days from 0 (or above 0) to _MAX_DAYS."""
    value = finite_number(text)
    if not (value > 0 if above_zero else value >= 0) or value > _MAX_DAYS:
        lowest = "above 0 and at most" if above_zero else "from 0 to"
        raise argparse.ArgumentTypeError(f"not a number of days {lowest} {_MAX_DAYS}: {text!r}")
    return value


def _positive_days(text: str) -> float:
    """A number of days above 0, at most _MAX_DAYS."""
    return _days(text, above_zero=True)


def _from_one_to(most: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to most."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"not a whole number from 1 to {most:,}: {text!r}")
        return value

    return whole_number


def _positive(text: str) -> float:
    """A positive, finite number (of seconds)."""
    value = finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Run the porch command line."""
    args = _parser().parse_args(argv)
    if sys.stdout is None and args.command not in ("serve", "gateway"):
        # Closed (>&-): Python drops what is printed, a token's secret or a claim unsaid.
        raise SystemExit("porch: stdout is closed: nothing was done, as its output would be lost")
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Text a stdout of another encoding cannot hold (a pipeline's name in
        # porch watch's lines, a token's description) is shown in Python's
        # escapes (\xe9), not refused after the work was done; JSON is
        # written in JSON's own escapes instead (client.print_json).
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "db" and args.db_command == "upgrade":
            _db_upgrade(args)
        elif args.command == "db":
            _import_npg_porch(args)
        elif args.command == "token":
            _for_a_pipeline(lambda: _token(args))
        elif args.command == "gateway":
            _gateway(args)
        elif args.command == "openapi":
            _for_a_pipeline(lambda: client.print_json(web.openapi_document(), indent=2))
        elif args.command == "events":
            _prune(args)
        else:
            _for_a_pipeline(lambda: client.run(args))
    except PorchError as error:
        print(f"porch: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as error:  # a port in use, a file that is not there
        print(f"porch: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as error:
        said = first_line(error.orig or error)
        print(f"porch: cannot use the database{_sqlite_named(args)}: {said}", file=sys.stderr)
        raise SystemExit(1) from None
    except sqlalchemy.exc.DBAPIError as error:  # an option libpq does not know, say
        said = first_line(error.orig or error)
        print(f"porch: the database{_sqlite_named(args)} refused: {said}", file=sys.stderr)
        raise SystemExit(1) from None
    except UnicodeEncodeError as error:
        given = error.object if isinstance(error.object, str) else ""
        character = given[error.start : error.start + 1]
        if client.not_text(error):  # from a flag, or JSON's "\ud800"
            print(
                f"porch: {shortened(given)!r} holds {character!r}, which {client.NOT_TEXT}",
                file=sys.stderr,
            )
        else:  # none known since stdout escapes what it cannot hold (main): Python's words
            print(f"porch: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as error:  # a database URL or schema name porch cannot use
        print(f"porch: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _sqlite_named(args: argparse.Namespace) -> str:
    """ " FILE" for a command on a SQLite database, whose driver's errors do
    not name the file ("unable to open database file"); else nothing: a
    PostgreSQL driver's errors name the server."""
    if not hasattr(args, "db_url"):
        return ""
    url, _ = db_settings(args.db_url, getattr(args, "db_schema", None))
    try:
        path = sqlite_file(url) if url.startswith("sqlite") else None
    except ValueError:
        return ""
    return "" if path is None else f" {Path(path).absolute()}"


def _for_a_pipeline(command: Callable[[], None]) -> None:
    """Run a command whose output may go to a shell pipeline.

    When whoever reads it leaves (`porch task list | head -1`), stop quietly
    with the status of a program ended by SIGPIPE. stdout goes to /dev/null
    first, or the flush at exit would fail and complain.
    """
    try:
        command()
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
        raise SystemExit(128 + signal.SIGPIPE) from None


def _drop_stdout() -> None:
    """Send what stdout still holds, and anything later, to /dev/null: after
    a write that failed, the flush at exit would fail again and complain."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
