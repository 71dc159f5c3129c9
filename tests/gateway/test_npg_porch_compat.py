"""npg_porch's HTTP surface, played as its clients send it (npg-porch-http.md).

Requests are made as `npg_porch_client` makes them: the full pipeline object
in every body, a `task_input_id` of the client's own that must be ignored,
paths with and without a trailing slash, and the OpenAPI document read
without a token from `/api/v1/openapi.json`.
"""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest

import gateway
from porch_server import web
from tests.gateway.conftest import PorchHttp, bearer, unused_target

pytestmark = pytest.mark.asyncio

STATES = ["PENDING", "CLAIMED", "RUNNING", "DONE", "FAILED", "CANCELLED"]
PIPELINE = {"name": "ptest", "uri": "https://github.com/wtsi-npg/ptest", "version": "1.0.0"}
# The test vector of porch.md §3: npg_porch computes the same id.
TASK_INPUT = {"study_id": 100, "id_run": 45925}
TASK_INPUT_ID = "ea058ea93114d621c1897f1e47cad245ba2a5b04edbd23a1d61ef502d5d5b76e"
# What npg_porch_client sends besides the token on requests with a body.
JSON = {"Content-Type": "application/json"}


def task_body(task_input: object, status: str | None = None) -> dict[str, object]:
    """A Task as npg_porch clients send it, with an id of their own that porch ignores."""
    body = {"pipeline": PIPELINE, "task_input_id": "not-the-real-id", "task_input": task_input}
    return body if status is None else {**body, "status": status}


def assert_npg_task(task: dict[str, object], status: str) -> None:
    """A Task npg_porch_client can read: its pipeline compares equal to the one it knows."""
    assert task["pipeline"] == PIPELINE
    assert task["status"] == status
    assert isinstance(task["task_input_id"], str) and len(task["task_input_id"]) == 64


async def setup_pipeline(http: PorchHttp) -> dict[str, str]:
    """Create ptest as an npg_porch admin would; the headers of a fresh token for it."""
    created = await http.client.post("/pipelines", json=PIPELINE, headers={**http.admin, **JSON})
    assert (created.status_code, created.json()) == (201, PIPELINE)
    token = await http.client.post(
        "/pipelines/ptest/token/the%20ptest%20wrapper", headers=http.admin
    )
    assert token.status_code == 201
    return {**bearer(token.json()["token"]), **JSON}


async def test_openapi_document_names_the_task_states() -> None:
    # npg_porch_client fetches it without a token to validate a status it is given.
    app = gateway.create_app(web.gateway_options(unused_target()))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://porch"
    ) as client:
        for path in ("/api/v1/openapi.json", "/api/v1/openapi.json/"):  # as every route
            response = await client.get(path)
            assert response.status_code == 200
            assert response.json()["components"]["schemas"]["TaskStateEnum"]["enum"] == STATES


async def test_pipelines(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, {**porch_http.admin, **JSON}
    other = {"name": "other", "uri": "https://example.org/other", "version": "2"}
    assert (await client.post("/pipelines", json=PIPELINE, headers=admin)).status_code == 201
    assert (await client.post("/pipelines/", json=other, headers=admin)).status_code == 201
    for slash in ("", "/"):
        listed = await client.get(f"/pipelines{slash}", headers=porch_http.admin)
        assert (listed.status_code, listed.json()) == (200, [other, PIPELINE])
        filtered = await client.get(
            f"/pipelines{slash}", params={"uri": PIPELINE["uri"], "version": "1.0.0"}, headers=admin
        )
        assert filtered.json() == [PIPELINE]
        none = await client.get(f"/pipelines{slash}", params={"version": "9"}, headers=admin)
        assert none.json() == []
        got = await client.get(f"/pipelines/ptest{slash}", headers=admin)
        assert (got.status_code, got.json()) == (200, PIPELINE)
        assert (await client.get(f"/pipelines/nope{slash}", headers=admin)).status_code == 404
        taken = await client.post(f"/pipelines{slash}", json=PIPELINE, headers=admin)
        assert taken.status_code == 409
    for missing in ("uri", "version"):
        body = {key: value for key, value in {**PIPELINE, "name": "new"}.items() if key != missing}
        incomplete = await client.post("/pipelines", json=body, headers=admin)
        assert incomplete.status_code == 400
        assert missing in incomplete.json()["message"]


async def test_pipeline_tokens(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    await client.post("/pipelines", json=PIPELINE, headers=admin)
    for slash in ("", "/"):
        created = await client.post(f"/pipelines/ptest/token/wrapper%20one{slash}", headers=admin)
        assert created.status_code == 201
        token = created.json()
        assert (token["name"], token["description"]) == ("ptest", "wrapper one")
        assert len(token["token"]) >= 32
        assert (await client.get("/tasks", headers=bearer(token["token"]))).status_code == 200
        unknown = await client.post(f"/pipelines/nope/token/x{slash}", headers=admin)
        assert unknown.status_code == 404
        not_admin = await client.post(
            f"/pipelines/ptest/token/x{slash}", headers=bearer(token["token"])
        )
        assert not_admin.status_code == 403
        assert (await client.post(f"/pipelines/ptest/token/x{slash}")).status_code == 401


async def test_task_lifecycle(porch_http: PorchHttp) -> None:
    client = porch_http.client
    wrapper = await setup_pipeline(porch_http)
    # A status given with a new task is not stored: new tasks are PENDING.
    added = await client.post("/tasks", json=task_body(TASK_INPUT, "DONE"), headers=wrapper)
    assert added.status_code == 201
    assert_npg_task(added.json(), "PENDING")
    assert added.json()["task_input_id"] == TASK_INPUT_ID
    # Integers come back as integers, as npg_porch answered them (not 100.0).
    assert json.loads(added.text, parse_float=Decimal)["task_input"] == TASK_INPUT

    claimed = await client.post("/tasks/claim/", json=PIPELINE, headers=wrapper)
    assert claimed.status_code == 200
    [task] = claimed.json()
    assert_npg_task(task, "CLAIMED")
    # Registered again: 200, with the stored task in its current status.
    same_input = {"id_run": 45925, "study_id": 100.0}
    again = await client.post("/tasks/", json=task_body(same_input), headers=wrapper)
    assert again.status_code == 200
    assert_npg_task(again.json(), "CLAIMED")
    assert again.json()["task_input_id"] == TASK_INPUT_ID

    # A task_input_id sent beside the input is ignored, here the id of
    # another input: the input names the task.
    elsewhere = "5b20168824c67261308103cb16459e1f1fdaf36ffe7b958c291a1237bcf56a2b"
    for slash, status in (("", "RUNNING"), ("/", "DONE")):
        body = task_body(TASK_INPUT, status) | {"task_input_id": elsewhere}
        updated = await client.put(f"/tasks{slash}", json=body, headers=wrapper)
        assert updated.status_code == 200
        assert_npg_task(updated.json(), status)
        assert updated.json()["task_input_id"] == TASK_INPUT_ID
    illegal = await client.put("/tasks", json=task_body(TASK_INPUT, "RUNNING"), headers=wrapper)
    assert illegal.status_code == 400
    unknown = await client.put("/tasks", json=task_body({"id_run": 1}, "RUNNING"), headers=wrapper)
    assert unknown.status_code == 404
    bad_status = await client.put(
        "/tasks/", json=task_body(TASK_INPUT, "FINISHED"), headers=wrapper
    )
    assert bad_status.status_code == 400

    for slash in ("", "/"):
        listed = await client.get(f"/tasks{slash}", headers=bearer(porch_http.porch.admin))
        assert listed.status_code == 200
        [only] = listed.json()
        assert_npg_task(only, "DONE")
        assert set(only["pipeline"]) == {"name", "uri", "version"}


async def test_a_claimed_task_sent_back_is_refused_once_claimed_again(
    porch_http: PorchHttp,
) -> None:
    client = porch_http.client
    wrapper = await setup_pipeline(porch_http)
    await client.post("/tasks", json=task_body(TASK_INPUT), headers=wrapper)
    [first] = (await client.post("/tasks/claim", json=PIPELINE, headers=wrapper)).json()
    assert first["claim_number"] == 1
    released = await client.put("/tasks", json=task_body(TASK_INPUT, "PENDING"), headers=wrapper)
    assert (released.status_code, released.json()["claim_number"]) == (200, 1)
    [second] = (await client.post("/tasks/claim", json=PIPELINE, headers=wrapper)).json()
    assert second["claim_number"] == 2
    # The first claimer sends its task back, as claimed, with its result.
    stale = await client.put("/tasks", json=first | {"status": "DONE"}, headers=wrapper)
    assert stale.status_code == 400
    assert "claimed again since claim 1" in stale.json()["message"]
    current = await client.put("/tasks", json=second | {"status": "DONE"}, headers=wrapper)
    assert (current.status_code, current.json()["status"]) == (200, "DONE")


async def test_a_claimed_task_with_a_large_integer_goes_back_as_json_wrote_it(
    porch_http: PorchHttp,
) -> None:
    # 2^60 is a double's value and is kept; porch writes it as it was sent,
    # and sent back so it names the same task. JavaScript and jq write that
    # double 1152921504606847000, which is not 2^60: refused, as any integer
    # a double would change, rather than read as a number it is not.
    client = porch_http.client
    wrapper = await setup_pipeline(porch_http)
    created = await client.post("/tasks", json=task_body({"run": 2**60}), headers=wrapper)
    assert created.status_code == 201, created.text
    claim = await client.post("/tasks/claim", json=PIPELINE, headers=wrapper)
    assert '"task_input":{"run":1152921504606846976}' in claim.text
    [claimed] = claim.json()
    assert claimed["task_input"]["run"] == 2**60
    as_sent = json.dumps(claimed | {"status": "RUNNING"})
    as_javascript = as_sent.replace("1152921504606846976", "1152921504606847000")
    assert as_javascript != as_sent
    refused = await client.put("/tasks", content=as_javascript, headers=wrapper)
    assert refused.status_code == 400
    assert refused.json()["message"].startswith(
        "task.task_input.run: the integer 1152921504606847000 would be stored as"
        " 1152921504606846976"
    )
    running = await client.put("/tasks", content=as_sent, headers=wrapper)
    assert (running.status_code, running.json()["status"]) == (200, "RUNNING"), running.text
    assert running.json()["task_input_id"] == created.json()["task_input_id"]


async def test_claim_num_tasks_and_an_empty_claim(porch_http: PorchHttp) -> None:
    client = porch_http.client
    wrapper = await setup_pipeline(porch_http)
    for n in range(4):
        await client.post("/tasks", json=task_body({"n": n}), headers=wrapper)
    one = await client.post("/tasks/claim", json=PIPELINE, headers=wrapper)
    assert [task["task_input"] for task in one.json()] == [{"n": 0}]
    two = await client.post("/tasks/claim", params={"num_tasks": 2}, json=PIPELINE, headers=wrapper)
    assert [task["task_input"] for task in two.json()] == [{"n": 1}, {"n": 2}]
    for task in two.json():
        assert_npg_task(task, "CLAIMED")
    many = await client.post(
        "/tasks/claim", params={"num_tasks": 5}, json=PIPELINE, headers=wrapper
    )
    assert [task["task_input"] for task in many.json()] == [{"n": 3}]
    empty = await client.post("/tasks/claim", json=PIPELINE, headers=wrapper)
    assert (empty.status_code, empty.json()) == (200, [])
    zero = await client.post(
        "/tasks/claim", params={"num_tasks": 0}, json=PIPELINE, headers=wrapper
    )
    assert zero.status_code == 400


async def test_list_tasks_filters(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    wrapper = await setup_pipeline(porch_http)
    other = {"name": "other", "uri": "https://example.org/o", "version": "1"}
    await client.post("/pipelines", json=other, headers=admin)
    other_token = await client.post("/pipelines/other/token/o", headers=admin)
    other_wrapper = {**bearer(other_token.json()["token"]), **JSON}
    for n in range(3):
        await client.post("/tasks", json=task_body({"n": n}), headers=wrapper)
    await client.post(
        "/tasks", json={"pipeline": other, "task_input": {"n": 0}}, headers=other_wrapper
    )
    await client.post("/tasks/claim", json=PIPELINE, headers=wrapper)
    everything = await client.get("/tasks", headers=admin)
    assert [task["pipeline"]["name"] for task in everything.json()] == ["ptest"] * 3 + ["other"]
    for task in everything.json():
        assert set(task["pipeline"]) == {"name", "uri", "version"}
    mine = await client.get("/tasks", params={"pipeline_name": "ptest"}, headers=admin)
    assert len(mine.json()) == 3
    pending = await client.get(
        "/tasks/", params={"pipeline_name": "ptest", "status": "PENDING"}, headers=admin
    )
    assert [task["task_input"] for task in pending.json()] == [{"n": 1}, {"n": 2}]
    bad = await client.get("/tasks", params={"status": "SOMETIMES"}, headers=admin)
    assert bad.status_code == 400
    # A misspelt filter would list every task, as npg_porch did: refused.
    for query, named in (
        ("staus=FAILED", "unknown query parameter 'staus': no such field"),
        ("_=123", "unknown query parameter '_': no such field"),
        ("status=DONE&status=FAILED", "query parameter 'status' is given more than once"),
    ):
        refused = await client.get(f"/tasks?{query}", headers=admin)
        assert (refused.status_code, refused.json()["message"]) == (400, named)
    # A pipeline nobody made is a filter matching nothing, as in npg_porch.
    unknown = await client.get("/tasks", params={"pipeline_name": "nope"}, headers=admin)
    assert (unknown.status_code, unknown.json()) == (200, [])
    # Every task in one answer: a page size would only multiply the calls.
    for listing, params in (("/tasks", {"page_size": 1}), ("/pipelines", {"page_token": "x"})):
        paged = await client.get(listing, params=params, headers=admin)
        assert paged.status_code == 400 and "every page at once" in paged.json()["message"]


async def test_an_empty_task_input_is_still_there(porch_http: PorchHttp) -> None:
    # A wrapper reads task["task_input"] from whatever it claimed.
    client = porch_http.client
    wrapper = await setup_pipeline(porch_http)
    created = await client.post("/tasks", json=task_body({}), headers=wrapper)
    again = await client.post("/tasks", json=task_body({}), headers=wrapper)
    [claimed] = (await client.post("/tasks/claim", json=PIPELINE, headers=wrapper)).json()
    updated = await client.put("/tasks", json={**claimed, "status": "RUNNING"}, headers=wrapper)
    [listed] = (await client.get("/tasks", headers=wrapper)).json()
    for task in (created.json(), again.json(), claimed, updated.json(), listed):
        assert task["task_input"] == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('"a task"', "task: expected an object, got a string"),
        (
            '{"pipeline": "ptest", "task_input": {}}',
            "task.pipeline: expected an object, got a string",
        ),
        (
            '{"pipeline": {"name": 5}, "task_input": {}}',
            "task.pipeline.name: expected a string, got a number",
        ),
        (
            '{"pipeline": {"name": "ptest"}, "task_input": "x"}',
            "task.task_input: expected an object, got a string",
        ),
        # json_format would read 6.5 as 6 (CANCELLED) and true as 1 (PENDING).
        *(
            (
                '{"pipeline": {"name": "ptest"}, "task_input": {}, "status": ' + status + "}",
                "task.status: expected one of PENDING, CLAIMED, RUNNING, DONE, FAILED, CANCELLED,"
                " got " + given,
            )
            for status, given in (
                ("6.5", "6.5"),
                ("true", "true"),
                ('["DONE"]', "a list"),
                ('"NOPE"', '"NOPE"'),
                ('"done!"', '"done!"'),
            )
        ),
        *(
            (
                '{"pipeline": {"name": "ptest"}, "task_input": {}, "claim_number": ' + number + "}",
                "task.claim_number: expected an integer from -2147483648 to 2147483647, got "
                + given,
            )
            for number, given in (
                ('"x"', '"x"'),
                ("1.5", "1.5"),
                ("false", "false"),
                ("4294967296", "4294967296"),
            )
        ),
        (
            '{"pipeline": {"name": "ptest"}, "task_input": {}, "colour": "red"}',
            'task has no field named "colour"; its fields are pipeline, task_input_id,',
        ),
        (
            '{"pipeline": {"name": "ptest"}, "task_input": {}, "create_time": "yesterday"}',
            'task.create_time: expected a time such as "2026-01-31T12:00:00Z" (RFC 3339),'
            ' got "yesterday"',
        ),
        (
            '{"pipeline": {"name": "ptest"}, "task_input": {"n": 1' + "0" * 400 + "}}",
            "task.task_input.n: the integer 100000000000000000000000… (401 digits) is past any"
            " double, the kind of number a JSON value holds in protobuf; send it as a string",
        ),
        ('{"pipeline": {"name": "ptest"}, "task_input": {"n": 1' + "0" * 5000 + "}}", "too long"),
        (
            '{"pipeline": {"name": "ptest"}, "task_input": ' + '{"x": ' * 1000 + "1" + "}" * 1001,
            "nests too deeply",
        ),
        (  # deep enough for json_format, not for JSON's parser
            '{"pipeline": {"name": "ptest"}, "task_input": ' + '{"x": ' * 60 + "1" + "}" * 61,
            "nests too deeply for protobuf to read (100 levels of messages, two for each",
        ),
        (  # deep enough for protobuf's binary form, not for JSON's parser
            '{"pipeline": {"name": "ptest"}, "task_input": ' + '{"x": ' * 40 + "1" + "}" * 41,
            "a task_input may nest at most 32 levels",
        ),
        (
            '{"pipeline": {"name": "ptest"}, "task_input": {"s": "\\ud800"}}',
            "task.task_input: a string holds an unpaired surrogate (a \\uD800 to \\uDFFF escape"
            " without its pair), which is not text",
        ),
        (
            '{"pipeline": {"name": "ptest\\udc00"}, "task_input": {"n": 1}}',
            "task.pipeline.name: a string holds an unpaired surrogate (a \\uD800 to \\uDFFF"
            " escape without its pair), which is not text",
        ),
    ],
)
async def test_a_body_of_the_wrong_shape_is_named(
    porch_http: PorchHttp, body: str, message: str
) -> None:
    client = porch_http.client
    wrapper = await setup_pipeline(porch_http)
    for method, path in (("POST", "/tasks"), ("PUT", "/tasks")):
        response = await client.request(method, path, content=body, headers=wrapper)
        assert response.status_code == 400, response.text
        assert message in response.json()["message"]
    assert (await client.get("/tasks", headers=wrapper)).json() == []


async def test_an_unpaired_surrogate_is_named_by_its_path(porch_http: PorchHttp) -> None:
    wrapper = await setup_pipeline(porch_http)
    tasks = '[{"task_input": {"n": 1}}, {"pipeline": {"name": "p\\ud800"}, "task_input": {}}]'
    for body, field in (
        ('{"tasks": ' + tasks + "}", "tasks[1].pipeline.name"),
        # Its words, sent as an enum's value, are not taken for protobuf's.
        ('{"tasks": [{"status": "Unpaired surrogate at X.y"}]}', None),
    ):
        response = await porch_http.client.post(
            "/v1/pipelines/ptest/tasks:batchRegister", content=body, headers=wrapper
        )
        assert response.status_code == 400
        message = response.json()["message"]
        assert ("unpaired surrogate" in message) is (field is not None), message
        if field is not None:
            assert message.startswith(f"{field}: a string holds an unpaired surrogate"), message


async def test_a_num_tasks_of_thousands_of_digits_is_out_of_range(porch_http: PorchHttp) -> None:
    wrapper = await setup_pipeline(porch_http)
    claim = await porch_http.client.post(
        "/tasks/claim", params={"num_tasks": "1" * 5000}, json=PIPELINE, headers=wrapper
    )
    assert claim.status_code == 400
    assert "is not an integer from" in claim.json()["message"]


async def test_wrong_pipeline_and_bad_tokens(porch_http: PorchHttp) -> None:
    client, admin = porch_http.client, porch_http.admin
    wrapper = await setup_pipeline(porch_http)
    other = {"name": "other", "uri": "https://example.org/o", "version": "1"}
    await client.post("/pipelines", json=other, headers=admin)
    elsewhere = {"pipeline": other, "task_input": {"n": 1}}
    assert (await client.post("/tasks", json=elsewhere, headers=wrapper)).status_code == 403
    assert (await client.post("/tasks/claim", json=other, headers=wrapper)).status_code == 403
    update = {**elsewhere, "status": "RUNNING"}
    assert (await client.put("/tasks", json=update, headers=wrapper)).status_code == 403
    assert (await client.get("/tasks")).status_code == 401
    # npg_porch's tokens were 32 hex characters; an unknown one is refused as such.
    unknown = await client.get("/pipelines", headers=bearer("0123456789abcdef" * 2))
    assert unknown.status_code == 401
    # Errors keep porch's body; npg_porch clients look only at the status.
    missing = await client.get("/pipelines/nope", headers=admin)
    assert missing.status_code == 404
    assert missing.json() == {"code": 5, "message": "pipeline 'nope' not found", "details": []}


async def test_every_task_is_listed_beyond_one_page(porch_http: PorchHttp) -> None:
    client = porch_http.client
    wrapper = await setup_pipeline(porch_http)
    total = 1_234  # ListTasks pages hold 1000 by default
    batch = {"tasks": [{"task_input": {"n": n}} for n in range(total)]}
    registered = await client.post(
        "/v1/pipelines/ptest/tasks:batchRegister", json=batch, headers=wrapper
    )
    assert registered.status_code == 201
    listed = await client.get("/tasks", headers=wrapper)
    assert listed.status_code == 200
    assert [task["task_input"]["n"] for task in listed.json()] == list(range(total))
    pending = await client.get(
        "/tasks", params={"pipeline_name": "ptest", "status": "PENDING"}, headers=wrapper
    )
    assert len(pending.json()) == total
