"""The task lifecycle over HTTP through the gateway, beside the same lifecycle over gRPC.

One `porch serve` (gRPC and its gateway in one process) on a fresh database.
Twice, N tasks are registered and W client processes claim K at a time and
report RUNNING then DONE for each: first over gRPC, then over HTTP/JSON
through the gateway. Then one client calls GetPipeline many times directly
and through the gateway. Prints tasks/s and per-call latency p50/p99 for
each transport, and the median latency the gateway adds to a call. Exits
non-zero on a task claimed twice or never claimed, or one not DONE at the end.

    python bench/gateway.py [--db-url URL | --sqlite] [--tasks N] [--workers W]
                            [--batch K] [--unary-calls C]
"""

from __future__ import annotations

import argparse
import statistics
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
    cpu_line,
    cpu_split,
    expect,
    grpc_channel,
    metadata,
    percentile,
    print_table,
    py_spy,
    run_clients,
    write_json,
)
from lifecycle import PIPELINE, lifecycle_client, register, statuses

CALLS = ("ClaimTasks", "UpdateTask")
# Registration is not what is measured: big batches from a few clients.
REGISTER_CLIENTS = 4
REGISTER_BATCH = 1000
WARM_UP_CALLS = 200


def http_lifecycle_client(
    base_url: str, secret: str, batch: int
) -> tuple[float, float, list[str], dict[str, list[float]]]:
    """lifecycle_client's loop over HTTP: claim a batch, RUNNING then DONE for each task."""
    headers = {"Authorization": f"Bearer {secret}"}
    tasks_url = f"/v1/pipelines/{PIPELINE}/tasks"
    timer = Timer()
    claimed: list[str] = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        start = time.time()
        while True:
            with timer("ClaimTasks"):
                response = client.post(f"{tasks_url}:claim", json={"num_tasks": batch})
            tasks = expect(response)["tasks"]
            if not tasks:
                break
            for task in tasks:
                task_id = task["task_input_id"]
                claimed.append(task_id)
                for status in ("RUNNING", "DONE"):
                    # Naming the claim, as the README's workflow does.
                    body = {"task": {"status": status, "claim_number": task["claim_number"]}}
                    with timer("UpdateTask"):
                        response = client.patch(f"{tasks_url}/{task_id}", json=body)
                    expect(response)
        return start, time.time(), claimed, dict(timer.latencies)


def run_lifecycle(
    client: Any,
    endpoint: str,
    server: Server,
    secret: str,
    args: argparse.Namespace,
    tag: str,
    profile: str | None = None,
) -> tuple[float, dict[str, list[float]], dict[str, float]]:
    """Register the tasks, then run the lifecycle from the client processes: tasks/s,
    latencies, and where the machine's CPU went."""
    register(server.target, secret, args.tasks, REGISTER_CLIENTS, REGISTER_BATCH, tag)
    with py_spy(server.pids(), profile), cpu_split(server.pids()) as split:
        results = run_clients(client, [(endpoint, secret, args.batch)] * args.clients)
    check_claims([key for result in results for key in result[2]], args.tasks)
    timer = Timer()
    for result in results:
        timer.merge(result[3])
    seconds = max(r[1] for r in results) - min(r[0] for r in results)
    # Where the machine's CPU went, per task (see bench/README.md).
    per_task = {
        f"{part}_cpu_ms_per_task": split[f"{part}_s"] / args.tasks * 1000
        for part in ("server", "clients", "postgres")
    }
    return (
        args.tasks / seconds,
        dict(timer.latencies),
        per_task | {"idle_share": split["idle_share"]},
    )


def unary_latencies(server: Server, secret: str, calls: int) -> tuple[list[float], list[float]]:
    """GetPipeline from one client, directly and through the gateway, alternating in rounds."""
    from porch_stubs.v1 import porch_pb2, porch_pb2_grpc

    assert server.http_url is not None
    channel = grpc_channel(server.target)
    stub = porch_pb2_grpc.PorchServiceStub(channel)
    auth = metadata(secret)
    request = porch_pb2.GetPipelineRequest(name=PIPELINE)
    headers = {"Authorization": f"Bearer {secret}"}
    direct: list[float] = []
    gateway: list[float] = []
    with httpx.Client(base_url=server.http_url, headers=headers, timeout=60) as http:

        def over_grpc() -> None:
            stub.GetPipeline(request, metadata=auth)

        def over_http() -> None:
            expect(http.get(f"/v1/pipelines/{PIPELINE}"))

        for call in (over_grpc, over_http):
            for _ in range(WARM_UP_CALLS):
                call()
        # Rounds of 100, alternating, so that drift in the machine's load hits both.
        for _ in range(max(1, calls // 100)):
            for call, into in ((over_grpc, direct), (over_http, gateway)):
                for _ in range(100):
                    start = time.perf_counter()
                    call()
                    into.append(time.perf_counter() - start)
    channel.close()
    return direct, gateway


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_database_options(parser)
    parser.add_argument("--tasks", type=int, default=4000, help="tasks per transport")
    parser.add_argument(
        "--workers", "--clients", dest="clients", type=int, default=8, help="client processes"
    )
    parser.add_argument("--batch", type=int, default=10, help="tasks per ClaimTasks")
    parser.add_argument(
        "--unary-calls", type=int, default=2000, help="GetPipeline calls per transport"
    )
    parser.add_argument("--profile", metavar="PREFIX", help="py-spy the server's HTTP lifecycle")
    add_json_option(parser)
    args = parser.parse_args(argv)
    with bench_pipeline(args, PIPELINE) as (url, secret):
        with Server(url, http=True) as server:
            assert server.http_url is not None
            grpc_rate, grpc_latencies, _ = run_lifecycle(
                lifecycle_client, server.target, server, secret, args, "grpc"
            )
            http_rate, http_latencies, http_split = run_lifecycle(
                http_lifecycle_client, server.http_url, server, secret, args, "http", args.profile
            )
            direct, gateway = unary_latencies(server, secret, args.unary_calls)
        final = statuses(url)
    if final != {"DONE": 2 * args.tasks}:
        raise SystemExit(f"bench: tasks not all DONE at the end: {final}")
    figures = figures_of(grpc_rate, http_rate, grpc_latencies, http_latencies, direct, gateway)
    figures |= {f"http_{name}": value for name, value in http_split.items()}
    print_figures(args, figures)
    write_json(args.json, figures)
    return figures


def figures_of(
    grpc_rate: float,
    http_rate: float,
    grpc_latencies: dict[str, list[float]],
    http_latencies: dict[str, list[float]],
    direct: list[float],
    gateway: list[float],
) -> dict[str, float]:
    """Every figure by name; latencies in milliseconds."""
    figures = {"grpc_tasks_per_s": grpc_rate, "http_tasks_per_s": http_rate}
    for transport, latencies in (("grpc", grpc_latencies), ("http", http_latencies)):
        for call in CALLS:
            for p in (50, 99):
                figures[f"{transport}_{call}_p{p}_ms"] = percentile(latencies[call], p) * 1000
    figures["grpc_GetPipeline_p50_ms"] = statistics.median(direct) * 1000
    figures["http_GetPipeline_p50_ms"] = statistics.median(gateway) * 1000
    figures["grpc_GetPipeline_p99_ms"] = percentile(direct, 99) * 1000
    figures["http_GetPipeline_p99_ms"] = percentile(gateway, 99) * 1000
    figures["gateway_added_p50_ms"] = (
        figures["http_GetPipeline_p50_ms"] - figures["grpc_GetPipeline_p50_ms"]
    )
    return figures


def print_figures(args: argparse.Namespace, figures: dict[str, float]) -> None:
    """The lifecycle table, then the single-client unary latencies."""
    backend = "SQLite" if args.sqlite else "PostgreSQL"
    print_table(
        f"lifecycle, {args.tasks} tasks per transport, {args.clients} clients, "
        f"claim {args.batch}, one `porch serve` process, {backend}; latency in ms",
        [
            "transport",
            "tasks/s",
            "ClaimTasks p50",
            "p99",
            "UpdateTask p50",
            "p99",
        ],
        [
            (
                label,
                figures[f"{transport}_tasks_per_s"],
                *(figures[f"{transport}_{call}_p{p}_ms"] for call in CALLS for p in (50, 99)),
            )
            for label, transport in (("gRPC", "grpc"), ("HTTP via gateway", "http"))
        ],
    )
    print_table(
        f"GetPipeline from one client, {args.unary_calls} calls each; latency in ms",
        ["path", "p50", "p99"],
        [
            (
                "gRPC, direct",
                figures["grpc_GetPipeline_p50_ms"],
                figures["grpc_GetPipeline_p99_ms"],
            ),
            (
                "HTTP via gateway",
                figures["http_GetPipeline_p50_ms"],
                figures["http_GetPipeline_p99_ms"],
            ),
            ("added by the gateway (median)", figures["gateway_added_p50_ms"], ""),
        ],
    )
    http_cpu = cpu_line(
        "HTTP",
        figures["http_server_cpu_ms_per_task"],
        figures["http_clients_cpu_ms_per_task"],
        figures["http_postgres_cpu_ms_per_task"],
        figures["http_idle_share"],
    )
    print(f"\n{http_cpu}")


if __name__ == "__main__":
    main()
