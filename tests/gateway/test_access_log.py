"""The gateway's access log: one line per HTTP request, with what the handler
in this process noted about its call."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import grpc
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from gateway import access
from gateway.access import AccessLog
from porch_server.models import Role
from porch_stubs.v1 import porch_pb2, porch_pb2_grpc
from tests.gateway.conftest import PorchHttp, bearer

pytestmark = pytest.mark.asyncio

LOGGER = "test.access"


async def noted(request: Request) -> Response:
    assert access.note("Echo OK token 7 (ci)")
    return PlainTextResponse("noted", status_code=201)


async def paged(request: Request) -> Response:
    for _ in range(3):
        access.note("List OK token 7 (ci)")
    access.note("Get OK token 7 (ci)")
    return PlainTextResponse("[]")


async def failing(request: Request) -> Response:
    raise RuntimeError("the handler broke")


def app(logger: str | None = LOGGER) -> Starlette:
    middleware = [Middleware(AccessLog, logger=logger)] if logger else []
    routes = [
        Route("/noted", noted, methods=["POST"]),
        Route("/paged", paged),
        Route("/failing", failing),
    ]
    return Starlette(routes=routes, middleware=middleware)


def lines(caplog: pytest.LogCaptureFixture, logger: str = LOGGER) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == logger]


async def logged_lines(caplog: pytest.LogCaptureFixture, logger: str, count: int) -> list[str]:
    """The logger's lines, once there are count of them (or after 5 s)."""
    for _ in range(100):
        if len(lines(caplog, logger)) >= count:
            break
        await asyncio.sleep(0.05)
    return lines(caplog, logger)


async def test_one_line_per_request_with_the_handlers_note(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    transport = httpx.ASGITransport(app=app(), client=("10.1.2.3", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert (await client.post("/noted?x=1&y=%20")).status_code == 201
        assert (await client.get("/nowhere")).status_code == 404

    [posted, missing] = lines(caplog)
    method, target, status, elapsed, peer, *note = posted.split(" ")
    assert (method, target, status, peer) == ("POST", "/noted?x=1&y=%20", "201", "10.1.2.3:5555")
    assert elapsed.endswith("ms") and float(elapsed.removesuffix("ms")) >= 0
    assert " ".join(note) == "Echo OK token 7 (ci)"
    assert missing.startswith("GET /nowhere 404 ") and missing.endswith(" 10.1.2.3:5555")


async def test_the_same_note_again_is_counted_not_repeated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert (await client.get("/paged")).status_code == 200

    [line] = lines(caplog)
    assert line.endswith(" List OK token 7 (ci) [3 calls] Get OK token 7 (ci)"), line


async def test_a_failing_request_is_logged_as_the_500_it_becomes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    transport = httpx.ASGITransport(app=app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert (await client.get("/failing")).status_code == 500

    [line] = lines(caplog)
    assert line.startswith("GET /failing 500 ")


async def test_bytes_that_could_forge_a_field_or_a_line_are_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/a\nb",
        "raw_path": b"/a\nb c\x7f\xff",
        "query_string": b"q=\r",
        "client": ("::1", 4000),
        "headers": [],
    }
    await AccessLog(PlainTextResponse("x"), LOGGER)(scope, receive, send)

    [line] = lines(caplog)
    assert line.split(" ")[:2] == ["GET", "/a\\x0ab\\x20c\\x7f\\xff?q=\\x0d"]
    assert line.endswith(" [::1]:4000")


async def test_a_secret_in_the_query_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        await client.get("/paged?status=DONE&access_token=s3cret&api_key=k3y&Token=t0k")

    [line] = lines(caplog)
    assert line.split(" ")[1] == "/paged?status=DONE&access_token=***&api_key=***&Token=***"


@pytest.mark.parametrize(
    "sent",
    [
        "apikey=k3y",
        "x-api-key=k3y",
        "authorization=Bearer%20s3cret",
        "auth=s3cret",
        "bearer=s3cret",
        "sessiontoken=s3cret",
        "session_id=s3cret",
        "passwd=s3cret",
        "pwd=s3cret",
        "pass=s3cret",
        "credentials=s3cret",
        "X-Amz-Signature=s3cret",
        "sig=s3cret",
        "passphrase=s3cret",
        "otp=123456",
        "totp=123456",
        "mfa_totp=123456",
        "passcode=123456",
        "pin=1234",
        "userPin=1234",
        "mfaTOTP=123456",
        "x-Sig=s3cret",
        # Named as the server reads the name: decoded.
        "%74oken=s3cret",
        "api%5Fkey=s3cret",
        "PASS%57ORD=s3cret",
        "api+key=s3cret",
    ],
)
async def test_any_parameter_named_like_a_secret_is_not_logged(
    caplog: pytest.LogCaptureFixture, sent: str
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        await client.get(f"/paged?status=DONE&{sent}&after=0.1")

    [line] = lines(caplog)
    name = sent.partition("=")[0]
    assert line.split(" ")[1] == f"/paged?status=DONE&{name}=***&after=0.1"


async def test_porchs_own_parameters_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    query = (
        "pipeline_name=p1&status=DONE&page_size=10&after=0.1&include_revoked=true"
        "&uri=https://example.org/p&version=1&num_tasks=2&task_input_id=ab&pipeline.name=p1"
    )
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        await client.get(f"/paged?{query}&page_token=s3cret")

    [line] = lines(caplog)
    assert line.split(" ")[1] == f"/paged?{query}&page_token=***"


async def test_text_that_could_break_a_line_is_escaped() -> None:
    assert access.escape("x)\nGET /forged\u2028 a\\b\x85 é\u00a0") == (
        "x)\\x0aGET /forged\\u2028 a\\x5cb\\x85 é\u00a0"
    )
    # Text that reads backwards, or hides, is shown for what it is.
    assert access.escape("ops\u202egnp\u202c \u200bx\ufeff") == (
        "ops\\u202egnp\\u202c \\u200bx\\ufeff"
    )


async def test_a_client_address_that_is_no_address_is_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Behind a proxy, X-Forwarded-For sets the client to whatever it says.
    caplog.set_level(logging.INFO, LOGGER)
    forged = "6.6.6.6 GET /admin 200 0.1ms x\u0085y"
    transport = httpx.ASGITransport(app=app(), client=(forged, 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        await client.get("/nowhere")

    [line] = lines(caplog)
    assert line.endswith(" 6.6.6.6\\x20GET\\x20/admin\\x20200\\x200.1ms\\x20x\\xc2\\x85y:1")
    assert len(line.split(" ")) == 5


@pytest.mark.parametrize(
    ("client", "shown"),
    [(("10.1.2.3", 0), "10.1.2.3"), (("::1", 0), "[::1]"), (("::1", 80), "[::1]:80")],
)
async def test_a_client_a_proxy_named_is_shown_without_a_port(
    caplog: pytest.LogCaptureFixture, client: tuple[str, int], shown: str
) -> None:
    # X-Forwarded-For gives a host alone, which uvicorn sets with port 0.
    caplog.set_level(logging.INFO, LOGGER)
    transport = httpx.ASGITransport(app=app(), client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        await http.get("/nowhere")
    [line] = lines(caplog)
    assert line.endswith(f" {shown}")


async def test_a_note_that_comes_after_the_line_is_refused_so_it_is_not_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    go_on = asyncio.Event()
    late: list[bool] = []

    async def slow_to_stop() -> None:
        await go_on.wait()
        late.append(access.note("Watch CANCELLED token 7 (ci)"))

    async def leaves_work_behind(request: Request) -> Response:
        background.append(asyncio.create_task(slow_to_stop()))
        return PlainTextResponse("")

    background: list[asyncio.Task[None]] = []
    routes = [Route("/", leaves_work_behind)]
    served = Starlette(routes=routes, middleware=[Middleware(AccessLog, logger=LOGGER)])
    transport = httpx.ASGITransport(app=served)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        await client.get("/")
    go_on.set()
    await asyncio.gather(*background)

    assert late == [False]  # the caller then writes its own line
    [line] = lines(caplog)
    assert line.startswith("GET / 200 ") and "Watch" not in line


async def test_no_line_and_no_note_when_the_access_log_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    assert not access.note("outside any request")
    transport = httpx.ASGITransport(app=app(logger=None))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        with pytest.raises(AssertionError):
            await client.post("/noted")  # noted() finds no request to note on
    assert lines(caplog) == []


async def test_porch_calls_through_the_gateway_log_one_line_each(
    porch_http: PorchHttp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "porch.access")
    headers = await porch_http.pipeline("p1")
    elsewhere = await porch_http.pipeline("p2")
    caplog.clear()

    response = await porch_http.client.post(
        "/v1/pipelines/p1/tasks", json={"task_input": {"run": 1}}, headers=headers
    )
    assert response.status_code == 201, response.text
    denied = await porch_http.client.get("/v1/pipelines/p1/tasks", headers={})
    assert denied.status_code == 401
    unknown = {"Authorization": "Bearer " + "x" * 43}
    assert (
        await porch_http.client.get("/v1/pipelines/p1/tasks", headers=unknown)
    ).status_code == 401
    wrong = await porch_http.client.post(
        "/v1/pipelines/p1/tasks", json={"task_input": {"run": 2}}, headers=elsewhere
    )
    assert wrong.status_code == 403
    reader = bearer(porch_http.token(Role.READER, description="r"))
    assert (await porch_http.client.get("/v1/tokens", headers=reader)).status_code == 403

    # A server in another thread may write its line just after its answer.
    logged = await logged_lines(
        caplog, "porch.access", 5 if porch_http.upstream == "in-process" else 10
    )
    http = [line for line in logged if line.startswith(("POST ", "GET "))]
    grpc = [line for line in logged if not line.startswith(("POST ", "GET "))]
    assert [line.split(" ")[:3] for line in http] == [
        ["POST", "/v1/pipelines/p1/tasks", "201"],
        ["GET", "/v1/pipelines/p1/tasks", "401"],
        ["GET", "/v1/pipelines/p1/tasks", "401"],
        ["POST", "/v1/pipelines/p1/tasks", "403"],
        ["GET", "/v1/tokens", "403"],
    ]
    if porch_http.upstream == "in-process":
        # The call's own line is folded into the HTTP request's line.
        assert grpc == []
        assert re.search(r" RegisterTask OK token \d+ \(p1 wrapper\)$", http[0]), http[0]
        assert http[1].endswith(" ListTasks UNAUTHENTICATED anonymous")
        assert http[2].endswith(" ListTasks UNAUTHENTICATED unknown token")
        # A refused call names the token that made it.
        assert re.search(r" RegisterTask PERMISSION_DENIED token \d+ \(p2 wrapper\)$", http[3])
        # Once, though the role alone refuses it.
        assert re.search(r" ListTokens PERMISSION_DENIED token \d+ \(r\)$", http[4]), http[4]
    else:
        # Over a connection the server logs the call itself, as any gRPC call.
        assert [line.split(" ")[:2] for line in grpc] == [
            ["RegisterTask", "OK"],
            ["ListTasks", "UNAUTHENTICATED"],
            ["ListTasks", "UNAUTHENTICATED"],
            ["RegisterTask", "PERMISSION_DENIED"],
            ["ListTokens", "PERMISSION_DENIED"],
        ]
        # ... and the gateway, in another process as a rule, knows nothing to add.
        assert [len(line.split(" ")) for line in http] == [5, 5, 5, 5, 5]


async def test_a_stream_the_client_leaves_still_logs_its_call_on_its_line(
    porch_http: PorchHttp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "porch.access")
    async with porch_http.client.stream(
        "GET", "/v1/events:watch", headers=porch_http.admin
    ) as response:
        assert response.status_code == 200
        async for _ in response.aiter_lines():
            break  # the first bookmark: the stream is up; now leave

    logged = await logged_lines(
        caplog, "porch.access", 1 if porch_http.upstream == "in-process" else 2
    )
    [line] = [line for line in logged if line.startswith("GET ")]
    assert line.split(" ")[:3] == ["GET", "/v1/events:watch", "200"]
    left = r"WatchEvents CANCELLED token \d+ \(.+\)"
    if porch_http.upstream == "in-process":
        assert re.search(left, line), line
    else:
        # The server's own line, of the gateway's call: time and address too.
        [served] = [line for line in logged if line.startswith("WatchEvents")]
        served_line = left.replace(" token", r" [\d.]+ms 127\.0\.0\.1:\d+ token")
        assert re.fullmatch(served_line, served), served


async def test_a_client_that_leaves_before_its_body_has_arrived_is_499(
    porch_http: PorchHttp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "porch.access")
    _, writer = await asyncio.open_connection("127.0.0.1", porch_http.server.port)
    writer.write(
        b"POST /v1/pipelines HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        b'Authorization: Bearer %s\r\n\r\n{"name' % porch_http.porch.admin.encode()
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()

    [line] = await logged_lines(caplog, "porch.access", 1)
    assert line.split(" ")[:3] == ["POST", "/v1/pipelines", "499"], line
    # The client's leaving is no failure of the server's.
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []


async def test_a_list_the_gateway_follows_page_by_page_is_one_line(
    porch_http: PorchHttp, caplog: pytest.LogCaptureFixture
) -> None:
    headers = await porch_http.pipeline("p1")
    for first in (0, 500, 1000):  # 1,200 tasks: two pages of ListTasks
        body = {"tasks": [{"task_input": {"n": n}} for n in range(first, min(first + 500, 1200))]}
        registered = await porch_http.client.post(
            "/v1/pipelines/p1/tasks:batchRegister", json=body, headers=headers
        )
        assert registered.status_code == 201, registered.text
    caplog.set_level(logging.INFO, "porch.access")
    caplog.clear()

    listed = await porch_http.client.get("/tasks", params={"pipeline_name": "p1"}, headers=headers)
    assert listed.status_code == 200 and len(listed.json()) == 1200

    logged = await logged_lines(
        caplog, "porch.access", 1 if porch_http.upstream == "in-process" else 3
    )
    [line] = [line for line in logged if line.startswith("GET ")]
    assert line.split(" ")[:3] == ["GET", "/tasks?pipeline_name=p1", "200"]
    if porch_http.upstream == "in-process":
        assert re.search(r" ListTasks OK token \d+ \(p1 wrapper\) \[2 calls\]$", line), line


async def test_a_token_description_cannot_break_the_line(
    porch_http: PorchHttp, caplog: pytest.LogCaptureFixture
) -> None:
    await porch_http.pipeline("p1")
    # New descriptions are refused a line break ...
    refused = await porch_http.client.post(
        "/pipelines/p1/token/x%0AGET%20%2Fforged", headers=porch_http.admin
    )
    assert refused.status_code == 400, refused.text
    assert "line breaks" in refused.json()["message"]
    # ... and one already stored (imported, say) is escaped.
    secret = porch_http.token(Role.PIPELINE, "p1", "x)\nGET /forged 200 0.1ms")
    caplog.set_level(logging.INFO, "porch.access")
    caplog.clear()

    listed = await porch_http.client.get("/v1/pipelines/p1/tasks", headers=bearer(secret))
    assert listed.status_code == 200

    logged = await logged_lines(
        caplog, "porch.access", 1 if porch_http.upstream == "in-process" else 2
    )
    assert all("\n" not in line for line in logged)
    # The server's own line (over a channel) has time and address too.
    served = r"( [\d.]+ms 127\.0\.0\.1:\d+)?"
    escaped = rf"ListTasks OK{served} token \d+ \(x\)\\x0aGET /forged 200 0\.1ms\)$"
    assert any(re.search(escaped, line) for line in logged), logged


async def test_a_stream_past_its_deadline_is_logged_as_such(
    porch_http: PorchHttp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "porch.access")
    async with grpc.aio.insecure_channel(porch_http.porch.target) as channel:
        stub = porch_pb2_grpc.PorchServiceStub(channel)
        call = stub.WatchEvents(
            porch_pb2.WatchEventsRequest(),
            metadata=(("authorization", f"Bearer {porch_http.porch.admin}"),),
            timeout=0.3,
        )
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in call:
                pass
    assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    logged = await logged_lines(caplog, "porch.access", 1)
    assert [line.split(" ")[:2] for line in logged] == [["WatchEvents", "DEADLINE_EXCEEDED"]]
