"""The `porch` command's client side: pipeline and task commands over gRPC.

Each command prints its results as JSON, one object per line, so that shell
scripts can read them with `jq`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from gateway import (
    ClientTLS,
    NotJson,
    UnreadableJson,
    access,
    inexact_integer,
    message_to_dict,
    read_json,
)
from gateway.upstream import GRACE_ENDED  # gRPC's words as a server's shutdown grace ends
from porch_server.config import (
    CHANNEL_OPTIONS,
    check_pem,
    finite_number,
    option_file,
)
from porch_server.errors import InvalidArgument
from porch_server.interceptor import DATABASE_STOPPED
from porch_server.service import MAX_LEASE, checked_task_input
from porch_stubs.v1 import porch_pb2, porch_pb2_grpc

STATES = [name for name in porch_pb2.Task.State.keys() if name != "STATE_UNSPECIFIED"]  # noqa: SIM118


# Tasks a `porch task register` call sends at most, and bytes of request:
# an answer holds each task again with its pipeline, within gRPC's 4 MiB.
REGISTER_BATCH = 1000
REGISTER_BATCH_BYTES = 1024 * 1024

# gRPC's own forms of target, taken as they are: dns:///host:port, unix:path, …
GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:", "xds:")
# The most a --token-file may hold: a token, some white space around it.
TOKEN_FILE_LIMIT = 4096
# What a token may hold: printable ASCII, no white space.
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")
# The white space taken from around a token: a file's line break, say.
_SPACE = " \t\r\n"
# A --token-file, or $PORCH_TOKEN_FILE, that may be a token given in the
# wrong place (porch's are 43 such characters): not shown in messages.
_LIKE_A_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,}")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


# Seconds each call of a command other than porch watch may take, unless
# --timeout or $PORCH_TIMEOUT says otherwise: room for a batch of
# REGISTER_BATCH tasks, or a large claim, on a busy database.
DEFAULT_TIMEOUT_SECONDS = 60.0
# The longest --timeout: gRPC takes a deadline some centuries away as one
# already passed.
MAX_TIMEOUT_SECONDS = 86_400.0

# Seconds porch watch waits before reconnecting: after a stream that
# delivered, then after each attempt that did not.
WATCH_RETRY_SECONDS = (1.0, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def grpc_target(text: str) -> str:
    """A server's address, HOST:PORT ([IPv6]:PORT) or one of gRPC's own
    forms (dns:///HOST:PORT, unix:PATH, …): for argparse."""
    if text.startswith(GRPC_SCHEMES):
        return text
    found = _HOST_PORT.fullmatch(text)
    if found is None or not 0 < int(found.group(2)) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (or a gRPC target such as dns:///HOST:PORT), got {text!r}"
        )
    return text


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        type=grpc_target,
        default=os.environ.get("PORCH_TARGET", "").strip() or "127.0.0.1:50051",
        help="porch server address (default: $PORCH_TARGET or 127.0.0.1:50051)",
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        help="bearer token (default: $PORCH_TOKEN); other users of the machine can read"
        " a command's flags, so prefer $PORCH_TOKEN or --token-file",
    )
    tokens.add_argument(
        "--token-file",
        type=_token_file,
        metavar="PATH",
        help="read the bearer token from this file (default: $PORCH_TOKEN_FILE)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="use TLS, verifying the server with the system's CAs (implied by the --tls-* files)",
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM CA to verify a TLS server with")
    parser.add_argument(
        "--tls-cert", type=Path, help="PEM client certificate, for a server that asks for one"
    )
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")


def _add_timeout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_timeout,
        metavar="SECONDS",
        help="how long each call to the server may take, at most a day"
        f" (default: $PORCH_TIMEOUT or {DEFAULT_TIMEOUT_SECONDS:g})",
    )


def _timeout(text: str) -> float:
    """A call's deadline in seconds, above 0 and at most MAX_TIMEOUT_SECONDS, for argparse."""
    value = finite_number(text)
    if not 0 < value <= MAX_TIMEOUT_SECONDS:
        raise argparse.ArgumentTypeError(
            f"not a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS:,.0f}: {text!r}"
        )
    return value


def _deadline(args: argparse.Namespace) -> float | None:
    """Seconds each call may take: --timeout, else $PORCH_TIMEOUT (unless
    empty), else DEFAULT_TIMEOUT_SECONDS; None, no deadline, for porch watch."""
    if args.command == "watch":  # a stream meant to run until interrupted
        return None
    if args.timeout is not None:
        return float(args.timeout)
    given = os.environ.get("PORCH_TIMEOUT", "").strip()
    if not given:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        return _timeout(given)
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"porch: $PORCH_TIMEOUT is {error}") from None


def add_commands(commands: Any) -> None:
    """Add the client commands to the `porch` parser's subcommands."""
    pipeline = commands.add_parser("pipeline", help="create, get and list pipelines")
    pipeline_commands = pipeline.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = pipeline_commands.add_parser("create", help="register a pipeline (admin)")
    create.add_argument("name", help="the pipeline's name (its identifier)")
    create.add_argument("--uri", required=True, help="where the pipeline's code lives")
    create.add_argument("--version", required=True, help="the pipeline's version")
    get = pipeline_commands.add_parser("get", help="show one pipeline")
    get.add_argument("name", help="the pipeline's name")
    listing = pipeline_commands.add_parser("list", help="list pipelines")
    listing.add_argument("--uri", help="only pipelines with this uri")
    listing.add_argument("--version", help="only pipelines of this version")
    for sub in (create, get, listing):
        _add_client_flags(sub)
        _add_timeout_flag(sub)

    task = commands.add_parser("task", help="register, claim, update and inspect tasks")
    task_commands = task.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = task_commands.add_parser(
        "register", help="register tasks: JSON objects as arguments, or '-' for JSON lines on stdin"
    )
    register.add_argument("--pipeline", required=True, help="the tasks' pipeline")
    register.add_argument(
        "inputs",
        nargs="+",
        metavar="JSON",
        help="task_input objects; - reads one per line from stdin",
    )
    claim = task_commands.add_parser("claim", help="claim pending tasks")
    claim.add_argument("--pipeline", required=True, help="the pipeline to claim tasks of")
    claim.add_argument(
        "-n",
        "--num-tasks",
        type=_num_tasks,
        default=1,
        metavar="N",
        help="claim up to this many (default 1; one call claims at most 10,000)",
    )
    claim.add_argument(
        "--lease",
        type=finite_number,
        metavar="SECONDS",
        help="ask for a lease of SECONDS (at most 30 days): the tasks go back to PENDING "
        "unless RUNNING is reported within it, and again within each lease after",
    )
    update = task_commands.add_parser("update", help="report a task's new status")
    update.add_argument("--pipeline", required=True, help="the task's pipeline")
    which = update.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the task_input_id")
    which.add_argument("--input", metavar="JSON", help="the task_input")
    # Only a claim makes a task CLAIMED.
    update.add_argument("--status", required=True, choices=[s for s in STATES if s != "CLAIMED"])
    update.add_argument("--message", default="", help="a note for the task's history")
    update.add_argument(
        "--claim-number",
        type=_claim_number,
        default=0,
        metavar="N",
        help="refuse the update if the task has been claimed again since claim N"
        " (the claim_number its claim gave)",
    )
    show = task_commands.add_parser("get", help="show one task")
    show.add_argument("--pipeline", required=True, help="the task's pipeline")
    show.add_argument("--id", required=True, help="the task_input_id")
    tasks = task_commands.add_parser("list", help="list tasks")
    tasks.add_argument("--pipeline", help="only tasks of this pipeline")
    tasks.add_argument("--status", choices=STATES, help="only tasks in this status")
    events = task_commands.add_parser("events", help="list a task's events")
    events.add_argument("--pipeline", required=True, help="the task's pipeline")
    events.add_argument("--id", required=True, help="the task_input_id")
    for sub in (register, claim, update, show, tasks, events):
        _add_client_flags(sub)
        _add_timeout_flag(sub)

    watch = commands.add_parser("watch", help="print events as they happen")
    watch.add_argument("--pipeline", help="only events of this pipeline")
    watch.add_argument("--after", default="", metavar="CURSOR", help="resume after this cursor")
    watch.add_argument("--json", action="store_true", help="print each event as JSON")
    watch.add_argument("--bookmarks", action="store_true", help="also print keep-alive bookmarks")
    _add_client_flags(watch)


def _seconds(value: float) -> str:
    """A number of seconds as given: 0 and 3,600, not 0.0 and 3,600.0."""
    return f"{value:,.0f}" if value.is_integer() else f"{value:,}"


# Said of a character that cannot be sent: Python reads a byte that is not
# UTF-8 (in a flag, on stdin) as a lone surrogate, as JSON's "\ud800" is.
NOT_TEXT = "is not text: a \\uD800 to \\uDFFF escape without its pair, or a byte that is not UTF-8"


def not_text(error: UnicodeEncodeError) -> bool:
    """Whether error is of a character NOT_TEXT describes, refused as UTF-8."""
    character = error.object[error.start : error.start + 1]
    return error.encoding == "utf-8" and "\ud800" <= character <= "\udfff"


# The largest number a request's int32 field holds.
_INT32_MAX = 2**31 - 1


def _claim_number(text: str) -> int:
    """A claim's number, from 1, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= _INT32_MAX:
        raise argparse.ArgumentTypeError(
            f"not a claim's number (a whole number from 1 to {_INT32_MAX:,}): {text!r}"
        )
    return value


def _num_tasks(text: str) -> int:
    """How many tasks to claim, from 1, for argparse; a number past what a
    request holds asks for as many as a call claims, as a smaller large one does."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a whole number from 1: {text!r}")
    return min(value, _INT32_MAX)


def client_tls(
    flag: str, tls: bool, ca: Path | None, cert: Path | None, key: Path | None
) -> ClientTLS | None:
    """TLS to a porch server from the files of the {flag}-ca, {flag}-cert and
    {flag}-key options (and {flag} alone: the system's CAs); None for plaintext."""
    if bool(cert) != bool(key):
        raise SystemExit(f"porch: {flag}-cert and {flag}-key go together")
    if not (tls or ca or cert):
        return None
    files = ClientTLS(
        root_certificates=option_file(f"{flag}-ca", ca) if ca else None,
        private_key=option_file(f"{flag}-key", key) if key else None,
        certificate_chain=option_file(f"{flag}-cert", cert) if cert else None,
    )
    check_pem(
        (f"{flag}-cert", cert) if cert else None,
        (f"{flag}-key", key) if key else None,
        (f"{flag}-ca", ca) if ca else None,
    )
    return files


def _stub(args: argparse.Namespace) -> tuple[porch_pb2_grpc.PorchServiceStub, grpc.Channel]:
    tls = client_tls("--tls", args.tls, args.tls_ca, args.tls_cert, args.tls_key)
    if tls is not None:
        credentials = grpc.ssl_channel_credentials(
            tls.root_certificates, tls.private_key, tls.certificate_chain
        )
        channel = grpc.secure_channel(args.target, credentials, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS)
    return porch_pb2_grpc.PorchServiceStub(channel), channel


class _TimedOut(grpc.RpcError):
    """A call that had no answer within the command's deadline (--timeout)."""

    def __init__(self, method: str, seconds: float) -> None:
        super().__init__(method, seconds)
        self.method = method
        self.seconds = seconds

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return (
            f"the server took longer than {_seconds(self.seconds)} s to answer {self.method}"
            " (--timeout SECONDS, or $PORCH_TIMEOUT, sets how long each call may take)"
        )


@dataclass(frozen=True)
class _Calls:
    """A command's calls to the server, each with its token and deadline
    (none for porch watch)."""

    stub: porch_pb2_grpc.PorchServiceStub
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None

    def unary(self, method: str, request: Message) -> Any:
        """The answer of the unary call method; _TimedOut once its deadline
        has passed (a DEADLINE_EXCEEDED the server sends sooner, its own
        statement's, say, keeps the server's words)."""
        started = time.monotonic()
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED or self.timeout is None:
                raise
            if time.monotonic() - started < self.timeout:
                raise
            raise _TimedOut(method, self.timeout) from None


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The call's authorization: the token of --token or --token-file, else
    of $PORCH_TOKEN or $PORCH_TOKEN_FILE (not both); none if none is given."""
    given = _given_token(args)
    if given is None:
        return ()
    token, where = given
    if not _TOKEN_TEXT.fullmatch(token):
        raise SystemExit(
            f"porch: the token {where} holds white space, control or "
            "non-ASCII characters, which no porch token has"
        )
    return (("authorization", f"Bearer {token}"),)


def _given_token(args: argparse.Namespace) -> tuple[str, str] | None:
    """The token given, without the white space around it, and where it was
    given, for messages; None for none, or one left blank."""
    if args.token is not None:
        token = args.token.strip(_SPACE)
        return (token, "given by --token") if token else None
    if args.token_file is not None:
        return _read_token(args.token_file, "--token-file", "--token")
    given = os.environ.get("PORCH_TOKEN", "").strip(_SPACE)
    named = os.environ.get("PORCH_TOKEN_FILE", "")
    if given and named:
        raise SystemExit(
            "porch: both $PORCH_TOKEN and $PORCH_TOKEN_FILE are set; unset one"
            " (or give --token or --token-file, which come first)"
        )
    if named:
        return _read_token(Path(named), "$PORCH_TOKEN_FILE", "$PORCH_TOKEN")
    return (given, "in $PORCH_TOKEN") if given else None


def _read_token(path: Path, option: str, instead: str) -> tuple[str, str]:
    """The token in the file option names, and where it was given. A file
    missing, empty or larger than any token is refused by name, a device
    such as /dev/zero read no further; a missing file's path that looks
    like a token itself, meant for instead, is not shown."""
    shown = shlex.quote(str(path))
    file = f"{option} {shown}" if option.startswith("-") else f"the file {option} names ({shown})"
    try:
        with path.open("rb") as opened:
            data = opened.read(TOKEN_FILE_LIMIT + 1)
            status = os.fstat(opened.fileno())
            mode, owner = status.st_mode, status.st_uid
    except FileNotFoundError as error:
        if _LIKE_A_TOKEN.fullmatch(str(path)):
            raise SystemExit(
                f"porch: cannot read {option}: {error.strerror}; its value, not shown, looks"
                f" like a token itself, which goes in {instead}"
            ) from None
        raise SystemExit(f"porch: cannot read {file}: {error.strerror}") from None
    except OSError as error:
        raise SystemExit(f"porch: cannot read {file}: {error.strerror or error}") from None
    if len(data) > TOKEN_FILE_LIMIT:
        raise SystemExit(
            f"porch: {file} is larger than {TOKEN_FILE_LIMIT:,} bytes; it should hold the"
            " token alone"
        )
    token = data.strip(_SPACE.encode()).decode("latin-1")
    if not token:
        raise SystemExit(f"porch: {file} is empty; it should hold the token alone")
    if stat.S_ISREG(mode) and mode & 0o044 and _may_chmod(path, owner):
        # As ssh does of a key; a warning, not a refusal: the call goes on.
        # Not of a file its reader could not mend (a secret mounted read-only).
        named = shlex.quote(f"./{path}") if str(path).startswith("-") else shown
        print(
            f"porch: warning: {file} may be read by other users of this machine"
            f" (mode {stat.S_IMODE(mode):04o}); `chmod 600 {named}` keeps the token its owner's",
            file=sys.stderr,
        )
    return token, f"in {file}"


def _may_chmod(path: Path, owner: int) -> bool:
    """Whether whoever runs porch owns path and may change its mode: a POSIX
    machine's file, not one on a read-only mount (a container's secret)."""
    if not hasattr(os, "geteuid") or owner != os.geteuid():
        return False
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _token_file(text: str) -> Path:
    """A --token-file's path, for argparse."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give the path of a file holding a token")
    return Path(text)


def _print(message: Message) -> None:
    # Every field, as the gateway prints it: `"created": false` is there to read.
    print_json(message_to_dict(message, always_print_fields_with_no_presence=True))


def print_json(value: Any, indent: int | None = None) -> None:
    """value as JSON, its characters as they are, or as JSON's \\u escapes
    where stdout's encoding cannot hold them (PYTHONIOENCODING=ascii, a
    Latin-1 locale): the same JSON either way, and a claim's answer is not
    lost for want of a character after the claim was made."""
    text = _json_text(value, indent)
    print(text if indent else access.escape_json(text), flush=True)


def _json_text(value: Any, indent: int | None = None) -> str:
    """value as JSON, in \\u escapes where stdout's encoding cannot hold
    its characters as they are (print_json)."""
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    if not text.isascii():
        try:
            text.encode(sys.stdout.encoding or "utf-8")
        except UnicodeEncodeError:
            text = json.dumps(value, indent=indent)
    return text


def _json_object(text: str, where: str = "") -> dict[str, Any]:
    at = f"{where}: " if where else ""
    try:
        value = read_json(text, "the task input")
    except NotJson as error:  # the text as the shell passed it: were its quotes lost?
        raise SystemExit(f"porch: {at}{error}, got {text!r}") from None
    except UnreadableJson as error:
        raise SystemExit(f"porch: {at}{error}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"porch: {at}a task input must be a JSON object, got {text!r}")
    inexact = inexact_integer(value, "")
    if inexact is not None:
        raise SystemExit(f"porch: {at}{inexact}")
    return value


def _inputs(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each input, with where it came from."""
    for argument, text in enumerate(args.inputs, start=1):
        if text == "-":
            for number, line in enumerate(sys.stdin, start=1):
                if line.strip():
                    where = f"line {number} of stdin"
                    yield where, _json_object(line, where)
        else:
            where = f"input {argument}"
            yield where, _json_object(text, where)


def _batches(tasks: list[porch_pb2.Task]) -> Iterator[list[porch_pb2.Task]]:
    """tasks in calls of at most REGISTER_BATCH tasks and REGISTER_BATCH_BYTES
    of request, well inside what a call and its answer may carry."""
    batch: list[porch_pb2.Task] = []
    size = 0
    for task in tasks:
        task_size = task.ByteSize()
        if batch and (len(batch) == REGISTER_BATCH or size + task_size > REGISTER_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(task)
        size += task_size
    if batch:
        yield batch


def _register(calls: _Calls, args: argparse.Namespace) -> None:
    """Register the inputs, each checked as the server checks it before the
    first is sent, in batches; print the answers once every batch is in, so
    that a reader who leaves early (`| head`) cannot cut the registering short."""
    tasks = []
    for where, task_input in _inputs(args):
        task = _task(args.pipeline)
        try:
            task.task_input.SetInParent()  # {} is an input too: given, though empty
            task.task_input.update(task_input)
            checked_task_input("task", task)
        except UnicodeEncodeError as error:
            if not not_text(error):
                raise
            raise SystemExit(f"porch: {where}: {error.object[error.start]!r} {NOT_TEXT}") from None
        except (InvalidArgument, ValueError) as error:
            raise SystemExit(f"porch: {where}: {error}") from None
        tasks.append(task)
    answers: list[Message] = []
    sent, answered = 0, 0  # the tasks of the batch last sent; the answers before it
    ending: tuple[str, int] | None = None  # said after the answers, and the exit status
    try:
        for batch in _batches(tasks):
            registering = porch_pb2.RegisterTasksRequest(pipeline_name=args.pipeline, tasks=batch)
            sent, answered = len(batch), len(answers)
            try:
                answers += calls.unary("RegisterTasks", registering).results
            except grpc.RpcError as error:
                # Ended by the server's stop, it may have been made. After a
                # batch that was, a bare UNAVAILABLE too (its grace over, say);
                # the first one's is more likely an address or TLS fault,
                # which the usual message names.
                maybe_made = (
                    isinstance(error, _TimedOut)
                    or _unanswered(error)
                    or _cut_short(error)
                    or _database_stopped(error)
                    or bool(answers and _unanswered(error, grpc.StatusCode.UNAVAILABLE))
                )
                if not answers and not maybe_made:
                    raise
                registered = _partly_registered(len(answers), sent, len(tasks), maybe_made)
                ending = (f"{_failure(error)} ({registered})", 1)
                break
    except KeyboardInterrupt:  # Ctrl-C: what was registered is told as above
        in_flight = sent if len(answers) == answered else 0
        registered = _partly_registered(len(answers), in_flight, len(tasks), bool(in_flight))
        ending = (f"porch: interrupted ({registered})", 128 + signal.SIGINT)
    try:
        for answer in answers:
            _print(answer)
    except KeyboardInterrupt:
        said = ending[0] if ending else f"porch: all {len(tasks):,} tasks were registered"
        ending = (f"{said} (interrupted as the answers were printed)", 128 + signal.SIGINT)
    if ending is not None:
        print(ending[0], file=sys.stderr)
        raise SystemExit(ending[1])


def _partly_registered(before: int, batch: int, inputs: int, maybe_made: bool) -> str:
    """What a register command whose batch failed did: the batches before it
    were registered; one that ran out of time, or that the server's stop
    ended, may have been; those after it were not sent."""
    if not before and not (maybe_made and batch):
        return "none was sent"
    done = [f"the {before:,} tasks before it were registered, as printed"] if before else []
    if maybe_made and batch:
        done.append(f"the {batch:,} it sent may have been")
    after = inputs - before - batch
    if after:
        done.append(f"the {after:,} after it were not sent")
    return "; ".join(done) + ": registering them all again changes nothing for those registered"


def _pages(calls: _Calls, method: str, request: Any, field: str) -> Iterator[Message]:
    """Yield every item of a paged listing."""
    while True:
        response = calls.unary(method, request)
        yield from getattr(response, field)
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


def _task(pipeline: str, **fields: Any) -> porch_pb2.Task:
    task = porch_pb2.Task(pipeline=porch_pb2.Pipeline(name=pipeline), **fields)
    return task


def run(args: argparse.Namespace) -> None:
    """Run one client command; a failed call exits with its status and message."""
    stub, channel = _stub(args)
    try:
        _dispatch(_Calls(stub, _metadata(args), _deadline(args)), args)
    except grpc.RpcError as error:
        writes = getattr(args, "action", "") in ("create", "claim", "update")
        maybe = "; what it asked may have been done" if writes and _cut_short(error) else ""
        raise SystemExit(_failure(error) + maybe + _tls_hint(args, error)) from None
    finally:
        channel.close()


def _tls_hint(args: argparse.Namespace, error: grpc.RpcError) -> str:
    given = bool(args.tls or args.tls_ca or args.tls_cert or args.tls_key)
    return tls_hint(error, "--tls", given, bool(args.tls_cert))


def tls_hint(error: grpc.RpcError, flag: str, tls: bool, certificate: bool) -> str:
    """A hint for a connection closed at once: as a TLS server closes a plain
    one, or one that requires client certificates closes one without. flag
    names the options (--tls: --tls, --tls-cert, --tls-key); tls and
    certificate say whether TLS and a client certificate were given."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    details = str(error.details())
    if tls and "WRONG_VERSION_NUMBER" in details:
        return f" (the server does not speak TLS: if it serves plain connections, leave out {flag})"
    if "Socket closed" not in details:
        return ""
    if not tls:
        return f" (a server that expects TLS closes plain connections so: if it does, give {flag})"
    if not certificate:
        return (
            " (a server that requires client certificates closes connections without one so:"
            f" if it does, give {flag}-cert and {flag}-key)"
        )
    return (
        " (a server closes a connection so whose client certificate it refuses: one its"
        f" client CA did not sign, or expired; check {flag}-cert)"
    )


def _failure(error: grpc.RpcError) -> str:
    """A failed call's line: its status and the server's message."""
    if _unanswered(error):
        return (
            "porch: CANCELLED: the server ended the call without answering it, most likely"
            " as it stopped; try again"
        )
    if _cut_short(error):
        return (
            "porch: UNAVAILABLE: the server stopped before the call was done (its shutdown"
            " grace ended)"
        )
    code = error.code()
    return f"porch: {code.name if code else 'error'}: {error.details()}"


def _cut_short(error: grpc.RpcError) -> bool:
    """Whether the call reached a server whose shutdown grace ended before
    the call did: it may have been done."""
    return _unanswered(error, grpc.StatusCode.UNAVAILABLE) and error.details() == GRACE_ENDED


def _database_stopped(error: grpc.RpcError) -> bool:
    """Whether the server ended the call as its database stopped answering
    while the call waited on it: it may have been done (its words say so)."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and error.details() == DATABASE_STOPPED


def _unanswered(error: grpc.RpcError, *codes: grpc.StatusCode) -> bool:
    """Whether gRPC ended the call with no word from porch's server (which
    sends metadata with every error of its own) and with one of codes
    (CANCELLED unless given): CANCELLED for a call that reached the server
    as it began to stop, UNAVAILABLE for one its grace cut short or that
    could not reach it."""
    if error.code() not in (codes or (grpc.StatusCode.CANCELLED,)):
        return False
    if not isinstance(error, grpc.Call):
        return False
    return not (error.initial_metadata() or error.trailing_metadata())


def _event_line(event: porch_pb2.Event) -> str:
    """Return one line of text for an event."""
    kind = porch_pb2.Event.Kind.Name(event.kind)
    if event.kind == porch_pb2.Event.BOOKMARK:
        return f"{event.time.ToJsonString()} {kind} cursor={event.cursor}"
    change = porch_pb2.Task.State.Name(event.new_status)
    if event.old_status:
        change = f"{porch_pb2.Task.State.Name(event.old_status)}->{change}"
    who = access.escape(event.token_description) if event.token_description else "porch"
    message = ""
    if event.message:
        message = f" {access.escape_json(_json_text(event.message))}"
    return (
        f"{event.time.ToJsonString()} {access.escape(event.pipeline_name)} {event.task_input_id} "
        f"{kind} {change} by {who}{message} cursor={event.cursor}"
    )


def _watch(calls: _Calls, args: argparse.Namespace) -> None:
    """Print events until interrupted. When the server goes away, reconnect
    after the last cursor, waiting longer each time it cannot be reached (up
    to WATCH_RETRY_SECONDS[-1]); when it cannot be reached at the start, fail
    as every other command does."""
    last = args.after
    connected = False
    failures = 0
    gone = _reader_gone()
    while True:
        request = porch_pb2.WatchEventsRequest(pipeline_name=args.pipeline or "", after=last)
        reason = "the server ended it"
        delivered = False
        try:
            stream: Any = calls.stub.WatchEvents(request, metadata=calls.metadata)
            gone.stream = stream  # then checked: the reader may have left just now
            if gone.is_set():
                stream.cancel()
            for event in stream:
                connected = delivered = True
                last = event.cursor
                if event.kind == porch_pb2.Event.BOOKMARK and not args.bookmarks:
                    continue
                if args.json:
                    _print(event)
                else:
                    print(_event_line(event), flush=True)
        except grpc.RpcError as error:
            if gone.is_set():
                raise BrokenPipeError from None
            if _unanswered(error):
                reason = "CANCELLED: the server ended the stream, most likely as it stopped"
            elif error.code() == grpc.StatusCode.UNAVAILABLE:
                reason = f"UNAVAILABLE: {error.details()}"
            else:
                raise
            if not connected:
                raise
        if gone.is_set():
            raise BrokenPipeError
        failures = 0 if delivered else failures + 1
        wait = WATCH_RETRY_SECONDS[min(failures, len(WATCH_RETRY_SECONDS) - 1)]
        what = "stream ended" if delivered else "cannot reach the server"
        print(
            f"porch: {what} ({reason}); reconnecting in {wait:g} s after cursor {last!r}",
            file=sys.stderr,
        )
        if gone.wait(wait):
            raise BrokenPipeError


class _Gone(threading.Event):
    """Set when whoever reads stdout has left; the stream to cancel then."""

    def __init__(self) -> None:
        super().__init__()
        self.stream: Any = None


def _reader_gone() -> _Gone:
    """An event set as soon as the reader of a pipe (or a Unix socket) on
    stdout leaves, with the stream in hand cancelled: `porch watch | head -1`
    ends when head does, not at the next event, whose write would have
    failed. Output to a terminal or a file is not watched, nor a TCP peer's
    leaving, which poll tells from a half-close only by a write; nor anything
    where poll() is not (Windows)."""
    gone = _Gone()
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError):
        return gone
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) or not hasattr(select, "poll"):
        return gone

    def wait() -> None:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # errors and hang-ups only
        while not poller.poll():
            pass
        gone.set()
        if gone.stream is not None:
            gone.stream.cancel()

    threading.Thread(target=wait, name="porch-stdout", daemon=True).start()
    return gone


def _dispatch(calls: _Calls, args: argparse.Namespace) -> None:
    if args.command == "watch":
        _watch(calls, args)
        return
    if args.command == "pipeline":
        if args.action == "create":
            pipeline = porch_pb2.Pipeline(name=args.name, uri=args.uri, version=args.version)
            request = porch_pb2.CreatePipelineRequest(pipeline=pipeline)
            _print(calls.unary("CreatePipeline", request))
        elif args.action == "get":
            _print(calls.unary("GetPipeline", porch_pb2.GetPipelineRequest(name=args.name)))
        else:
            listing = porch_pb2.ListPipelinesRequest(uri=args.uri or "", version=args.version or "")
            for item in _pages(calls, "ListPipelines", listing, "pipelines"):
                _print(item)
        return
    if args.action == "register":
        _register(calls, args)
    elif args.action == "claim":
        claim = porch_pb2.ClaimTasksRequest(
            pipeline=porch_pb2.Pipeline(name=args.pipeline), num_tasks=args.num_tasks
        )
        if args.lease is not None:
            if not 0 < args.lease <= MAX_LEASE.total_seconds():
                raise SystemExit(
                    f"porch: --lease must be more than 0 and at most {MAX_LEASE.days} days "
                    f"({MAX_LEASE.total_seconds():,.0f} s), got {_seconds(args.lease)}"
                )
            claim.lease.FromNanoseconds(int(args.lease * 1e9))
        for task in calls.unary("ClaimTasks", claim).tasks:
            _print(task)
    elif args.action == "update":
        task = _task(args.pipeline, task_input_id=args.id or "", status=args.status)
        task.claim_number = args.claim_number
        if args.input:
            task.task_input.SetInParent()
            task.task_input.update(_json_object(args.input, "--input"))
        update = porch_pb2.UpdateTaskRequest(task=task, message=args.message)
        _print(calls.unary("UpdateTask", update))
    elif args.action == "get":
        get = porch_pb2.GetTaskRequest(pipeline_name=args.pipeline, task_input_id=args.id)
        _print(calls.unary("GetTask", get))
    elif args.action == "list":
        task_listing = porch_pb2.ListTasksRequest(
            pipeline_name=args.pipeline or "", status=args.status
        )
        for item in _pages(calls, "ListTasks", task_listing, "tasks"):
            _print(item)
    else:
        events = porch_pb2.ListTaskEventsRequest(pipeline_name=args.pipeline, task_input_id=args.id)
        for item in _pages(calls, "ListTaskEvents", events, "events"):
            _print(item)
