"""npg_porch's own workload on porch: its HTTP routes, called the way its clients call them.

The issue's figures for npg_porch were taken over its HTTP routes, so this is
the like-for-like comparison (``all.py``'s "x npg_porch" row divides the gRPC
lifecycle instead). One `porch serve` (gRPC and its gateway in one process)
on a fresh database; every call goes through the gateway's npg_porch
bindings, with the JSON bodies npg_porch's clients send:

1. ``--register-clients`` processes register N tasks, one ``POST /tasks``
   each (the Task with its pipeline and ``task_input``);
2. ``--clients`` processes claim K at a time (``POST /tasks/claim?num_tasks=K``
   with the Pipeline as the body) and report RUNNING, then DONE, for each
   task with ``PUT /tasks`` and the whole Task as npg_porch's client sends it.

Prints tasks/s for each phase and the server's CPU per task (register +
claim + RUNNING + DONE, from /proc), beside npg_porch 2.2's figures from the
issue (measured on this machine kind against the same PostgreSQL 15). Exits
non-zero on a task claimed twice or never claimed, or one not DONE at the end.

    python bench/npg_routes.py [--db-url URL | --sqlite] [--tasks N]
        [--register-clients 4] [--clients 8] [--batch 10] [--profile PREFIX]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import httpx
from _common import (
    Server,
    Timer,
    add_database_options,
    add_json_option,
    bench_pipeline,
    check_claims,
    cpu_seconds,
    expect,
    percentile,
    print_table,
    py_spy,
    run_clients,
    write_json,
)
from lifecycle import PIPELINE, statuses

# npg_porch 2.2 on this machine kind, PostgreSQL 15 (the table).
NPG_REGISTER_PER_S = (43, 64)
NPG_LIFECYCLE_PER_S = (21, 31)
NPG_CPU_MS_PER_TASK = 17.0


def register_client(
    base_url: str, secret: str, first: int, last: int
) -> tuple[float, float, dict[str, list[float]]]:
    """Register tasks first..last-1 with one POST /tasks each."""
    headers = {"Authorization": f"Bearer {secret}"}
    pipeline = {"name": PIPELINE}
    timer = Timer()
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        start = time.time()
        for number in range(first, last):
            task = {
                "pipeline": pipeline,
                "task_input": {"number": number, "path": f"/data/{number}.cram"},
            }
            with timer("POST /tasks"):
                response = client.post("/tasks", json=task)
            expect(response, 201)
        return start, time.time(), dict(timer.latencies)


def lifecycle_client(
    base_url: str, secret: str, batch: int
) -> tuple[float, float, list[str], dict[str, list[float]]]:
    """Claim batches until none is left; PUT each task RUNNING, then DONE."""
    headers = {"Authorization": f"Bearer {secret}"}
    pipeline = {"name": PIPELINE, "uri": "bench", "version": "1"}
    timer = Timer()
    claimed: list[str] = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        start = time.time()
        while True:
            with timer("POST /tasks/claim"):
                response = client.post("/tasks/claim", params={"num_tasks": batch}, json=pipeline)
            tasks = expect(response, 200)
            if not tasks:
                break
            for task in tasks:
                claimed.append(task["task_input_id"])
                for status in ("RUNNING", "DONE"):
                    task["status"] = status
                    with timer("PUT /tasks"):
                        response = client.put("/tasks", json=task)
                    expect(response, 200)
        return start, time.time(), claimed, dict(timer.latencies)


def _spread(count: int, clients: int) -> list[tuple[int, int]]:
    bounds = [count * index // clients for index in range(clients + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(clients) if bounds[i] < bounds[i + 1]]


def _seconds(results: list[Any]) -> float:
    return float(max(r[1] for r in results) - min(r[0] for r in results))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_database_options(parser)
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--register-clients", type=int, default=4, help="registering processes")
    parser.add_argument("--clients", type=int, default=8, help="claiming and updating processes")
    parser.add_argument("--batch", type=int, default=10, help="num_tasks per claim")
    parser.add_argument("--profile", metavar="PREFIX", help="py-spy the server's lifecycle phase")
    add_json_option(parser)
    args = parser.parse_args(argv)
    with bench_pipeline(args, PIPELINE) as (url, secret):
        with Server(url, http=True) as server:
            assert server.http_url is not None
            timer = Timer()
            cpu_before = cpu_seconds(server.pids())
            spread = _spread(args.tasks, args.register_clients)
            registered = run_clients(
                register_client, [(server.http_url, secret, *bounds) for bounds in spread]
            )
            cpu_registered = cpu_seconds(server.pids())
            with py_spy(server.pids(), args.profile):
                claimed = run_clients(
                    lifecycle_client, [(server.http_url, secret, args.batch)] * args.clients
                )
            cpu_done = cpu_seconds(server.pids())
        check_claims([key for result in claimed for key in result[2]], args.tasks)
        final = statuses(url)
    if final != {"DONE": args.tasks}:
        raise SystemExit(f"bench: tasks not all DONE at the end: {final}")
    for result in registered:
        timer.merge(result[2])
    for result in claimed:
        timer.merge(result[3])
    figures = {
        "register_tasks_per_s": args.tasks / _seconds(registered),
        "lifecycle_tasks_per_s": args.tasks / _seconds(claimed),
        "server_cpu_ms_per_task": (cpu_done - cpu_before) * 1000 / args.tasks,
        "register_server_cpu_ms_per_task": (cpu_registered - cpu_before) * 1000 / args.tasks,
    }
    for call, latencies in timer.latencies.items():
        for p in (50, 99):
            figures[f"{call} p{p} ms"] = percentile(latencies, p) * 1000
    print_figures(args, figures)
    write_json(args.json, figures)
    return figures


def print_figures(args: argparse.Namespace, figures: dict[str, float]) -> None:
    """porch beside npg_porch, then the latency of each route."""
    backend = "SQLite" if args.sqlite else "PostgreSQL"

    def npg(low: float, high: float) -> str:
        return f"{low:g}-{high:g}"

    def times(porch: float, low: float, high: float) -> str:
        return f"{porch / high:.1f}-{porch / low:.1f}x"

    register = figures["register_tasks_per_s"]
    lifecycle = figures["lifecycle_tasks_per_s"]
    cpu = figures["server_cpu_ms_per_task"]
    print_table(
        f"npg_porch's routes through porch's gateway, {args.tasks} tasks, {backend}",
        ["measurement", "porch", "npg_porch 2.2", "porch / npg_porch"],
        [
            (
                f"registration, POST /tasks, {args.register_clients} clients, tasks/s",
                register,
                npg(*NPG_REGISTER_PER_S),
                times(register, *NPG_REGISTER_PER_S),
            ),
            (
                f"lifecycle, claim {args.batch} → PUT RUNNING → PUT DONE, "
                f"{args.clients} clients, tasks/s",
                lifecycle,
                npg(*NPG_LIFECYCLE_PER_S),
                times(lifecycle, *NPG_LIFECYCLE_PER_S),
            ),
            (
                "server CPU per task (register + claim + 2 updates), ms",
                cpu,
                f"about {NPG_CPU_MS_PER_TASK:g}",
                f"1/{NPG_CPU_MS_PER_TASK / cpu:.1f}",
            ),
        ],
    )
    calls = sorted({name.rsplit(" p", 1)[0] for name in figures if name.endswith(" ms")})
    print_table(
        "per-call latency, ms",
        ["route", "p50", "p99"],
        [(call, figures[f"{call} p50 ms"], figures[f"{call} p99 ms"]) for call in calls],
    )


if __name__ == "__main__":
    main()
