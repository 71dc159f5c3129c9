"""The transport limits: a trivial gRPC echo and a trivial JSON echo over HTTP.

The same client processes as the other benchmarks (W 'spawn' processes,
sync grpc / httpx clients) call servers that do nothing, so the rates are
what the transport alone allows on this machine.

One more kind, not measured unless asked for: grpc-aio-work, the grpc.aio
echo whose handler also does in miniature what any registration must do
beside the transport and the database (a Task message with a Struct input,
the input's canonical JSON and its SHA-256, one access line to a file, the
answer's bytes). Its server measures that work alone in a tight loop before
it serves, and a second table shows what it cost there; its server CPU per
call less grpc-aio's, measured beside it, is what the work costs when it
runs between the calls' transport, beside the client processes.

    python bench/ceiling.py [--clients W] [--seconds S] [--kinds KIND ...]
    python bench/ceiling.py --serve KIND [--scratch DIR]   (one echo server)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from _common import (
    add_json_option,
    cpu_figures,
    cpu_split,
    free_port,
    percentile,
    print_table,
    run_clients,
    start_process,
    write_json,
)

KINDS = ("grpc-aio", "grpc-sync", "http")
# Measured only when asked for (--kinds): see the docstring.
EXTRA_KINDS = ("grpc-aio-work",)
TIGHT_LOOP_CALLS = 20_000
METHOD = "/bench.Echo/Echo"
READY = r"echo listening on (\S+)"
PAYLOAD = b'{"pipeline": {"name": "bench"}, "task_input_id": "' + b"0" * 64 + b'"}'


def _identity(request: bytes, context: object) -> bytes:
    return request


async def _async_identity(request: bytes, context: object) -> bytes:
    return request


def _handler(behaviour: object) -> grpc.GenericRpcHandler[Any, Any]:
    method = grpc.unary_unary_rpc_method_handler(behaviour)  # type: ignore[arg-type]
    return grpc.method_handlers_generic_handler("bench.Echo", {"Echo": method})


class _RegistrationLikeWork:
    """What any registration must do beside the transport and the database, in
    miniature: see the module's docstring. The access lines go to a file in
    directory."""

    def __init__(self, directory: str) -> None:
        from porch_stubs.v1 import porch_pb2

        self._task = porch_pb2.Task
        self._log = logging.getLogger("bench.echo.access")
        handler = logging.FileHandler(f"{directory}/access.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        self._log.addHandler(handler)
        self._log.setLevel(logging.INFO)
        self._log.propagate = False
        self._calls = 0

    def __call__(self) -> bytes:
        self._calls += 1
        task = self._task()
        task.pipeline.name = "bench"
        task.task_input.update({"bench": "echo", "number": self._calls, "path": "/data/x.cram"})
        text = json.dumps(
            {key: task.task_input[key] for key in task.task_input},
            sort_keys=True,
            separators=(",", ":"),
        )
        task.task_input_id = hashlib.sha256(text.encode()).hexdigest()
        self._log.info("RegisterTask OK %s %s", task.task_input_id, text)
        return task.SerializeToString()

    def tight_loop_us(self) -> float:
        """CPU µs per call of the work alone, called over and over."""
        for _ in range(TIGHT_LOOP_CALLS // 10):
            self()
        start = time.process_time()
        for _ in range(TIGHT_LOOP_CALLS):
            self()
        return (time.process_time() - start) / TIGHT_LOOP_CALLS * 1e6


def serve_grpc_aio(work: _RegistrationLikeWork | None = None) -> None:
    """A grpc.aio echo server, as porch's server is built (on the same event
    loop); with work, each call does it too before it answers."""

    async def working(request: bytes, context: object) -> bytes:
        assert work is not None
        work()
        return request

    async def run() -> None:
        if work is not None:
            print(f"work alone: {work.tight_loop_us():.1f} µs per call", flush=True)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(_async_identity if work is None else working),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"echo listening on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    # The loop `porch serve` runs on: uvloop where it is installed.
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run())


def serve_grpc_sync() -> None:
    """A thread-pool grpc echo server."""
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((_handler(_identity),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def serve_http() -> None:
    """A Starlette JSON echo under uvicorn."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(await request.json())

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    # Not uvicorn's sockets=[...]: on a socket bound here, every request
    # took 40 ms (delayed ACKs), as if TCP_NODELAY were lost.
    port = free_port()
    print(f"echo listening on http://127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def grpc_client(target: str, seconds: float) -> tuple[int, float, list[float]]:
    """Echo as fast as possible for seconds; return calls, elapsed, latencies."""
    channel = grpc.insecure_channel(target)
    echo = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    latencies = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        echo(PAYLOAD)
        latencies.append(time.perf_counter() - now)
    return len(latencies), time.perf_counter() - start, latencies


def http_client(url: str, seconds: float) -> tuple[int, float, list[float]]:
    """POST JSON to the echo as fast as possible for seconds."""
    import httpx

    latencies = []
    with httpx.Client(base_url=url) as client:
        start = time.perf_counter()
        while (now := time.perf_counter()) - start < seconds:
            client.post("/echo", content=PAYLOAD, headers={"content-type": "application/json"})
            latencies.append(time.perf_counter() - now)
    return len(latencies), time.perf_counter() - start, latencies


def measure(kind: str, clients: int, seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """Start an echo server of kind and load it from clients; return its rate
    (``per_s``) with p50 and p99 (ms), and its cpu_figures (named after kind):
    per call the CPU ms of the server, the client processes and PostgreSQL
    (its background work only), with the share of the machine left idle."""
    # The server is stopped with SIGTERM, which runs no clean-up in it: its
    # scratch files (grpc-aio-work's access log) live in a directory made here.
    with tempfile.TemporaryDirectory() as scratch:
        argv = [sys.executable, __file__, "--serve", kind, "--scratch", scratch]
        process, match, lines = start_process(argv, READY)
        try:
            client = http_client if kind == "http" else grpc_client
            with cpu_split([process.pid]) as split:
                results = run_clients(client, [(match.group(1), seconds)] * clients)
        finally:
            process.terminate()
            process.wait()
    latencies = [value for result in results for value in result[2]]
    calls = sum(result[0] for result in results)
    rate = {
        "per_s": calls / max(result[1] for result in results),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }
    for line in lines:
        if line.startswith("work alone: "):
            rate["work_alone_us"] = float(line.split()[2])
    return rate, cpu_figures(_key(kind), split, calls)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure the echo servers; print and return their rates."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per server")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS + EXTRA_KINDS,
        default=list(KINDS),
        help="the echo servers to measure",
    )
    parser.add_argument("--serve", choices=KINDS + EXTRA_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=tempfile.gettempdir(), help=argparse.SUPPRESS)
    add_json_option(parser)
    args = parser.parse_args(argv)
    if args.serve == "grpc-aio-work":
        serve_grpc_aio(_RegistrationLikeWork(args.scratch))
        return {}
    if args.serve:
        {"grpc-aio": serve_grpc_aio, "grpc-sync": serve_grpc_sync, "http": serve_http}[args.serve]()
        return {}
    figures: dict[str, float] = {}
    rows = []
    work_rows: list[tuple[str, float]] = []
    for kind in args.kinds:
        measured, cpu = measure(kind, args.clients, args.seconds)
        key = _key(kind)
        figures[f"{key}_per_s"] = measured["per_s"]
        figures |= cpu
        if "work_alone_us" in measured:
            figures[f"{key}_alone_us"] = measured["work_alone_us"]
            work_rows.append((kind, measured["work_alone_us"]))
        rows.append(
            (
                kind,
                measured["per_s"],
                measured["p50_ms"],
                measured["p99_ms"],
                cpu[f"{key}_server_cpu_ms"] * 1000,
                cpu[f"{key}_clients_cpu_ms"] * 1000,
                cpu[f"{key}_idle_share"] * 100,
            )
        )
    print_table(
        f"transport ceiling: trivial echo, {args.clients} client processes",
        [
            "server",
            "calls/s",
            "p50 ms",
            "p99 ms",
            "CPU µs/call: server",
            "clients",
            "machine idle %",
        ],
        rows,
    )
    if work_rows:
        print_table(
            "grpc-aio-work's work on its own, in a tight loop in its server before it serves",
            ["server", "CPU µs/call, work alone"],
            work_rows,
        )
    write_json(args.json, figures)
    return figures


def _key(kind: str) -> str:
    """The prefix of an echo's figures: grpc-aio's are grpc_aio_per_s, ..."""
    return kind.replace("-", "_")


if __name__ == "__main__":
    main()
