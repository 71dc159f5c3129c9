"""Path templates and the route table, without a server."""

from __future__ import annotations

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

import gateway
from gateway import RouteTable, load_bindings, parse_template
from tests.gateway.conftest import ECHO_SERVICE, echo_options


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/v1/items", "/v1/items", {}),
        ("/v1/items", "/v1/items/", {}),
        ("/v1/items/{id}", "/v1/items/a%20b", {"id": "a b"}),
        ("/v1/items/{id}", "/v1/items/a%2Fb", {"id": "a/b"}),
        (
            "/v1/{name=shelves/*/books/*}",
            "/v1/shelves/s1/books/b%201",
            {"name": "shelves/s1/books/b 1"},
        ),
        ("/v1/{path=**}", "/v1/a/b%2Fc/d", {"path": "a/b%2Fc/d"}),
        ("/v1/{a.b.c}/x/{d}:go", "/v1/1/x/2:go", {"a.b.c": "1", "d": "2"}),
        ("/v1/*/{id}", "/v1/anything/7", {"id": "7"}),
    ],
)
def test_templates_match_and_decode(template: str, path: str, expected: dict[str, str]) -> None:
    assert parse_template(template).match(path) == expected


@pytest.mark.parametrize(
    ("template", "path"),
    [
        ("/v1/items/{id}", "/v1/items"),
        ("/v1/items/{id}", "/v1/items/a/b"),
        ("/v1/{name=shelves/*}", "/v1/books/x"),
        ("/v1/{id}:go", "/v1/x:stop"),
        ("/v1/items", "/v1/items//"),
    ],
)
def test_templates_reject(template: str, path: str) -> None:
    assert parse_template(template).match(path) is None


@pytest.mark.parametrize(
    "template",
    [
        "v1/items",
        "/v1//items",
        "/v1/{id",
        "/v1/{id}}",
        "/v1/{1d}",
        "/v1/{a}/{a}",
        "/v1/{x=a/{y}}",
        "/v1/x:",
    ],
)
def test_invalid_templates_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        parse_template(template)


def test_openapi_form_and_shape() -> None:
    template = parse_template("/v1/{task.pipeline.name=pipes/*}/tasks:claim")
    assert template.with_names(["pipeline"]) == "/v1/{pipeline}/tasks:claim"
    assert template.shape == "/v1/{}/tasks:claim"
    assert template.verb == "claim"


def test_the_most_specific_binding_wins() -> None:
    table = RouteTable(load_bindings([ECHO_SERVICE]))
    shout = table.resolve("POST", "/v1/echo/x:shout")
    assert shout is not None
    assert (shout.binding.operation_id, shout.variables) == ("EchoService_Echo3", {"text": "x"})
    plain = table.resolve("GET", "/v1/echo/x:shout")
    assert plain is not None
    assert plain.variables == {"text": "x:shout"}
    assert table.resolve("DELETE", "/v1/echo/x") is None
    assert table.allowed_methods("/v1/echo/x/details") == [
        "GET",
        "HEAD",
        "PUT",
    ]  # HEAD: a GET without its body
    assert table.allowed_methods("/nowhere") == []


def _service_with_rule(path: str, body: str = "") -> ServiceDescriptor:
    """A one-method service, in a pool of its own, bound by GET path."""
    pool = descriptor_pool.DescriptorPool()
    for dependency in (
        "google/protobuf/descriptor.proto",
        "google/api/http.proto",
        "google/api/annotations.proto",
    ):
        pool.AddSerializedFile(descriptor_pool.Default().FindFileByName(dependency).serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(name="bad.proto", package="bad", syntax="proto3")
    file.dependency.append("google/api/annotations.proto")
    message = file.message_type.add(name="Request")
    string, optional, repeated = descriptor_pb2.FieldDescriptorProto.TYPE_STRING, 1, 3
    message.field.add(name="id", number=1, type=string, label=optional)
    message.field.add(name="ids", number=2, type=string, label=repeated)
    method = file.service.add(name="Bad").method.add(
        name="Call", input_type=".bad.Request", output_type=".bad.Request"
    )
    rule = method.options.Extensions[annotations_pb2.http]
    rule.get, rule.body = path, body
    pool.Add(file)
    return pool.FindServiceByName("bad.Bad")


@pytest.mark.parametrize(
    ("path", "body", "problem"),
    [
        ("/v1/{nope}", "", "not a singular scalar field"),
        ("/v1/{ids}", "", "not a singular scalar field"),
        ("/v1/{id}", "nope", "not a field of the request"),
        ("/v1/{id", "", "unbalanced"),
    ],
)
def test_bad_rules_are_refused_at_load(path: str, body: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        load_bindings([_service_with_rule(path, body)])


def test_clashing_bindings_are_refused() -> None:
    bindings = load_bindings([ECHO_SERVICE])
    with pytest.raises(ValueError, match="bound by both"):
        RouteTable([*bindings, bindings[0]])


@pytest.mark.parametrize(
    ("method", "options", "problem"),
    [
        ("echo.v1.EchoService.Nope", gateway.MethodOptions(), "no such method"),
        ("echo.v1.EchoService.Count", gateway.MethodOptions(sse_id_field="nope"), "sse_id_field"),
        (
            "echo.v1.EchoService.Count",
            gateway.MethodOptions(last_event_id_field="x.y"),
            "last_event_id",
        ),
    ],
)
def test_method_options_must_name_what_exists(
    method: str, options: gateway.MethodOptions, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        gateway.create_app(echo_options("127.0.0.1:1", methods={method: options}))
