"""A paginated answer whose response_body is a map field: every page's entries, in one object."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

import gateway

pytestmark = pytest.mark.asyncio

_FIELD = descriptor_pb2.FieldDescriptorProto


def _service() -> Any:
    """mapped.v1.Lister: List(page_token) -> things (a map) and next_page_token, at GET /things."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName("mapped.v1.Lister")
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/mapped/v1/lister.proto",
        package="mapped.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
    )
    request = file.message_type.add(name="ListRequest")
    request.field.add(name="page_token", number=1, type=_FIELD.TYPE_STRING)
    response = file.message_type.add(name="ListResponse")
    entry = response.nested_type.add(name="ThingsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=_FIELD.TYPE_STRING)
    entry.field.add(name="value", number=2, type=_FIELD.TYPE_STRING)
    response.field.add(
        name="things",
        number=1,
        type=_FIELD.TYPE_MESSAGE,
        label=_FIELD.LABEL_REPEATED,
        type_name=".mapped.v1.ListResponse.ThingsEntry",
    )
    response.field.add(name="next_page_token", number=2, type=_FIELD.TYPE_STRING)
    method = file.service.add(name="Lister").method.add(
        name="List", input_type=".mapped.v1.ListRequest", output_type=".mapped.v1.ListResponse"
    )
    rule = http_pb2.HttpRule(get="/things", response_body="things")
    method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    pool.Add(file)
    return pool.FindServiceByName("mapped.v1.Lister")


class _Pages:
    """An upstream answering List from fixed pages: token -> (entries, next token)."""

    def __init__(self, pages: dict[str, tuple[dict[str, str], str]]) -> None:
        self.pages = pages
        self.response = message_factory.GetMessageClass(
            _service().methods_by_name["List"].output_type
        )

    async def unary_call(self, method: Any, message: Message, *args: Any) -> Any:
        things, following = self.pages[message.page_token]  # type: ignore[attr-defined]
        response = self.response(things=things, next_page_token=following)
        return response, (), ()

    async def admit(self, *args: Any, **options: Any) -> None:
        pass

    def probe(self, *args: Any) -> None:
        return None

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("pages", "expected"),
    [
        ({"": ({"a": "1"}, "")}, {"a": "1"}),
        ({"": ({}, "")}, {}),
        ({"": ({}, "2"), "2": ({}, "")}, {}),
        (
            {"": ({"a": "1"}, "2"), "2": ({}, "3"), "3": ({"b": "2", "c": "3"}, "")},
            {"a": "1", "b": "2", "c": "3"},
        ),
    ],
)
async def test_every_page_of_a_map_is_one_object(
    pages: dict[str, tuple[dict[str, str], str]], expected: dict[str, str]
) -> None:
    options = gateway.GatewayOptions(services=(_service(),), target="unused:1")
    app = gateway.create_app(options, _Pages(pages))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/things")
    assert response.status_code == 200
    assert response.json() == expected
