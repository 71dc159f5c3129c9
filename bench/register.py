"""Registration and claiming throughput over gRPC.

Three phases against one server: RegisterTask (one task per call) from W
clients; RegisterTasks in batches of B from W clients; then ClaimTasks alone
in batches of C from W clients until every task registered in batches is
claimed (exits non-zero on a duplicate or lost claim). For each phase:
tasks/s, latency, database write transactions per call (PostgreSQL; see
_common.commits_between), and where the machine's CPU went per task.

With --pipelines P the clients are spread over P pipelines, client i
registering in and claiming from the i-th modulo P with that pipeline's own
token, as wrappers of different pipelines would.

    python bench/register.py [--db-url URL | --sqlite] [--tasks N] [--batch-tasks M]
                             [--clients W] [--batch B] [--claim-batch C] [--pipelines P]
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

from _common import (
    Server,
    Timer,
    add_database_options,
    add_json_option,
    bench_pipeline,
    check_claims,
    commits_between,
    cpu_figures,
    cpu_split,
    create_pipeline_token,
    grpc_channel,
    metadata,
    percentile,
    print_table,
    py_spy,
    run_clients,
    write_json,
    write_transactions,
)
from lifecycle import PIPELINE, register


def claim_client(
    target: str, secret: str, batch: int, pipeline_name: str = PIPELINE
) -> tuple[float, float, list[str], Any]:
    """Claim batches of pipeline_name until none is left; report nothing else."""
    from porch_stubs.v1 import porch_pb2, porch_pb2_grpc

    stub = porch_pb2_grpc.PorchServiceStub(grpc_channel(target))
    auth = metadata(secret)
    pipeline = porch_pb2.Pipeline(name=pipeline_name)
    claim = porch_pb2.ClaimTasksRequest(pipeline=pipeline, num_tasks=batch)
    timer = Timer()
    claimed: list[str] = []
    start = time.time()
    while True:
        with timer("ClaimTasks"):
            tasks = stub.ClaimTasks(claim, metadata=auth).tasks
        if not tasks:
            break
        claimed.extend(task.task_input_id for task in tasks)
    return start, time.time(), claimed, dict(timer.latencies)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_database_options(parser)
    parser.add_argument("--tasks", type=int, default=10_000, help="for RegisterTask")
    parser.add_argument("--batch-tasks", type=int, default=100_000, help="for RegisterTasks")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=500, help="tasks per RegisterTasks")
    parser.add_argument("--claim-batch", type=int, default=100, help="tasks per ClaimTasks")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument(
        "--pipelines",
        type=int,
        default=1,
        help="spread the clients over this many pipelines, each with a token of its own",
    )
    parser.add_argument(
        "--profile", metavar="PREFIX", help="py-spy each phase (PREFIX.PHASE.PID.txt)"
    )
    add_json_option(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.pipelines <= args.clients:
        parser.error("--pipelines must be between 1 and --clients")
    figures: dict[str, float] = {}
    rows = []
    with bench_pipeline(args, PIPELINE) as (url, secret):
        pipelines = [(PIPELINE, secret)] + [
            (name, create_pipeline_token(url, name))
            for name in (f"{PIPELINE}{index}" for index in range(1, args.pipelines))
        ]
        with Server(url, workers=args.workers) as server:
            phases: list[tuple[str, str, int, Any]] = [
                ("register_task", "RegisterTask", args.tasks, 1),
                ("register_tasks", f"RegisterTasks of {args.batch}", args.batch_tasks, args.batch),
            ]
            for key, label, count, batch in phases:
                profile = _phase(args.profile, key)
                before = write_transactions(url)
                with py_spy(server.pids(), profile), cpu_split(server.pids()) as split:
                    seconds, latencies = register(
                        server.target, secret, count, args.clients, batch, key, pipelines
                    )
                [values] = latencies.values()
                commits = commits_between(before, write_transactions(url), len(values))
                figures[f"{key}_per_s"] = count / seconds
                figures |= cpu_figures(key, split, count)
                if commits is not None:
                    figures[f"{key}_commits_per_call"] = commits
                rows.append(_row(label, count, seconds, split, values, commits))
            # The RegisterTask phase's tasks are pending too: claim them all.
            total = args.tasks + args.batch_tasks
            profile = _phase(args.profile, "claim_tasks")
            before = write_transactions(url)
            with py_spy(server.pids(), profile), cpu_split(server.pids()) as split:
                claimers = [
                    (server.target, token, args.claim_batch, name)
                    for name, token in itertools.islice(itertools.cycle(pipelines), args.clients)
                ]
                results = run_clients(claim_client, claimers)
            after = write_transactions(url)
        check_claims([key for result in results for key in result[2]], total)
    seconds = max(r[1] for r in results) - min(r[0] for r in results)
    claims = [value for result in results for value in result[3]["ClaimTasks"]]
    figures["claim_tasks_per_s"] = total / seconds
    commits = commits_between(before, after, len(claims))
    if commits is not None:
        figures["claim_tasks_commits_per_call"] = commits
    rows.append(_row(f"ClaimTasks of {args.claim_batch}", total, seconds, split, claims, commits))
    print_table(
        f"registration and claiming over gRPC: {args.clients} clients, "
        + (f"{args.pipelines} pipelines each with its own token, " if args.pipelines > 1 else "")
        + ("SQLite" if args.sqlite else "PostgreSQL"),
        [
            "call",
            "tasks",
            "tasks/s",
            "calls",
            "p50 ms",
            "p99 ms",
            "commits/call",
            "CPU ms/task: server",
            "clients",
            "PostgreSQL",
            "idle %",
        ],
        rows,
    )
    write_json(args.json, figures)
    return figures


def _phase(profile: str | None, key: str) -> str | None:
    return None if profile is None else f"{profile}.{key}"


def _row(
    label: str,
    tasks: int,
    seconds: float,
    split: dict[str, float],
    latencies: list[float],
    commits: float | None,
) -> Any:
    """A phase's figures; where the machine's CPU went, per task (see _common.cpu_split)."""
    return (
        label,
        tasks,
        tasks / seconds,
        len(latencies),
        percentile(latencies, 50) * 1000,
        percentile(latencies, 99) * 1000,
        "-" if commits is None else commits,
        *(split[f"{part}_s"] / tasks * 1000 for part in ("server", "clients", "postgres")),
        split["idle_share"] * 100,
    )


if __name__ == "__main__":
    main()
