"""Many WatchEvents streams on one porch server while writers run the lifecycle.

W watcher streams (spread over a few client processes, grpc.aio) follow one
server while `--writers` processes claim, start and finish tasks at a
bounded total rate. Prints the server's memory, the events delivered per
second over all streams, and the delay from an event's time (taken when its
transaction writes it) to its arrival at a watcher, p50 and p99.

    python bench/watch.py [--db-url URL | --sqlite] [--watchers 1000]
        [--writers 8] [--rate 40] [--seconds 20]

The whole run is bounded: writers stop after --seconds, watchers a little
later. Fails loudly when a watcher misses or repeats an event.
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
    DEFAULT_DB_URL,
    Server,
    create_pipeline_token,
    fresh_database,
    metadata,
    peak_rss_mb,
    percentile,
    porch,
    print_table,
    rss_mb,
    run_clients,
    sqlite_url,
)

from porch_stubs.v1 import porch_pb2 as pb
from porch_stubs.v1 import porch_pb2_grpc

STREAMS_PER_CHANNEL = 50


def watch(target: str, secret: str, streams: int, ready: Any, stop: Any, results: Any) -> None:
    """Follow `streams` WatchEvents streams until stop is set; put what arrived on results."""
    results.put(asyncio.run(_watch(target, secret, streams, ready, stop)))


async def _watch(target: str, secret: str, streams: int, ready: Any, stop: Any) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(target) for _ in range(-(-streams // STREAMS_PER_CHANNEL))
    ]
    delays: list[float] = []
    cursors: list[list[str]] = [[] for _ in range(streams)]
    started = asyncio.Event()
    waiting = [streams]

    async def follow(index: int) -> None:
        stub = porch_pb2_grpc.PorchServiceStub(channels[index // STREAMS_PER_CHANNEL])
        call = stub.WatchEvents(pb.WatchEventsRequest(), metadata=metadata(secret))
        async for event in call:
            if event.kind == pb.Event.BOOKMARK:
                if not cursors[index]:
                    cursors[index].append("")  # connected
                    waiting[0] -= 1
                    if not waiting[0]:
                        started.set()
                continue
            delays.append(time.time() - event.time.ToMicroseconds() / 1e6)
            cursors[index].append(event.cursor)

    tasks = [asyncio.create_task(follow(i)) for i in range(streams)]
    await started.wait()
    ready.set()
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return {"delays": delays, "cursors": [c[1:] for c in cursors]}


def write(target: str, secret: str, rate: float, seconds: float, seed: int) -> int:
    """Claim one task at a time, report RUNNING then DONE, at about `rate` tasks/s."""
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        auth = metadata(secret)
        done = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            claim = pb.ClaimTasksRequest(pipeline=pb.Pipeline(name="bench"), num_tasks=1)
            tasks = stub.ClaimTasks(claim, metadata=auth).tasks
            for task in tasks:
                for status in (pb.Task.RUNNING, pb.Task.DONE):
                    update = pb.Task(
                        pipeline=task.pipeline, task_input_id=task.task_input_id, status=status
                    )
                    stub.UpdateTask(pb.UpdateTaskRequest(task=update), metadata=auth)
                done += 1
            # Poisson-ish pacing around the target rate
            time.sleep(rng.expovariate(rate))
        return done


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--db-url", default=DEFAULT_DB_URL)
    parser.add_argument("--sqlite", action="store_true", help="use a SQLite file instead")
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--watcher-processes", type=int, default=4)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rate", type=float, default=40.0, help="tasks/s over all writers")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        url = fresh_database(sqlite_url(scratch) if args.sqlite else args.db_url)
        secret = create_pipeline_token(url, "bench")
        reader = porch("token", "create", "--reader", "--description", "watchers", "--db-url", url)
        tasks = int(args.rate * args.seconds * 1.5) + 100
        with Server(url) as server:
            _register(server.target, secret, tasks)
            figures = _run(server, reader.strip(), secret, args)
    return figures


def _register(target: str, secret: str, count: int) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        for start in range(0, count, 500):
            batch = []
            for n in range(start, min(count, start + 500)):
                task = pb.Task()
                task.task_input.update({"n": n})
                batch.append(task)
            request = pb.RegisterTasksRequest(pipeline_name="bench", tasks=batch)
            stub.RegisterTasks(request, metadata=metadata(secret))


def _run(server: Server, reader: str, secret: str, args: argparse.Namespace) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    ready = [context.Event() for _ in range(args.watcher_processes)]
    stop = context.Event()
    share = [args.watchers // args.watcher_processes] * args.watcher_processes
    share[0] += args.watchers - sum(share)
    results_queue = context.Queue()
    watchers = [
        context.Process(
            target=watch, args=(server.target, reader, n, ready[i], stop, results_queue)
        )
        for i, n in enumerate(share)
    ]
    for process in watchers:
        process.start()
    for event in ready:
        if not event.wait(120):
            raise SystemExit("bench: the watchers did not connect within 2 minutes")
    rss_idle = rss_mb(server.pids())
    samples: list[float] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            samples.append(rss_mb(server.pids()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    per_writer = args.rate / args.writers
    started = time.monotonic()
    finished = run_clients(
        write, [(server.target, secret, per_writer, args.seconds, i) for i in range(args.writers)]
    )
    time.sleep(2)  # let the last events arrive
    elapsed = time.monotonic() - started
    sampling.set()
    stop.set()
    results = [results_queue.get(timeout=120) for _ in watchers]
    for process in watchers:
        process.join()
    peak = peak_rss_mb(server.pids())

    expected = 3 * sum(finished)  # CLAIMED, RUNNING, DONE
    delays = [d for r in results for d in r["delays"]]
    streams = [c for r in results for c in r["cursors"]]
    for index, cursors in enumerate(streams):
        if len(cursors) != len(set(cursors)):
            raise SystemExit(f"bench: watcher {index} saw an event twice")
        if len(cursors) != expected:
            raise SystemExit(f"bench: watcher {index} saw {len(cursors)} of {expected} events")
    figures = {
        "watchers": float(args.watchers),
        "tasks_per_second": sum(finished) / args.seconds,
        "events_delivered_per_second": len(delays) / elapsed,
        "delay_p50_ms": percentile(delays, 50) * 1000,
        "delay_p99_ms": percentile(delays, 99) * 1000,
        "rss_idle_mb": rss_idle,
        "rss_max_mb": max(samples or [rss_idle]),
        "peak_rss_mb": peak,
    }
    print_table(
        f"WatchEvents: {args.watchers} streams on one server, {args.writers} writers",
        ["figure", "value"],
        [(name, f"{value:,.1f}") for name, value in figures.items()],
    )
    return figures


if __name__ == "__main__":
    main()
