"""Every PorchService method through a real gRPC server, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, NamedTuple
from unittest import mock

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from porch_server import store as store_module
from porch_server.digest import task_input_id
from porch_server.errors import InvalidArgument
from porch_server.interceptor import DATABASE_SILENT, DATABASE_STOPPED
from porch_server.models import Pipeline, Role
from porch_server.service import LOCKED_RETRY_PAUSES, _registration_answer_bytes
from porch_stubs.v1 import porch_pb2 as pb
from porch_stubs.v1 import porch_pb2_grpc

from .conftest import Client, Porch, start_porch

State = pb.Task.State
Code = grpc.StatusCode


def fails(code: grpc.StatusCode, call: Any, request: Any, match: str = "") -> str:
    """Call and assert it fails with code; return the error's message."""
    with pytest.raises(grpc.RpcError) as raised:
        call(request)
    error: Any = raised.value
    assert error.code() == code, error.details()
    assert match in error.details()
    return str(error.details())


def access_lines(
    caplog: pytest.LogCaptureFixture, wanted: Callable[[str], bool], tries: int = 50
) -> list[str]:
    """The lines logged, once one is wanted: a call's access line is written
    as the call ends, maybe after its answer. AssertionError if none comes."""
    for _ in range(tries):
        lines = [record.getMessage() for record in caplog.records]
        if any(wanted(line) for line in lines):
            return lines
        time.sleep(0.02)
    raise AssertionError(lines)


def _matches(pattern: re.Pattern[str], line: str) -> bool:
    return pattern.fullmatch(line) is not None


def pipeline_request(name: str, uri: str = "u", version: str = "1") -> pb.CreatePipelineRequest:
    return pb.CreatePipelineRequest(pipeline=pb.Pipeline(name=name, uri=uri, version=version))


def register(pipeline: str, **task_input: Any) -> pb.RegisterTaskRequest:
    task = pb.Task(pipeline=pb.Pipeline(name=pipeline))
    task.task_input.update(task_input)
    return pb.RegisterTaskRequest(task=task)


def claim(pipeline: str, num_tasks: int | None = None, **kwargs: Any) -> pb.ClaimTasksRequest:
    return pb.ClaimTasksRequest(pipeline=pb.Pipeline(name=pipeline), num_tasks=num_tasks, **kwargs)


def update(pipeline: str, task_id: str, status: int, message: str = "") -> pb.UpdateTaskRequest:
    task = pb.Task(pipeline=pb.Pipeline(name=pipeline), task_input_id=task_id, status=status)
    return pb.UpdateTaskRequest(task=task, message=message)


# -- pipelines ---------------------------------------------------------------


def test_create_get_and_list_pipelines(porch: Porch) -> None:
    admin = porch.stub(porch.admin)
    created, call = admin.CreatePipeline.with_call(pipeline_request("p1", "https://x/p1", "2.0"))
    assert (created.name, created.uri, created.version) == ("p1", "https://x/p1", "2.0")
    assert ("x-http-code", "201") in call.trailing_metadata()
    admin.CreatePipeline(pipeline_request("p2", "https://x/p2", "1.0"))
    admin.CreatePipeline(pipeline_request("p3", "https://x/p1", "1.0"))
    assert admin.GetPipeline(pb.GetPipelineRequest(name="p2")).uri == "https://x/p2"

    def names(**filters: str) -> list[str]:
        return [p.name for p in admin.ListPipelines(pb.ListPipelinesRequest(**filters)).pipelines]

    assert names() == ["p1", "p2", "p3"]
    assert names(uri="https://x/p1") == ["p1", "p3"]
    assert names(uri="https://x/p1", version="1.0") == ["p3"]
    first = admin.ListPipelines(pb.ListPipelinesRequest(page_size=2))
    assert [p.name for p in first.pipelines] == ["p1", "p2"] and first.next_page_token
    rest = admin.ListPipelines(
        pb.ListPipelinesRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [p.name for p in rest.pipelines] == ["p3"] and not rest.next_page_token


def test_pipeline_errors(porch: Porch) -> None:
    admin = porch.stub(porch.admin)
    admin.CreatePipeline(pipeline_request("p1"))
    fails(Code.ALREADY_EXISTS, admin.CreatePipeline, pipeline_request("p1"), "'p1' already exists")
    fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, pipeline_request("p2", uri=""), "uri")
    fails(
        Code.INVALID_ARGUMENT, admin.CreatePipeline, pipeline_request("p2", version=""), "version"
    )
    fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, pipeline_request(""), "name is required")
    fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, pipeline_request("x" * 256), "255")
    for dots in (".", ".."):
        fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, pipeline_request(dots), "no URL")
    assert admin.CreatePipeline(pipeline_request("...")).name == "..."
    for spaced in ("  ", " p2", "p2 "):
        fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, pipeline_request(spaced), "white space")
    # A character a reader could not tell apart is named, with where it is.
    unusable = {
        "a/b": "must not contain '/' at character 2",
        "x\u00a0y": "must not contain U+00A0 (NO-BREAK SPACE) at character 2",
        "x\u200by": "must not contain U+200B (ZERO WIDTH SPACE) at character 2",
        "tab\there": "must not contain U+0009 (a control character) at character 4",
        "x\ue000": "must not contain U+E000 (a private-use character) at character 2",
        "x\u0378": "must not contain U+0378 (an unassigned code point) at character 2",
    }
    for name, named in unusable.items():
        fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, pipeline_request(name), named)
    assert admin.CreatePipeline(pipeline_request("a b")).name == "a b"  # the space prints
    for field in ("uri", "version"):
        blank = pipeline_request("p2", **{field: " \t "})
        fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, blank, f"pipeline.{field} is required")
        for text, code_point, at in (
            ("u\nv", "000A", 2),
            ("1\x1b[31m", "001B", 2),
            ("x\x85", "0085", 2),
        ):
            controlled = pipeline_request("p2", **{field: text})
            named = f"pipeline.{field} must not contain control characters, line breaks"
            message = fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, controlled, named)
            assert message.endswith(f"U+{code_point} (a control character) at character {at}")
    assert admin.CreatePipeline(pipeline_request("p 2")).name == "p 2"
    fails(Code.NOT_FOUND, admin.GetPipeline, pb.GetPipelineRequest(name="nope"), "'nope' not found")
    fails(Code.INVALID_ARGUMENT, admin.ListPipelines, pb.ListPipelinesRequest(page_size=-1))
    fails(
        Code.INVALID_ARGUMENT,
        admin.ListPipelines,
        pb.ListPipelinesRequest(page_token="garbage"),
        "page_token",
    )
    assert admin.GetPipeline(pb.GetPipelineRequest(name="p1")).uri == "u"


def test_text_that_would_read_otherwise_than_stored_is_refused(porch: Porch) -> None:
    admin = porch.stub(porch.admin)
    admin.CreatePipeline(pipeline_request("p1"))
    # An override turns the text after it around; the others show nothing at all.
    for field in ("uri", "version"):
        for text, named in (
            ("a\u202eb", "U+202E (RIGHT-TO-LEFT OVERRIDE) at character 2"),
            ("v1\u2066", "U+2066 (LEFT-TO-RIGHT ISOLATE) at character 3"),
            ("\u200bx", "U+200B (ZERO WIDTH SPACE) at character 1"),
            ("x\ufeff", "U+FEFF (ZERO WIDTH NO-BREAK SPACE) at character 2"),
            ("x\U000e0041", "U+E0041 (TAG LATIN CAPITAL LETTER A) at character 2"),
        ):
            request = pipeline_request("p2", **{field: text})
            message = fails(
                Code.INVALID_ARGUMENT, admin.CreatePipeline, request, f"pipeline.{field} must not"
            )
            assert message.endswith(named), message
    for text, named in (
        ("txt\u202eexe.sh", "U+202E (RIGHT-TO-LEFT OVERRIDE) at character 4"),
        ("\u2069", "U+2069 (POP DIRECTIONAL ISOLATE) at character 1"),
    ):
        request = pb.CreateTokenRequest(pipeline_name="p1", description=text)
        message = fails(Code.INVALID_ARGUMENT, admin.CreateToken, request, "description must not")
        assert message.endswith(named), message
    # The joiners are part of writing emoji and Persian: a description keeps them.
    for text in (
        "\U0001f469\u200d\U0001f4bb wrapper",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    ):
        request = pb.CreateTokenRequest(pipeline_name="p1", description=text)
        assert admin.CreateToken(request).description == text
    assert [p.name for p in admin.ListPipelines(pb.ListPipelinesRequest()).pipelines] == ["p1"]
    # What was stored before (imported, say) stays readable as it was.
    porch.server.store.create_pipeline(Pipeline(name="old", uri="u\u202e", version="1\u200b"))
    old = admin.GetPipeline(pb.GetPipelineRequest(name="old"))
    assert (old.uri, old.version) == ("u\u202e", "1\u200b")
    porch.token(Role.READER, None, "old \u202e reader")
    tokens = admin.ListTokens(pb.ListTokensRequest(role=pb.Token.READER)).tokens
    assert [t.description for t in tokens] == ["old \u202e reader"]


def test_a_nul_character_is_refused_by_name_and_nothing_changes(porch: Porch) -> None:
    # No database text can hold U+0000; PostgreSQL refuses it.
    admin = porch.stub(porch.admin)
    nul = "a\x00b"
    fails(
        Code.INVALID_ARGUMENT, admin.CreatePipeline, pipeline_request("p", uri=nul), "pipeline.uri"
    )
    fails(Code.INVALID_ARGUMENT, admin.ListPipelines, pb.ListPipelinesRequest(version=nul), "NUL")
    fails(
        Code.INVALID_ARGUMENT,
        admin.CreateToken,
        pb.CreateTokenRequest(pipeline_name=nul, description="d"),
        "pipeline_name",
    )
    admin.CreatePipeline(pipeline_request("p"))
    secret = admin.CreateToken(pb.CreateTokenRequest(pipeline_name="p", description="w")).token
    wrapper = porch.stub(secret)
    task = wrapper.RegisterTask(register("p", n=1)).task
    refused = update("p", task.task_input_id, State.CANCELLED, message=nul)
    fails(Code.INVALID_ARGUMENT, wrapper.UpdateTask, refused, "message must not contain NUL")
    got = wrapper.GetTask(pb.GetTaskRequest(pipeline_name="p", task_input_id=task.task_input_id))
    assert got.status == State.PENDING
    assert [p.name for p in admin.ListPipelines(pb.ListPipelinesRequest()).pipelines] == ["p"]


def test_an_unexpected_failure_is_internal_and_keeps_its_details_in_the_log(
    porch: Porch, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("detail for the operator only")

    monkeypatch.setattr(porch.server.store, "get_pipeline", broken)
    message = fails(
        Code.INTERNAL, porch.stub(porch.admin).GetPipeline, pb.GetPipelineRequest(name="p")
    )
    assert message == "internal error: the server logged what went wrong"
    assert "detail for the operator only" in caplog.text


def test_a_refusal_quotes_a_long_value_shortened(porch: Porch) -> None:
    # gRPC sends the message in metadata, which clients refuse past 8 to 16
    # KiB: quoted whole, a long value would turn the refusal into RESOURCE_EXHAUSTED.
    long = "x" * 100_000
    shown = "x" * 64 + "…"
    admin, wrapper = porch.stub(porch.admin), porch.stub(porch.pipeline("p1"))
    reader = porch.stub(porch.token(Role.READER))
    fails(
        Code.INVALID_ARGUMENT,
        admin.GetTask,
        pb.GetTaskRequest(pipeline_name="p1", task_input_id=long),
        f"got '{shown}'",
    )
    fails(Code.INVALID_ARGUMENT, admin.RevokeToken, pb.RevokeTokenRequest(token_id=long), shown)
    task = pb.Task(pipeline=pb.Pipeline(name=long))
    task.task_input.update({"n": 1})
    register = pb.RegisterTaskRequest(task=task)
    fails(Code.PERMISSION_DENIED, wrapper.RegisterTask, register, f"not '{shown}'")
    fails(Code.PERMISSION_DENIED, reader.RegisterTask, register, f"pipeline '{shown}'")
    update = pb.Task(pipeline=pb.Pipeline(name="p1"), status=State.RUNNING, task_input_id=long)
    fails(
        Code.INVALID_ARGUMENT,
        wrapper.UpdateTask,
        pb.UpdateTaskRequest(task_input_id="a" * 64, task=update),
        f"task.task_input_id '{shown}' name different tasks",
    )
    batch = pb.RegisterTasksRequest(pipeline_name="p1", tasks=[task])
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTasks, batch, f"is of pipeline '{shown}', not")
    # A name of up to 255 characters is shortened too.
    named = "n" * 254
    spaced = pipeline_request(named + " ")
    fails(Code.INVALID_ARGUMENT, admin.CreatePipeline, spaced, f"got '{named[:64]}…'")
    message = fails(Code.NOT_FOUND, admin.GetPipeline, pb.GetPipelineRequest(name=named))
    assert message == f"pipeline '{named[:64]}…' not found"
    admin.CreatePipeline(pipeline_request(named))
    message = fails(Code.ALREADY_EXISTS, admin.CreatePipeline, pipeline_request(named))
    assert message == f"pipeline '{named[:64]}…' already exists"
    get = pb.GetTaskRequest(pipeline_name=named, task_input_id="a" * 64)
    message = fails(Code.NOT_FOUND, admin.GetTask, get)
    assert message == f"task {'a' * 64} of pipeline '{named[:64]}…' not found"


def test_a_refusal_of_any_length_arrives_cut(porch: Porch, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any) -> None:
        raise InvalidArgument("é" * 100_000)

    monkeypatch.setattr(porch.server.store, "get_pipeline", refused)
    message = fails(
        Code.INVALID_ARGUMENT, porch.stub(porch.admin).GetPipeline, pb.GetPipelineRequest(name="p")
    )
    assert message == "é" * 1024 + "… (cut: the message was 200,000 bytes)"


# -- tokens ------------------------------------------------------------------


def test_token_lifecycle(porch: Porch) -> None:
    admin = porch.stub(porch.admin)
    admin.CreatePipeline(pipeline_request("p1"))
    made, call = admin.CreateToken.with_call(
        pb.CreateTokenRequest(pipeline_name="p1", description="wrapper on host a")
    )
    assert ("x-http-code", "201") in call.trailing_metadata()
    assert made.role == pb.Token.PIPELINE and made.name == "p1"
    assert len(made.token) >= 32 and made.token_id
    reader = admin.CreateToken(pb.CreateTokenRequest(description="dashboard", role=pb.Token.READER))
    assert reader.role == pb.Token.READER and reader.name == ""
    listed = admin.ListTokens(pb.ListTokensRequest()).tokens
    assert made.token_id in {t.token_id for t in listed}
    assert all(made.token not in str(t) for t in listed)
    only = admin.ListTokens(pb.ListTokensRequest(pipeline_name="p1")).tokens
    assert [t.description for t in only] == ["wrapper on host a"]
    readers = admin.ListTokens(pb.ListTokensRequest(role=pb.Token.READER)).tokens
    assert [t.token_id for t in readers] == [reader.token_id]

    wrapper = porch.stub(made.token)
    assert wrapper.RegisterTask(register("p1", x=1)).created
    revoked = admin.RevokeToken(pb.RevokeTokenRequest(token_id=made.token_id))
    assert revoked.HasField("revoke_time")
    fails(Code.UNAUTHENTICATED, wrapper.RegisterTask, register("p1", x=2), "revoked")
    fails(Code.UNAUTHENTICATED, wrapper.GetPipeline, pb.GetPipelineRequest(name="p1"), "revoked")
    active = {t.token_id for t in admin.ListTokens(pb.ListTokensRequest()).tokens}
    assert made.token_id not in active
    every = admin.ListTokens(pb.ListTokensRequest(include_revoked=True)).tokens
    assert made.token_id in {t.token_id for t in every}


def test_token_errors(porch: Porch) -> None:
    admin = porch.stub(porch.admin)
    fails(
        Code.NOT_FOUND,
        admin.CreateToken,
        pb.CreateTokenRequest(pipeline_name="nope", description="d"),
        "'nope'",
    )
    fails(Code.INVALID_ARGUMENT, admin.CreateToken, pb.CreateTokenRequest(description="d"), "role")
    fails(
        Code.INVALID_ARGUMENT,
        admin.CreateToken,
        pb.CreateTokenRequest(pipeline_name="p", description="d", role=pb.Token.READER),
        "a READER token is not bound to a pipeline",
    )
    fails(
        Code.INVALID_ARGUMENT,
        admin.CreateToken,
        pb.CreateTokenRequest(pipeline_name="p", description="d", role=pb.Token.ADMIN),
        "an ADMIN token is not bound to a pipeline",
    )
    fails(
        Code.INVALID_ARGUMENT,
        admin.CreateToken,
        pb.CreateTokenRequest(description="d", role=pb.Token.PIPELINE),
        "pipeline_name",
    )
    fails(Code.INVALID_ARGUMENT, admin.CreateToken, pb.CreateTokenRequest(role=pb.Token.READER))
    fails(Code.NOT_FOUND, admin.RevokeToken, pb.RevokeTokenRequest(token_id="999999"))
    fails(Code.INVALID_ARGUMENT, admin.RevokeToken, pb.RevokeTokenRequest())


def test_authentication_failures(porch: Porch, caplog: pytest.LogCaptureFixture) -> None:
    request = pb.GetPipelineRequest(name="p1")
    fails(Code.UNAUTHENTICATED, porch.stub().GetPipeline, request, "no token")
    fails(Code.UNAUTHENTICATED, porch.stub("A" * 43).GetPipeline, request, "unknown token")
    fails(Code.UNAUTHENTICATED, porch.stub("short").GetPipeline, request, "not a porch token")
    channel = grpc.insecure_channel(porch.target)
    porch.channels.append(channel)
    raw = channel.unary_unary(
        "/porch.v1.PorchService/GetPipeline",
        request_serializer=pb.GetPipelineRequest.SerializeToString,
        response_deserializer=pb.Pipeline.FromString,
    )
    fails(
        Code.UNAUTHENTICATED,
        lambda r: raw(r, metadata=[("authorization", f"Basic {porch.admin}")]),
        request,
        "Bearer",
    )
    # Two tokens: which is meant cannot be told, as the gateway also says.
    twice = [("authorization", f"Bearer {porch.admin}"), ("authorization", "Bearer " + "A" * 43)]
    caplog.set_level(logging.INFO, "porch.access")
    fails(Code.UNAUTHENTICATED, lambda r: raw(r, metadata=twice), request, "more than once")
    access_lines(caplog, lambda line: " two tokens" in line)


def test_npg_porch_style_token_works(porch: Porch) -> None:
    porch.stub(porch.admin).CreatePipeline(pipeline_request("p1"))
    imported = "0123456789abcdef0123456789abcdef"
    from porch_server import auth

    porch.server.store.create_token(Role.PIPELINE, "p1", "imported", auth.hash_secret(imported))
    assert porch.stub(imported).RegisterTask(register("p1", run=1)).created


def test_role_matrix(porch: Porch) -> None:
    """Each role calling each method: PERMISSION_DENIED exactly where the spec says."""
    wrapper = porch.pipeline("p1")
    porch.pipeline("p2")
    tokens = {
        "admin": porch.admin,
        "reader": porch.token(Role.READER),
        "p1": wrapper,
        "p2": porch.token(Role.PIPELINE, "p2"),
    }
    task_id = porch.stub(wrapper).RegisterTask(register("p1", n=0)).task.task_input_id
    requests: dict[str, Any] = {
        "CreatePipeline": lambda i: pipeline_request(f"new{i}"),
        "GetPipeline": lambda i: pb.GetPipelineRequest(name="p1"),
        "ListPipelines": lambda i: pb.ListPipelinesRequest(),
        "CreateToken": lambda i: pb.CreateTokenRequest(pipeline_name="p1", description="d"),
        "ListTokens": lambda i: pb.ListTokensRequest(),
        "RevokeToken": lambda i: pb.RevokeTokenRequest(token_id="999999"),
        "RegisterTask": lambda i: register("p1", n=i),
        "RegisterTasks": lambda i: pb.RegisterTasksRequest(
            pipeline_name="p1", tasks=[register("p1", m=i).task]
        ),
        "GetTask": lambda i: pb.GetTaskRequest(pipeline_name="p1", task_input_id=task_id),
        "ListTasks": lambda i: pb.ListTasksRequest(pipeline_name="p1"),
        "ClaimTasks": lambda i: claim("p1"),
        "UpdateTask": lambda i: update("p1", task_id, State.PENDING),
        "ListTaskEvents": lambda i: pb.ListTaskEventsRequest(
            pipeline_name="p1", task_input_id=task_id
        ),
    }
    allowed = {
        "admin": {"CreatePipeline", "CreateToken", "ListTokens", "RevokeToken"},
        "reader": set(),
        "p1": {"RegisterTask", "RegisterTasks", "ClaimTasks", "UpdateTask"},
        "p2": set(),
    }
    reads = {"GetPipeline", "ListPipelines", "GetTask", "ListTasks", "ListTaskEvents"}
    for index, (who, secret) in enumerate(tokens.items()):
        client = porch.stub(secret)
        for method, make in requests.items():
            call = getattr(client, method)
            if method in reads or method in allowed[who]:
                try:
                    call(make(index))
                except grpc.RpcError as error:
                    # RevokeToken of an unknown id gets past authorization to NOT_FOUND
                    assert error.code() == Code.NOT_FOUND, (who, method, error)
            else:
                message = fails(Code.PERMISSION_DENIED, call, make(index))
                if who == "p2":
                    assert "'p1'" in message or "admin" in message, message


def test_anonymous_reads_only_when_allowed(db_url: str) -> None:
    porch = start_porch(db_url, anonymous_reads=True)
    try:
        porch.stub(porch.admin).CreatePipeline(pipeline_request("p1"))
        anonymous = porch.stub()
        assert anonymous.GetPipeline(pb.GetPipelineRequest(name="p1")).name == "p1"
        assert len(anonymous.ListTasks(pb.ListTasksRequest()).tasks) == 0
        fails(Code.UNAUTHENTICATED, anonymous.CreatePipeline, pipeline_request("p2"))
        fails(Code.UNAUTHENTICATED, anonymous.ClaimTasks, claim("p1"))
        # A token a read does carry must still be valid (spec: UNAUTHENTICATED).
        unknown = porch.stub("not-a-token")
        fails(Code.UNAUTHENTICATED, unknown.GetPipeline, pb.GetPipelineRequest(name="p1"))
    finally:
        porch.server.stop()


# -- tasks -------------------------------------------------------------------


def test_register_is_idempotent(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    first, call = wrapper.RegisterTask.with_call(register("p1", study_id=100, id_run=45925))
    assert first.created and ("x-http-code", "201") in call.trailing_metadata()
    task = first.task
    assert task.task_input_id == "ea058ea93114d621c1897f1e47cad245ba2a5b04edbd23a1d61ef502d5d5b76e"
    assert task.status == State.PENDING and task.pipeline.uri == "https://example.org/p"
    assert dict(task.task_input) == {"study_id": 100, "id_run": 45925}
    again, call = wrapper.RegisterTask.with_call(register("p1", id_run=45925.0, study_id=100.0))
    assert not again.created and ("x-http-code", "201") not in call.trailing_metadata()
    assert again.task.task_input_id == task.task_input_id
    assert again.task.create_time == task.create_time


def test_register_ignores_a_given_status(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    request = register("p1", a=1)
    request.task.status = State.DONE
    request.task.task_input_id = "whatever"
    task = wrapper.RegisterTask(request).task
    assert task.status == State.PENDING and task.task_input_id == task_input_id({"a": 1})


def test_answers_of_inputs_larger_as_protobuf_fit_a_default_client(porch: Porch) -> None:
    # About 180 KB of JSON each, and about 1 MB as protobuf: eight of them
    # are past a client's 4 MiB default, which would refuse the answer after
    # the claim had taken the tasks.
    wrapper = porch.stub(porch.pipeline("p1"))
    batch = [register("p1", n=n, many=[0] * 90_000).task for n in range(8)]
    for first in range(0, 8, 3):
        part = pb.RegisterTasksRequest(pipeline_name="p1", tasks=batch[first : first + 3])
        assert wrapper.RegisterTasks(part).ByteSize() < 4 * 1024 * 1024
    listed: list[float] = []
    page = pb.ListTasksResponse(next_page_token="first")
    while page.next_page_token:
        token = "" if page.next_page_token == "first" else page.next_page_token
        page = wrapper.ListTasks(pb.ListTasksRequest(pipeline_name="p1", page_token=token))
        assert 1 <= len(page.tasks) < 8 and page.ByteSize() < 4 * 1024 * 1024
        listed += [task.task_input["n"] for task in page.tasks]
    assert listed == list(range(8))
    claimed: list[float] = []
    while answer := wrapper.ClaimTasks(claim("p1", 8)).tasks:
        assert len(answer) < 8
        claimed += [task.task_input["n"] for task in answer]
    assert claimed == list(range(8))


def _nested(levels: int, inner: str) -> dict[str, Any]:
    """A task input of levels objects and lists inside one another, itself
    included, those inside it all of the inner kind."""
    value: Any = 1
    for _ in range(levels - 1):
        value = {"a": value} if inner == "object" else [value]
    return {"a": value}


@pytest.mark.parametrize("inner", ["object", "list"])
def test_an_input_nested_as_deep_as_allowed_comes_back_in_every_answer(
    porch: Porch, inner: str
) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    deepest = register("p1", **_nested(32, inner)).task
    batch = pb.RegisterTasksRequest(pipeline_name="p1", tasks=[deepest])
    [registered] = wrapper.RegisterTasks(batch).results
    assert registered.created
    assert wrapper.ClaimTasks(claim("p1")).tasks[0].task_input == deepest.task_input
    deeper = pb.RegisterTasksRequest(
        pipeline_name="p1", tasks=[register("p1", **_nested(33, inner)).task]
    )
    fails(
        Code.INVALID_ARGUMENT,
        wrapper.RegisterTasks,
        deeper,
        "tasks[0].task_input nests deeper than 32 levels",
    )


def test_a_call_larger_than_4_mib_is_refused_unread(porch: Porch) -> None:
    # A known token's call is read whole before the rest of it is checked
    # (a reader's, here, whose rights the request would not pass): its size
    # is bounded. A stranger's is refused for its token before it is read.
    reader = porch.stub(porch.token(Role.READER))
    tasks = [register("p1", blob="x" * 1_000_000).task for _ in range(5)]
    request = pb.RegisterTasksRequest(pipeline_name="p1", tasks=tasks)
    fails(Code.RESOURCE_EXHAUSTED, reader.RegisterTasks, request, "larger than max")
    fails(Code.UNAUTHENTICATED, porch.stub().RegisterTasks, request, "no token")


def test_a_caller_its_token_refuses_is_answered_before_its_request_arrives(
    porch: Porch, caplog: pytest.LogCaptureFixture
) -> None:
    # grpc holds a unary request whole until its handler runs: a caller
    # refused for its token alone is answered from the call's metadata, so
    # that many large calls from a stranger are never held. A call whose
    # message never comes shows it: it is answered all the same.
    channel = grpc.insecure_channel(porch.target)
    porch.channels.append(channel)
    pending = threading.Event()

    def never_sent() -> Iterator[pb.RegisterTasksRequest]:
        pending.wait(10)
        return
        yield

    caplog.set_level(logging.INFO, "porch.access")
    stream = channel.stream_unary(
        "/porch.v1.PorchService/RegisterTasks",
        request_serializer=pb.RegisterTasksRequest.SerializeToString,
        response_deserializer=pb.RegisterTasksResponse.FromString,
    )
    watching = channel.stream_stream(
        "/porch.v1.PorchService/WatchEvents",
        request_serializer=pb.WatchEventsRequest.SerializeToString,
        response_deserializer=pb.Event.FromString,
    )
    try:
        for metadata, refusal in [
            ([], "no token"),
            ([("authorization", "Bearer " + "A" * 43)], "unknown token"),
            ([("authorization", "Basic x")], "Bearer"),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                stream(never_sent(), metadata=metadata, timeout=5)
            assert refused.value.code() == Code.UNAUTHENTICATED, refused.value
            assert refusal in refused.value.details()
            with pytest.raises(grpc.RpcError) as refused:
                next(watching(never_sent(), metadata=metadata, timeout=5))
            assert refused.value.code() == Code.UNAUTHENTICATED, refused.value
        # A revoked token, found in the database and refused there.
        admin = porch.stub(porch.admin)
        admin.CreatePipeline(pipeline_request("p1"))
        made = admin.CreateToken(pb.CreateTokenRequest(pipeline_name="p1", description="w"))
        admin.RevokeToken(pb.RevokeTokenRequest(token_id=made.token_id))
        with pytest.raises(grpc.RpcError) as refused:
            stream(never_sent(), metadata=[("authorization", f"Bearer {made.token}")], timeout=5)
        assert refused.value.code() == Code.UNAUTHENTICATED, refused.value
        assert "revoked" in refused.value.details()
        # A valid token's call waits for its message, as any call does; one
        # that ends before its message comes is not logged, as grpc runs no
        # handler for it, whether its deadline passed or its client sent none.
        admin = [("authorization", f"Bearer {porch.admin}")]
        with pytest.raises(grpc.RpcError) as waited:
            stream(never_sent(), metadata=admin, timeout=1)
        assert waited.value.code() == Code.DEADLINE_EXCEEDED, waited.value
        with pytest.raises(grpc.RpcError) as empty:
            stream(iter(()), metadata=admin, timeout=5)
        assert empty.value.code() == Code.INVALID_ARGUMENT, empty.value
        assert empty.value.details() == "the call ended without its request"
    finally:
        pending.set()
    access_lines(caplog, lambda line: line.startswith("RegisterTasks UNAUTHENTICATED"))
    time.sleep(0.2)
    lines = [record.getMessage() for record in caplog.records]
    unsent = ("RegisterTasks DEADLINE_EXCEEDED", "RegisterTasks INVALID_ARGUMENT")
    assert not [line for line in lines if line.startswith(unsent)], lines


def test_a_call_whose_token_is_not_cached_is_served_as_any_other(
    porch: Porch, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A token not found valid this last second is looked up before the
    # request is read (the handler that takes it as a stream): with no
    # cache, every call goes that way, unary and streaming alike.
    monkeypatch.setattr(store_module, "TOKEN_CACHE_SECONDS", 0.0)
    caplog.set_level(logging.INFO, "porch.access")
    admin = porch.stub(porch.admin)
    admin.CreatePipeline(pipeline_request("p1"))
    wrapper = porch.stub(porch.token(Role.PIPELINE, "p1"))
    assert wrapper.RegisterTask(register("p1", n=1)).created
    [task] = wrapper.ClaimTasks(claim("p1")).tasks
    done = wrapper.UpdateTask(update("p1", task.task_input_id, State.DONE, "ok"))
    assert done.status == State.DONE
    listed = admin.ListTasks(pb.ListTasksRequest(pipeline_name="p1")).tasks
    assert [each.status for each in listed] == [State.DONE]
    # A deadline long enough to wait out a write another test keeps open:
    # on PostgreSQL one left open in any database holds streams back (the
    # README's "Watching events"), and CI runs tests side by side.
    events = admin.WatchEvents(pb.WatchEventsRequest(after="0.0"), timeout=60)
    first = next(event for event in events if event.kind != pb.Event.BOOKMARK)
    events.cancel()
    assert first.kind == pb.Event.CREATED
    fails(Code.INVALID_ARGUMENT, wrapper.ClaimTasks, claim("p1", num_tasks=0), "num_tasks")
    lines = access_lines(caplog, lambda line: line.startswith("ClaimTasks INVALID_ARGUMENT"))
    for method in ("CreatePipeline OK", "RegisterTask OK", "UpdateTask OK", "ListTasks OK"):
        assert any(line.startswith(method) for line in lines), (method, lines)


def test_a_calls_access_line_names_its_clients_address(
    porch: Porch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "porch.access")
    porch.stub(porch.admin).CreatePipeline(pipeline_request("p1"))
    line = r"CreatePipeline OK [\d.]+ms 127\.0\.0\.1:\d+ token \d+ \(test admin\)"
    lines = access_lines(caplog, lambda logged: logged.startswith("CreatePipeline OK"))
    assert [each for each in lines if re.fullmatch(line, each)], lines


def test_a_call_of_a_method_the_server_does_not_serve_says_which_it_serves(
    porch: Porch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "porch.access")
    channel = grpc.insecure_channel(porch.target)
    porch.channels.append(channel)
    admin = [("authorization", f"Bearer {porch.admin}")]
    for method, metadata, caller in [
        ("/porch.v1.PorchService/DeleteTask", [], "anonymous"),
        ("/other.Service/Line\nbreak", admin, "token not checked"),
    ]:
        call = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", metadata=metadata, timeout=5)
        assert refused.value.code() == Code.UNIMPLEMENTED, refused.value
        assert refused.value.details() == (
            f"unknown method {method!r}: this server serves porch.v1.PorchService,"
            " grpc.health.v1.Health, grpc.reflection.v1alpha.ServerReflection"
            " (reflection lists their methods)"
        )
        logged = method.replace("\n", "\\x0a")
        line = re.compile(rf"{re.escape(logged)} UNIMPLEMENTED [\d.]+ms 127\.0\.0\.1:\d+ {caller}")
        lines = access_lines(caplog, functools.partial(_matches, line))
        assert not [each for each in lines if "\n" in each], lines
    # A stream of requests the server never reads, ended all the same.
    stream = channel.stream_stream("/porch.v1.PorchService/Nothing")
    with pytest.raises(grpc.RpcError) as refused:
        next(stream(iter([b"x"] * 1000), timeout=5))
    assert refused.value.code() == Code.UNIMPLEMENTED, refused.value


def test_a_call_that_ends_while_its_token_is_looked_up_is_logged(
    porch: Porch, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    found = porch.server.store.find_token
    slow = threading.Event()

    def find_token(secret_hash: str) -> Any:
        if slow.is_set():
            time.sleep(1.0)
        return found(secret_hash)

    monkeypatch.setattr(porch.server.store, "find_token", find_token)
    monkeypatch.setattr(store_module, "TOKEN_CACHE_SECONDS", 0.0)
    caplog.set_level(logging.INFO, "porch.access")
    slow.set()
    request = pb.GetPipelineRequest(name="p1")
    with pytest.raises(grpc.RpcError) as late:
        porch.stub(porch.admin).GetPipeline(request, timeout=0.3)
    assert late.value.code() == Code.DEADLINE_EXCEEDED
    access_lines(caplog, lambda line: line.startswith("GetPipeline DEADLINE_EXCEEDED"), tries=100)


def test_a_page_of_long_event_messages_fits_a_default_client(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    task = wrapper.RegisterTask(register("p1", n=1)).task
    wrapper.ClaimTasks(claim("p1"))
    heartbeat = "é" * (32 * 1024 - 1)  # just under 64 KiB as UTF-8
    for _ in range(70):  # 4.5 MB of messages
        wrapper.UpdateTask(update("p1", task.task_input_id, State.RUNNING, heartbeat))
    seen, token = 0, None
    while token != "":
        request = pb.ListTaskEventsRequest(
            pipeline_name="p1", task_input_id=task.task_input_id, page_size=1000
        )
        request.page_token = token or ""
        page = wrapper.ListTaskEvents(request)
        assert 1 <= len(page.events) < 72 and page.ByteSize() < 4 * 1024 * 1024
        seen += len(page.events)
        token = page.next_page_token
    assert seen == 72  # created, claimed and 70 heartbeats


def test_a_registration_answer_is_never_larger_than_reckoned(porch: Porch) -> None:
    # Every task comes back with its pipeline: these take 2.5 KB each.
    admin = porch.stub(porch.admin)
    long = pb.Pipeline(name="p" * 255, uri="https://example.org/" + "u" * 2000, version="v" * 255)
    admin.CreatePipeline(pb.CreatePipelineRequest(pipeline=long))
    wrapper = porch.stub(porch.token(Role.PIPELINE, long.name))
    many = [register(long.name, n=n).task for n in range(2000)]
    request = pb.RegisterTasksRequest(pipeline_name=long.name, tasks=many)
    assert request.ByteSize() < 1_000_000  # the answer, over 5 MB, is what is too large
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTasks, request, "send them in smaller batches")
    assert not wrapper.ListTasks(pb.ListTasksRequest(pipeline_name=long.name)).tasks
    inputs: list[dict[str, Any]] = [
        {},
        {"n": 1},
        {"s": "é" * 5000, "deep": [[[[{"x": None, "t": True}]]]]},
        {"many": [1.5e300] * 3000, "k" * 200: -(2**53)},
    ]
    for count in (1, 7, 300):
        tasks = [register(long.name, i=n, **inputs[n % 4]).task for n in range(count)]
        request = pb.RegisterTasksRequest(pipeline_name=long.name, tasks=tasks)
        answer = wrapper.RegisterTasks(request)
        reckoned = _registration_answer_bytes(answer.results[0].task.pipeline, tasks)
        assert answer.ByteSize() <= reckoned < answer.ByteSize() + 40 * count


def test_register_errors(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    no_input = pb.RegisterTaskRequest(task=pb.Task(pipeline=pb.Pipeline(name="p1")))
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTask, no_input, "task.task_input is required")
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTask, register("", a=1), "pipeline.name")
    other = porch.stub(porch.pipeline("p2"))
    fails(Code.PERMISSION_DENIED, other.RegisterTask, register("p1", a=1), "'p1'")
    ghost = porch.stub(porch.token(Role.PIPELINE, "p2"))
    assert ghost.RegisterTask(register("p2", a=1)).created
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTask, register("p1", big="x" * (1024 * 1024)))
    # Small in JSON (2 bytes a number), 5.5 times that as protobuf: refused too.
    numbers = register("p1", many=[0] * 200_000)
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTask, numbers, "bytes as protobuf")
    # A Struct can carry NaN and infinities; JSON, and so the digest, cannot.
    # Where it is, and which, is named.
    nan = register("p1", nested={"n": float("nan")})
    named = "task.task_input.nested.n holds a number that is not finite (NaN)"
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTask, nan, named)
    infinite = register("p1", z=float("nan"), a=[1, {"x y": [-float("inf")]}])
    named = 'task.task_input.a[1]["x y"][0] holds a number that is not finite (-Infinity)'
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTask, infinite, named)
    batch = pb.RegisterTasksRequest(pipeline_name="p1", tasks=[register("p1", n=1).task, nan.task])
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTasks, batch, "tasks[1].task_input.nested.n holds")


def test_register_tasks_in_one_call(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    wrapper.RegisterTask(register("p1", n=2))
    inputs = [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 1}]
    tasks = []
    for item in inputs:
        task = pb.Task()
        task.task_input.update(item)
        tasks.append(task)
    results = wrapper.RegisterTasks(
        pb.RegisterTasksRequest(pipeline_name="p1", tasks=tasks)
    ).results
    assert [r.created for r in results] == [True, False, True, False]
    assert [r.task.task_input_id for r in results] == [task_input_id(i) for i in inputs]
    mixed = pb.RegisterTasksRequest(pipeline_name="p1", tasks=[register("p2", n=1).task])
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTasks, mixed, "tasks[0] is of pipeline 'p2'")
    fails(Code.INVALID_ARGUMENT, wrapper.RegisterTasks, pb.RegisterTasksRequest(pipeline_name="p1"))
    named = pb.RegisterTasksRequest(tasks=[register("p1", n=9).task])
    assert wrapper.RegisterTasks(named).results[0].created


def test_get_task(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    task = wrapper.RegisterTask(register("p1", a="/x/é")).task
    got = wrapper.GetTask(pb.GetTaskRequest(pipeline_name="p1", task_input_id=task.task_input_id))
    assert got == task
    missing = pb.GetTaskRequest(pipeline_name="p1", task_input_id="0" * 64)
    fails(Code.NOT_FOUND, wrapper.GetTask, missing, "not found")
    fails(
        Code.INVALID_ARGUMENT,
        wrapper.GetTask,
        pb.GetTaskRequest(pipeline_name="p1", task_input_id="xyz"),
        "64",
    )


def test_list_tasks_walks_250_without_gaps_or_repeats(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    batch = []
    for n in range(250):
        task = pb.Task()
        task.task_input.update({"n": n})
        batch.append(task)
    wrapper.RegisterTasks(pb.RegisterTasksRequest(pipeline_name="p1", tasks=batch))
    seen: list[int] = []
    request = pb.ListTasksRequest(pipeline_name="p1", page_size=7)
    pages = 0
    while True:
        response = wrapper.ListTasks(request)
        pages += 1
        seen += [int(t.task_input["n"]) for t in response.tasks]
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    assert seen == list(range(250)) and pages == 36
    changed = pb.ListTasksRequest(
        pipeline_name="p1", status=State.DONE, page_token=response.next_page_token or "x"
    )
    fails(Code.INVALID_ARGUMENT, wrapper.ListTasks, changed, "page_token")
    assert len(wrapper.ListTasks(pb.ListTasksRequest()).tasks) == 250


def test_list_tasks_filters(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    other = porch.stub(porch.pipeline("p2"))
    for n in range(3):
        wrapper.RegisterTask(register("p1", n=n))
    other.RegisterTask(register("p2", n=0))
    wrapper.ClaimTasks(claim("p1"))
    listing = lambda **f: wrapper.ListTasks(pb.ListTasksRequest(**f)).tasks  # noqa: E731
    assert len(listing(pipeline_name="p1")) == 3
    assert len(listing(status=State.PENDING)) == 3
    assert [t.task_input["n"] for t in listing(pipeline_name="p1", status=State.CLAIMED)] == [0]
    assert listing(pipeline_name="nope") == []  # a filter, as npg_porch's GET /tasks
    # ... also of names no pipeline can have.
    for impossible in ("a/b", "x" * 256, "tab\there", "nul\x00"):
        assert listing(pipeline_name=impossible) == []
    fails(Code.INVALID_ARGUMENT, wrapper.ListTasks, pb.ListTasksRequest(status=99), "status")


def test_claim(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    assert list(wrapper.ClaimTasks(claim("p1")).tasks) == []
    for n in range(5):
        wrapper.RegisterTask(register("p1", n=n))
    one = wrapper.ClaimTasks(claim("p1")).tasks
    assert [t.task_input["n"] for t in one] == [0]
    assert one[0].status == State.CLAIMED and one[0].HasField("claim_time")
    assert one[0].claimed_by_token_id and not one[0].HasField("lease_expire_time")
    three = wrapper.ClaimTasks(claim("p1", 3)).tasks
    assert [t.task_input["n"] for t in three] == [1, 2, 3]
    rest = wrapper.ClaimTasks(claim("p1", 10)).tasks
    assert [t.task_input["n"] for t in rest] == [4]
    for bad in (0, -1):
        fails(Code.INVALID_ARGUMENT, wrapper.ClaimTasks, claim("p1", bad), "at least 1")
    # More than a call carries claims as many as it does: here, what is left.
    assert [t.task_input["n"] for t in wrapper.ClaimTasks(claim("p1", 10_001)).tasks] == []
    for lease in (duration_pb2.Duration(seconds=-1), duration_pb2.Duration(seconds=0)):
        fails(Code.INVALID_ARGUMENT, wrapper.ClaimTasks, claim("p1", lease=lease), "positive")
    too_long = duration_pb2.Duration(seconds=30 * 86_400, nanos=1)
    fails(Code.INVALID_ARGUMENT, wrapper.ClaimTasks, claim("p1", lease=too_long), "30 days")
    for seconds, nanos in ((1, 2_000_000_000), (1, -1), (-1, 1)):
        invalid = duration_pb2.Duration(seconds=seconds, nanos=nanos)
        fails(Code.INVALID_ARGUMENT, wrapper.ClaimTasks, claim("p1", lease=invalid), "not a valid")
    # A nanosecond is positive: the lease is the shortest there is, a second.
    wrapper.RegisterTask(register("p1", n=5))
    [short] = wrapper.ClaimTasks(claim("p1", lease=duration_pb2.Duration(nanos=1))).tasks
    assert short.lease_expire_time.ToDatetime() - short.claim_time.ToDatetime() == timedelta(
        seconds=1
    )
    fails(Code.PERMISSION_DENIED, wrapper.ClaimTasks, claim("p1x"), "'p1', not 'p1x'")


def test_update_lifecycle_and_events(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    task = wrapper.RegisterTask(register("p1", id_run=1)).task
    task_id = task.task_input_id
    wrapper.ClaimTasks(claim("p1"))
    running = wrapper.UpdateTask(update("p1", task_id, State.RUNNING, "on host a"))
    assert (
        running.status == State.RUNNING
        and running.update_time.ToDatetime() >= task.update_time.ToDatetime()
    )
    by_input = pb.Task(pipeline=pb.Pipeline(name="p1"), status=State.DONE, task_input_id="ignored")
    by_input.task_input.update({"id_run": 1})
    done = wrapper.UpdateTask(pb.UpdateTaskRequest(task=by_input, message="all good"))
    assert done.status == State.DONE
    events = wrapper.ListTaskEvents(
        pb.ListTaskEventsRequest(pipeline_name="p1", task_input_id=task_id)
    ).events
    kinds = [(e.kind, e.old_status, e.new_status, e.message) for e in events]
    assert kinds == [
        (pb.Event.CREATED, 0, State.PENDING, ""),
        (pb.Event.CLAIMED, State.PENDING, State.CLAIMED, ""),
        (pb.Event.STATUS_CHANGED, State.CLAIMED, State.RUNNING, "on host a"),
        (pb.Event.STATUS_CHANGED, State.RUNNING, State.DONE, "all good"),
    ]
    unnamed = pb.ListTaskEventsRequest(pipeline_name="p1")
    fails(Code.INVALID_ARGUMENT, wrapper.ListTaskEvents, unnamed, "task_input_id is required")
    assert {e.token_description for e in events} == {"p1 wrapper"}
    assert all(e.cursor and e.pipeline_name == "p1" and e.task_input_id == task_id for e in events)
    paged = wrapper.ListTaskEvents(
        pb.ListTaskEventsRequest(pipeline_name="p1", task_input_id=task_id, page_size=3)
    )
    assert len(paged.events) == 3 and paged.next_page_token


def test_update_errors_leave_the_task_unchanged(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    task = wrapper.RegisterTask(register("p1", a=1)).task
    task_id = task.task_input_id
    message = fails(Code.FAILED_PRECONDITION, wrapper.UpdateTask, update("p1", task_id, State.DONE))
    assert "PENDING" in message and "DONE" in message
    fails(
        Code.FAILED_PRECONDITION,
        wrapper.UpdateTask,
        update("p1", task_id, State.CLAIMED),
        "ClaimTasks",
    )
    unset = update("p1", task_id, 0)
    fails(Code.INVALID_ARGUMENT, wrapper.UpdateTask, unset, "task.status is required")
    unknown = update("p1", task_id, 99)  # a number no Task.State has
    fails(Code.INVALID_ARGUMENT, wrapper.UpdateTask, unknown, "task.status has no such value: 99")
    fails(Code.INVALID_ARGUMENT, wrapper.UpdateTask, update("p1", "", State.DONE), "task_input")
    fails(Code.NOT_FOUND, wrapper.UpdateTask, update("p1", "f" * 64, State.CANCELLED), "not found")
    fails(
        Code.INVALID_ARGUMENT,
        wrapper.UpdateTask,
        update("p1", task_id, State.CANCELLED, "x" * (64 * 1024 + 1)),
        "65536 bytes",
    )
    # The id of one task (as a PATCH's path gives it) beside the input of
    # another names neither; and two ids that differ name none.
    other = wrapper.RegisterTask(register("p1", a=2)).task
    by_input = pb.Task(pipeline=pb.Pipeline(name="p1"), status=State.CANCELLED)
    by_input.task_input.update({"a": 2})
    both = pb.UpdateTaskRequest(task=by_input, task_input_id=task_id)
    mismatch = fails(Code.INVALID_ARGUMENT, wrapper.UpdateTask, both)
    assert task_id in mismatch and other.task_input_id in mismatch
    by_id = pb.Task(pipeline=pb.Pipeline(name="p1"), task_input_id=task_id, status=State.CANCELLED)
    ids = pb.UpdateTaskRequest(task=by_id, task_input_id=other.task_input_id)
    mismatch = fails(Code.INVALID_ARGUMENT, wrapper.UpdateTask, ids, "name different tasks")
    assert task_id in mismatch and other.task_input_id in mismatch
    assert (
        wrapper.GetTask(pb.GetTaskRequest(pipeline_name="p1", task_input_id=other.task_input_id))
        == other
    )
    assert wrapper.GetTask(pb.GetTaskRequest(pipeline_name="p1", task_input_id=task_id)) == task
    events = wrapper.ListTaskEvents(
        pb.ListTaskEventsRequest(pipeline_name="p1", task_input_id=task_id)
    )
    assert len(events.events) == 1
    # the largest allowed message is kept whole
    wrapper.UpdateTask(update("p1", task_id, State.CANCELLED, "é" * (32 * 1024)))
    events = wrapper.ListTaskEvents(
        pb.ListTaskEventsRequest(pipeline_name="p1", task_input_id=task_id)
    )
    assert events.events[-1].message == "é" * (32 * 1024)


def lock(connection: sa.Connection, task: pb.Task) -> None:
    """Hold the task's row locked in connection's transaction, as a session
    left open after an update would: a registration of its input waits too."""
    connection.execute(
        sa.text("UPDATE task SET update_time = update_time WHERE task_input_id = :id"),
        {"id": task.task_input_id},
    )


class BesideALock(NamedTuple):
    """A server, pipeline p1 with a wrapper's token, and an engine of the
    server's database whose transactions hold locks as other sessions would."""

    porch: Porch
    holder: sa.Engine
    wrapper: Client
    # grpc's own stub, for calls made as futures, and the metadata they need.
    raw: porch_pb2_grpc.PorchServiceStub
    metadata: list[tuple[str, str]]


@contextlib.contextmanager
def beside_a_lock(pg_url: str, db_pool_size: int) -> Iterator[BesideALock]:
    """BesideALock, its server with db_pool_size database threads."""
    porch = start_porch(pg_url, db_pool_size=db_pool_size)
    holder = sa.create_engine(pg_url)
    try:
        secret = porch.pipeline("p1")
        channel = grpc.insecure_channel(porch.target)
        porch.channels.append(channel)
        raw = porch_pb2_grpc.PorchServiceStub(channel)
        metadata = [("authorization", f"Bearer {secret}")]
        yield BesideALock(porch, holder, porch.stub(secret), raw, metadata)
    finally:
        holder.dispose()
        porch.stop()


def test_changes_waiting_for_a_lock_leave_the_server_to_other_calls(pg_url: str) -> None:
    # Four threads for the database, of which changes that wait take two at most.
    with beside_a_lock(pg_url, db_pool_size=4) as (_, holder, wrapper, raw, metadata):
        locked = wrapper.RegisterTask(register("p1", n=0)).task
        other = wrapper.RegisterTask(register("p1", n=1)).task
        pending = wrapper.RegisterTask(register("p1", n=2)).task
        with holder.begin() as connection:
            lock(connection, locked)
            cancel = update("p1", locked.task_input_id, pb.Task.CANCELLED)
            waiting = [raw.UpdateTask.future(cancel, metadata=metadata) for _ in range(8)]
            time.sleep(1.5)  # the token's check cached no more: it needs a thread too
            get = pb.GetTaskRequest(pipeline_name="p1", task_input_id=other.task_input_id)
            assert raw.GetTask(get, metadata=metadata, timeout=10).status == pb.Task.PENDING
            claimed = raw.ClaimTasks(claim("p1", 1), metadata=metadata, timeout=10).tasks
            assert [task.task_input_id for task in claimed] == [other.task_input_id]
            running = update("p1", other.task_input_id, pb.Task.RUNNING)
            assert raw.UpdateTask(running, metadata=metadata, timeout=10).status == pb.Task.RUNNING
            # A change refused goes the blocking way too, and is answered at once.
            with pytest.raises(grpc.RpcError) as refused:
                refuse = update("p1", pending.task_input_id, pb.Task.RUNNING)
                raw.UpdateTask(refuse, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert not any(call.done() for call in waiting)
            connection.rollback()
        # One change made, the others refused as changes of a task CANCELLED by then.
        codes = [call.exception(timeout=30) and call.code() for call in waiting]
        assert sorted(code.name if code else "OK" for code in codes) == [
            "FAILED_PRECONDITION"
        ] * 7 + ["OK"]


def test_registrations_waiting_for_a_lock_leave_the_server_to_other_calls(pg_url: str) -> None:
    with beside_a_lock(pg_url, db_pool_size=4) as (porch, holder, wrapper, raw, metadata):
        locked = wrapper.RegisterTask(register("p1", n=0)).task
        with holder.begin() as connection:
            lock(connection, locked)
            again = register("p1", n=0)
            waiting = [raw.RegisterTask.future(again, metadata=metadata) for _ in range(6)]
            tasks = [again.task, register("p1", n=9).task]
            both = pb.RegisterTasksRequest(pipeline_name="p1", tasks=tasks)
            batch_waiting = raw.RegisterTasks.future(both, metadata=metadata)
            time.sleep(1.5)  # the token's check cached no more: it needs a thread too
            # While those wait, more of the same input go straight to wait
            # too, holding back no batch of other registrations.
            batches = porch.server.store._registering.batches  # type: ignore[union-attr]
            waiting += [raw.RegisterTask.future(again, metadata=metadata) for _ in range(4)]
            time.sleep(0.5)
            assert porch.server.store._registering.batches == batches  # type: ignore[union-attr]
            for n in range(1, 4):  # single registrations, one after another
                made = raw.RegisterTask(register("p1", n=n), metadata=metadata, timeout=10)
                assert made.created
            batch = pb.RegisterTasksRequest(pipeline_name="p1", tasks=[register("p1", n=4).task])
            assert raw.RegisterTasks(batch, metadata=metadata, timeout=10).results[0].created
            claimed = raw.ClaimTasks(claim("p1", 1), metadata=metadata, timeout=10).tasks
            assert [t.task_input_id for t in claimed] != [locked.task_input_id]
            assert not any(call.done() for call in [*waiting, batch_waiting])
            connection.rollback()
        answers = [call.result(timeout=30) for call in waiting]
        assert all(answer.task == locked and not answer.created for answer in answers)
        results = batch_waiting.result(timeout=30).results
        assert [(t.task.task_input_id, t.created) for t in results] == [
            (locked.task_input_id, False),
            (task_input_id({"n": 9}), True),
        ]


def test_a_registration_queued_behind_other_waits_does_not_hold_its_input(pg_url: str) -> None:
    # Two database threads: one place for a write that waits for a lock.
    with beside_a_lock(pg_url, db_pool_size=2) as (_, holder, wrapper, raw, metadata):
        held = wrapper.RegisterTask(register("p1", n=0)).task
        freed = wrapper.RegisterTask(register("p1", n=1)).task
        with holder.begin() as connection:
            lock(connection, held)
            cancel = update("p1", held.task_input_id, pb.Task.CANCELLED)
            holding = raw.UpdateTask.future(cancel, metadata=metadata)  # takes the place
            time.sleep(0.5)
            with holder.begin() as brief:
                lock(brief, freed)
                queued = raw.RegisterTask.future(register("p1", n=1), metadata=metadata)
                time.sleep(0.5)  # locked, it queues for the place
                brief.rollback()
            # Its input free again, another call of it is answered at once.
            again = raw.RegisterTask(register("p1", n=1), metadata=metadata, timeout=5)
            assert again.task == freed and not again.created
            assert not queued.done() and not holding.done()
            connection.rollback()
        assert holding.result(timeout=30).status == pb.Task.CANCELLED
        assert queued.result(timeout=30).task == freed


def test_with_one_database_thread_a_write_to_a_locked_task_is_unavailable(pg_url: str) -> None:
    # Waiting would take the only thread.
    with beside_a_lock(pg_url, db_pool_size=1) as (porch, holder, wrapper, *_):
        locked = wrapper.RegisterTask(register("p1", n=0)).task
        with holder.begin() as connection:
            lock(connection, locked)
            cancel = update("p1", locked.task_input_id, pb.Task.CANCELLED)
            fails(Code.UNAVAILABLE, wrapper.UpdateTask, cancel, "locked by another transaction")
            again = register("p1", n=0)
            store = porch.server.store
            with mock.patch.object(store, "register_canonical", wraps=store.register_canonical):
                fails(Code.UNAVAILABLE, wrapper.RegisterTask, again, "locked by another")
                # Tried again without waiting after each pause.
                tries = store.register_canonical.call_args_list  # type: ignore[attr-defined]
                assert [call.kwargs for call in tries] == [{"wait": False}] * len(
                    LOCKED_RETRY_PAUSES
                )
            get = pb.GetTaskRequest(pipeline_name="p1", task_input_id=locked.task_input_id)
            assert wrapper.GetTask(get).status == pb.Task.PENDING
        # A lock held briefly (another registration of the input, say) is
        # waited for on the event loop, trying again.
        answers = []
        for call, request in [(wrapper.RegisterTask, again), (wrapper.UpdateTask, cancel)]:
            with holder.connect() as connection:
                connection.begin()
                lock(connection, locked)
                release = threading.Timer(0.3, connection.rollback)
                release.start()
                answers.append(call(request))
                release.join()
        assert not answers[0].created and answers[1].status == pb.Task.CANCELLED


def test_rerun_release_and_retry(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    task_id = wrapper.RegisterTask(register("p1", a=1)).task.task_input_id
    wrapper.ClaimTasks(claim("p1"))
    released = wrapper.UpdateTask(update("p1", task_id, State.PENDING, "node drained"))
    assert released.status == State.PENDING and not released.claimed_by_token_id
    assert wrapper.ClaimTasks(claim("p1")).tasks[0].task_input_id == task_id
    wrapper.UpdateTask(update("p1", task_id, State.FAILED, "exit 1"))
    wrapper.UpdateTask(update("p1", task_id, State.PENDING, "retry"))
    assert wrapper.ClaimTasks(claim("p1")).tasks[0].task_input_id == task_id


def test_lease_expires_unless_renewed(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    lapsing = wrapper.RegisterTask(register("p1", n=1)).task.task_input_id
    renewed = wrapper.RegisterTask(register("p1", n=2)).task.task_input_id
    lease = duration_pb2.Duration(seconds=1)
    claimed = wrapper.ClaimTasks(claim("p1", 2, lease=lease)).tasks
    assert all(t.HasField("lease_expire_time") for t in claimed)
    for _ in range(4):
        time.sleep(0.4)
        wrapper.UpdateTask(update("p1", renewed, State.RUNNING, "heartbeat"))
    again = wrapper.ClaimTasks(claim("p1", 5)).tasks
    assert [t.task_input_id for t in again] == [lapsing]
    events = wrapper.ListTaskEvents(
        pb.ListTaskEventsRequest(pipeline_name="p1", task_input_id=lapsing)
    ).events
    assert [e.kind for e in events] == [
        pb.Event.CREATED,
        pb.Event.CLAIMED,
        pb.Event.LEASE_EXPIRED,
        pb.Event.CLAIMED,
    ]
    assert events[2].new_status == State.PENDING and events[2].token_id == ""
    kept = wrapper.GetTask(pb.GetTaskRequest(pipeline_name="p1", task_input_id=renewed))
    assert kept.status == State.RUNNING


def test_a_claimer_that_lost_its_task_cannot_report_on_the_new_claim(porch: Porch) -> None:
    wrapper = porch.stub(porch.pipeline("p1"))
    task_id = wrapper.RegisterTask(register("p1", n=1)).task.task_input_id
    get = pb.GetTaskRequest(pipeline_name="p1", task_input_id=task_id)
    assert wrapper.GetTask(get).claim_number == 0

    def fenced(status: int, claim_number: int) -> pb.UpdateTaskRequest:
        request = update("p1", task_id, status, "from the first launcher")
        request.task.claim_number = claim_number
        return request

    [first] = wrapper.ClaimTasks(claim("p1", lease=duration_pb2.Duration(seconds=1))).tasks
    assert first.claim_number == 1
    assert wrapper.UpdateTask(fenced(State.RUNNING, 1)).claim_number == 1
    time.sleep(1.2)  # the first launcher stalls; its lease lapses
    [second] = wrapper.ClaimTasks(claim("p1")).tasks
    assert (second.task_input_id, second.claim_number) == (task_id, 2)
    events = pb.ListTaskEventsRequest(pipeline_name="p1", task_input_id=task_id)
    history = wrapper.ListTaskEvents(events).events

    # The first launcher wakes: neither its heartbeat nor its result lands.
    for status in (State.RUNNING, State.DONE, State.FAILED, State.PENDING):
        message = fails(Code.FAILED_PRECONDITION, wrapper.UpdateTask, fenced(status, 1))
        assert "claimed again since claim 1" in message and "latest claim is 2" in message
    fails(Code.FAILED_PRECONDITION, wrapper.UpdateTask, fenced(State.RUNNING, 3), "never made")
    fails(Code.INVALID_ARGUMENT, wrapper.UpdateTask, fenced(State.RUNNING, -1), "claim_number")
    assert wrapper.GetTask(get) == second
    assert wrapper.ListTaskEvents(events).events == history

    # The second claim's own reports land, and so do updates naming no claim.
    assert wrapper.UpdateTask(fenced(State.RUNNING, 2)).status == State.RUNNING
    released = wrapper.UpdateTask(update("p1", task_id, State.PENDING, "drained"))
    assert (released.status, released.claim_number) == (State.PENDING, 2)
    [third] = wrapper.ClaimTasks(claim("p1")).tasks
    assert third.claim_number == 3
    fails(Code.FAILED_PRECONDITION, wrapper.UpdateTask, fenced(State.DONE, 2), "since claim 2")
    assert wrapper.UpdateTask(fenced(State.DONE, 3)).status == State.DONE
    kinds = [event.kind for event in wrapper.ListTaskEvents(events).events]
    assert kinds.count(pb.Event.CLAIMED) == 3 and kinds[-1] == pb.Event.STATUS_CHANGED


def test_health_and_reflection(porch: Porch) -> None:
    channel = grpc.insecure_channel(porch.target)
    porch.channels.append(channel)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "porch.v1.PorchService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "porch.v1.PorchService" in names and "grpc.health.v1.Health" in names


def test_health_watch_streams_end_as_the_server_stops_not_at_its_grace(db_url: str) -> None:
    porch = start_porch(db_url)
    channel = grpc.insecure_channel(porch.target)
    health = health_pb2_grpc.HealthStub(channel)
    statuses = health_pb2.HealthCheckResponse
    watches = {
        service: health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
        for service in ("", "porch.v1.PorchService", "other.Service")
    }
    stopped = False
    try:
        assert next(watches[""]).status == statuses.SERVING
        assert next(watches["porch.v1.PorchService"]).status == statuses.SERVING
        assert next(watches["other.Service"]).status == statuses.SERVICE_UNKNOWN
        started = time.monotonic()
        stopped = True
        porch.server.stop(grace=20)
        assert time.monotonic() - started < 10
        for service, watch in watches.items():
            told = []
            with pytest.raises(grpc.RpcError) as ended:
                told.extend(answer.status for answer in watch)
            assert ended.value.code() == Code.UNAVAILABLE, (service, ended.value)
            assert ended.value.details() == "the server is stopping"
            known = service != "other.Service"
            assert told == ([statuses.NOT_SERVING] if known else []), service
    finally:
        channel.close()
        if not stopped:
            porch.stop()


def test_a_request_that_cannot_be_read_is_an_invalid_argument(
    porch: Porch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "porch.access")
    secret = porch.pipeline("p1")
    channel = grpc.insecure_channel(porch.target)
    porch.channels.append(channel)
    raw = channel.unary_unary("/porch.v1.PorchService/RegisterTask")  # bytes in, bytes out
    task = pb.Task(pipeline=pb.Pipeline(name="p1"))
    task.task_input.update({"ok": 1})
    shallow = pb.RegisterTaskRequest(task=task).SerializeToString()
    # A Struct 60 deep is 120 messages deep, more than protobuf reads; its
    # bytes are nested by hand, as python protobuf would not build it.
    nested = b""
    for _ in range(60):
        value = b"\x2a" + _varint(len(nested)) + nested  # Value.struct_value
        entry = b"\x0a\x01x" + b"\x12" + _varint(len(value)) + value  # fields["x"]
        nested = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields
    inner = b"\x0a\x04\x0a\x02p1" + b"\x1a" + _varint(len(nested)) + nested
    too_deep = b"\x0a" + _varint(len(inner)) + inner
    metadata = [("authorization", f"Bearer {secret}")]
    for data, words in (
        (too_deep, "nests too deeply for protobuf to read (100 levels of messages, of which each"),
        (b"\x0a\xff\xff", "could not be read"),  # a length past the end
    ):
        with pytest.raises(grpc.RpcError) as raised:
            raw(data, metadata=metadata)
        error: Any = raised.value
        assert error.code() == Code.INVALID_ARGUMENT, error.details()
        assert words in error.details()
    # Read once its token was known, so its access line names the token.
    refused = [r.getMessage() for r in caplog.records if "INVALID_ARGUMENT" in r.getMessage()]
    assert refused and all(" token 2 (" in line for line in refused), refused
    assert raw(shallow, metadata=metadata)  # the same call, readable, works
    # A caller porch does not know is refused before its request is read:
    # a request made to be costly to read costs it nothing.
    revoked = porch.token(Role.READER)
    porch.stub(porch.admin).RevokeToken(pb.RevokeTokenRequest(token_id="3"))
    for unknown in (
        [],
        [("authorization", "Bearer not-a-token")],
        [("authorization", f"Bearer {revoked}")],
    ):
        with pytest.raises(grpc.RpcError) as raised:
            raw(too_deep, metadata=unknown)
        assert raised.value.code() == Code.UNAUTHENTICATED  # type: ignore[attr-defined]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_calls_waiting_as_the_database_stops_answering_are_ended_then(
    porch: Porch, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As the housekeeping finds SELECT 1 unanswered, a call waiting on the
    # database (here, for its token) is ended, not left to wait as long as
    # the network lets it; what it asked may have been done.
    admin = porch.stub(porch.admin)
    admin.CreatePipeline(pipeline_request("p"))
    found = porch.server.store.find_token
    waiting, held = threading.Event(), threading.Event()

    def find_token(secret_hash: str) -> Any:
        waiting.set()
        held.wait(20)
        return found(secret_hash)

    monkeypatch.setattr(porch.server.store, "find_token", find_token)
    monkeypatch.setattr(store_module, "TOKEN_CACHE_SECONDS", 0.0)
    caplog.set_level(logging.INFO, "porch.access")
    interceptor = porch.server.running.interceptor

    async def cut() -> int:
        return interceptor.cut_waiting()

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(admin.GetPipeline, pb.GetPipelineRequest(name="p"), timeout=30)
            assert waiting.wait(10)
            assert porch.server.call(cut()) == 1
            with pytest.raises(grpc.RpcError) as ended:
                call.result(timeout=10)
        assert ended.value.code() == Code.UNAVAILABLE, ended.value  # type: ignore[attr-defined]
        assert ended.value.details() == DATABASE_STOPPED  # type: ignore[attr-defined]
        access_lines(caplog, lambda line: line.startswith("GetPipeline UNAVAILABLE"))
    finally:
        held.set()
    # Nothing else was touched: the next call is served.
    assert porch.server.call(cut()) == 0
    assert admin.GetPipeline(pb.GetPipelineRequest(name="p")).name == "p"


def test_a_call_waiting_for_its_own_request_is_not_cut_but_refused_once_it_comes(
    porch: Porch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its token looked up, it waits on its client, not the database: it is
    # not cut as the database falls silent, but its request, once it comes,
    # is refused as a new call's would be.
    admin = porch.stub(porch.admin)
    admin.CreatePipeline(pipeline_request("p"))
    monkeypatch.setattr(store_module, "TOKEN_CACHE_SECONDS", 0.0)  # the request read after
    found = porch.server.store.find_token
    looked_up, sending = threading.Event(), threading.Event()

    def find_token(secret_hash: str) -> Any:
        try:
            return found(secret_hash)
        finally:
            looked_up.set()

    monkeypatch.setattr(porch.server.store, "find_token", find_token)
    interceptor = porch.server.running.interceptor

    def request() -> Iterator[bytes]:
        sending.wait(20)
        yield pb.GetPipelineRequest(name="p").SerializeToString()

    async def fall_silent() -> int:
        interceptor.database_silent = True
        return interceptor.cut_waiting()

    channel = grpc.insecure_channel(porch.target)
    porch.channels.append(channel)
    get = channel.stream_unary(
        "/porch.v1.PorchService/GetPipeline", response_deserializer=pb.Pipeline.FromString
    )
    call = get.future(request(), metadata=[("authorization", f"Bearer {porch.admin}")], timeout=30)
    try:
        assert looked_up.wait(10)
        # Back from the lookup's thread, the call waits for its request,
        # and is no longer among those waiting on the database.
        for _ in range(500):
            if not interceptor._waiting:
                break
            time.sleep(0.01)
        assert porch.server.call(fall_silent()) == 0
        sending.set()
        with pytest.raises(grpc.RpcError) as refused:
            call.result(timeout=10)
        assert refused.value.code() == Code.UNAVAILABLE, refused.value  # type: ignore[attr-defined]
        assert refused.value.details() == DATABASE_SILENT  # type: ignore[attr-defined]
    finally:
        sending.set()
        interceptor.database_silent = False
    assert admin.GetPipeline(pb.GetPipelineRequest(name="p")).name == "p"


def test_calls_are_refused_at_once_while_the_database_does_not_answer(porch: Porch) -> None:
    # As the housekeeping finds it (SELECT 1 unanswered): a call would
    # otherwise wait on the database as long as the network lets it.
    admin = porch.stub(porch.admin)
    admin.CreatePipeline(
        pb.CreatePipelineRequest(pipeline=pb.Pipeline(name="p", uri="u", version="1"))
    )
    interceptor = porch.server.running.interceptor
    interceptor.database_silent = True
    try:
        with pytest.raises(grpc.RpcError) as raised:
            admin.GetPipeline(pb.GetPipelineRequest(name="p"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert raised.value.details() == DATABASE_SILENT  # type: ignore[attr-defined]
        # And before the in-process gateway reads a body.
        refused = porch.server.call(
            interceptor.admit(
                "/porch.v1.PorchService/GetPipeline", [("authorization", f"Bearer {porch.admin}")]
            )
        )
        assert refused == (grpc.StatusCode.UNAVAILABLE, DATABASE_SILENT)
    finally:
        interceptor.database_silent = False
    assert admin.GetPipeline(pb.GetPipelineRequest(name="p")).name == "p"
