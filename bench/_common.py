"""Helpers the benchmarks share: databases, porch servers, client processes, figures.

Databases
    ``DEFAULT_DB_URL``: the PostgreSQL database benchmarks use unless told otherwise.
    ``fresh_database(url)``: drop and re-create the database ``url`` names
    (PostgreSQL) or delete the file (SQLite), then ``porch db upgrade`` it;
    returns ``url``. Everything in that database is lost.
    ``drop_database(url)``: drop the PostgreSQL database ``url`` names.
    ``write_transactions(url)`` / ``commits_between(before, after, count)``:
    PostgreSQL's transaction-id counter, and the commits per call or task
    between two of its readings (None on SQLite).
    ``sqlite_url(directory)``: a SQLite URL for a file in ``directory``.
    ``add_database_options(parser)`` / ``bench_database(args, scratch)``:
    the ``--db-url`` and ``--sqlite`` options, and the fresh database they
    name (a SQLite file in ``scratch`` with ``--sqlite``).
    ``psycopg2_dsn(url)``: the libpq DSN of a SQLAlchemy PostgreSQL URL.
    ``porch(*args)``: run the ``porch`` command and return its stdout.
    ``create_pipeline_token(url, pipeline)``: create pipeline ``pipeline``
    (directly in the database) and a pipeline token for it; returns the secret.
    ``bench_pipeline(args, pipeline)``: a context manager giving ``(url,
    secret)``: the fresh database the options name, with ``pipeline`` and
    its token; a SQLite file lives in a directory removed afterwards.

Servers
    ``Server(url, workers=1, http=False, extra=())``: a context manager that
    runs ``porch serve`` and waits until it listens. Attributes: ``target``
    (``HOST:PORT`` of gRPC), ``http_url`` (the gateway's base URL, or None),
    ``admin_token`` (the first admin token, when the database had none),
    ``pids()`` (the server's processes: the main one and its workers).
    ``start_process(argv, ready)``: start any command and wait for a line
    matching the regular expression ``ready`` on its stdout; returns the
    ``subprocess.Popen`` and the match.
    ``free_port()``: a TCP port that is free now.

Processes and their accounting (Linux /proc)
    ``cpu_seconds(pids)``: user + system CPU seconds the processes used so far.
    ``peak_rss_mb(pids)``: the largest peak resident set (VmHWM) among them, MiB.
    ``rss_mb(pids)``: the current resident sets (VmRSS) added up, MiB.
    ``cpu_split(server_pids)``: a context manager giving a dict that, when
    the block ends, holds where the machine's CPU went while it ran: the
    server's, the client processes' (those run_clients ran in the block),
    PostgreSQL's, the share left idle, and how the server's busiest
    event-loop thread spent the time (on a CPU, or runnable and waiting
    for one).
    ``cpu_figures(prefix, split, count)``: a cpu_split's CPU per call or
    task, as the figures ``PREFIX_{server,clients,postgres}_cpu_ms`` and
    ``PREFIX_idle_share`` that all.py reads.

Clients
    ``run_clients(function, arguments)``: run ``function(*arguments[i])`` in
    one 'spawn' process per entry, all released together once every one has
    started, and return their results in order. ``function`` must live in an
    importable module (a benchmark script is importable as such: ``bench/``
    is on ``sys.path`` when a script in it runs) and its results must pickle.
    Raises if any client failed.
    ``Timer``: collects per-call latencies by name (``with timer("Claim"):``).
    ``grpc_channel(target)`` / ``metadata(secret)``: a channel with porch's
    options and the ``authorization`` metadata for a token.
    ``expect(response, status=200)``: an httpx response's JSON; raises,
    naming the call, on any other HTTP status.

Figures
    ``percentile(values, p)``: the p-th percentile (nearest rank) of values.
    ``print_table(title, headers, rows)``: a small aligned table on stdout.
    ``check_claims(claimed, expected)``: exit loudly on a task claimed twice,
    or on tasks registered but never claimed (lost).

Each benchmark script has ``main(argv=None) -> dict[str, float]``: it parses
its options, prints its table and returns its figures by name. It also takes
``--json FILE`` (``add_json_option(parser)``) and then writes those figures
there (``write_json(path, figures)``): ``bench/all.py`` runs every script as a
subprocess with it and computes the ratios from the files. ``bench/gateway.py``
is expected to write ``http_tasks_per_s`` (the lifecycle over HTTP through the
gateway) and ``grpc_tasks_per_s`` (the same over gRPC in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg2
from sqlalchemy.engine import make_url

DEFAULT_DB_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/porch_bench"
PORCH = str(Path(sys.executable).with_name("porch"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GRPC_READY = r"porch: gRPC listening on (\S+)"
HTTP_READY = r"porch: HTTP gateway on (\S+)"
ADMIN_TOKEN = re.compile(r"first admin token \(shown only now\): (\S+)")


# Databases


def psycopg2_dsn(url: str) -> str:
    """Return the libpq DSN of a SQLAlchemy PostgreSQL URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def write_transactions(url: str) -> int | None:
    """PostgreSQL's transaction-id counter: every write transaction (each commit
    that changed something, a NOTIFY included) takes one id, this call too.
    The difference of two readings, less one, counts the commits between
    (commits_between). None on SQLite."""
    if make_url(url).get_backend_name() != "postgresql":
        return None
    connection = psycopg2.connect(psycopg2_dsn(url))
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT txid_current()")
            row = cursor.fetchone()
            assert row is not None, "SELECT txid_current() returns a row"
            return int(row[0])
    finally:
        connection.close()


def commits_between(before: int | None, after: int | None, count: int) -> float | None:
    """Write transactions per call or task (count of them) between two
    write_transactions readings, the second reading's own left out; None on
    SQLite. Besides the calls' commits they count the NOTIFYs that wake other
    servers' watch hubs: one per 20 ms of writes at most."""
    if before is None or after is None:
        return None
    return (after - before - 1) / count


def sqlite_url(directory: str | Path) -> str:
    """Return a SQLite URL for a fresh file in directory."""
    return f"sqlite:///{Path(directory) / 'porch-bench.db'}"


def add_database_options(parser: argparse.ArgumentParser) -> None:
    """Add --db-url (re-created, PostgreSQL by default) and --sqlite."""
    parser.add_argument("--db-url", default=DEFAULT_DB_URL, help="re-created: all data is lost")
    parser.add_argument("--sqlite", action="store_true", help="use a SQLite file instead")


def bench_database(args: argparse.Namespace, scratch: str | Path) -> str:
    """The database those options name, fresh: with --sqlite, a file in scratch."""
    return fresh_database(sqlite_url(scratch) if args.sqlite else args.db_url)


@contextmanager
def bench_pipeline(args: argparse.Namespace, pipeline: str) -> Iterator[tuple[str, str]]:
    """The fresh database the options name, with pipeline and a token for it:
    (url, secret). With --sqlite the file is in a directory removed afterwards."""
    with tempfile.TemporaryDirectory() as scratch:
        url = bench_database(args, scratch)
        yield url, create_pipeline_token(url, pipeline)


def fresh_database(url: str) -> str:
    """Drop and re-create the database at url, then bring its schema up to date."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    else:
        _admin(url, "DROP DATABASE IF EXISTS {name} WITH (FORCE)", "CREATE DATABASE {name}")
    porch("db", "upgrade", "--db-url", url)
    return url


def drop_database(url: str) -> None:
    """Drop the PostgreSQL database at url, if it is there."""
    _admin(url, "DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _admin(url: str, *statements: str) -> None:
    """Run statements about url's PostgreSQL database ({name} in each) from the
    server's postgres database; refuses a name that is not plain letters,
    digits and underscores."""
    parsed = make_url(url)
    name = parsed.database
    if not name or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise SystemExit(f"bench: refusing to re-create or drop database {name!r}")
    admin = psycopg2.connect(psycopg2_dsn(str(parsed.set(database="postgres"))))
    admin.autocommit = True
    with admin.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement.format(name=name))
    admin.close()


def porch(*args: str) -> str:
    """Run the porch command; return its stdout, raising on failure."""
    done = subprocess.run([PORCH, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench: porch {' '.join(args[:2])} failed:\n{done.stderr}")
    return done.stdout


def create_pipeline_token(url: str, pipeline: str) -> str:
    """Create a pipeline and a token for it, directly in the database; return the secret."""
    from porch_server.db.engine import make_engine
    from porch_server.models import Pipeline
    from porch_server.store import Store

    store = Store(make_engine(url, pool_size=1))
    try:
        store.create_pipeline(Pipeline(name=pipeline, uri="bench", version="1"))
    finally:
        store.close()
    return porch(
        "token", "create", "--pipeline", pipeline, "--description", "bench", "--db-url", url
    ).strip()


# Servers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_process(
    argv: Sequence[str], ready: str, timeout: float = 60.0
) -> tuple[subprocess.Popen[str], re.Match[str], list[str]]:
    """Start argv; wait for a stdout line matching ready. Returns the process, the
    match and the lines read before it.

    The process gets a session of its own, as a service started by an init
    system or a daemon does, and as PostgreSQL here has: Linux then shares
    the CPU between sessions before their threads (autogroups), so the
    server is not one thread among the 8 client processes' when they all
    want a core. Every server the benchmarks start, porch's and the echoes
    the limits are taken from, is started here, so the ratios compare like
    with like. The caller stops it (it gets no Ctrl-C from the terminal)."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    pattern = re.compile(ready)
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise SystemExit(f"bench: {argv[0]} ended before it was ready:\n{''.join(lines)}")
            lines.append(line)
            match = pattern.search(line)
            if match:
                return process, match, lines
        raise SystemExit(f"bench: {argv[0]} was not ready after {timeout} s")
    except BaseException:
        _kill_session(process)
        raise


def _kill_session(process: subprocess.Popen[str]) -> None:
    """Kill a process started by start_process and whatever it started (its
    session's process group): Ctrl-C does not reach them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children.extend(int(child) for child in task.read_text().split())
    return children


class Server:
    """`porch serve` in a subprocess, for the duration of a with block."""

    def __init__(
        self, url: str, workers: int = 1, http: bool = False, extra: Sequence[str] = ()
    ) -> None:
        self.url = url
        self.workers = workers
        self.http = http
        self.extra = list(extra)
        self.target = ""
        self.http_url: str | None = None
        self.admin_token: str | None = None
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Server:
        port = free_port() if self.workers > 1 else 0
        argv = [PORCH, "serve", "--db-url", self.url, "--grpc-port", str(port)]
        argv += ["--workers", str(self.workers)]
        argv += ["--http-port", str(free_port())] if self.http else ["--no-http"]
        argv += ["--log-config", str(_quiet_log_config()), *self.extra]
        ready = HTTP_READY if self.http else GRPC_READY
        self.process, match, lines = start_process(argv, ready)
        for line in lines:
            if found := re.search(GRPC_READY, line):
                self.target = found.group(1)
            if found := ADMIN_TOKEN.search(line):
                self.admin_token = found.group(1)
        if self.http:
            self.http_url = match.group(1).rstrip("/")
        try:
            if self.workers > 1:
                _wait_for_workers(self.process.pid, self.workers - 1)
            _wait_for_grpc(self.target)
        except BaseException:
            self.__exit__()
            raise
        return self

    def pids(self) -> list[int]:
        """The main server process and its worker processes."""
        assert self.process is not None
        return [self.process.pid, *_children(self.process.pid)]

    def __exit__(self, *exc_info: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            _kill_session(self.process)
        LOG_FILE.unlink(missing_ok=True)
        LOG_CONFIG.unlink(missing_ok=True)


LOG_FILE = Path(f"/tmp/porch-bench-{os.getpid()}.log")
LOG_CONFIG = Path(f"/tmp/porch-bench-log-{os.getpid()}.json")


def _quiet_log_config() -> Path:
    """A log config that keeps the access log (one line per call, as in
    production) but writes it to LOG_FILE rather than the terminal."""
    handler = {"class": "logging.FileHandler", "filename": str(LOG_FILE)}
    config = {"version": 1, "handlers": {"file": handler}}
    LOG_CONFIG.write_text(json.dumps(config | {"root": {"level": "INFO", "handlers": ["file"]}}))
    return LOG_CONFIG


def _wait_for_workers(pid: int, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # multiprocessing's spawn also starts a resource tracker: count those
        # that run porch (their command line names the spawn entry point).
        workers = [
            child
            for child in _children(pid)
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
        ]
        if len(workers) >= count:
            time.sleep(2.0)  # let them import and bind
            return
        time.sleep(0.1)
    raise SystemExit("bench: the server's workers did not start")


def _wait_for_grpc(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)


# Processes and their accounting


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by the processes (not their children);
    a process that has already exited counts nothing."""
    total = 0
    for pid in pids:
        stat = _proc_text(pid, "stat")
        if stat:
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


@contextmanager
def cpu_split(server_pids: Sequence[int]) -> Iterator[dict[str, float]]:
    """Where the CPU goes while the block runs, in the dict this yields:
    ``server_s``, ``clients_s`` (what run_clients' processes spent in their
    function during the block, start-up not counted) and ``postgres_s``
    (every process named postgres, the whole cluster's) CPU seconds; ``idle_share`` of the
    machine (/proc/stat); and of the busiest event-loop thread (each server
    process's main thread, /proc/PID/task/PID/schedstat) the share of the
    block's time it ran (``loop_run_share``) and the share it was runnable
    but waited for a core (``loop_wait_share``)."""
    figures: dict[str, float] = {}
    start = time.monotonic()
    server, clients = cpu_seconds(server_pids), _client_cpu_seconds[0]
    postgres, machine = _postgres_cpu(), _machine_ticks()
    loops = {pid: _schedstat(pid) for pid in server_pids}
    yield figures
    seconds = time.monotonic() - start
    figures["server_s"] = cpu_seconds(server_pids) - server
    figures["clients_s"] = _client_cpu_seconds[0] - clients
    ended = _postgres_cpu()
    figures["postgres_s"] = sum(ended[pid] - postgres.get(pid, 0.0) for pid in ended)
    busy, total = (now - then for now, then in zip(_machine_ticks(), machine, strict=True))
    figures["idle_share"] = 1 - busy / total if total else 0.0
    run, wait = max(
        (
            tuple(now - then for now, then in zip(_schedstat(pid), loops[pid], strict=True))
            for pid in server_pids
        ),
        default=(0, 0),
    )
    figures["loop_run_share"] = run / 1e9 / seconds
    figures["loop_wait_share"] = wait / 1e9 / seconds


def cpu_figures(prefix: str, split: dict[str, float], count: int) -> dict[str, float]:
    """A cpu_split's CPU ms per call or task (count of them), and its idle share,
    as figures named after prefix."""
    figures = {
        f"{prefix}_{part}_cpu_ms": split[f"{part}_s"] / count * 1000
        for part in ("server", "clients", "postgres")
    }
    figures[f"{prefix}_idle_share"] = split["idle_share"]
    return figures


def _postgres_cpu() -> dict[int, float]:
    """CPU seconds of every running process named postgres, by pid."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return {pid: cpu_seconds([pid]) for pid in pids if _proc_text(pid, "comm") == "postgres\n"}


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot; idle and iowait are not busy."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    total = sum(ticks[:8])  # guest time is already counted in user time
    return total - ticks[3] - ticks[4], total


def _schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable and waiting for one) of the process's main thread."""
    fields = _proc_text(pid, f"task/{pid}/schedstat").split()
    return (int(fields[0]), int(fields[1])) if fields else (0, 0)


def _proc_text(pid: int, name: str) -> str:
    """/proc/PID/name, or "" when the process has exited meanwhile."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _status_kib(pid: int, field: str) -> int:
    for line in _proc_text(pid, "status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_mb(pids: Iterable[int]) -> float:
    """The largest peak resident set size (VmHWM) among the processes, in MiB."""
    return max((_status_kib(pid, "VmHWM") for pid in pids), default=0) / 1024


def rss_mb(pids: Iterable[int]) -> float:
    """The current resident set sizes (VmRSS) of the processes added up, in MiB."""
    return sum(_status_kib(pid, "VmRSS") for pid in pids) / 1024


# Clients


def _client_main(
    function: Callable[..., Any], arguments: tuple[Any, ...], barrier: Any, results: Any, index: int
) -> None:
    try:
        barrier.wait()
        start = time.process_time()
        value = function(*arguments)
        results.put((index, True, value, time.process_time() - start))
    except BaseException as error:  # reported to the parent, which fails loudly
        results.put((index, False, f"{type(error).__name__}: {error}", 0.0))


# CPU seconds the clients of run_clients have spent in their function, all
# threads, start-up not included.
_client_cpu_seconds = [0.0]


def run_clients(function: Callable[..., Any], arguments: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run function once per argument tuple, each in its own 'spawn' process,
    started together; return the results in order."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(arguments))
    results = context.Queue()
    processes = [
        context.Process(target=_client_main, args=(function, args, barrier, results, index))
        for index, args in enumerate(arguments)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    failures = []
    for _ in processes:
        index, ok, value, cpu = results.get()
        _client_cpu_seconds[0] += cpu
        if ok:
            collected[index] = value
        else:
            failures.append(f"client {index}: {value}")
    for process in processes:
        process.join()
    if failures:
        raise SystemExit("bench: clients failed:\n" + "\n".join(failures))
    return [collected[index] for index in range(len(arguments))]


class Timer:
    """Per-call latencies in seconds, by call name."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.latencies[name].append(time.perf_counter() - start)

    def merge(self, other: dict[str, list[float]]) -> None:
        """Add another timer's latencies to these."""
        for name, values in other.items():
            self.latencies[name].extend(values)


GRPC_CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def grpc_channel(target: str) -> grpc.Channel:
    """A plain-text channel to a porch server."""
    return grpc.insecure_channel(target, options=GRPC_CLIENT_OPTIONS)


def metadata(secret: str) -> tuple[tuple[str, str]]:
    """The call metadata that carries a token."""
    return (("authorization", f"Bearer {secret}"),)


# Figures


def expect(response: Any, status: int = 200) -> Any:
    """An httpx response's JSON; raises, naming the call, on any other HTTP status."""
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:200]}"
        )
    return response.json()


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile of values, nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, round(p / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def cpu_line(
    transport: str, server_ms: float, clients_ms: float, postgres_ms: float, idle: float
) -> str:
    """One line of where the machine's CPU went per task in a lifecycle (cpu_split)."""
    return (
        f"{transport} lifecycle, CPU ms per task: server {server_ms:.2f},"
        f" client processes {clients_ms:.2f}, PostgreSQL {postgres_ms:.2f};"
        f" machine idle {idle:.0%}"
    )


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print rows under headers, columns aligned, floats shortened."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    table = [list(headers)] + [[cell(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in table) for column in range(len(headers))]
    print(f"\n{title}")
    for number, row in enumerate(table):
        print("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)))
        if number == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """Add --json FILE, where the script writes its figures for bench/all.py."""
    parser.add_argument("--json", metavar="FILE", help="also write the figures here, as JSON")


def write_json(path: str | None, figures: dict[str, float]) -> None:
    """Write figures to path as JSON, when a path was given."""
    if path is not None:
        Path(path).write_text(json.dumps(figures, indent=2))


def check_claims(claimed: Iterable[str], expected: int) -> None:
    """Exit loudly if a task was claimed twice or if registered tasks were never claimed."""
    counts = Counter(claimed)
    duplicates = [key for key, count in counts.items() if count > 1]
    if duplicates:
        raise SystemExit(f"bench: DUPLICATE CLAIMS: {len(duplicates)}, e.g. {duplicates[:3]}")
    if len(counts) != expected:
        raise SystemExit(f"bench: LOST CLAIMS: {expected} tasks registered, {len(counts)} claimed")


@contextmanager
def py_spy(pids: Sequence[int], output: str | None) -> Iterator[None]:
    """Record the processes with py-spy (collapsed stacks, output.PID.txt) while
    the block runs; nothing when output is None. py-spy must be installed."""
    if output is None:
        yield
        return
    program = Path(sys.executable).with_name("py-spy")
    # --gil: only samples that hold the GIL, i.e. CPU the Python code spends.
    options = ["--format", "raw", "--rate", "200", "--gil", "--nonblocking"]
    recorders = [
        subprocess.Popen(
            [
                str(program),
                "record",
                *options,
                "--pid",
                str(pid),
                "--output",
                f"{output}.{pid}.txt",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    time.sleep(1.0)
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(2)  # SIGINT: py-spy writes its file and exits
            recorder.wait()
