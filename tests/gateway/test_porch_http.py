"""porch's v1 HTTP routes end to end: HTTP → gateway → gRPC server → database.

Every test runs against a real porch gRPC server and its gateway under
uvicorn, on real sockets, once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import httpx
import psycopg2
import pytest
from sqlalchemy.engine import make_url

from porch_server import auth
from porch_server import store as store_module
from porch_server.errors import Unavailable
from porch_server.interceptor import DATABASE_STOPPED
from porch_server.models import Role
from porch_server.service import UNANSWERED_CLAIM
from tests.gateway.conftest import PorchHttp, bearer

pytestmark = pytest.mark.asyncio

PIPELINE = {"name": "p1", "uri": "https://example.org/p", "version": "1"}
SSE = {"accept": "text/event-stream"}
STREAM_TIMEOUT = 15


async def register(http: PorchHttp, headers: dict[str, str], *inputs: dict[str, Any]) -> list[str]:
    """Register tasks of p1 in one batch; their task_input_ids, in order."""
    response = await http.client.post(
        "/v1/pipelines/p1/tasks:batchRegister",
        json={"tasks": [{"task_input": each} for each in inputs]},
        headers=headers,
    )
    assert response.status_code in (200, 201), response.text
    return [result["task"]["task_input_id"] for result in response.json()["results"]]


async def update(
    http: PorchHttp, headers: dict[str, str], task_id: str, status: str, message: str = ""
) -> httpx.Response:
    body = {"task": {"status": status}, "message": message}
    return await http.client.patch(f"/v1/pipelines/p1/tasks/{task_id}", json=body, headers=headers)


def assert_error(response: httpx.Response, status: int, code: int, *words: str) -> None:
    """An error answer: this HTTP status, google.rpc.Status JSON with this code and words."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    # A 401 says how to authenticate (RFC 9110); other answers need not.
    assert response.headers.get("www-authenticate") == ("Bearer" if status == 401 else None)
    body = response.json()
    assert (body["code"], body["details"]) == (code, [])
    for word in words:
        assert word in body["message"], body["message"]
    # The mark of porch's own errors is for its gRPC clients, not a header.
    assert "grpc-trailer-x-porch-error" not in response.headers


# Pipelines and tokens.


async def test_create_get_and_list_pipelines_with_paging(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    for index in range(5):
        body = {**PIPELINE, "name": f"p{index}", "version": str(index % 2)}
        created = await client.post("/v1/pipelines", json=body, headers=admin)
        assert created.status_code == 201
        assert created.json() == body
    got = await client.get("/v1/pipelines/p3", headers=admin)
    assert got.json() == {**PIPELINE, "name": "p3", "version": "1"}
    names, token, pages = [], "", 0
    while True:
        page = await client.get(
            "/v1/pipelines", params={"page_size": 2, "page_token": token}, headers=admin
        )
        names += [each["name"] for each in page.json()["pipelines"]]
        token, pages = page.json()["next_page_token"], pages + 1
        if not token:
            break
    assert (names, pages) == (["p0", "p1", "p2", "p3", "p4"], 3)
    filtered = await client.get(
        "/v1/pipelines", params={"version": "1", "uri": PIPELINE["uri"]}, headers=admin
    )
    assert [each["name"] for each in filtered.json()["pipelines"]] == ["p1", "p3"]


async def test_tokens_are_created_listed_and_revoked(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    await porch_http.pipeline()
    created = await client.post(
        "/v1/tokens", json={"pipeline_name": "p1", "description": "wrapper"}, headers=admin
    )
    assert created.status_code == 201
    assert created.headers["cache-control"] == "no-store"  # it holds the secret
    token = created.json()
    assert (token["name"], token["description"], token["role"]) == ("p1", "wrapper", "PIPELINE")
    reader = await client.post(
        "/v1/tokens", json={"description": "dashboard", "role": "READER"}, headers=admin
    )
    assert (reader.status_code, reader.json()["name"]) == (201, "")
    listed = await client.get("/v1/tokens", params={"pipeline_name": "p1"}, headers=admin)
    descriptions = [each["description"] for each in listed.json()["tokens"]]
    assert "wrapper" in descriptions
    assert token["token"] not in listed.text
    before = await client.get("/v1/pipelines/p1", headers=bearer(token["token"]))
    assert before.status_code == 200
    revoked = await client.post(f"/v1/tokens/{token['token_id']}:revoke", json={}, headers=admin)
    assert revoked.status_code == 200
    assert revoked.json()["revoke_time"]
    after = await client.get("/v1/pipelines/p1", headers=bearer(token["token"]))
    assert_error(after, 401, 16, "revoked")


# Tasks.


async def test_register_is_201_then_200_and_batches_keep_their_order(
    porch_http: PorchHttp,
) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    url = "/v1/pipelines/p1/tasks"
    first = await client.post(url, json={"task_input": {"id_run": 1}}, headers=wrapper)
    again = await client.post(url, json={"task_input": {"id_run": 1.0}}, headers=wrapper)
    assert (first.status_code, again.status_code) == (201, 200)
    assert (first.json()["created"], again.json()["created"]) == (True, False)
    task = first.json()["task"]
    assert again.json()["task"] == task
    assert task["status"] == "PENDING"
    assert task["pipeline"] == PIPELINE
    assert '"task_input":{"id_run":1}' in first.text
    batch = await client.post(
        "/v1/pipelines/p1/tasks:batchRegister",
        json={"tasks": [{"task_input": {"id_run": n}} for n in (3, 1, 2)]},
        headers=wrapper,
    )
    assert batch.status_code == 201  # some were new
    results = batch.json()["results"]
    assert [each["task"]["task_input"]["id_run"] for each in results] == [3, 1, 2]
    assert [each["created"] for each in results] == [True, False, True]
    repeat = await client.post(
        "/v1/pipelines/p1/tasks:batchRegister",
        json={"tasks": [{"task_input": {"id_run": n}} for n in (1, 2)]},
        headers=wrapper,
    )
    assert repeat.status_code == 200  # none was


async def test_get_and_list_tasks_with_filters_and_paging(porch_http: PorchHttp) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    ids = await register(porch_http, wrapper, *({"n": n} for n in range(5)))
    got = await client.get(f"/v1/pipelines/p1/tasks/{ids[2]}", headers=wrapper)
    assert (got.status_code, got.json()["task_input"]) == (200, {"n": 2})
    claimed = await client.post("/v1/pipelines/p1/tasks:claim", json={}, headers=wrapper)
    assert [each["task_input_id"] for each in claimed.json()["tasks"]] == ids[:1]
    seen, token = [], ""
    while True:
        page = await client.get(
            "/v1/pipelines/p1/tasks",
            params={"status": "PENDING", "page_size": 3, "page_token": token},
            headers=wrapper,
        )
        assert page.status_code == 200
        seen += [each["task_input_id"] for each in page.json()["tasks"]]
        token = page.json()["next_page_token"]
        if not token:
            break
    assert seen == ids[1:]
    everything = await client.get("/v1/tasks", params={"pipeline_name": "p1"}, headers=wrapper)
    assert [each["task_input_id"] for each in everything.json()["tasks"]] == ids
    assert everything.json()["next_page_token"] == ""


async def test_claim_with_num_tasks_and_a_lease(porch_http: PorchHttp) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    ids = await register(porch_http, wrapper, *({"n": n} for n in range(5)))
    plain = await client.post(
        "/v1/pipelines/p1/tasks:claim", json={"num_tasks": 2}, headers=wrapper
    )
    tasks = plain.json()["tasks"]
    assert [each["task_input_id"] for each in tasks] == ids[:2]
    assert {each["status"] for each in tasks} == {"CLAIMED"}
    assert all("lease_expire_time" not in each for each in tasks)
    leased = await client.post(
        "/v1/pipelines/p1/tasks:claim", json={"num_tasks": 2, "lease": "60s"}, headers=wrapper
    )
    [one, two] = leased.json()["tasks"]
    assert [one["task_input_id"], two["task_input_id"]] == ids[2:4]
    lease = datetime.fromisoformat(one["lease_expire_time"]) - datetime.fromisoformat(
        one["claim_time"]
    )
    assert lease.total_seconds() == pytest.approx(60, abs=1)
    # Typed query parameters on the npg_porch route: an integer and a Duration.
    by_query = await client.post(
        "/tasks/claim", params={"num_tasks": "3", "lease": "30s"}, json=PIPELINE, headers=wrapper
    )
    assert [each["task_input_id"] for each in by_query.json()] == ids[4:]
    assert by_query.json()[0]["lease_expire_time"]
    empty = await client.post("/v1/pipelines/p1/tasks:claim", json={}, headers=wrapper)
    assert (empty.status_code, empty.json()) == (200, {"tasks": []})


async def test_update_with_a_message_and_list_the_events(porch_http: PorchHttp) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    [task_id] = await register(porch_http, wrapper, {"id_run": 45925})
    await client.post("/v1/pipelines/p1/tasks:claim", json={}, headers=wrapper)
    running = await update(porch_http, wrapper, task_id, "RUNNING")
    assert (running.status_code, running.json()["status"]) == (200, "RUNNING")
    done = await update(porch_http, wrapper, task_id, "DONE", "finished in 3h; café ☕")
    assert done.json()["status"] == "DONE"
    events = await client.get(f"/v1/pipelines/p1/tasks/{task_id}/events", headers=wrapper)
    listed = events.json()["events"]
    assert [(e["kind"], e["old_status"], e["new_status"]) for e in listed] == [
        ("CREATED", "STATE_UNSPECIFIED", "PENDING"),
        ("CLAIMED", "PENDING", "CLAIMED"),
        ("STATUS_CHANGED", "CLAIMED", "RUNNING"),
        ("STATUS_CHANGED", "RUNNING", "DONE"),
    ]
    assert listed[-1]["message"] == "finished in 3h; café ☕"
    assert {e["token_description"] for e in listed} == {"p1 wrapper"}
    paged = await client.get(
        f"/v1/pipelines/p1/tasks/{task_id}/events", params={"page_size": 3}, headers=wrapper
    )
    assert len(paged.json()["events"]) == 3
    rest = await client.get(
        f"/v1/pipelines/p1/tasks/{task_id}/events",
        params={"page_token": paged.json()["next_page_token"]},
        headers=wrapper,
    )
    assert rest.json()["events"] == listed[3:]


async def test_an_update_naming_a_stale_claim_is_400_and_changes_nothing(
    porch_http: PorchHttp,
) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    [task_id] = await register(porch_http, wrapper, {"id_run": 45925})
    claim = "/v1/pipelines/p1/tasks:claim"
    [first] = (await client.post(claim, json={}, headers=wrapper)).json()["tasks"]
    await update(porch_http, wrapper, task_id, "PENDING")
    [second] = (await client.post(claim, json={}, headers=wrapper)).json()["tasks"]
    assert (first["claim_number"], second["claim_number"]) == (1, 2)
    path = f"/v1/pipelines/p1/tasks/{task_id}"
    for number in (1, "1"):  # int32: a JSON number or a string of one
        body = {"task": {"status": "RUNNING", "claim_number": number}}
        stale = await client.patch(path, json=body, headers=wrapper)
        assert_error(stale, 400, 9, "claimed again since claim 1", "latest claim is 2")
    assert (await client.get(path, headers=wrapper)).json() == second
    body = {"task": {"status": "RUNNING", "claimNumber": 2}}
    running = await client.patch(path, json=body, headers=wrapper)
    assert (running.status_code, running.json()["status"]) == (200, "RUNNING")


@contextlib.contextmanager
def database_held(db_url: str) -> Iterator[None]:
    """Make every write wait while the block runs: PostgreSQL for a lock on
    the task table, SQLite for the database's write lock."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        holder: Any = sqlite3.connect(str(url.database), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    else:
        holder = psycopg2.connect(
            host=url.host, port=url.port, user=url.username, dbname=url.database
        )
        holder.cursor().execute("LOCK TABLE task IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        holder.rollback()
        holder.close()


async def test_a_claim_whose_client_left_goes_back_to_pending(
    porch_http: PorchHttp, db_url: str
) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    [task_id] = await register(porch_http, wrapper, {"id_run": 45925})
    with database_held(db_url):
        # The claim waits for the database; its client gives up and leaves.
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/tasks/claim", json=PIPELINE, headers=wrapper, timeout=0.5)
        await asyncio.sleep(0.5)
    events_url = f"/v1/pipelines/p1/tasks/{task_id}/events"
    for _ in range(100):
        events = (await client.get(events_url, headers=wrapper)).json()["events"]
        if len(events) == 3:
            break
        await asyncio.sleep(0.1)
    assert [(e["kind"], e["new_status"]) for e in events] == [
        ("CREATED", "PENDING"),
        ("CLAIMED", "CLAIMED"),
        ("STATUS_CHANGED", "PENDING"),
    ]
    assert events[-1]["message"] == UNANSWERED_CLAIM
    [again] = (await client.post("/tasks/claim", json=PIPELINE, headers=wrapper)).json()
    assert (again["task_input_id"], again["claim_number"]) == (task_id, 2)


async def test_the_servers_own_unavailable_keeps_its_words(
    porch_http: PorchHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(name: str) -> None:
        raise Unavailable("the database is unavailable", "no route to host db.example.org")

    monkeypatch.setattr(porch_http.porch.server.store, "get_pipeline", unreachable)
    response = await porch_http.client.get("/v1/pipelines/p1", headers=porch_http.admin)
    assert_error(response, 503, 14)
    said = "the database is unavailable; try again (the server's log says why)"
    assert response.json()["message"] == said


async def test_a_body_the_document_requires_the_server_requires(porch_http: PorchHttp) -> None:
    client, admin, wrapper = porch_http.client, porch_http.admin, await porch_http.pipeline()
    document = (await client.get("/openapi.json")).json()
    required = [
        (method, path)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if operation.get("requestBody", {}).get("required")
    ]
    assert ("post", "/v1/tokens") in required and ("post", "/v1/pipelines") in required
    for method, path in required:
        url = re.sub(r"\{[^}]*input_id\}", "a" * 64, re.sub(r"\{[^}]*name\}", "p1", path))
        answer = await client.request(method, url, headers=admin)
        if answer.status_code == 403:  # a wrapper's call
            answer = await client.request(method, url, headers=wrapper)
        assert answer.status_code == 400, (method, path, answer.text)
        assert "required" in answer.json()["message"], (method, path, answer.text)


async def test_text_that_would_read_otherwise_is_refused_naming_the_character(
    porch_http: PorchHttp,
) -> None:
    client, admin = porch_http.client, porch_http.admin
    document = (await client.get("/openapi.json")).json()
    made = document["paths"]["/v1/pipelines"]["post"]["requestBody"]["content"]
    for path in ("/v1/pipelines", "/pipelines"):  # porch's route and npg_porch's
        for field in ("uri", "version"):
            pattern = made["application/json"]["schema"]["properties"][field]["pattern"]
            assert not re.fullmatch(pattern, "1\u202e2") and re.fullmatch(pattern, "1\u00a02")
            body = {"name": "p2", "uri": "u", "version": "1"} | {field: "1\u202e2"}
            response = await client.post(path, json=body, headers=admin)
            named = "U+202E (RIGHT-TO-LEFT OVERRIDE) at character 2"
            assert_error(response, 400, 3, f"pipeline.{field} must not contain", named)
    token = document["components"]["schemas"]["porch.v1.CreateTokenRequest"]["properties"]
    pattern = token["description"]["pattern"]
    assert not re.fullmatch(pattern, "cron \u2066job") and re.fullmatch(pattern, "\u200d\u200c")
    await porch_http.pipeline("p1")
    body = {"pipeline_name": "p1", "description": "cron \u2066job"}
    response = await client.post("/v1/tokens", json=body, headers=admin)
    named = "U+2066 (LEFT-TO-RIGHT ISOLATE) at character 6"
    assert_error(response, 400, 3, "description must not contain", named)
    response = await client.post("/pipelines/p1/token/cron%20%E2%80%AEjob", headers=admin)
    named = "U+202E (RIGHT-TO-LEFT OVERRIDE) at character 6"
    assert_error(response, 400, 3, "description must not contain", named)
    names = [p["name"] for p in (await client.get("/pipelines", headers=admin)).json()]
    assert names == ["p1"]


async def test_what_a_request_needs_the_document_requires(porch_http: PorchHttp) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    paths = (await porch_http.client.get("/openapi.json")).json()["paths"]

    def body(path: str, method: str) -> dict[str, Any]:
        schema: dict[str, Any] = paths[path][method]["requestBody"]["content"]["application/json"]
        return schema["schema"]

    async def refused(method: str, url: str, sent: dict[str, Any], *words: str) -> None:
        response = await client.request(method, url, json=sent, headers=wrapper)
        assert_error(response, 400, 3, *words)

    # Registering: an input, and a pipeline unless the path names it.
    assert body("/tasks", "post")["required"] == ["pipeline", "task_input"]
    await refused("POST", "/tasks", {"pipeline": {"name": "p1"}}, "task.task_input is required")
    await refused("POST", "/tasks", {"task_input": {}}, "task.pipeline.name is required")
    assert body("/v1/pipelines/{pipeline_name}/tasks", "post")["required"] == ["task_input"]
    await refused("POST", "/v1/pipelines/p1/tasks", {}, "task.task_input is required")
    batch = body("/v1/pipelines/{pipeline_name}/tasks:batchRegister", "post")
    assert batch["properties"]["tasks"]["items"]["required"] == ["task_input"]
    sent = {"tasks": [{"task_input": {"n": 2}}, {}]}
    url = "/v1/pipelines/p1/tasks:batchRegister"
    await refused("POST", url, sent, "tasks[1].task_input is required")
    # Updating: a status, and a pipeline unless the path names it.
    [task_id] = await register(porch_http, wrapper, {"n": 1})
    assert body("/tasks", "put")["required"] == ["pipeline", "status"]
    await refused("PUT", "/tasks", {"pipeline": {"name": "p1"}, "task_input": {"n": 1}}, "status")
    await refused("PUT", "/tasks", {"task_input": {"n": 1}, "status": "CANCELLED"}, "pipeline")
    patch = body("/v1/pipelines/{pipeline_name}/tasks/{task_input_id}", "patch")
    assert (patch["required"], patch["properties"]["task"]["required"]) == (["task"], ["status"])
    url = f"/v1/pipelines/p1/tasks/{task_id}"
    await refused("PATCH", url, {"task": {}}, "task.status is required")
    await refused("PATCH", url, {"message": "m"}, "task.status is required")
    task = (await client.get(url, headers=wrapper)).json()
    assert task["status"] == "PENDING"  # nothing refused changed it
    # Claiming: a pipeline's name, not empty.
    assert body("/tasks/claim", "post")["properties"]["name"]["minLength"] == 1
    await refused("POST", "/tasks/claim", {"name": ""}, "pipeline.name is required")


async def test_npg_porch_token_route_offers_what_it_makes(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    await porch_http.pipeline("p1")
    document = (await client.get("/openapi.json")).json()
    route = document["paths"]["/pipelines/{pipeline_name}/token/{description}"]["post"]
    [role] = [p for p in route["parameters"] if p["name"] == "role"]
    assert role["schema"]["enum"] == ["PIPELINE"]
    for other in ("ADMIN", "READER"):  # the route names a pipeline, which these have none of
        response = await client.post(f"/pipelines/p1/token/d?role={other}", headers=admin)
        assert_error(response, 400, 3, "not bound to a pipeline")
    made = await client.post("/pipelines/p1/token/d?role=PIPELINE", headers=admin)
    assert made.status_code == 201, made.text
    schemas = document["components"]["schemas"]
    token_id = schemas["porch.v1.CreateTokenResponse"]["properties"]["token_id"]
    assert token_id["pattern"] == "^[1-9][0-9]{0,9}$"
    assert re.fullmatch(token_id["pattern"], made.json()["token_id"])
    listed = schemas["porch.v1.Token"]["properties"]["token_id"]["pattern"]
    tokens = (await client.get("/v1/tokens", headers=admin)).json()["tokens"]
    assert tokens and all(re.fullmatch(listed, each["token_id"]) for each in tokens)
    revoke = document["paths"]["/v1/tokens/{token_id}:revoke"]["post"]["parameters"][0]
    for given in ("0", "x1", "-1"):
        assert not re.fullmatch(revoke["schema"]["pattern"], given)
        response = await client.post(f"/v1/tokens/{given}:revoke", json={}, headers=admin)
        assert_error(response, 400, 3, "token_id must be a token's id")
    revoked = await client.post(f"/v1/tokens/0{made.json()['token_id']}:revoke", headers=admin)
    assert revoked.status_code == 200, revoked.text


async def test_the_limits_the_document_states_are_the_servers(porch_http: PorchHttp) -> None:
    client, admin, wrapper = porch_http.client, porch_http.admin, await porch_http.pipeline()
    document = (await client.get("/openapi.json")).json()
    properties = {
        name: schema.get("properties", {})
        for name, schema in document["components"]["schemas"].items()
    }
    name = properties["porch.v1.Pipeline"]["name"]
    longest = "n" * name["maxLength"]
    for pipeline, status in ((longest, 201), (longest + "n", 400), ("a/b", 400)):
        assert re.search(name["pattern"], pipeline) or status == 400
        body = {"name": pipeline, "uri": "u", "version": "1"}
        assert (await client.post("/v1/pipelines", json=body, headers=admin)).status_code == status
    made = document["paths"]["/v1/pipelines"]["post"]["requestBody"]["content"]
    bounds = made["application/json"]["schema"]["properties"]
    for field in ("uri", "version"):
        assert "maxLength" not in properties["porch.v1.Pipeline"][field]  # answers: any
        longest = bounds[field]["maxLength"]
        for length, status in ((longest, 201), (longest + 1, 400)):
            body = {"name": f"{field}{length}", "uri": "u", "version": "1"} | {field: "€" * length}
            made = await client.post("/v1/pipelines", json=body, headers=admin)
            assert made.status_code == status, made.text
            assert status == 201 or f"pipeline.{field} is longer than {longest}" in made.text
    made = document["paths"]["/v1/pipelines"]["post"]["requestBody"]["content"]
    assert made["application/json"]["schema"]["required"] == ["name", "uri", "version"]
    for missing in ("uri", "version"):
        body = {"name": "p_" + missing, "uri": "u", "version": "1"}
        del body[missing]
        response = await client.post("/v1/pipelines", json=body, headers=admin)
        assert_error(response, 400, 3, missing)
    description = properties["porch.v1.CreateTokenRequest"]["description"]
    for length, status in ((description["maxLength"], 201), (description["maxLength"] + 1, 400)):
        body = {"pipeline_name": "p1", "description": "d" * length}
        assert (await client.post("/v1/tokens", json=body, headers=admin)).status_code == status
    # What the patterns take, the server takes; what they refuse, it refuses.
    new_name = bounds["name"]
    for pipeline in ("a b", "é", " lead", "trail ", "a\x01b", "a\x85b", "a\u2028b", ".", ".."):
        fits = (
            re.fullmatch(name["pattern"], pipeline)
            and re.fullmatch(new_name["pattern"], pipeline)
            and pipeline not in new_name["not"]["enum"]
        )
        body = {"name": pipeline, "uri": "u", "version": "1"}
        response = await client.post("/v1/pipelines", json=body, headers=admin)
        assert response.status_code == (201 if fits else 400), (pipeline, response.text)
    for field in ("uri", "version"):
        for value in (
            "x y",
            " x ",
            "",
            " ",
            "\tx",
            "a\nb",
            "a\u2028b",
            "a\x9fb",
            "\ufeff",
            "\u3000",
            "a\u202eb",
            "\u200bx",
            "x\u00a0z",
        ):
            fits = len(value) >= bounds[field]["minLength"] and re.fullmatch(
                bounds[field]["pattern"], value
            )
            body = {"name": f"{field}_{len(value)}_{ord(value[-1:] or 'z')}", "uri": "u"}
            body |= {"version": "1", field: value}
            response = await client.post("/v1/pipelines", json=body, headers=admin)
            assert response.status_code == (201 if fits else 400), (field, value, response.text)
    for text in ("d e", " d ", "", " ", "d\te", "d\ne", "d\u2029e", "d\u2067e", "d\u200de"):
        fits = len(text) >= description["minLength"] and re.fullmatch(description["pattern"], text)
        body = {"pipeline_name": "p1", "description": text}
        response = await client.post("/v1/tokens", json=body, headers=admin)
        assert response.status_code == (201 if fits else 400), (text, response.text)

    claim = properties["porch.v1.ClaimTasksRequest"]["num_tasks"]
    body = {"num_tasks": claim["minimum"] - 1}
    response = await client.post("/v1/pipelines/p1/tasks:claim", json=body, headers=wrapper)
    assert_error(response, 400, 3, "num_tasks")
    # Any larger number is taken: a call claims as many as it carries.
    body = {"num_tasks": claim["maximum"]}
    response = await client.post("/v1/pipelines/p1/tasks:claim", json=body, headers=wrapper)
    assert claim["maximum"] == 2**31 - 1 and response.status_code == 200
    lease = properties["porch.v1.ClaimTasksRequest"]["lease"]
    for given in ("1s", "1.s", "0.5s", "2592000s", "0.000000001s", "0s", "0.s", "-1s", "-0.5s"):
        body = {"lease": given}
        response = await client.post("/v1/pipelines/p1/tasks:claim", json=body, headers=wrapper)
        fits = re.fullmatch(lease["pattern"], given)
        assert response.status_code == (200 if fits else 400), (given, response.text)
    batch = properties["porch.v1.RegisterTasksRequest"]["tasks"]
    assert batch["maxItems"] == 10_000
    empty = await client.post(
        "/v1/pipelines/p1/tasks:batchRegister", json={"tasks": []}, headers=wrapper
    )
    assert batch["minItems"] == 1 and empty.status_code == 400

    [task_id] = await register(porch_http, wrapper, {"n": 1})
    # A message is bounded in bytes (64 KiB), so in characters too.
    message = properties["porch.v1.UpdateTaskRequest"]["message"]
    for text, status in (
        ("m" * message["maxLength"], 200),
        ("m" * (message["maxLength"] + 1), 400),
    ):
        response = await update(porch_http, wrapper, task_id, "PENDING", text)
        assert response.status_code == status, response.text
    parameters = {
        (operation["operationId"], parameter["name"]): parameter["schema"]
        for operations in document["paths"].values()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
    }
    pattern = parameters["PorchService_GetTask", "task_input_id"]["pattern"]
    assert re.fullmatch(pattern.strip("^$"), task_id)
    assert parameters["PorchService_UpdateTask", "task_input_id"]["pattern"] == pattern
    # A query's enum offers only what the server takes: not the zero value.
    offered = parameters["PorchService_ListTasks", "status"]["enum"]
    for status in ("STATE_UNSPECIFIED", *offered):
        listed = await client.get(f"/v1/tasks?status={status}", headers=wrapper)
        assert listed.status_code == (200 if status in offered else 400), status
    upper = await client.get(f"/v1/pipelines/p1/tasks/{task_id.upper()}", headers=wrapper)
    assert_error(upper, 400, 3, "64 lowercase hex digits")
    assert properties["porch.v1.Task"]["claim_number"]["minimum"] == 0
    body = {"task": {"status": "CANCELLED", "claim_number": -1}}
    negative = await client.patch(f"/v1/pipelines/p1/tasks/{task_id}", json=body, headers=wrapper)
    assert_error(negative, 400, 3, "claim_number")
    # Nor is a task's status ever the zero value, stored or asked for.
    state = properties["porch.v1.Task"]["status"]["$ref"].rpartition("/")[2]
    assert document["components"]["schemas"][state]["enum"] == offered
    unspecified = await update(porch_http, wrapper, task_id, "STATE_UNSPECIFIED")
    assert_error(unspecified, 400, 3, "status")
    page_size = parameters["PorchService_ListTasks", "page_size"]["minimum"]
    below = await client.get("/v1/tasks", params={"page_size": page_size - 1}, headers=wrapper)
    assert_error(below, 400, 3, "page_size must not be negative")


# Watching.


async def results(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The events of an NDJSON stream, without bookmarks."""
    async for line in lines:
        event = json.loads(line)["result"]
        if event["kind"] != "BOOKMARK":
            yield event


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(id, event) of a Server-Sent Events stream, without bookmarks."""
    fields: dict[str, str] = {}
    async for line in lines:
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        event = json.loads(fields["data"])
        if event["kind"] != "BOOKMARK":
            yield fields["id"], event
        fields = {}


async def test_watch_as_ndjson_from_now_on(porch_http: PorchHttp) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    [old] = await register(porch_http, wrapper, {"before": "the watch"})
    async with (
        asyncio.timeout(STREAM_TIMEOUT),
        client.stream("GET", "/v1/pipelines/p1/events:watch", headers=wrapper) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = response.aiter_lines()
        first = json.loads(await anext(lines))["result"]
        assert first["kind"] == "BOOKMARK" and first["cursor"]
        [new] = await register(porch_http, wrapper, {"after": "the watch"})
        await client.post("/v1/pipelines/p1/tasks:claim", json={}, headers=wrapper)
        seen = []
        async for event in results(lines):
            seen.append((event["kind"], event["task_input_id"]))
            if event["kind"] == "CLAIMED":
                break
    # From now on: the task registered before the watch shows up claimed, not created.
    # (On PostgreSQL "now" is the oldest transaction running anywhere on the server,
    # so an event committed just before may be replayed too: never one missed.)
    if seen[0] == ("CREATED", old):
        seen = seen[1:]
    assert seen == [("CREATED", new), ("CLAIMED", old)]


async def test_watch_as_sse_resumes_after_last_event_id(porch_http: PorchHttp) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    async with (
        asyncio.timeout(STREAM_TIMEOUT),
        client.stream("GET", "/v1/events:watch", headers={**wrapper, **SSE}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("id: ")
        ids = await register(porch_http, wrapper, {"n": 1}, {"n": 2}, {"n": 3})
        events = sse_events(lines)
        seen = [await anext(events) for _ in ids]
    # One transaction: its events come in the order porch wrote the rows.
    assert sorted(event["task_input_id"] for _, event in seen) == sorted(ids)
    assert [event_id for event_id, event in seen] == [event["cursor"] for _, event in seen]
    # A reconnecting EventSource sends the id of the last event it saw.
    resume = {**wrapper, **SSE, "Last-Event-ID": seen[0][0]}
    async with (
        asyncio.timeout(STREAM_TIMEOUT),
        client.stream("GET", "/v1/events:watch", headers=resume) as response,
    ):
        events = sse_events(response.aiter_lines())
        replayed = [await anext(events), await anext(events)]
    assert replayed == seen[1:]


async def test_watch_errors_before_the_stream_are_http_errors(porch_http: PorchHttp) -> None:
    client, wrapper = porch_http.client, await porch_http.pipeline()
    unknown = await client.get("/v1/pipelines/nope/events:watch", headers=wrapper)
    assert_error(unknown, 404, 5, "nope")
    bad_cursor = await client.get(
        "/v1/events:watch", params={"after": "x"}, headers={**wrapper, **SSE}
    )
    assert_error(bad_cursor, 400, 3, "cursor")
    anonymous = await client.get("/v1/events:watch")
    assert_error(anonymous, 401, 16, "token")


# Errors.


async def test_bad_tokens_are_401_and_tokens_without_the_right_403(porch_http: PorchHttp) -> None:
    client = porch_http.client
    assert_error(await client.get("/v1/pipelines"), 401, 16, "no token")
    malformed = await client.get("/v1/pipelines", headers={"Authorization": "Basic abc"})
    assert_error(malformed, 401, 16, "malformed")
    unknown = await client.get("/v1/pipelines", headers=bearer("x" * 43))
    assert_error(unknown, 401, 16, "unknown token")
    # Valid tokens without the right: 403, naming the pipeline.
    wrapper = await porch_http.pipeline("p1")
    await porch_http.pipeline("p2")
    wrong = await client.post(
        "/v1/pipelines/p2/tasks", json={"task_input": {"a": 1}}, headers=wrapper
    )
    assert_error(wrong, 403, 7, "'p1'", "'p2'")
    claim = await client.post("/tasks/claim", json={"name": "p2"}, headers=wrapper)
    assert_error(claim, 403, 7, "'p2'")
    not_admin = await client.post("/v1/pipelines", json={**PIPELINE, "name": "p3"}, headers=wrapper)
    assert_error(not_admin, 403, 7, "admin")
    reader = bearer(porch_http.token(Role.READER))
    assert (await client.get("/v1/tasks", headers=reader)).status_code == 200
    as_reader = await client.post("/v1/pipelines/p1/tasks:claim", json={}, headers=reader)
    assert_error(as_reader, 403, 7, "this is a reader token")


async def test_unknown_things_are_404_and_a_taken_name_409(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    wrapper = await porch_http.pipeline()
    assert_error(await client.get("/v1/pipelines/nope", headers=admin), 404, 5, "'nope'")
    missing = await client.get(f"/v1/pipelines/p1/tasks/{'0' * 64}", headers=admin)
    assert_error(missing, 404, 5, "0" * 64)
    unknown_pipeline = await client.post(
        "/v1/tokens", json={"pipeline_name": "nope", "description": "d"}, headers=admin
    )
    assert_error(unknown_pipeline, 404, 5, "'nope'")
    assert_error(await client.get("/v1/nowhere", headers=admin), 404, 5, "no route")
    update_missing = await update(porch_http, wrapper, "a" * 64, "RUNNING")
    assert_error(update_missing, 404, 5)
    taken = await client.post("/v1/pipelines", json=PIPELINE, headers=admin)
    assert_error(taken, 409, 6, "'p1'", "exists")


async def test_bad_requests_and_illegal_transitions_are_400(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    wrapper = await porch_http.pipeline()
    no_uri = await client.post("/v1/pipelines", json={"name": "p9"}, headers=admin)
    assert_error(no_uri, 400, 3, "pipeline.uri")
    unknown_field = await client.post(
        "/v1/pipelines/p1/tasks", json={"task_input": {}, "colour": "red"}, headers=wrapper
    )
    assert_error(unknown_field, 400, 3, "colour")
    no_input = await client.post("/v1/pipelines/p1/tasks", json={}, headers=wrapper)
    assert_error(no_input, 400, 3, "task.task_input")
    bad_status = await client.get("/v1/tasks", params={"status": "LOST"}, headers=admin)
    assert_error(bad_status, 400, 3, "status", "LOST")
    # The value that means "not given" would list every task: refused when named.
    for unspecified in ("STATE_UNSPECIFIED", "0"):
        refused = await client.get("/v1/tasks", params={"status": unspecified}, headers=admin)
        assert_error(refused, 400, 3, f"'{unspecified}' is not one of PENDING, CLAIMED,")
    assert (await client.get("/v1/tasks", params={"status": "2"}, headers=admin)).status_code == 200
    bad_size = await client.get("/v1/tasks", params={"page_size": "many"}, headers=admin)
    assert_error(bad_size, 400, 3, "page_size")
    negative = await client.get("/v1/tasks", params={"page_size": "-1"}, headers=admin)
    assert_error(negative, 400, 3, "page_size")
    zero = await client.post("/v1/pipelines/p1/tasks:claim", json={"num_tasks": 0}, headers=wrapper)
    assert_error(zero, 400, 3, "num_tasks")
    bad_lease = await client.post(
        "/v1/pipelines/p1/tasks:claim", json={"lease": "soon"}, headers=wrapper
    )
    assert_error(bad_lease, 400, 3, "lease", 'such as "3600s"', 'got "soon"')
    for lease, given in (("1e3s", '"1e3s"'), (3600, "3600"), ({"seconds": 1}, "an object")):
        refused = await client.post(
            "/v1/pipelines/p1/tasks:claim", json={"lease": lease}, headers=wrapper
        )
        assert_error(refused, 400, 3, "lease: expected a duration", f"got {given}")
    # json_format would read true as 1 (ADMIN), "3" as 3 and 1.5 as 1.
    tokens_before = (await client.get("/v1/tokens", headers=admin)).json()
    for role in (True, "3", 1.5, ["ADMIN"]):
        refused = await client.post(
            "/v1/tokens", json={"description": "d", "role": role}, headers=admin
        )
        assert_error(refused, 400, 3, "role: expected one of ADMIN, PIPELINE, READER")
    assert (await client.get("/v1/tokens", headers=admin)).json() == tokens_before
    for lease, words in (
        ("999999999999s", "lease: a duration is at most 315,576,000,000 seconds either way"),
        ("100000000000s", "at most 30 days (2,592,000 s), got 100,000,000,000 s"),
        (
            "2592000.5s",
            "lease must be positive and at most 30 days (2,592,000 s), got 2,592,000.5 s",
        ),
        ("0s", "got 0 s"),
        ("315576000000.000000001s", "got 315,576,000,000.000000001 s"),
        ("315576000000.5s", "at most 30 days (2,592,000 s), got 315,576,000,000.5 s"),
        ("-0.5s", "got -0.5 s"),
    ):
        refused = await client.post(
            "/v1/pipelines/p1/tasks:claim", json={"lease": lease}, headers=wrapper
        )
        assert_error(refused, 400, 3, words)
    # The proto3 JSON mapping lets an integer come in a string, in any notation.
    for number in ("1e0", "1.0", "+1", "0" * 30 + "1"):
        claimed = await client.post(
            "/v1/pipelines/p1/tasks:claim", json={"num_tasks": number}, headers=wrapper
        )
        assert claimed.status_code == 200, (number, claimed.text)
    bad_id = await client.get("/v1/pipelines/p1/tasks/XYZ", headers=admin)
    assert_error(bad_id, 400, 3, "task_input_id")
    not_json = await client.post(
        "/v1/pipelines", content=b"{", headers={**admin, "content-type": "application/json"}
    )
    assert_error(not_json, 400, 3, "JSON")
    # Through porch serve's own gateway, a caller the server does not know is
    # refused before its body is read; a gateway of its own (porch gateway)
    # reads the body, and the server judges the call.
    for unknown in ({}, bearer("not-a-token")):
        refused = await client.post(
            "/v1/pipelines/p1/tasks:batchRegister", content=b"{", headers=unknown
        )
        if porch_http.upstream == "in-process":
            assert_error(refused, 401, 16)
        else:
            assert_error(refused, 400, 3, "JSON")
    # So is a token whose role may never make the call, whatever a large body
    # says; a small one is read, and the refusal names the pipeline.
    reader = bearer(porch_http.token(Role.READER))
    for path, who in (("/v1/pipelines/p1/tasks:batchRegister", reader), ("/v1/pipelines", wrapper)):
        refused = await client.post(path, content=b"{" + b" " * 70_000, headers=who)
        if porch_http.upstream == "in-process":
            assert_error(refused, 403, 7, "needs a", "this is a")
        else:
            assert_error(refused, 400, 3, "JSON")

    # A body of undeclared length (chunked) counts as large.
    async def chunked() -> AsyncIterator[bytes]:
        yield b"{"

    path = "/v1/pipelines/p1/tasks:batchRegister"
    unread = await client.post(path, content=chunked(), headers=reader)
    if porch_http.upstream == "in-process":
        assert_error(unread, 403, 7, "needs a pipeline's token; this is a reader token")
    else:
        assert_error(unread, 400, 3, "JSON")
    small = {"tasks": [{"task_input": {"n": 1}}]}
    named = await client.post("/v1/pipelines/p1/tasks:batchRegister", json=small, headers=reader)
    assert_error(named, 403, 7, "needs a token of pipeline 'p1'; this is a reader token")
    [task_id] = await register(porch_http, wrapper, {"n": 1})
    illegal = await update(porch_http, wrapper, task_id, "DONE")
    assert_error(illegal, 400, 9, "PENDING", "DONE")
    got = await client.get(f"/v1/pipelines/p1/tasks/{task_id}", headers=wrapper)
    assert got.json()["status"] == "PENDING"
    # The path names one task, the body's input another: neither changes.
    [other_id] = await register(porch_http, wrapper, {"n": 2})
    elsewhere = await client.patch(
        f"/v1/pipelines/p1/tasks/{task_id}",
        json={"task": {"status": "CANCELLED", "task_input": {"n": 2}}},
        headers=wrapper,
    )
    assert_error(elsewhere, 400, 3, task_id, other_id)
    for each in (task_id, other_id):
        got = await client.get(f"/v1/pipelines/p1/tasks/{each}", headers=wrapper)
        assert got.json()["status"] == "PENDING"


async def test_a_large_body_from_a_caller_the_server_refuses_is_never_read(
    porch_http: PorchHttp,
) -> None:
    # Through either gateway: in-process it asks before reading the body;
    # over a channel its call to the server begins before a large body is
    # read, and porch's server refuses an unknown token from the call's
    # metadata. Sent a head and one byte of 3 MB, it is answered at once.
    wrapper = await porch_http.pipeline()
    for unknown in ("", "Authorization: Bearer " + "A" * 43 + "\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", porch_http.server.port)
        try:
            writer.write(
                b"POST /v1/pipelines/p1/tasks:batchRegister HTTP/1.1\r\nHost: x\r\n"
                + unknown.encode()
                + b"Content-Type: application/json\r\nContent-Length: 3000000\r\n\r\n{"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 401"), head
            assert b"\r\nconnection: close\r\n" in head
        finally:
            writer.close()
    # So is a stream's, whose body is read before its call begins.
    reader, writer = await asyncio.open_connection("127.0.0.1", porch_http.server.port)
    try:
        writer.write(
            b"GET /v1/events:watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b"A" * 43
            + b"\r\nContent-Length: 3000000\r\n\r\n{"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 401"), head
    finally:
        writer.close()
    # Sent whole, a stranger's large body is refused all the same, whether
    # the refusal or the body's end comes first.
    whole = b'{"tasks": [{"task_input": {"pad": "' + b"x" * 200_000 + b'"}}]}'
    for _ in range(10):
        refused = await porch_http.client.post(
            "/v1/pipelines/p1/tasks:batchRegister", content=whole, headers=bearer("A" * 43)
        )
        assert_error(refused, 401, 16, "unknown token")
    # A known caller's large body is read and its call made as any other,
    # declared or chunked.
    padded = json.dumps({"tasks": [{"task_input": {"n": 1, "pad": "x" * 100_000}}]}).encode()
    made = await porch_http.client.post(
        "/v1/pipelines/p1/tasks:batchRegister",
        content=padded,
        headers={**wrapper, "content-type": "application/json"},
    )
    assert made.status_code == 201, made.text

    async def chunked() -> AsyncIterator[bytes]:
        yield padded[:50_000]
        await asyncio.sleep(0.2)
        yield padded[50_000:]

    again = await porch_http.client.post(
        "/v1/pipelines/p1/tasks:batchRegister", content=chunked(), headers=wrapper
    )
    assert again.status_code == 200, again.text
    assert again.json()["results"][0]["created"] is False
    # A known caller's large body that is not JSON: 400.
    broken = await porch_http.client.post(
        "/v1/pipelines/p1/tasks:batchRegister", content=b"{" + b" " * 70_000, headers=wrapper
    )
    assert_error(broken, 400, 3, "JSON")
    assert (await porch_http.client.get("/v1/pipelines/p1", headers=wrapper)).status_code == 200


async def test_a_large_body_writes_one_access_line_for_its_call(
    porch_http: PorchHttp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Over a channel the gateway probes the caller of a large body first: the
    # probe, which sends no request, is not a call of the server's log.
    wrapper = await porch_http.pipeline()
    monkeypatch.setattr(store_module, "TOKEN_CACHE_SECONDS", 0.0)  # each call looks its token up
    caplog.set_level(logging.INFO, "porch.access")
    for n in range(3):
        padded = {"tasks": [{"task_input": {"n": n, "pad": "x" * 100_000}}]}
        made = await porch_http.client.post(
            "/v1/pipelines/p1/tasks:batchRegister", json=padded, headers=wrapper
        )
        assert made.status_code == 201, made.text
    await asyncio.sleep(0.5)  # for lines written as calls end

    def registrations() -> list[str]:
        return [
            record.getMessage()
            for record in caplog.records
            if "RegisterTasks" in record.getMessage()
        ]

    lines = registrations()
    assert len(lines) == 3, lines
    assert all("RegisterTasks OK" in line for line in lines), lines


async def test_a_token_revoked_once_its_call_was_admitted_is_refused_by_the_call(
    porch_http: PorchHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process, a call the gateway admitted may find its token revoked
    # since (or its check a second old): the handler that looks the token
    # up before it reads the request refuses it, unary or streaming.
    wrapper = await porch_http.pipeline()
    [task_id] = await register(porch_http, wrapper, {"n": 1})
    monkeypatch.setattr(store_module, "TOKEN_CACHE_SECONDS", 0.0)
    if porch_http.upstream == "in-process":
        interceptor = porch_http.porch.server.running.local._interceptors[0]

        async def admitted(*args: Any, **kwargs: Any) -> None:
            return None

        monkeypatch.setattr(interceptor, "admit", admitted)
    client = porch_http.client
    assert (await client.get(f"/v1/pipelines/p1/tasks/{task_id}", headers=wrapper)).is_success
    store = porch_http.porch.server.store
    listed = store.list_tokens("p1", None, False, 100, "").items
    [token] = [each for each in listed if each.description == "p1 wrapper"]
    store.revoke_token(token.token_id)
    body = {"tasks": [{"task_input": {"n": 2}}]}
    for response in (
        await client.post("/v1/pipelines/p1/tasks:batchRegister", json=body, headers=wrapper),
        await client.get("/tasks?pipeline_name=p1", headers=wrapper),
        await client.get("/v1/events:watch", headers=wrapper),
    ):
        assert_error(response, 401, 16, "revoked")


async def test_a_request_waiting_as_the_database_stops_answering_is_ended_then(
    porch_http: PorchHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process, before the gateway reads the body, the call waits for its
    # token; over a channel, the server's call does. Either is ended, 503.
    wrapper = await porch_http.pipeline()
    server = porch_http.porch.server
    found = server.store.find_token
    waiting, held = threading.Event(), threading.Event()

    def find_token(secret_hash: str) -> Any:
        waiting.set()
        held.wait(20)
        return found(secret_hash)

    monkeypatch.setattr(server.store, "find_token", find_token)
    monkeypatch.setattr(store_module, "TOKEN_CACHE_SECONDS", 0.0)

    async def cut() -> int:
        return server.running.interceptor.cut_waiting()

    try:
        body = {"tasks": [{"task_input": {"n": 1}}]}
        post = porch_http.client.post(
            "/v1/pipelines/p1/tasks:batchRegister", json=body, headers=wrapper
        )
        answer = asyncio.ensure_future(post)
        assert await asyncio.to_thread(waiting.wait, 10)
        assert await asyncio.to_thread(server.call, cut()) == 1
        assert_error(await answer, 503, 14, DATABASE_STOPPED)
    finally:
        held.set()
    listed = await porch_http.client.get("/tasks?pipeline_name=p1", headers=wrapper)
    assert listed.status_code == 200, listed.text


async def test_405_with_allow_413_and_the_pages_beside_the_api(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    wrong = await client.delete("/v1/pipelines", headers=admin)
    assert_error(wrong, 405, 12, "DELETE")
    assert wrong.headers["allow"] == "GET, HEAD, POST"
    head = await client.head("/v1/pipelines", headers=admin)
    got = await client.get("/v1/pipelines", headers=admin)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == got.headers["content-length"]
    claim = await client.get("/v1/pipelines/p1/tasks:claim", headers=admin)
    assert (claim.status_code, claim.headers["allow"]) == (405, "POST")
    huge = {"task_input": {"blob": "x" * (5 * 1024 * 1024)}}
    wrapper = await porch_http.pipeline()
    too_large = await client.post("/v1/pipelines/p1/tasks", json=huge, headers=wrapper)
    assert_error(too_large, 413, 8, "larger than")
    # Within the HTTP limit, but 16.5 MB as protobuf: small numbers take 11 bytes there.
    numbers = b'{"task_input": {"l": [' + b",".join([b"1"] * 1_500_000) + b"]}}"
    swollen = await client.post("/v1/pipelines/p1/tasks", content=numbers, headers=wrapper)
    if porch_http.upstream == "in-process":
        assert_error(swollen, 400, 3, "task.task_input is larger than 1048576 bytes as protobuf")
    else:
        assert_error(swollen, 413, 8, "16,500,0", "bytes as protobuf", "send less")
    health = await client.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})
    for path in ("/openapi.json", "/api/v1/openapi.json"):
        document = await client.get(path)
        assert document.json()["info"]["title"] == "porch"
    assert (await client.get("/docs")).status_code == 200


async def test_index_names_the_grpc_address_clients_use(porch_http: PorchHttp) -> None:
    page = await porch_http.client.get("/")
    assert page.status_code == 200
    assert f"<code>{porch_http.porch.target}</code>" in page.text


async def test_each_call_hashes_its_secret_once(
    porch_http: PorchHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process, the gateway has the token checked before it reads a body,
    # and the call checks it again: the second check reuses the hash.
    client, wrapper = porch_http.client, await porch_http.pipeline()
    hashed: list[str] = []
    real = auth.hash_secret

    def counted(secret: str) -> str:
        hashed.append(secret)
        return real(secret)

    monkeypatch.setattr(auth, "hash_secret", counted)
    for calls in (1, 2):
        response = await client.get("/v1/pipelines/p1", headers=wrapper)
        assert response.status_code == 200, response.text
        assert len(hashed) == calls
