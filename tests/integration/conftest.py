"""A real porch gRPC server on port 0, in a thread of its own, per test."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from porch_server import auth, server
from porch_server.config import Config
from porch_server.db import migrate
from porch_server.db.engine import make_engine
from porch_server.models import Role, Task
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2, porch_pb2_grpc


class ServerThread:
    """Runs server.start/stop on an event loop in a background thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(make_engine(config.db_url, config.db_schema))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.running = self.call(server.start(config, self.store))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coroutine):  # type: ignore[no-untyped-def]
        """Run a coroutine on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def stop(self, grace: float = 1.0) -> None:
        self.call(server.stop(self.running, grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self.store.close()


@dataclass
class Porch:
    """A running server and the tokens a test needs to talk to it."""

    server: ServerThread
    admin: str
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.server.target

    def stub(self, secret: str | None = None) -> Client:
        channel = grpc.insecure_channel(self.target)
        self.channels.append(channel)
        return Client(porch_pb2_grpc.PorchServiceStub(channel), secret)

    def token(self, role: Role, pipeline: str | None = None, description: str = "test") -> str:
        secret = auth.new_secret()
        self.server.store.create_token(role, pipeline, description, auth.hash_secret(secret))
        return secret

    def stop(self) -> None:
        """Close the channels the test opened, then stop the server."""
        for channel in self.channels:
            channel.close()
        self.server.stop()

    def pipeline(self, name: str = "p1") -> str:
        """Create a pipeline and return a pipeline token for it."""
        self.stub(self.admin).CreatePipeline(
            porch_pb2.CreatePipelineRequest(
                pipeline=porch_pb2.Pipeline(name=name, uri="https://example.org/p", version="1")
            )
        )
        return self.token(Role.PIPELINE, name, f"{name} wrapper")


class Client:
    """A PorchService stub that sends its bearer token with every call."""

    def __init__(self, stub: porch_pb2_grpc.PorchServiceStub, secret: str | None) -> None:
        self._stub = stub
        self._metadata = [("authorization", f"Bearer {secret}")] if secret else []

    def __getattr__(self, method: str):  # type: ignore[no-untyped-def]
        call = getattr(self._stub, method)

        def invoke(request, **kwargs):  # type: ignore[no-untyped-def]
            return call(request, metadata=self._metadata, **({"timeout": 30} | kwargs))

        invoke.with_call = lambda request: call.with_call(  # type: ignore[attr-defined]
            request, metadata=self._metadata, timeout=30
        )
        return invoke


def start_porch(db_url: str, schema: str | None = None, **options: object) -> Porch:
    if db_url.startswith("sqlite"):
        migrate.upgrade(db_url, schema)
    config = Config(
        db_url=db_url,
        db_schema=schema,
        grpc_port=0,
        http_port=None,
        **options,  # type: ignore[arg-type]
    )
    thread = ServerThread(config)
    secret = auth.new_secret()
    thread.store.create_token(Role.ADMIN, None, "test admin", auth.hash_secret(secret))
    return Porch(thread, secret)


@pytest.fixture
def porch(db_url: str) -> Iterator[Porch]:
    running = start_porch(db_url)
    yield running
    running.stop()


LISTENING = re.compile(r"gRPC listening on \S+:(\d+)")


def start_server(db_url: str, *flags: str) -> tuple[subprocess.Popen[str], str]:
    """Start `porch serve` on a free port and return it with its address."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "porch_server",
            "serve",
            "--db-url",
            db_url,
            "--grpc-port",
            "0",
            "--no-http",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        found = LISTENING.search(line)
        if found:
            return process, f"127.0.0.1:{found.group(1)}"
    raise AssertionError(f"porch serve exited with {process.wait()} before listening")


def stop_server(process: subprocess.Popen[str]) -> None:
    """SIGTERM a `porch serve` process and check it shut down cleanly."""
    process.terminate()
    assert process.wait(timeout=30) == 0
    assert process.stdout is not None
    process.stdout.close()


@contextlib.contextmanager
def server_processes(db_url: str, count: int) -> Iterator[tuple[Store, list[str]]]:
    """`count` porch servers on one database, and a store on it for set-up and checks."""
    store = Store(make_engine(db_url))
    started = [start_server(db_url) for _ in range(count)]
    try:
        yield store, [target for _, target in started]
    finally:
        for process, _ in started:
            stop_server(process)
        store.close()


def every_task(store: Store, pipeline_name: str) -> list[Task]:
    """Every task of the pipeline, oldest first, page after page."""
    tasks: list[Task] = []
    token = ""
    while True:
        page = store.list_tasks(pipeline_name, None, 1000, token)
        tasks += page.items
        if not (token := page.next_page_token):
            return tasks


def run_sql(url: str, *statements: str) -> None:
    """Run statements on the database at url, in one transaction."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
    finally:
        engine.dispose()
