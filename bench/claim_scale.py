"""Claim latency as finished tasks pile up: 0, 100k and 1M DONE tasks in the table.

At each level, P fresh PENDING tasks (newer than the finished ones) are
claimed by one client in batches of K, and the latency of ClaimTasks is
reported. The finished tasks are written straight into the task table (not
through the server, and without their events, which a claim never reads).
Exits non-zero on a duplicate or lost claim.

    python bench/claim_scale.py [--db-url URL | --sqlite] [--levels 0 100000 1000000]
                                [--pending P] [--batch K]
"""

from __future__ import annotations

import argparse
import time

from _common import (
    Server,
    add_database_options,
    add_json_option,
    bench_pipeline,
    check_claims,
    grpc_channel,
    metadata,
    percentile,
    print_table,
    run_clients,
    write_json,
)
from sqlalchemy import create_engine, text

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
    parser.add_argument("--batch", type=int, default=10, help="tasks per ClaimTasks")
    add_json_option(parser)
    args = parser.parse_args(argv)
    figures: dict[str, float] = {}
    rows = []
    with bench_pipeline(args, PIPELINE) as (url, secret):
        # Numbers above every finished task's, so that pending tasks are the newest.
        next_pending = 10 * max(args.levels) + 1
        finished = 0
        with Server(url) as server:
            for level in sorted(args.levels):
                started = time.monotonic()
                add_tasks(url, finished + 1, level + 1, "DONE")
                add_tasks(url, next_pending, next_pending + args.pending, "PENDING")
                setup = time.monotonic() - started
                finished, next_pending = level, next_pending + args.pending
                [(claimed, latencies)] = run_clients(
                    claim_client, [(server.target, secret, args.batch)]
                )
                check_claims(claimed, args.pending)
                p50 = percentile(latencies, 50) * 1000
                figures[f"claim_p50_ms_{level}"] = p50
                rows.append(
                    (f"{level:,}", len(latencies), p50, percentile(latencies, 99) * 1000, setup)
                )
    print_table(
        f"ClaimTasks of {args.batch} with finished tasks in the table, one client, "
        f"{'SQLite' if args.sqlite else 'PostgreSQL'}",
        ["finished tasks", "claims", "p50 ms", "p99 ms", "setup s"],
        rows,
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
