"""The task lifecycle over gRPC: register, then claim K → RUNNING → DONE from W clients.

Prints tasks/s, per-RPC latency p50/p99 and the server's CPU seconds per
1,000 tasks (utime + stime of the server's processes, from /proc), split
into registration and the lifecycle proper, and its peak RSS. Exits
non-zero on a task claimed twice or never claimed, or one not DONE at the end.

    python bench/lifecycle.py [--db-url URL | --sqlite] [--tasks N] [--clients W]
                              [--batch K] [--workers S] [--register-batch B]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from _common import (
    Server,
    Timer,
    add_database_options,
    add_json_option,
    bench_pipeline,
    check_claims,
    commits_between,
    cpu_seconds,
    cpu_split,
    grpc_channel,
    metadata,
    peak_rss_mb,
    percentile,
    print_table,
    py_spy,
    run_clients,
    write_json,
    write_transactions,
)
from sqlalchemy import create_engine, text

PIPELINE = "bench"


def register_client(
    target: str,
    secret: str,
    first: int,
    last: int,
    batch: int,
    tag: str,
    pipeline_name: str = PIPELINE,
) -> tuple[float, float, dict[str, list[float]]]:
    """Register tasks first..last-1 in pipeline_name, one RegisterTask each
    or RegisterTasks of batch."""
    from porch_stubs.v1 import porch_pb2, porch_pb2_grpc

    stub = porch_pb2_grpc.PorchServiceStub(grpc_channel(target))
    auth = metadata(secret)
    pipeline = porch_pb2.Pipeline(name=pipeline_name)
    timer = Timer()

    def task(number: int) -> Any:
        message = porch_pb2.Task(pipeline=pipeline)
        message.task_input.update({"bench": tag, "number": number, "path": f"/data/{number}.cram"})
        return message

    start = time.time()
    if batch <= 1:
        for number in range(first, last):
            with timer("RegisterTask"):
                stub.RegisterTask(porch_pb2.RegisterTaskRequest(task=task(number)), metadata=auth)
    else:
        for low in range(first, last, batch):
            tasks = [task(number) for number in range(low, min(low + batch, last))]
            request = porch_pb2.RegisterTasksRequest(pipeline_name=pipeline_name, tasks=tasks)
            with timer("RegisterTasks"):
                stub.RegisterTasks(request, metadata=auth)
    return start, time.time(), dict(timer.latencies)


def lifecycle_client(
    target: str, secret: str, batch: int
) -> tuple[float, float, list[str], dict[str, list[float]]]:
    """Claim batches until none is left, reporting RUNNING then DONE for each task."""
    from porch_stubs.v1 import porch_pb2, porch_pb2_grpc

    stub = porch_pb2_grpc.PorchServiceStub(grpc_channel(target))
    auth = metadata(secret)
    pipeline = porch_pb2.Pipeline(name=PIPELINE)
    claim = porch_pb2.ClaimTasksRequest(pipeline=pipeline, num_tasks=batch)
    timer = Timer()
    claimed: list[str] = []
    start = time.time()
    while True:
        with timer("ClaimTasks"):
            tasks = stub.ClaimTasks(claim, metadata=auth).tasks
        if not tasks:
            break
        for task in tasks:
            claimed.append(task.task_input_id)
            for update in status_updates(pipeline, task):
                with timer("UpdateTask"):
                    stub.UpdateTask(update, metadata=auth)
    return start, time.time(), claimed, dict(timer.latencies)


def status_updates(pipeline: Any, task: Any) -> list[Any]:
    """The UpdateTaskRequests that report a claimed task RUNNING, then DONE,
    naming its claim as the README's workflow does."""
    from porch_stubs.v1 import porch_pb2

    return [
        porch_pb2.UpdateTaskRequest(
            task=porch_pb2.Task(
                pipeline=pipeline,
                task_input_id=task.task_input_id,
                claim_number=task.claim_number,
                status=status,
            )
        )
        for status in (porch_pb2.Task.RUNNING, porch_pb2.Task.DONE)
    ]


def register(
    target: str,
    secret: str,
    tasks: int,
    clients: int,
    batch: int,
    tag: str,
    pipelines: Sequence[tuple[str, str]] = (),
) -> Any:
    """Register tasks from clients processes; return (seconds, latencies).
    Given pipelines, (name, secret) pairs, client i registers in the i-th
    modulo their number with its token; else all in PIPELINE with secret."""
    pipelines = pipelines or [(PIPELINE, secret)]
    bounds = [tasks * index // clients for index in range(clients + 1)]
    arguments = []
    for i in range(clients):
        if bounds[i] < bounds[i + 1]:
            name, token = pipelines[i % len(pipelines)]
            arguments.append((target, token, bounds[i], bounds[i + 1], batch, tag, name))
    results = run_clients(register_client, arguments)
    timer = Timer()
    for _, _, latencies in results:
        timer.merge(latencies)
    seconds = max(r[1] for r in results) - min(r[0] for r in results)
    return seconds, timer.latencies


def statuses(url: str) -> dict[str, int]:
    """How many tasks are in each status."""
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT status, count(*) FROM task GROUP BY status"))
        result = {row[0]: int(row[1]) for row in rows}
    engine.dispose()
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_database_options(parser)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=10, help="tasks per ClaimTasks")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument(
        "--register-batch", type=int, default=1, help="1: RegisterTask each; more: RegisterTasks"
    )
    parser.add_argument("--profile", metavar="PREFIX", help="py-spy the server's lifecycle phase")
    add_json_option(parser)
    args = parser.parse_args(argv)
    with bench_pipeline(args, PIPELINE) as (url, secret):
        with Server(url, workers=args.workers) as server:
            cpu_start = cpu_seconds(server.pids())
            register_seconds, latencies = register(
                server.target, secret, args.tasks, args.clients, args.register_batch, "lifecycle"
            )
            cpu_registered = cpu_seconds(server.pids())
            xid_registered = write_transactions(url)
            with py_spy(server.pids(), args.profile), cpu_split(server.pids()) as split:
                results = run_clients(
                    lifecycle_client, [(server.target, secret, args.batch)] * args.clients
                )
            cpu_done = cpu_seconds(server.pids())
            xid_done = write_transactions(url)
            rss = peak_rss_mb(server.pids())
        check_claims([key for result in results for key in result[2]], args.tasks)
        final = statuses(url)
    if final != {"DONE": args.tasks}:
        raise SystemExit(f"bench: tasks not all DONE at the end: {final}")
    timer = Timer()
    timer.merge(latencies)
    for result in results:
        timer.merge(result[3])
    seconds = max(r[1] for r in results) - min(r[0] for r in results)
    calls = sum(len(values) for name, values in timer.latencies.items() if "Register" not in name)
    figures = {
        "tasks_per_s": args.tasks / seconds,
        "calls_per_s": calls / seconds,
        "register_per_s": args.tasks / register_seconds,
        "cpu_ms_per_task_register": (cpu_registered - cpu_start) / args.tasks * 1000,
        "cpu_ms_per_task_lifecycle": (cpu_done - cpu_registered) / args.tasks * 1000,
        "cpu_ms_per_task": (cpu_done - cpu_start) / args.tasks * 1000,
        "server_peak_rss_mb": rss,
        # Where the machine's CPU went in the lifecycle (see bench/README.md).
        "clients_cpu_ms_per_task": split["clients_s"] / args.tasks * 1000,
        "idle_share": split["idle_share"],
        "loop_run_share": split["loop_run_share"],
        "loop_wait_share": split["loop_wait_share"],
    }
    if not args.sqlite:
        figures["postgres_cpu_ms_per_task"] = split["postgres_s"] / args.tasks * 1000
    commits = commits_between(xid_registered, xid_done, args.tasks)
    if commits is not None:
        # The reference: one commit per claim of K and per status change, 2 + 1/K.
        figures["commits_per_task"] = commits
    backend = "SQLite" if args.sqlite else "PostgreSQL"
    print_table(
        f"lifecycle over gRPC: {args.tasks} tasks, {args.clients} clients, claim {args.batch}, "
        f"{args.workers} server process(es), {backend}",
        ["figure", "value"],
        [
            ("lifecycle tasks/s (claim + RUNNING + DONE)", figures["tasks_per_s"]),
            ("lifecycle RPC/s", figures["calls_per_s"]),
            (f"registration tasks/s (batch {args.register_batch})", figures["register_per_s"]),
            ("server CPU s / 1,000 tasks, registration", figures["cpu_ms_per_task_register"]),
            ("server CPU s / 1,000 tasks, lifecycle", figures["cpu_ms_per_task_lifecycle"]),
            ("server CPU s / 1,000 tasks, all", figures["cpu_ms_per_task"]),
            ("server peak RSS MiB (largest process)", figures["server_peak_rss_mb"]),
            *(
                [("database commits per task, lifecycle", figures["commits_per_task"])]
                if "commits_per_task" in figures
                else []
            ),
            ("client processes' CPU ms / task, lifecycle", figures["clients_cpu_ms_per_task"]),
            *(
                [("PostgreSQL's CPU ms / task, lifecycle", figures["postgres_cpu_ms_per_task"])]
                if "postgres_cpu_ms_per_task" in figures
                else []
            ),
            ("machine idle in the lifecycle, %", 100 * figures["idle_share"]),
            ("server event loop on a CPU, %", 100 * figures["loop_run_share"]),
            ("  runnable, waiting for a CPU, %", 100 * figures["loop_wait_share"]),
        ],
    )
    print_table(
        "per-RPC latency, ms",
        ["method", "calls", "p50", "p99"],
        [
            (name, len(values), percentile(values, 50) * 1000, percentile(values, 99) * 1000)
            for name, values in sorted(timer.latencies.items())
        ],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
