"""Run every benchmark in sequence and print each target beside what was measured.

Each script runs as its own process and hands its figures back through
``--json``; bench/gateway.py is included when it exists. The targets are
ratios against limits measured in the same run (see bench/README.md). A
second table gives, for the loads those targets compare, where the
machine's CPU went per call or task and what the cores would carry at
that cost if they never idled.

    python bench/all.py [--db-url URL] [--clients W] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_DB_URL, print_table
from npg_routes import NPG_CPU_MS_PER_TASK, NPG_LIFECYCLE_PER_S, NPG_REGISTER_PER_S

HERE = Path(__file__).parent
CALLS_PER_TASK = 2.1  # a claim of 10, then RUNNING and DONE: 1/10 + 2
# npg_porch's best figures: lifecycle with 1-8 HTTP clients, registration with 1-4.
NPG_PORCH_LIFECYCLE = float(NPG_LIFECYCLE_PER_S[1])
NPG_PORCH_REGISTER = float(NPG_REGISTER_PER_S[1])


def run(name: str, args: list[str], scratch: Path) -> dict[str, float]:
    """Run bench/NAME.py with args; return the figures it wrote."""
    output = scratch / f"{name}-{len(list(scratch.iterdir()))}.json"
    command = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(output)]
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, check=False)
    print(f"({time.monotonic() - started:.0f} s)", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: {name}.py failed with exit status {done.returncode}")
    figures: dict[str, float] = json.loads(output.read_text())
    return figures


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks; print the targets table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db-url", default=DEFAULT_DB_URL, help="re-created: all data is lost")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a rougher picture")
    args = parser.parse_args(argv)
    db = ["--db-url", args.db_url]
    clients = ["--clients", str(args.clients)]
    tasks = "3000" if args.quick else "10000"
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        echo = run("ceiling", [*clients, "--seconds", "4" if args.quick else "10"], scratch)
        raw = run("raw_sql", [*db, "--tasks", tasks, "--clients", str(args.clients)], scratch)
        grpc = run("lifecycle", [*db, *clients, "--tasks", tasks], scratch)
        two = run("lifecycle", [*db, *clients, "--tasks", tasks, "--workers", "2"], scratch)
        register = run(
            "register",
            [*db, *clients, "--tasks", tasks, "--batch-tasks", "20000" if args.quick else "100000"],
            scratch,
        )
        scale = run(
            "claim_scale",
            [
                *db,
                "--levels",
                "0",
                "100000",
                "1000000",
                "--pending",
                "1000" if args.quick else "2000",
            ],
            scratch,
        )
        sqlite = run("lifecycle", ["--sqlite", *clients, "--tasks", tasks], scratch)
        gateway = None
        if (HERE / "gateway.py").exists():
            gateway = run("gateway", [*db, *clients], scratch)
        npg = run("npg_routes", [*db, *clients], scratch)
    print_targets(echo, raw, grpc, two, register, scale, sqlite, gateway, npg, args.clients)


def print_targets(
    echo: dict[str, float],
    raw: dict[str, float],
    grpc: dict[str, float],
    two: dict[str, float],
    register: dict[str, float],
    scale: dict[str, float],
    sqlite: dict[str, float],
    gateway: dict[str, float] | None,
    npg: dict[str, float],
    clients: int,
) -> None:
    """Print each target, what it comes to in this run, what was measured, and whether it held."""
    grpc_echo = echo["grpc_aio_per_s"]
    limit = min(raw[f"tasks_per_s_{clients}"], grpc_echo / CALLS_PER_TASK)
    empty, million = scale.get("claim_p50_ms_0", 0.0), scale.get("claim_p50_ms_1000000", 0.0)
    rows: list[tuple[Any, ...]] = [
        _row("lifecycle over gRPC, tasks/s", 0.5 * limit, grpc["tasks_per_s"], "50% of limit"),
        _row("  same, --workers 2", 0.5 * limit, two["tasks_per_s"], "50% of limit"),
        _row("  x npg_porch (31 tasks/s)", 15, grpc["tasks_per_s"] / NPG_PORCH_LIFECYCLE, "15x"),
        _row("server CPU ms/task (register+claim+2 updates)", 2.0, grpc["cpu_ms_per_task"], "≤ 2"),
        _row("RegisterTask, tasks/s", 0.5 * grpc_echo, register["register_task_per_s"], "50% echo"),
        _row("RegisterTasks of 500, tasks/s", 10_000, register["register_tasks_per_s"], ""),
        _row("ClaimTasks of 100, tasks/s", 5_000, register["claim_tasks_per_s"], ""),
        _row("claim p50 with 1M finished, ms", 1.5 * empty, million, "1.5x empty"),
        _row("SQLite lifecycle, tasks/s", 250, sqlite["tasks_per_s"], ""),
        _row("server peak RSS in lifecycle, MiB", 150, grpc["server_peak_rss_mb"], "≤ 150"),
    ]
    if gateway is not None:
        http_limit = echo["http_per_s"] / CALLS_PER_TASK
        rows.append(
            _row(
                "lifecycle over HTTP gateway, tasks/s",
                0.4 * http_limit,
                gateway["http_tasks_per_s"],
                "40% of HTTP echo ÷ 2.1",
            )
        )
    rows += [
        _row(
            "npg_porch's routes: lifecycle x npg_porch (31)",
            5,
            npg["lifecycle_tasks_per_s"] / NPG_PORCH_LIFECYCLE,
            "5x, as over HTTP",
        ),
        _row(
            "  POST /tasks x npg_porch (64)",
            None,
            npg["register_tasks_per_s"] / NPG_PORCH_REGISTER,
            "",
        ),
        _row(
            f"  server CPU ms/task, npg_porch {NPG_CPU_MS_PER_TASK:g}",
            None,
            npg["server_cpu_ms_per_task"],
            "",
        ),
    ]
    print_table(
        f"limits in this run: gRPC echo {grpc_echo:,.0f}/s, HTTP echo {echo['http_per_s']:,.0f}/s,"
        f" raw SQL {raw[f'tasks_per_s_{clients}']:,.0f} tasks/s ({clients} processes)",
        ["measurement", "target", "measured", "met", "rule"],
        rows,
    )
    print_cpu(echo, grpc, register, gateway)
    print(
        f"gRPC lifecycle: server event loop on a CPU {grpc['loop_run_share']:.0%}"
        f" and runnable, waiting for one, {grpc['loop_wait_share']:.0%} of the time"
    )


def print_cpu(
    echo: dict[str, float],
    grpc: dict[str, float],
    register: dict[str, float],
    gateway: dict[str, float] | None,
) -> None:
    """Print where the machine's CPU went in each load set against a limit,
    per call or task, and what the cores would carry at that cost if they
    never went idle: the arithmetic behind those targets."""
    loads = [
        ("gRPC echo, per call", *_echo_cpu(echo, "grpc_aio")),
        (
            "RegisterTask, per call",
            register["register_task_server_cpu_ms"],
            register["register_task_clients_cpu_ms"],
            register["register_task_postgres_cpu_ms"],
            register["register_task_idle_share"],
        ),
        (
            "gRPC lifecycle, per task",
            grpc["cpu_ms_per_task_lifecycle"],
            grpc["clients_cpu_ms_per_task"],
            grpc["postgres_cpu_ms_per_task"],
            grpc["idle_share"],
        ),
        ("HTTP echo, per request", *_echo_cpu(echo, "http")),
    ]
    if gateway is not None:
        loads.append(
            (
                "HTTP lifecycle, per task",
                gateway["http_server_cpu_ms_per_task"],
                gateway["http_clients_cpu_ms_per_task"],
                gateway["http_postgres_cpu_ms_per_task"],
                gateway["http_idle_share"],
            )
        )
    cores = len(os.sched_getaffinity(0))  # the cores these processes may run on
    rows = []
    for name, server, clients, postgres, idle in loads:
        total = server + clients + postgres
        rows.append((name, server, clients, postgres, total, idle * 100, cores * 1000 / total))
    print_table(
        f"where the machine's CPU went, ms; 'never idle': what its {cores} cores would carry"
        " a second at that cost",
        ["load", "server", "clients", "PostgreSQL", "all", "idle %", "never idle"],
        rows,
    )


def _echo_cpu(echo: dict[str, float], kind: str) -> tuple[float, float, float, float]:
    """An echo's CPU ms per call (server, clients, PostgreSQL: its background) and idle share."""
    return (
        echo[f"{kind}_server_cpu_ms"],
        echo[f"{kind}_clients_cpu_ms"],
        echo[f"{kind}_postgres_cpu_ms"],
        echo[f"{kind}_idle_share"],
    )


def _row(name: str, target: float | None, measured: float, rule: str) -> tuple[Any, ...]:
    if target is None:
        return name, "", measured, "", rule
    lower_is_better = rule.startswith("≤") or name.startswith(("server", "claim p50"))
    met = measured <= target if lower_is_better else measured >= target
    sign = "≤" if lower_is_better else "≥"
    return name, f"{sign} {target:,.1f}", measured, "yes" if met else "NO", rule


if __name__ == "__main__":
    main()
