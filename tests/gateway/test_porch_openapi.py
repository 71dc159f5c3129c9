"""porch's OpenAPI document, built from its descriptors as the porch server builds it."""

from __future__ import annotations

from importlib import resources
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

import gateway
from porch_server import web
from porch_stubs.v1 import porch_pb2

STATES = ["PENDING", "CLAIMED", "RUNNING", "DONE", "FAILED", "CANCELLED"]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    descriptor_set = resources.files("porch_stubs.v1").joinpath("porch.binpb").read_bytes()
    options = gateway.DocumentOptions(
        title="porch",
        version="1",
        descriptor_sets=(descriptor_set,),
        # npg_porch_client validates statuses against this list: STATE_UNSPECIFIED
        # is never stored and no client may send it, so the alias leaves it out.
        aliases=(
            gateway.SchemaAlias("TaskStateEnum", "porch.v1.Task.State", omit_zero_enum_value=True),
        ),
    )
    return gateway.build_openapi([porch_pb2.DESCRIPTOR.services_by_name["PorchService"]], options)


def test_document_is_valid(document: dict[str, Any]) -> None:
    validate(document)


def test_the_served_claims_body_checks_the_pipelines_fields_the_path_does_not_give() -> None:
    served = web.openapi_document()
    claim = served["paths"]["/v1/pipelines/{pipeline_name}/tasks:claim"]["post"]
    schema = claim["requestBody"]["content"]["application/json"]["schema"]
    bodies = Draft202012Validator({**schema, "components": served["components"]})
    assert bodies.is_valid({"pipeline": {"uri": "u"}})
    assert not bodies.is_valid({"pipeline": {"uri": 7}})


def test_task_state_enum_for_npg_porch_client(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["TaskStateEnum"]["type"] == "string"
    assert schemas["TaskStateEnum"]["enum"] == STATES
    # Responses can still carry the zero value (e.g. an event's old status).
    assert schemas["porch.v1.Task.State"]["enum"] == ["STATE_UNSPECIFIED", *STATES]


def test_npg_porch_routes_are_operations(document: dict[str, Any]) -> None:
    paths = document["paths"]
    expected = {
        "/pipelines": {"get", "post"},
        "/pipelines/{name}": {"get"},
        "/pipelines/{pipeline_name}/token/{description}": {"post"},
        "/tasks": {"get", "post", "put"},
        "/tasks/claim": {"post"},
    }
    for path, methods in expected.items():
        assert set(paths[path]) == methods, path
    tasks = paths["/tasks"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert tasks == {"type": "array", "items": {"$ref": "#/components/schemas/porch.v1.Task"}}
    status = next(p for p in paths["/tasks"]["get"]["parameters"] if p["name"] == "status")
    # The zero value reads as no filter, and is refused: not offered.
    assert (status["schema"]["type"], status["schema"]["enum"]) == ("string", STATES)
    assert "- `RUNNING`: Reported as running by its wrapper." in status["schema"]["description"]


def test_a_route_that_always_creates_documents_only_201() -> None:
    paths = web.openapi_document()["paths"]  # as porch serves it
    for path in ("/v1/pipelines", "/pipelines", "/v1/tokens"):
        assert set(paths[path]["post"]["responses"]) == {"201", "default"}, path
    registered = paths["/v1/pipelines/{pipeline_name}/tasks"]["post"]["responses"]
    assert set(registered) == {"200", "201", "default"}  # 200: the task was there already


def test_comments_and_field_behaviour(document: dict[str, Any]) -> None:
    claim = document["paths"]["/tasks/claim"]["post"]
    assert claim["summary"] == "Claim up to `num_tasks` PENDING tasks of a pipeline, oldest first."
    task = document["components"]["schemas"]["porch.v1.Task"]
    # The path or a batch names the pipeline over HTTP: a task need not.
    assert "required" not in task
    pipeline = document["components"]["schemas"]["porch.v1.Pipeline"]
    assert pipeline["required"] == ["name"]
    claimed = document["paths"]["/v1/pipelines/{pipeline_name}/tasks:claim"]["post"]
    [name] = claimed["parameters"]
    assert (name["name"], name["in"]) == ("pipeline_name", "path")
    assert "Sets `pipeline.name`." in name["description"]
    body = claimed["requestBody"]["content"]["application/json"]["schema"]
    assert "required" not in body and "pipeline" in body["properties"]
    # The path gives pipeline.name: a body's pipeline need not, and the
    # body of npg_porch's claim, whose path does not, must.
    bodies = Draft202012Validator({**body, "components": document["components"]})
    assert bodies.is_valid({"num_tasks": 2, "pipeline": {"uri": "u"}})
    assert not bodies.is_valid({"pipeline": {"uri": 7}})
    # So too where the path gives task.pipeline.name, a level deeper.
    for path, method, body_json in (
        ("/v1/pipelines/{pipeline_name}/tasks", "post", {"pipeline": {"uri": "u"}}),
        (
            "/v1/pipelines/{pipeline_name}/tasks/{task_input_id}",
            "patch",
            {"task": {"pipeline": {"uri": "u"}, "status": "DONE"}},
        ),
    ):
        content = document["paths"][path][method]["requestBody"]["content"]["application/json"]
        deeper = Draft202012Validator({**content["schema"], "components": document["components"]})
        assert deeper.is_valid(body_json), path
        assert not deeper.is_valid({"task": {"pipeline": {"uri": 7}}, "pipeline": {"uri": 7}})
    npg = document["paths"]["/tasks/claim"]["post"]["requestBody"]["content"]["application/json"]
    npg_bodies = Draft202012Validator({**npg["schema"], "components": document["components"]})
    assert not npg_bodies.is_valid({"uri": "u"})
    assert npg_bodies.is_valid({"name": "p", "uri": "u"})
    assert task["properties"]["create_time"]["readOnly"] is True
    assert task["properties"]["create_time"]["format"] == "date-time"
    assert "SHA-256" in task["properties"]["task_input_id"]["description"]
    watch = document["paths"]["/v1/events:watch"]["get"]["responses"]["200"]["content"]
    assert set(watch) == {"application/x-ndjson", "text/event-stream"}
