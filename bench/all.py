"""Run every benchmark in sequence and print each target beside what was measured.

Each script runs as its own process and hands its figures back through
``--json``; bench/gateway.py is included when it exists. In each round
RegisterTask also runs with each client on a pipeline of its own, with
its own token, shown under RegisterTask's row without a target of its
own. The targets are
ratios against limits measured in the same run (see bench/README.md). A
second table gives, for the loads those targets compare, where the
machine's CPU went per call or task and what the cores would carry at
that cost if they never idled.

The limits and the loads set against them (both lifecycles and
registration) run in rounds: three, one with --quick, or --rounds N.
Each target is taken against its own round's limits and the tables give
medians: the machine's speed drifts by a third within minutes, and a load
measured minutes after its limit carries that drift into its ratio.

    python bench/all.py [--db-url URL] [--clients W] [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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
    parser.add_argument(
        "--rounds",
        type=int,
        help="measure the limits and the loads set against them this many times in turn;"
        " the table gives medians (default 3, with --quick 1)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    db = ["--db-url", args.db_url]
    clients = ["--clients", str(args.clients)]
    tasks = "3000" if args.quick else "10000"
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        for number in range(args.rounds):
            if args.rounds > 1:
                print(f"\n# round {number + 1} of {args.rounds}", flush=True)
            # The thread-pool echo is for comparison only: measured in the first round.
            kinds = [] if number == 0 else ["--kinds", "grpc-aio", "http"]
            seconds = "4" if args.quick else "10"
            echo = run("ceiling", [*clients, "--seconds", seconds, *kinds], scratch)
            raw = run("raw_sql", [*db, "--tasks", tasks, "--clients", str(args.clients)], scratch)
            grpc = run("lifecycle", [*db, *clients, "--tasks", tasks], scratch)
            two = run("lifecycle", [*db, *clients, "--tasks", tasks, "--workers", "2"], scratch)
            batch_tasks = "20000" if args.quick else "100000"
            register = run(
                "register", [*db, *clients, "--tasks", tasks, "--batch-tasks", batch_tasks], scratch
            )
            # RegisterTask as wrappers of different pipelines call it: each
            # client on a pipeline of its own, with its token. register.py
            # runs its other phases too: they are kept small.
            own = ["--pipelines", str(args.clients), "--tasks", tasks, "--batch-tasks", "1000"]
            pipelines = run("register", [*db, *clients, *own], scratch)
            gateway = None
            if (HERE / "gateway.py").exists():
                gateway = run("gateway", [*db, *clients], scratch)
            rounds.append(Round(echo, raw, grpc, two, register, pipelines, gateway))
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
        npg = run("npg_routes", [*db, *clients], scratch)
    print_targets(rounds, scale, sqlite, npg, args.clients)


class Round(NamedTuple):
    """The figures of one round: the limits and the loads set against them."""

    echo: dict[str, float]
    raw: dict[str, float]
    grpc: dict[str, float]
    two: dict[str, float]
    register: dict[str, float]
    pipelines: dict[str, float]  # register.py with a pipeline for each client
    gateway: dict[str, float] | None


# RegisterTask with each client on a pipeline of its own, with its token.
PIPELINE_PER_CLIENT = "  same, a pipeline per client"

# A target: what is measured, the target (None: shown beside, not a target),
# the figure measured, and the rule that sets the target.
Target = tuple[str, float | None, float, str]


def targets(
    figures: Round,
    scale: dict[str, float],
    sqlite: dict[str, float],
    npg: dict[str, float],
    clients: int,
) -> list[Target]:
    """Each target, what it comes to against one round's limits, and what was measured."""
    echo, raw, grpc, two, register, pipelines, gateway = figures
    grpc_echo = echo["grpc_aio_per_s"]
    limit = min(raw[f"tasks_per_s_{clients}"], grpc_echo / CALLS_PER_TASK)
    empty, million = scale.get("claim_p50_ms_0", 0.0), scale.get("claim_p50_ms_1000000", 0.0)
    rows: list[Target] = [
        ("lifecycle over gRPC, tasks/s", 0.5 * limit, grpc["tasks_per_s"], "50% of limit"),
        ("  same, --workers 2", 0.5 * limit, two["tasks_per_s"], "50% of limit"),
        ("  x npg_porch (31 tasks/s)", 15, grpc["tasks_per_s"] / NPG_PORCH_LIFECYCLE, "15x"),
        ("server CPU ms/task (register+claim+2 updates)", 2.0, grpc["cpu_ms_per_task"], "≤ 2"),
        ("RegisterTask, tasks/s", 0.5 * grpc_echo, register["register_task_per_s"], "50% echo"),
        (PIPELINE_PER_CLIENT, None, pipelines["register_task_per_s"], ""),
        ("RegisterTasks of 500, tasks/s", 10_000, register["register_tasks_per_s"], ""),
        ("ClaimTasks of 100, tasks/s", 5_000, register["claim_tasks_per_s"], ""),
        ("claim p50 with 1M finished, ms", 1.5 * empty, million, "1.5x empty"),
        ("SQLite lifecycle, tasks/s", 250, sqlite["tasks_per_s"], ""),
        ("server peak RSS in lifecycle, MiB", 150, grpc["server_peak_rss_mb"], "≤ 150"),
    ]
    if gateway is not None:
        rows.append(
            (
                "lifecycle over HTTP gateway, tasks/s",
                0.4 * echo["http_per_s"] / CALLS_PER_TASK,
                gateway["http_tasks_per_s"],
                "40% of HTTP echo ÷ 2.1",
            )
        )
    return [
        *rows,
        (
            "npg_porch's routes: lifecycle x npg_porch (31)",
            5,
            npg["lifecycle_tasks_per_s"] / NPG_PORCH_LIFECYCLE,
            "5x, as over HTTP",
        ),
        (
            "  POST /tasks x npg_porch (64)",
            None,
            npg["register_tasks_per_s"] / NPG_PORCH_REGISTER,
            "",
        ),
        (
            f"  server CPU ms/task, npg_porch {NPG_CPU_MS_PER_TASK:g}",
            None,
            npg["server_cpu_ms_per_task"],
            "",
        ),
    ]


def print_targets(
    rounds: Sequence[Round],
    scale: dict[str, float],
    sqlite: dict[str, float],
    npg: dict[str, float],
    clients: int,
) -> None:
    """Print each target, what it comes to in this run, what was measured, and
    whether it held: with several rounds, each target against its own round's
    limits, and the medians over the rounds."""
    per_round = [targets(figures, scale, sqlite, npg, clients) for figures in rounds]
    several = len(rounds) > 1
    headers = ["measurement", "target", "measured", "measured / target", "met", "rule"]
    if several:
        headers.append("rounds met")  # each round's figure against its own round's target
    rows = []
    for results in zip(*per_round, strict=True):
        name, _, _, rule = results[0]
        measured = statistics.median(result[2] for result in results)
        if results[0][1] is None:
            rows.append((name, "", measured, "", "", rule, "")[: len(headers)])
            continue
        target = statistics.median(_target(result) for result in results)
        lower_is_better = _lower_is_better(name, rule)
        held = sum(_held(result[2], _target(result), lower_is_better) for result in results)
        # Each round's figure against its own round's target: the median of
        # those ratios says whether the target held, not the two medians,
        # which may come from different rounds.
        ratios = [result[2] / _target(result) for result in results if _target(result)]
        ratio = statistics.median(ratios) if len(ratios) == len(results) else None
        if ratio is None:  # a target of 0 (claim_scale.py run without an empty level)
            met = _held(measured, target, lower_is_better)
        else:
            met = ratio <= 1 if lower_is_better else ratio >= 1
        sign = "≤" if lower_is_better else "≥"
        row = (
            name,
            f"{sign} {target:,.1f}",
            measured,
            "" if ratio is None else f"{ratio:.2f}",
            "yes" if met else "NO",
            rule,
        )
        rows.append((*row, f"{held} of {len(rounds)}") if several else row)
    limits = {
        "gRPC echo": [figures.echo["grpc_aio_per_s"] for figures in rounds],
        "HTTP echo": [figures.echo["http_per_s"] for figures in rounds],
        "raw SQL": [figures.raw[f"tasks_per_s_{clients}"] for figures in rounds],
    }
    described = ", ".join(
        f"{name} {_spread(values)}{unit}"
        for (name, values), unit in zip(limits.items(), ("/s", "/s", " tasks/s"), strict=True)
    )
    title = f"limits in this run: {described} ({clients} processes)"
    if several:
        title += f"; medians of {len(rounds)} rounds, each round against its own limits"
        print_rounds(per_round, limits)
    print_table(title, headers, rows)
    median = Round(
        *(_median_figures([getattr(f, field) for f in rounds]) for field in Round._fields)
    )
    print_cpu(median.echo, median.grpc, median.register, median.gateway)
    grpc = median.grpc
    print(
        f"gRPC lifecycle: server event loop on a CPU {grpc['loop_run_share']:.0%}"
        f" and runnable, waiting for one, {grpc['loop_wait_share']:.0%} of the time"
        + (" (medians)" if several else "")
    )


def print_rounds(per_round: Sequence[Sequence[Target]], limits: dict[str, list[float]]) -> None:
    """Print each round's limits and the loads set against them, with their targets."""
    loads = {
        "lifecycle over gRPC, tasks/s": "gRPC lifecycle",
        "RegisterTask, tasks/s": "RegisterTask",
        "lifecycle over HTTP gateway, tasks/s": "HTTP lifecycle",
    }
    headers = ["round", *limits]
    for label in loads.values():
        headers += [label, "target"]
        if label == "RegisterTask":
            headers.append("a pipeline per client")
    rows = []
    for number, results in enumerate(per_round):
        by_name = {result[0]: result for result in results}
        row: list[Any] = [number + 1, *(values[number] for values in limits.values())]
        for name in loads:
            result = by_name.get(name)
            row += ["", ""] if result is None else [result[2], _target(result)]
            if name == "RegisterTask, tasks/s":
                row.append(by_name[PIPELINE_PER_CLIENT][2])
        rows.append(row)
    print_table("each round: the limits, and the loads set against them", headers, rows)


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
        ("gRPC echo, per call", *_cpu(echo, "grpc_aio")),
        ("RegisterTask, per call", *_cpu(register, "register_task")),
        (
            "gRPC lifecycle, per task",
            grpc["cpu_ms_per_task_lifecycle"],
            grpc["clients_cpu_ms_per_task"],
            grpc["postgres_cpu_ms_per_task"],
            grpc["idle_share"],
        ),
        ("HTTP echo, per request", *_cpu(echo, "http")),
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


def _cpu(figures: dict[str, float], prefix: str) -> tuple[float, float, float, float]:
    """CPU ms per call of the server, clients and PostgreSQL, and the idle
    share, from figures _common.cpu_figures named after prefix."""
    return (
        figures[f"{prefix}_server_cpu_ms"],
        figures[f"{prefix}_clients_cpu_ms"],
        figures[f"{prefix}_postgres_cpu_ms"],
        figures[f"{prefix}_idle_share"],
    )


def _target(result: Target) -> float:
    assert result[1] is not None
    return result[1]


def _lower_is_better(name: str, rule: str) -> bool:
    return rule.startswith("≤") or name.startswith(("server", "claim p50"))


def _held(measured: float, target: float, lower_is_better: bool) -> bool:
    return measured <= target if lower_is_better else measured >= target


def _spread(values: Sequence[float]) -> str:
    """One figure, or the median with the lowest and highest."""
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def _median_figures(figures: Sequence[dict[str, float] | None]) -> Any:
    """Each figure's median over the rounds (those every round has); None if any round has none."""
    present = [each for each in figures if each is not None]
    if len(present) < len(figures):
        return None
    keys = set.intersection(*(set(each) for each in present))
    return {key: statistics.median(each[key] for each in present) for key in sorted(keys)}


if __name__ == "__main__":
    main()
