"""Claim latency as finished tasks pile up: 0, 100k and 1M DONE tasks in the table.

Each level gets a database of its own, filled before anything is timed:
PostgreSQL databases named after --db-url's with the level appended
(``porch_bench_0``, ``porch_bench_100000``, ...), dropped at the end, or
SQLite files in a scratch directory. The finished tasks are written
straight into the task table (not through the server, and without their
events, which a claim never reads), and PostgreSQL is checkpointed so that
no level is timed while those writes are flushed. One server per level;
then, in R rounds, each level in turn (the order rotating) gets P / R fresh
PENDING tasks, newer than the finished ones, which one client claims in
batches of K. Interleaving the levels puts each through the same changes
of the machine's speed, so their ratio compares like with like. The
latencies of ClaimTasks are pooled per level, each round's first call
(which opens the client's connection) left out. Exits non-zero on a
duplicate or lost claim.

    python bench/claim_scale.py [--db-url URL | --sqlite] [--levels 0 100000 1000000]
                                [--pending P] [--rounds R] [--batch K]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from _common import (
    Server,
    add_database_options,
    add_json_option,
    check_claims,
    create_pipeline_token,
    drop_database,
    fresh_database,
    grpc_channel,
    metadata,
    percentile,
    print_table,
    run_clients,
    sqlite_url,
    write_json,
)
from sqlalchemy import create_engine, make_url, text

PIPELINE = "scale"

# Tasks numbered :low to :high - 1 of pipeline 1, in :status. The ids are
# zero-padded numbers: unique, 64 characters like real ones.
_NUMBERS = {
    "postgresql": "SELECT n FROM generate_series(:low, :high - 1) AS n",
    "sqlite": "WITH RECURSIVE s(n) AS"
    " (SELECT :low UNION ALL SELECT n + 1 FROM s WHERE n < :high - 1) SELECT n FROM s",
}
_KEY = {"postgresql": "lpad(n::text, 64, '0')", "sqlite": "printf('%064d', n)"}
_INSERT = """
INSERT INTO task (pipeline_id, task_input_id, task_input, status, create_time, update_time)
SELECT 1, {key}, '{{"n":' || n || '}}', :status, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP
FROM ({numbers}) AS numbers ORDER BY n
"""


def add_tasks(url: str, low: int, high: int, status: str) -> None:
    """Insert tasks numbered low..high-1 in status, and finish the ones claimed before."""
    engine = create_engine(url)
    dialect = engine.dialect.name
    statement = _INSERT.format(key=_KEY[dialect], numbers=_NUMBERS[dialect])
    with engine.begin() as connection:
        connection.execute(text("UPDATE task SET status = 'DONE' WHERE status = 'CLAIMED'"))
        if high > low:
            connection.execute(text(statement), {"low": low, "high": high, "status": status})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE task" if dialect == "postgresql" else "ANALYZE"))
    engine.dispose()


def claim_client(target: str, secret: str, batch: int) -> tuple[list[str], list[float]]:
    """Claim batches until none is left; return the tasks and each call's latency."""
    from porch_stubs.v1 import porch_pb2, porch_pb2_grpc

    stub = porch_pb2_grpc.PorchServiceStub(grpc_channel(target))
    auth = metadata(secret)
    claim = porch_pb2.ClaimTasksRequest(pipeline=porch_pb2.Pipeline(name=PIPELINE), num_tasks=batch)
    claimed: list[str] = []
    latencies = []
    while True:
        start = time.perf_counter()
        tasks = stub.ClaimTasks(claim, metadata=auth).tasks
        latencies.append(time.perf_counter() - start)
        if not tasks:
            return claimed, latencies
        claimed.extend(task.task_input_id for task in tasks)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_database_options(parser)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    parser.add_argument("--pending", type=int, default=2000, help="tasks claimed per level")
    parser.add_argument("--rounds", type=int, default=4, help="turns each level gets")
    parser.add_argument("--batch", type=int, default=10, help="tasks per ClaimTasks")
    add_json_option(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.pending < args.rounds:
        parser.error("--rounds must be at least 1 and at most --pending")
    levels = sorted(set(args.levels))
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        urls, secrets, setups = {}, {}, {}
        for level in levels:
            url = fresh_database(_level_url(args, scratch, level))
            if not args.sqlite:  # a SQLite file goes with the scratch directory
                stack.callback(drop_database, url)
            started = time.monotonic()
            secrets[level] = create_pipeline_token(url, PIPELINE)
            add_tasks(url, 1, level + 1, "DONE")
            urls[level], setups[level] = url, time.monotonic() - started
        if not args.sqlite:
            _checkpoint(urls[levels[0]])
        servers = {level: stack.enter_context(Server(urls[level])) for level in levels}
        latencies: dict[int, list[float]] = {level: [] for level in levels}
        # Numbers above every finished task's, so that pending tasks are the newest.
        next_pending = 10 * max(levels) + 1
        for turn in range(args.rounds):
            share = args.pending // args.rounds + (turn < args.pending % args.rounds)
            for level in levels[turn % len(levels) :] + levels[: turn % len(levels)]:
                add_tasks(urls[level], next_pending, next_pending + share, "PENDING")
                next_pending += share
                [(claimed, taken)] = run_clients(
                    claim_client, [(servers[level].target, secrets[level], args.batch)]
                )
                check_claims(claimed, share)
                # Not the first call: it opens the client's connection.
                latencies[level] += taken[1:]
    rows = []
    for level in levels:
        p50 = percentile(latencies[level], 50) * 1000
        figures[f"claim_p50_ms_{level}"] = p50
        p99 = percentile(latencies[level], 99) * 1000
        rows.append((f"{level:,}", len(latencies[level]), p50, p99, setups[level]))
    print_table(
        f"ClaimTasks of {args.batch} with finished tasks in the table, one client, "
        f"{args.rounds} rounds, {'SQLite' if args.sqlite else 'PostgreSQL'}",
        ["finished tasks", "claims", "p50 ms", "p99 ms", "setup s"],
        rows,
    )
    write_json(args.json, figures)
    return figures


def _level_url(args: argparse.Namespace, scratch: str, level: int) -> str:
    """The database of one level: --db-url's, its name suffixed, or a SQLite file."""
    if args.sqlite:
        directory = Path(scratch) / str(level)
        directory.mkdir()
        return sqlite_url(directory)
    parsed = make_url(args.db_url)
    if not parsed.database:
        raise SystemExit(f"bench: --db-url names no database: {args.db_url}")
    return parsed.set(database=f"{parsed.database}_{level}").render_as_string(hide_password=False)


def _checkpoint(url: str) -> None:
    """Flush what the levels' loads wrote before anything is timed: a
    checkpoint covers every database of the PostgreSQL server at url."""
    engine = create_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("CHECKPOINT"))
    engine.dispose()


if __name__ == "__main__":
    main()
