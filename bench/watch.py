"""Many WatchEvents streams on one porch server while writers run the lifecycle.

W watcher streams (spread over two client processes, grpc.aio) follow one
server while `--writers` processes claim, start and finish tasks at a
bounded total rate. With `--pipelines P` the tasks are spread over P
pipelines and each stream watches one of them; with P = 1 every stream sees
every event. Prints the server's memory, the events delivered per second
over all streams, the delay from an event's time (taken when its
transaction writes it) to its arrival at a watcher, p50 and p99, and the
latency of the writers' own calls, served beside the streams.

    python bench/watch.py [--db-url URL | --sqlite] [--watchers 1000]
        [--pipelines 1] [--writers 8] [--rate 5] [--seconds 60] [--workers 1]
        [--watcher-processes 2] [--writers-apart]

On two cores the watcher clients compete with the server, the writers and
PostgreSQL: each delivered event costs the receiving clients nearly twice
the server's CPU (the server's is 35 µs on the fastest machine measured,
50-60 µs on one half as fast), so keep watchers times events per second
within what the box can do. The default rate, about 4 tasks/s or 12 events/s
once the writers' own round trips are counted, makes 12,000 deliveries a
second to 1,000 unfiltered streams; twice that rate saturates two cores.
Writers start after the server has gone idle from the streams' replays.
A p99 over 20 seconds rests on a few clusters of arrivals and varies from
run to run by a factor of 1.5; a minute gives a steadier figure.
The run is bounded: writers stop after --seconds, watchers once they have
every event of their pipeline or a minute later. Fails loudly when a
watcher misses or repeats an event.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Server,
    Timer,
    add_database_options,
    bench_database,
    cpu_seconds,
    create_pipeline_token,
    metadata,
    peak_rss_mb,
    percentile,
    porch,
    print_table,
    rss_mb,
    run_clients,
)

from porch_stubs.v1 import porch_pb2 as pb
from porch_stubs.v1 import porch_pb2_grpc

STREAMS_PER_CHANNEL = 50
EVENTS_PER_TASK = 3  # CLAIMED, RUNNING, DONE: the writers' events
# The server counts as idle below this share of one core over the window.
IDLE_CPU_SHARE = 0.1
IDLE_WINDOW_SECONDS = 0.5


def watch(
    target: str,
    secret: str,
    pipelines: list[str],
    ready: Any,
    expected: Any,
    caught_up: Any,
    results: Any,
) -> None:
    """Follow one stream per entry of pipelines ("" for all) until each has its
    expected number of events, or a minute after that is known."""
    results.put(asyncio.run(_watch(target, secret, pipelines, ready, expected, caught_up)))


async def _watch(
    target: str, secret: str, pipelines: list[str], ready: Any, expected: Any, caught_up: Any
) -> dict[str, Any]:
    streams = len(pipelines)
    channels = [
        grpc.aio.insecure_channel(target) for _ in range(-(-streams // STREAMS_PER_CHANNEL))
    ]
    delays: list[float] = []
    last_arrival = [0.0]
    cursors: list[list[str]] = [[] for _ in range(streams)]
    connected = [0]
    started = asyncio.Event()

    async def follow(index: int) -> None:
        stub = porch_pb2_grpc.PorchServiceStub(channels[index // STREAMS_PER_CHANNEL])
        request = pb.WatchEventsRequest(pipeline_name=pipelines[index])
        first = True
        async for event in stub.WatchEvents(request, metadata=metadata(secret)):
            if event.kind == pb.Event.BOOKMARK:
                if first:
                    first = False
                    connected[0] += 1
                    if connected[0] == streams:
                        started.set()
                continue
            now = time.time()
            delays.append(now - event.time.ToMicroseconds() / 1e6)
            last_arrival[0] = now
            cursors[index].append(event.cursor)

    tasks = [asyncio.create_task(follow(i)) for i in range(streams)]
    await started.wait()
    ready.set()
    deadline = None
    while True:
        await asyncio.sleep(0.1)
        if expected[0] < 0:
            continue
        deadline = deadline or time.monotonic() + 60
        enough = all(
            len(c) >= _expected(expected, p) for c, p in zip(cursors, pipelines, strict=True)
        )
        if enough or time.monotonic() > deadline:
            break
    caught_up.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(grace=None)
    return {
        "delays": delays,
        "last": last_arrival[0],
        "streams": list(zip(pipelines, cursors, strict=True)),
    }


def _expected(expected: Any, pipeline: str) -> int:
    """Events a stream of pipeline ("" for all) should see; expected[i + 1] is pipeline i's."""
    if not pipeline:
        return int(sum(expected[1:]))
    return int(expected[int(pipeline.removeprefix("bench")) + 1])


def write(
    target: str, tokens: dict[str, str], rate: float, seconds: float, seed: int
) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Claim one task at a time from a random pipeline, report RUNNING then DONE,
    at about `rate` tasks/s; return the tasks finished per pipeline and the
    calls' latencies."""
    rng = random.Random(seed)
    finished = dict.fromkeys(tokens, 0)
    timer = Timer()
    with grpc.insecure_channel(target) as channel:
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        start = time.monotonic()
        # Poisson arrivals around the rate, from the start: writers that all
        # began with a task would write a burst no steady load has.
        while time.monotonic() - start + (pause := rng.expovariate(rate)) < seconds:
            time.sleep(pause)
            name = rng.choice(list(tokens))
            auth = metadata(tokens[name])
            claim = pb.ClaimTasksRequest(pipeline=pb.Pipeline(name=name), num_tasks=1)
            with timer("ClaimTasks"):
                claimed = stub.ClaimTasks(claim, metadata=auth).tasks
            for task in claimed:
                for status in (pb.Task.RUNNING, pb.Task.DONE):
                    update = pb.Task(
                        pipeline=task.pipeline, task_input_id=task.task_input_id, status=status
                    )
                    with timer("UpdateTask"):
                        stub.UpdateTask(pb.UpdateTaskRequest(task=update), metadata=auth)
                finished[name] += 1
    return finished, dict(timer.latencies)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_database_options(parser)
    parser.add_argument("--watchers", type=int, default=1000)
    # One receiving process per core: the delay measured includes the
    # receivers' own queueing, and on two cores more of them only add
    # context switches (p99 over 30 s, 1,000 unfiltered streams: 1 process
    # 201-283 ms, 2: 284-394, 4: 680-988, 8: 1,053).
    parser.add_argument("--watcher-processes", type=int, default=2)
    parser.add_argument("--pipelines", type=int, default=1, help="streams watch one each")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rate", type=float, default=5.0, help="tasks/s over all writers")
    parser.add_argument("--seconds", type=float, default=60.0, help="writers run this long")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument(
        "--writers-apart",
        action="store_true",
        help="writers call a second porch server; the figures are the watchers' server's",
    )
    args = parser.parse_args(argv)
    names = [f"bench{i}" for i in range(args.pipelines)]
    with tempfile.TemporaryDirectory() as scratch:
        url = bench_database(args, scratch)
        tokens = {name: create_pipeline_token(url, name) for name in names}
        reader = porch("token", "create", "--reader", "--description", "watchers", "--db-url", url)
        per_pipeline = int(args.rate * args.seconds * 1.5 / args.pipelines) + 50
        with Server(url, workers=args.workers) as server:
            for name, secret in tokens.items():
                _register(server.target, name, secret, per_pipeline)
            if not args.writers_apart:
                return _run(server, server.target, reader.strip(), tokens, args)
            # The watchers' server learns of the writers' events through
            # the database (NOTIFY), as any other server's.
            with Server(url) as writers_server:
                return _run(server, writers_server.target, reader.strip(), tokens, args)


def _register(target: str, pipeline: str, secret: str, count: int) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        for start in range(0, count, 500):
            batch = []
            for n in range(start, min(count, start + 500)):
                task = pb.Task()
                task.task_input.update({"n": n})
                batch.append(task)
            request = pb.RegisterTasksRequest(pipeline_name=pipeline, tasks=batch)
            stub.RegisterTasks(request, metadata=metadata(secret))


def _wait_until_idle(pids: list[int], limit: float = 60.0) -> float:
    """Wait until the server is idle; return how long that took.

    Each new stream replays from the database after its first bookmark, so
    the server is still busy when every stream is connected: a thousand
    replays take it about a second. Events written meanwhile would wait
    behind them, a cost of connecting, not of delivery.
    """
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = cpu_seconds(pids)
        time.sleep(IDLE_WINDOW_SECONDS)
        if cpu_seconds(pids) - before < IDLE_CPU_SHARE * IDLE_WINDOW_SECONDS:
            break
    return time.monotonic() - start


def _run(
    server: Server,
    writers_target: str,
    reader: str,
    tokens: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    names = list(tokens)
    watched = [names[i % len(names)] if len(names) > 1 else "" for i in range(args.watchers)]
    shares = [watched[i :: args.watcher_processes] for i in range(args.watcher_processes)]
    ready = [context.Event() for _ in shares]
    caught_up = [context.Event() for _ in shares]
    expected = context.Array("i", [-1] * (len(names) + 1))
    results_queue = context.Queue()
    watchers = [
        context.Process(
            target=watch,
            args=(server.target, reader, share, ready[i], expected, caught_up[i], results_queue),
        )
        for i, share in enumerate(shares)
    ]
    for process in watchers:
        process.start()
    for event in ready:
        if not event.wait(120):
            raise SystemExit("bench: the watchers did not connect within 2 minutes")
    settle_seconds = _wait_until_idle(server.pids())
    rss_idle = rss_mb(server.pids())
    samples: list[float] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            samples.append(rss_mb(server.pids()))

    threading.Thread(target=sample, daemon=True).start()
    started = time.time()
    cpu_before = cpu_seconds(server.pids())
    per_writer = args.rate / args.writers
    written = run_clients(
        write, [(writers_target, tokens, per_writer, args.seconds, i) for i in range(args.writers)]
    )
    finished = [tasks for tasks, _ in written]
    calls = [value for _, latencies in written for values in latencies.values() for value in values]
    for index, name in enumerate(names):
        expected[index + 1] = EVENTS_PER_TASK * sum(f[name] for f in finished)
    expected[0] = 0
    for event in caught_up:
        event.wait(120)
    sampling.set()
    server_cpu = cpu_seconds(server.pids()) - cpu_before
    results = [results_queue.get(timeout=120) for _ in watchers]
    for process in watchers:
        process.join()
    peak = peak_rss_mb(server.pids())

    for result in results:
        for pipeline, cursors in result["streams"]:
            want = _expected(expected, pipeline)
            if len(cursors) != len(set(cursors)):
                raise SystemExit(f"bench: a watcher of {pipeline or 'all'} saw an event twice")
            if len(cursors) != want:
                raise SystemExit(
                    f"bench: a watcher of {pipeline or 'all'} saw {len(cursors)} of {want} events"
                )
    delays = [d for r in results for d in r["delays"]]
    elapsed = max(r["last"] for r in results) - started
    tasks = sum(sum(f.values()) for f in finished)
    figures = {
        "watchers": float(args.watchers),
        "pipelines": float(args.pipelines),
        "tasks_per_second": tasks / args.seconds,
        "events_written_per_second": EVENTS_PER_TASK * tasks / args.seconds,
        "events_delivered_per_second": len(delays) / elapsed,
        "server_cpu_us_per_delivery": server_cpu / max(1, len(delays)) * 1e6,
        "server_cpu_share_of_one_core": server_cpu / elapsed,
        "delay_p50_ms": percentile(delays, 50) * 1000,
        "delay_p99_ms": percentile(delays, 99) * 1000,
        # The writers' ClaimTasks and UpdateTask calls, served beside the streams.
        "writer_call_p50_ms": percentile(calls, 50) * 1000,
        "writer_call_p99_ms": percentile(calls, 99) * 1000,
        "settle_seconds": settle_seconds,
        "rss_idle_mb": rss_idle,
        "rss_max_mb": max(samples or [rss_idle]),
        "peak_rss_mb": peak,
    }
    print_table(
        f"WatchEvents: {args.watchers} streams over {args.pipelines} pipeline(s), "
        f"{args.writers} writers",
        ["figure", "value"],
        [(name, f"{value:,.1f}") for name, value in figures.items()],
    )
    return figures


if __name__ == "__main__":
    main()
