"""The OpenAPI document served by the gateway, generated from the echo descriptors."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, wrappers_pb2
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from gateway import DocumentOptions, build_openapi, openapi
from tests.gateway.conftest import DESCRIPTOR_SET, ECHO_SERVICE

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


def schemas(document: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = document["components"]["schemas"]
    return result


async def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    validate(document)


async def test_every_binding_is_an_operation_with_a_unique_id(document: dict[str, Any]) -> None:
    operations = [op for path in document["paths"].values() for op in path.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids)) == 17
    assert {
        "EchoService_Echo",
        "EchoService_Echo2",
        "EchoService_Echo9",
        "EchoService_ListItems2",
    } <= set(ids)


async def test_comments_become_summaries_and_descriptions(document: dict[str, Any]) -> None:
    echo = document["paths"]["/v1/echo"]["post"]
    assert echo["summary"] == "Echo a message."
    assert echo["description"].startswith("Echo a message.\n\nThe answer is the request")
    assert document["info"]["description"].startswith("Echoes its input")
    assert document["tags"] == [
        {"name": "EchoService", "description": document["info"]["description"]}
    ]
    message = schemas(document)["echo.v1.EchoMessage"]
    assert message["description"] == "Every kind of field a request can carry."
    assert message["properties"]["text"]["description"] == "The text to echo."


async def test_field_types(document: dict[str, Any]) -> None:
    properties = schemas(document)["echo.v1.EchoMessage"]["properties"]
    assert properties["int32_value"]["type"] == "integer"
    assert properties["int64_value"]["type"] == "string"
    assert properties["int64_value"]["format"] == "int64"
    assert properties["uint64_value"]["format"] == "uint64"
    assert properties["bool_value"]["type"] == "boolean"
    assert properties["bytes_value"]["format"] == "byte"
    assert properties["color"]["$ref"] == "#/components/schemas/echo.v1.Color"
    assert properties["tags"]["items"] == {"type": "string"}
    assert properties["inner"]["$ref"] == "#/components/schemas/echo.v1.Inner"
    assert properties["when"]["format"] == "date-time"
    assert properties["wait"]["type"] == "string"
    assert properties["data"]["type"] == "object"
    assert properties["wrapped"]["type"] == "integer"
    assert properties["labels"]["additionalProperties"] == {"type": "string"}
    assert properties["mask"]["type"] == "string"


async def test_enums_are_strings_with_documented_values(document: dict[str, Any]) -> None:
    color = schemas(document)["echo.v1.Color"]
    assert color["type"] == "string"
    assert color["enum"] == ["COLOR_UNSPECIFIED", "RED", "GREEN", "BLUE"]
    assert "- `RED`: Red." in color["description"]
    alias = schemas(document)["ColorEnum"]
    assert alias["enum"] == ["RED", "GREEN", "BLUE"]
    assert "COLOR_UNSPECIFIED" not in alias["description"]


async def test_field_behavior_sets_required_and_read_only(document: dict[str, Any]) -> None:
    message = schemas(document)["echo.v1.EchoMessage"]
    assert message["required"] == ["text"]
    assert message["properties"]["metadata"]["readOnly"] is True
    thing = schemas(document)["echo.v1.Thing"]
    assert thing["required"] == ["name"]
    assert thing["properties"]["serial"]["readOnly"] is True
    assert thing["properties"]["create_time"]["readOnly"] is True


async def test_parameters_are_typed(document: dict[str, Any]) -> None:
    get_echo = document["paths"]["/v1/echo/{text}"]["get"]
    parameters = {p["name"]: p for p in get_echo["parameters"]}
    assert parameters["text"]["in"] == "path"
    assert parameters["text"]["required"] is True
    assert parameters["int32_value"]["schema"]["format"] == "int32"
    # The zero value reads as none given, and the transcoder refuses it.
    color = parameters["color"]["schema"]
    assert (color["type"], color["enum"]) == ("string", ["RED", "GREEN", "BLUE"])
    # Each value offered keeps its comment; the one not offered is not named.
    assert "- `RED`: Red." in color["description"]
    assert "COLOR_UNSPECIFIED" not in color["description"]
    assert parameters["tags"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert parameters["tags"]["explode"] is True
    assert parameters["inner.child.label"]["in"] == "query"
    assert parameters["when"]["schema"]["format"] == "date-time"
    assert "data" not in parameters
    assert "labels" not in parameters
    assert "metadata" not in parameters  # a map
    fail = document["paths"]["/v1/fail/{code}"]["get"]["parameters"][0]
    assert fail["schema"] == {"$ref": "#/components/schemas/google.rpc.Code"}


async def test_paths_shared_by_bindings_use_one_set_of_names(document: dict[str, Any]) -> None:
    details = document["paths"]["/v1/echo/{text}/details"]
    assert set(details) == {"get", "put"}
    put_path = next(p for p in details["put"]["parameters"] if p["in"] == "path")
    assert put_path["name"] == "text"
    assert "Sets `inner.label`." in put_path["description"]
    assert "/v1/{text}" in document["paths"]
    pattern = document["paths"]["/v1/{text}"]["get"]["parameters"][0]
    assert pattern["schema"]["pattern"] == "^texts/[^/]+$"
    # A client would send texts%2Fx, which matches no route.
    slashes = "Its slashes go in the path as they are: `%2F` is not read as `/`."
    assert slashes in pattern["description"]
    files = document["paths"]["/v1/files/{text}:read"]["get"]["parameters"][0]
    assert slashes in files["description"]
    assert slashes not in put_path["description"]


async def test_request_bodies(document: dict[str, Any]) -> None:
    star = document["paths"]["/v1/echo"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert star == {"$ref": "#/components/schemas/echo.v1.EchoMessage"}
    # A body that must hold a field (EchoMessage's text) is required; one
    # whose required fields the path gives is not.
    assert document["paths"]["/v1/echo"]["post"]["requestBody"]["required"] is True
    shout_body = document["paths"]["/v1/echo/{text}:shout"]["post"]["requestBody"]
    shout = shout_body["content"]
    assert "text" not in shout["application/json"]["schema"]["properties"]
    assert "required" not in shout["application/json"]["schema"]
    assert shout_body["required"] is False
    field = document["paths"]["/v1/things"]["post"]["requestBody"]
    assert field["required"] is True
    assert field["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/echo.v1.Thing"
    }
    assert "requestBody" not in document["paths"]["/v1/echo/{text}"]["get"]


async def test_responses(document: dict[str, Any]) -> None:
    things = document["paths"]["/v1/things"]["post"]["responses"]
    assert set(things) == {"200", "201", "default"}
    error = things["default"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/google.rpc.Status"}
    status = schemas(document)["google.rpc.Status"]
    assert set(status["properties"]) == {"code", "message", "details"}
    items = document["paths"]["/items"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]
    assert items == {"type": "array", "items": {"$ref": "#/components/schemas/echo.v1.Item"}}


async def test_streams_are_documented_as_ndjson_and_sse(document: dict[str, Any]) -> None:
    count = document["paths"]["/v1/count"]["get"]
    content = count["responses"]["200"]["content"]
    assert set(content) == {"application/x-ndjson", "text/event-stream"}
    line = content["application/x-ndjson"]["schema"]
    assert line["properties"]["result"] == {"$ref": "#/components/schemas/echo.v1.Tick"}
    header = next(p for p in count["parameters"] if p["in"] == "header")
    assert header["name"] == "Last-Event-ID"


async def test_bearer_security_applies_everywhere(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A bearer token.",
    }
    assert document["security"] == [{"bearer": []}]


async def test_field_schemas_add_the_servers_limits_wherever_the_field_appears() -> None:
    limits = {
        "echo.v1.EchoMessage.text": {"maxLength": 10},
        "echo.v1.EchoMessage.int32_value": {"minimum": 0},
        "echo.v1.EchoMessage.tags": {"maxItems": 3},
    }
    document = build_openapi(
        [ECHO_SERVICE],
        DocumentOptions(descriptor_sets=(DESCRIPTOR_SET,), field_schemas=limits),
    )
    validate(document)
    message = schemas(document)["echo.v1.EchoMessage"]["properties"]
    assert message["text"]["maxLength"] == 10 and message["text"]["type"] == "string"
    assert message["text"]["description"]  # the comment stays
    assert message["int32_value"]["minimum"] == 0  # replaces int32's own bound
    assert message["int32_value"]["maximum"] == 2**31 - 1
    assert message["tags"] == {**message["tags"], "type": "array", "maxItems": 3}
    parameters = {p["name"]: p for p in document["paths"]["/v1/echo/{text}"]["get"]["parameters"]}
    assert parameters["text"]["in"] == "path" and parameters["text"]["schema"]["maxLength"] == 10
    assert parameters["int32_value"]["schema"]["minimum"] == 0
    assert parameters["tags"]["schema"]["maxItems"] == 3
    untouched = build_openapi([ECHO_SERVICE], DocumentOptions(descriptor_sets=(DESCRIPTOR_SET,)))
    assert "maxLength" not in schemas(untouched)["echo.v1.EchoMessage"]["properties"]["text"]


async def test_a_body_need_not_hold_what_its_path_gives() -> None:
    # What the server needs of a message field, stated where a request holds it.
    limits = {"echo.v1.EchoMessage.inner": {"required": ["label", "count"]}}
    document = build_openapi(
        [ECHO_SERVICE],
        DocumentOptions(descriptor_sets=(DESCRIPTOR_SET,), field_schemas=limits),
    )
    validate(document)
    whole = schemas(document)["echo.v1.EchoMessage"]["properties"]["inner"]
    assert whole["required"] == ["label", "count"]
    details = document["paths"]["/v1/echo/{text}/details"]["put"]["requestBody"]
    body = details["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/echo.v1.Inner"
    assert body["required"] == ["count"]  # the path gives inner.label


async def test_route_parameters_constrain_one_route_only() -> None:
    routes = {"GET /v1/echo/{text}": {"color": {"enum": ["RED"]}, "text": {"maxLength": 3}}}
    document = build_openapi(
        [ECHO_SERVICE],
        DocumentOptions(descriptor_sets=(DESCRIPTOR_SET,), route_parameters=routes),
    )
    validate(document)

    def parameters(path: str) -> dict[str, Any]:
        return {p["name"]: p["schema"] for p in document["paths"][path]["get"]["parameters"]}

    constrained = parameters("/v1/echo/{text}")
    assert constrained["color"]["enum"] == ["RED"] and constrained["text"]["maxLength"] == 3
    assert constrained["color"]["type"] == "string"
    other = parameters("/v1/echo/{text}/details")
    assert other["color"]["enum"] == ["RED", "GREEN", "BLUE"] and "maxLength" not in other["text"]
    for wrong, named in (
        ({"GET /v1/nowhere": {"color": {}}}, "GET /v1/nowhere: no such route"),
        ({"GET /v1/echo/{text}": {"hue": {}}}, "GET /v1/echo/{text}: no parameter hue"),
    ):
        options = DocumentOptions(descriptor_sets=(DESCRIPTOR_SET,), route_parameters=wrong)
        with pytest.raises(ValueError, match=re.escape(named)):
            build_openapi([ECHO_SERVICE], options)


def _pool_with_annotations() -> descriptor_pool.DescriptorPool:
    """A pool of its own with google.api's annotations and a few well-known types."""
    pool = descriptor_pool.DescriptorPool()
    for module in (descriptor_pb2, http_pb2, annotations_pb2, empty_pb2, wrappers_pb2):
        known = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(known)
        pool.Add(known)
    return pool


async def test_a_whole_body_of_a_well_known_type_is_described() -> None:
    # A request with no schema of its own in the document, as the body.
    pool = _pool_with_annotations()
    file = descriptor_pb2.FileDescriptorProto(
        name="ping/v1/ping.proto",
        package="ping.v1",
        syntax="proto3",
        dependency=[
            "google/api/annotations.proto",
            "google/protobuf/empty.proto",
            "google/protobuf/wrappers.proto",
        ],
    )
    service = file.service.add(name="PingService")
    for name, request, path in (
        ("Ping", "Empty", "/v1/ping"),
        ("Say", "StringValue", "/v1/say/{value}"),  # the body less what the path gives
    ):
        method = service.method.add(
            name=name,
            input_type=f".google.protobuf.{request}",
            output_type=".google.protobuf.Empty",
        )
        rule = method.options.Extensions[annotations_pb2.http]
        rule.post, rule.body = path, "*"
    pool.Add(file)
    document = build_openapi([pool.FindServiceByName("ping.v1.PingService")])
    assert document["paths"]["/v1/ping"]["post"]["requestBody"]["required"] is False
    assert document["paths"]["/v1/say/{value}"]["post"]["requestBody"]["required"] is False


async def test_a_custom_method_openapi_has_no_operation_for_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Under its own key, "list", it made the whole document invalid.
    pool = _pool_with_annotations()
    file = descriptor_pb2.FileDescriptorProto(
        name="odd/v1/odd.proto",
        package="odd.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto", "google/protobuf/empty.proto"],
    )
    service = file.service.add(name="OddService")
    for name, kind in (("Listing", "LIST"), ("Patching", "PATCH")):
        method = service.method.add(
            name=name, input_type=".google.protobuf.Empty", output_type=".google.protobuf.Empty"
        )
        rule = method.options.Extensions[annotations_pb2.http]
        rule.custom.kind, rule.custom.path = kind, f"/v1/{name.lower()}"
    pool.Add(file)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        document = build_openapi([pool.FindServiceByName("odd.v1.OddService")])
    assert list(document["paths"]) == ["/v1/patching"]  # a custom rule of a known method is kept
    assert list(document["paths"]["/v1/patching"]) == ["patch"]
    validate(document)
    assert caplog.messages == [
        "LIST /v1/listing of odd.v1.OddService.Listing is not documented: OpenAPI has no"
        " operation for that method"
    ]


async def test_a_path_through_a_required_message_field_frees_a_body_of_it() -> None:
    # Outer { Mid mid [REQUIRED] }, Mid { Leaf leaf [REQUIRED]; string other },
    # Leaf { string x }: a path {mid.leaf.x} gives mid.leaf, so a body need
    # hold neither mid nor, within it, leaf.
    builder = openapi._Builder(DocumentOptions(), {})
    builder.schemas = {
        "Mid": {
            "type": "object",
            "properties": {
                "leaf": {"$ref": "#/components/schemas/Leaf"},
                "other": {"type": "string"},
            },
            "required": ["leaf"],
        },
        "Leaf": {"type": "object", "properties": {"x": {"type": "string"}}},
    }
    mid = builder._cut({"$ref": "#/components/schemas/Mid"}, {("leaf", "x")})
    bodies = Draft202012Validator({**mid, "components": {"schemas": builder.schemas}})
    assert bodies.is_valid({"other": "o"})
    assert not bodies.is_valid({"leaf": {"x": 7}})
    # What a field's schema says beside a reference adds to the message's.
    beside = {"$ref": "#/components/schemas/Mid", "properties": {"other": {"maxLength": 1}}}
    cut = builder._cut(beside, {("leaf",)})
    assert cut["properties"] == {"other": {"type": "string", "maxLength": 1}}
    assert "required" not in cut
