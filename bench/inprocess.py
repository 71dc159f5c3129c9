"""porch's own work per task, without the gRPC transport: the lifecycle called in process.

One process runs porch's server (store, service, interceptor, commit
coalescing, asyncpg, the access log) and calls it through the gateway's
in-process upstream, the path `porch serve`'s own gateway takes: no socket
and no gRPC transport in between, though each message is still serialized
and read, as grpc would. W coroutines each claim K tasks, then report
RUNNING and DONE for each, as lifecycle.py's client processes do over gRPC.

The process's CPU per task is then porch's own work: what the server spends
beyond the transport, without client processes taking the same cores
(PostgreSQL still shares them). It includes grpc's idle server threads,
and for the lifecycle building the requests and reading the answers (a few
µs a call); RegisterTask's requests are built before the clock starts.
With more callers the status changes share larger batches, so the rows
show what one commit costs beside the work per change.
The last row runs the most callers with the access log off. A second
table does the same for RegisterTask, one input a call from each of W
callers, as register.py's client processes call it. One asyncpg
round trip (`SELECT 1`) on porch's own connections is timed too
(PostgreSQL). Exits non-zero on a task claimed twice or never claimed.

    python bench/inprocess.py [--db-url URL | --sqlite] [--tasks N]
                              [--callers 1,2,4,8] [--batch K]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    add_database_options,
    add_json_option,
    bench_pipeline,
    check_claims,
    cpu_seconds,
    print_table,
    write_json,
)
from lifecycle import PIPELINE, status_updates

ROUND_TRIPS = 4000

Rows = list[tuple[Any, ...]]


async def run(
    url: str, secret: str, tasks: int, callers: list[int], batch: int, log_file: Path
) -> tuple[Rows, Rows, dict[str, float]]:
    """Lifecycle rows and RegisterTask rows: one per number of callers, and
    one more with the access log off."""
    server, config, engine, interceptor, stores = _porch_modules(
        "server", "config", "db.engine", "interceptor", "store"
    )
    # The access log goes to a file, as the benchmarks' servers log it.
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    store = stores.Store(engine.make_engine(url))
    try:
        running = await server.start(config.Config(db_url=url, grpc_port=0, http_port=None), store)
        try:
            return await _measure(running, store, interceptor.log, secret, tasks, callers, batch)
        finally:
            await server.stop(running, 1.0)
    finally:
        store.close()
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


async def _measure(
    running: Any,
    store: Any,
    access_log: logging.Logger,
    secret: str,
    tasks: int,
    callers: list[int],
    batch: int,
) -> tuple[Rows, Rows, dict[str, float]]:
    from porch_stubs.v1 import porch_pb2

    methods = porch_pb2.DESCRIPTOR.services_by_name["PorchService"].methods_by_name
    auth = [("authorization", f"Bearer {secret}")]
    pipeline = porch_pb2.Pipeline(name=PIPELINE)

    async def call(name: str, request: Any) -> Any:
        return (await running.local.unary_call(methods[name], request, auth, None)).response

    async def register(tag: str) -> None:
        for low in range(0, tasks, 500):
            request = porch_pb2.RegisterTasksRequest(pipeline_name=PIPELINE)
            for number in range(low, min(low + 500, tasks)):
                task = request.tasks.add()
                task.task_input.update({"bench": tag, "number": number, "path": f"/{number}.cram"})
            await call("RegisterTasks", request)

    async def caller(claimed: list[str]) -> int:
        calls = 0
        claim = porch_pb2.ClaimTasksRequest(pipeline=pipeline, num_tasks=batch)
        while True:
            calls += 1
            found = (await call("ClaimTasks", claim)).tasks
            if not found:
                return calls
            for task in found:
                claimed.append(task.task_input_id)
                for update in status_updates(pipeline, task):
                    await call("UpdateTask", update)
                    calls += 1

    async def registrar(requests: Iterator[Any]) -> None:
        for request in requests:  # shared: each request is taken by one registrar
            await call("RegisterTask", request)

    async def timed(
        count: int,
        logged: bool,
        work: Callable[[], Awaitable[Any]],
        coalesced: Callable[[], tuple[int, int]],
    ) -> tuple[list[Any], float, float, float]:
        """work() in count callers at once, the access log on or off: their
        results, the CPU and wall seconds taken, and items per coalesced batch."""
        access_log.setLevel(logging.INFO if logged else logging.WARNING)
        items, batches = coalesced()
        cpu, start = cpu_seconds([os.getpid()]), time.perf_counter()
        results = await asyncio.gather(*(work() for _ in range(count)))
        cpu, seconds = cpu_seconds([os.getpid()]) - cpu, time.perf_counter() - start
        after = coalesced()
        items, batches = after[0] - items, after[1] - batches
        return results, cpu, seconds, items / batches if batches else float("nan")

    rows = []
    figures: dict[str, float] = {}
    runs = [(count, True) for count in callers] + [(max(callers), False)]
    for index, (count, logged) in enumerate(runs):
        await register(f"run {index}")
        claimed: list[str] = []
        work = functools.partial(caller, claimed)
        counts, cpu, seconds, per_batch = await timed(count, logged, work, lambda: store.coalesced)
        check_claims(claimed, tasks)
        key = f"w{count}" if logged else f"w{count}_quiet"
        figures[f"{key}_cpu_ms_per_task"] = cpu / tasks * 1000
        figures[f"{key}_tasks_per_s"] = tasks / seconds
        on = "on" if logged else "off"
        rows.append(
            (count, on, per_batch, tasks / seconds, cpu / tasks * 1000, cpu / sum(counts) * 1e6)
        )
    register_rows = []
    for index, (count, logged) in enumerate(runs):
        requests = []
        for number in range(tasks):
            request = porch_pb2.RegisterTaskRequest(task=porch_pb2.Task(pipeline=pipeline))
            request.task.task_input.update(
                {"bench": f"single {index}", "number": number, "path": f"/{number}.cram"}
            )
            requests.append(request)
        registering = functools.partial(registrar, iter(requests))
        _, cpu, seconds, per_batch = await timed(
            count, logged, registering, lambda: store.coalesced_registrations
        )
        key = f"register_w{count}" if logged else f"register_w{count}_quiet"
        figures[f"{key}_cpu_us_per_call"] = cpu / tasks * 1e6
        figures[f"{key}_per_s"] = tasks / seconds
        on = "on" if logged else "off"
        register_rows.append((count, on, per_batch, tasks / seconds, cpu / tasks * 1e6))
    access_log.setLevel(logging.NOTSET)
    if running.statements is not None:
        figures["round_trip_cpu_us"] = await _round_trip(running.statements.scalar)
    return rows, register_rows, figures


def _porch_modules(*names: str) -> list[Any]:
    """porch_server's modules by name, imported with bench/ off the path:
    bench/gateway.py would stand in for the gateway package they import
    (for mypy too, which is why they are imported by name)."""
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    try:
        modules = [importlib.import_module(f"porch_server.{name}") for name in names]
    finally:
        sys.path[:] = saved
    if not hasattr(sys.modules["gateway"], "__path__"):
        raise SystemExit("bench: bench/gateway.py was imported as the gateway package")
    return modules


async def _round_trip(scalar: Callable[[Any, Any], Awaitable[Any]]) -> float:
    """CPU µs of one asyncpg round trip (SELECT 1) on porch's held connection."""
    from sqlalchemy import literal, select

    statement = select(literal(1))
    for _ in range(200):
        await scalar(statement, {})
    cpu = cpu_seconds([os.getpid()])
    for _ in range(ROUND_TRIPS):
        await scalar(statement, {})
    return (cpu_seconds([os.getpid()]) - cpu) / ROUND_TRIPS * 1e6


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_database_options(parser)
    parser.add_argument("--tasks", type=int, default=8000, help="per row")
    parser.add_argument(
        "--callers", default="1,2,4,8", help="numbers of concurrent callers, one row each"
    )
    parser.add_argument("--batch", type=int, default=10, help="tasks per ClaimTasks")
    add_json_option(parser)
    args = parser.parse_args(argv)
    try:
        callers = [int(text) for text in args.callers.split(",")]
    except ValueError:
        parser.error(f"--callers: numbers separated by commas, not {args.callers!r}")
    if not callers or min(callers) < 1 or args.tasks < 1 or args.batch < 1:
        parser.error("--callers, --tasks and --batch must be at least 1")
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with (
        bench_pipeline(args, PIPELINE) as (url, secret),
        tempfile.TemporaryDirectory() as logs,
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        rows, register_rows, figures = runner.run(
            run(url, secret, args.tasks, callers, args.batch, Path(logs, "access.log"))
        )
    print_table(
        f"the lifecycle in process, no transport: {args.tasks} tasks a row, claim {args.batch}, "
        f"{'SQLite' if args.sqlite else 'PostgreSQL'}",
        ["callers", "access log", "changes per batch", "tasks/s", "CPU ms/task", "CPU µs/call"],
        rows,
    )
    print_table(
        f"RegisterTask in process, no transport: {args.tasks} registrations a row",
        ["callers", "access log", "registrations per batch", "calls/s", "CPU µs/call"],
        register_rows,
    )
    if "round_trip_cpu_us" in figures:
        print(f"\nasyncpg round trip (SELECT 1): {figures['round_trip_cpu_us']:.0f} µs of CPU")
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
