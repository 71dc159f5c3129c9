"""HttpRule bindings, request building, JSON output and errors, over HTTP."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import re
import statistics
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

import gateway
from gateway import app as gateway_app
from gateway.upstream import CUT_SHORT, UNREACHABLE
from tests.gateway.conftest import (
    FAILING_TOTAL,
    LOOPING_TOTAL,
    MAX_BODY,
    UPSTREAMS,
    Backend,
    EchoServicer,
    EchoState,
    Live,
    echo_app,
    echo_options,
    unused_target,
)
from tests.gateway.testproto import echo_pb2_grpc

pytestmark = pytest.mark.asyncio

ECHO_DEFAULTS = {
    "text": "",
    "int32_value": 0,
    "int64_value": "0",
    "uint32_value": 0,
    "uint64_value": "0",
    "double_value": 0.0,
    "float_value": 0.0,
    "bool_value": False,
    "bytes_value": "",
    "color": "COLOR_UNSPECIFIED",
    "tags": [],
    "colors": [],
    "numbers": [],
    "labels": {},
    "metadata": {},
}


async def test_body_star_prints_every_field_without_presence(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/echo", json={"text": "hi"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    # Message fields and `optional` scalars have presence: unset, they stay absent.
    assert response.json() == {**ECHO_DEFAULTS, "text": "hi"}


async def test_body_accepts_snake_and_camel_case_and_prints_int64_as_strings(
    client: httpx.AsyncClient,
) -> None:
    body = {
        "text": "all",
        "int32Value": -5,
        "int64_value": "9007199254740993",
        "uint64Value": 18446744073709551615,
        "doubleValue": "NaN",
        "bool_value": True,
        "bytes_value": base64.b64encode(b"\x00\xff").decode(),
        "color": "GREEN",
        "colors": ["RED", 3],
        "inner": {"label": "in", "count": 7, "child": {"label": "deeper"}},
        "maybe": 0,
        "when": "2024-05-06T07:08:09.5+01:00",
        "wait": "1.5s",
        "data": {"k": [1, "two", None, True]},
        "wrapped": 12,
        "labels": {"a": "b"},
        "mask": "inner.label,int32Value",
    }
    response = await client.post("/v1/echo", json=body)
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["int32_value"] == -5
    assert echoed["int64_value"] == "9007199254740993"
    assert echoed["uint64_value"] == "18446744073709551615"
    assert echoed["double_value"] == "NaN"
    assert echoed["bytes_value"] == "AP8="
    assert echoed["colors"] == ["RED", "BLUE"]
    assert echoed["inner"] == {
        "label": "in",
        "count": "7",
        "color": "COLOR_UNSPECIFIED",
        "child": {"label": "deeper", "count": "0", "color": "COLOR_UNSPECIFIED"},
    }
    assert echoed["maybe"] == 0
    assert echoed["when"] == "2024-05-06T06:08:09.500Z"
    assert echoed["wait"] == "1.500s"
    assert echoed["data"] == {"k": [1.0, "two", None, True]}
    assert echoed["wrapped"] == 12
    assert echoed["labels"] == {"a": "b"}
    assert echoed["mask"] == "inner.label,int32Value"


async def test_query_parameters_are_typed_by_field(client: httpx.AsyncClient) -> None:
    params = [
        ("int32_value", "-2"),
        ("int64_value", "-9007199254740993"),
        ("uint32_value", "4294967295"),
        ("uint64_value", "18446744073709551615"),
        ("double_value", "2.5"),
        ("float_value", "-0.5"),
        ("bool_value", "true"),
        ("bytes_value", "AP8"),
        ("color", "BLUE"),
        ("tags", "a"),
        ("tags", "b"),
        ("colors", "RED"),
        ("colors", "2"),
        ("numbers", "1"),
        ("numbers", "-1"),
        ("inner.label", "nested"),
        ("inner.count", "3"),
        ("inner.color", "1"),
        ("inner.child.label", "deep"),
        ("maybe", "0"),
        ("when", "2024-01-01T00:00:00Z"),
        ("wait", "3s"),
        ("wrapped", "-4"),
        ("mask", "a,b.c"),
    ]
    response = await client.get("/v1/echo/query", params=params)
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["text"] == "query"
    assert (echoed["int32_value"], echoed["int64_value"]) == (-2, "-9007199254740993")
    assert (echoed["uint32_value"], echoed["uint64_value"]) == (4294967295, "18446744073709551615")
    assert (echoed["double_value"], echoed["float_value"], echoed["bool_value"]) == (
        2.5,
        -0.5,
        True,
    )
    assert echoed["bytes_value"] == "AP8="
    assert echoed["color"] == "BLUE"
    assert (echoed["tags"], echoed["colors"], echoed["numbers"]) == (
        ["a", "b"],
        ["RED", "GREEN"],
        [1, -1],
    )
    assert echoed["inner"]["label"] == "nested"
    assert echoed["inner"]["count"] == "3"
    assert echoed["inner"]["color"] == "RED"
    assert echoed["inner"]["child"]["label"] == "deep"
    assert echoed["maybe"] == 0
    assert (echoed["when"], echoed["wait"], echoed["wrapped"], echoed["mask"]) == (
        "2024-01-01T00:00:00Z",
        "3s",
        -4,
        "a,b.c",
    )


@pytest.mark.parametrize(
    ("param", "value", "said"),
    [
        # Numbers the field would hold as another: infinity, or 0.
        ("double_value", "1e400", "'1e400' is out of range for a double"),
        ("float_value", "3.5e38", "'3.5e38' is out of range for a float"),
        ("double_value", "1e-400", "'1e-400' is too small for a double, which would hold it as 0"),
        ("float_value", "1e-50", "'1e-50' is too small for a float, which would hold it as 0"),
        # Python's forms that are no number's text elsewhere.
        ("double_value", "1_000", "'1_000' is not a number"),
        ("double_value", " 5 ", "' 5 ' is not a number"),
        ("double_value", "\uff11\uff12", "'\uff11\uff12' is not a number"),
        ("double_value", "--inf", "'--inf' is not a number"),
    ],
)
async def test_a_float_query_parameter_is_a_number_the_field_holds(
    client: httpx.AsyncClient, param: str, value: str, said: str
) -> None:
    response = await client.get("/v1/echo/x", params={param: value})
    assert response.status_code == 400, response.text
    assert response.json()["message"] == f"invalid query parameter {param!r}: {said}"
    # The same text in a body's string, as protobuf's JSON allows a number.
    quoted_value = json.dumps(value, ensure_ascii=False)
    why = said.split("'", 2)[2]  # after the value the query's message quotes
    response = await client.post("/v1/echo", json={"text": "x", param: value})
    assert response.status_code == 400, response.text
    assert response.json()["message"] == f"{param}: {quoted_value}{why}"


async def test_a_float_in_a_body_is_a_number_the_field_holds(client: httpx.AsyncClient) -> None:
    # json_format read 1e-50 into a float as 0, and true as 1.
    for body, said in (
        ('{"text": "x", "float_value": 1e-50}', "float_value: 1e-50 is too small for a float"),
        ('{"text": "x", "double_value": true}', "double_value: expected a number, got true"),
    ):
        response = await client.post("/v1/echo", content=body)
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith(said), response.text


async def test_a_field_mask_in_the_query_that_is_not_one_says_its_form(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/echo/x", params={"mask": "inner.label,int32_value"})
    assert response.status_code == 400
    assert response.json()["message"] == (
        "invalid query parameter 'mask': 'inner.label,int32_value' is not a"
        " google.protobuf.FieldMask (its JSON form: paths in lowerCamelCase, comma-separated,"
        " as fooBar,inner.label)"
    )


@pytest.mark.parametrize(
    ("param", "value", "echoed"),
    [
        ("double_value", "NaN", "NaN"),
        ("double_value", "-Infinity", "-Infinity"),
        ("double_value", "inf", "Infinity"),
        ("double_value", ".5", 0.5),
        ("double_value", "+2e3", 2000),
        ("double_value", "5e-324", 5e-324),
        ("double_value", "-0", 0),
        # The largest float as the gateway writes it reads back.
        ("float_value", "3.4028235e+38", 3.4028235e38),
    ],
)
async def test_a_float_query_parameter_in_the_forms_it_may_take(
    client: httpx.AsyncClient, param: str, value: str, echoed: object
) -> None:
    response = await client.get("/v1/echo/x", params={param: value})
    assert response.status_code == 200, response.text
    assert response.json()[param] == echoed


@pytest.mark.parametrize(
    ("param", "value", "named"),
    [
        ("int32_value", "1.5", "int32_value"),
        ("int32_value", "2147483648", "int32_value"),
        ("uint32_value", "-1", "uint32_value"),
        ("bool_value", "yes", "bool_value"),
        ("color", "PURPLE", "color"),
        ("color", "9", "color"),
        ("double_value", "many", "double_value"),
        ("bytes_value", "!!", "bytes_value"),
        ("when", "yesterday", "when"),
        ("nope", "1", "nope"),
        ("inner.nope", "1", "inner.nope"),
        ("text.deeper", "1", "text.deeper"),
        ("inner", "x", "inner"),
        ("labels", "x", "labels"),
    ],
)
async def test_bad_query_parameter_is_400_naming_it(
    client: httpx.AsyncClient, param: str, value: str, named: str
) -> None:
    response = await client.get("/v1/echo/x", params={param: value})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    assert named in body["message"]
    assert body["details"] == []


async def test_an_error_quotes_at_most_64_characters_of_a_value_sent(
    client: httpx.AsyncClient,
) -> None:
    long = "9" * 5_000
    shown = "9" * 64 + "…"
    refused = [
        await client.get("/v1/echo/query", params={"int32_value": long}),
        await client.get("/v1/echo/query", params={"color": long}),
        await client.get("/v1/echo/query", params={"bool_value": long}),
        await client.get("/v1/echo/query", params={"double_value": long + "x"}),
        await client.get("/v1/echo/query", params={"bytes_value": long + "!"}),
        await client.get("/v1/echo/query", params={"wait": long + "s"}),
        await client.get("/v1/echo/query", params={"when": long}),
        await client.get("/v1/echo/query", params={long: "1"}),
        await client.get(f"/v1/echo/query?int32_value=1&{long}=1&{long}=2"),
        await client.post("/v1/echo/from-path:shout", json={"text": long}),
        await client.post("/v1/echo", content=f'{{"{long}": 1, "{long}": 2}}'.encode()),
        # protobuf's own words for a field mask and a wrapper, which quote them whole
        await client.post("/v1/echo", json={"mask": "a_" + long}),
        await client.post("/v1/echo", json={"wrapped": long[:100] + "Q"}),
    ]
    for response in refused:
        message = response.json()["message"]
        assert response.status_code == 400 and len(message) < 300, message
        assert long[:100] not in message and ("9" * 40 + "…") in message, message
    # A value protobuf's words give whole and out of quotes, with spaces: the message is cut.
    spaced = await client.post("/v1/echo", json={"mask": ("A_" + "9" * 62 + " ") * 100})
    message = spaced.json()["message"]
    assert len(message) < 1100, message
    assert re.search(r"… \(cut: the message was 6,[0-9]{3} characters\)$", message), message
    # A number of seconds a Duration cannot hold, in a query parameter, as in a body.
    message = refused[5].json()["message"]
    assert message.startswith("invalid query parameter 'wait': a duration is at most"), message
    message = refused[0].json()["message"]
    assert message == f"invalid query parameter 'int32_value': '{shown}' is not an integer" + (
        " from -2147483648 to 2147483647"
    )


async def test_path_variable_is_percent_decoded(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/echo/a%2Fb%20c%3Ad")
    assert response.json()["text"] == "a/b c:d"


async def test_verb_and_path_fill_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/echo/from-path:shout", json={"int32_value": 3})
    assert response.status_code == 200
    assert (response.json()["text"], response.json()["int32_value"]) == ("from-path", 3)
    same = await client.post("/v1/echo/from-path:shout", json={"text": "from-path"})
    assert same.status_code == 200


async def test_a_body_that_contradicts_the_path_is_refused(client: httpx.AsyncClient) -> None:
    # Which was meant? Not the path's silently.
    response = await client.post("/v1/echo/from-path:shout", json={"text": "from-body"})
    assert response.status_code == 400
    assert response.json()["message"] == (
        "text is 'from-body' in the request but 'from-path' in the path"
    )


async def test_an_enum_value_not_offered_names_the_others(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/echo/query", params={"color": "PUCE"})
    assert response.status_code == 400
    message = response.json()["message"]
    assert "is not one of RED" in message and "UNSPECIFIED" not in message


async def test_a_key_given_twice_in_a_body_is_refused(client: httpx.AsyncClient) -> None:
    body = b'{"int32_value": 1, "inner": {"label": "a", "label": "b"}}'
    response = await client.post("/v1/echo", content=body)
    assert response.status_code == 400
    assert response.json()["message"] == "the request body names 'label' twice in one object"
    # A field by its name and by its JSON name: json_format kept the last.
    for body, said in (
        (
            b'{"text": "x", "int32_value": 1, "int32Value": 2}',
            'the body gives the field int32_value twice, as "int32_value" and as "int32Value"',
        ),
        (
            b'{"text": "x", "choiceInner": {"count": 1}, "choice_inner": null}',
            'the body gives the field choice_inner twice, as "choiceInner" and as "choice_inner"',
        ),
    ):
        response = await client.post("/v1/echo", content=body)
        assert response.status_code == 400, body
        assert response.json()["message"] == said
    response = await client.post("/v1/echo", content=b'{"text": "x", "int32Value": 2}')
    assert response.json()["int32_value"] == 2


async def test_a_singular_query_parameter_given_twice_is_refused(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/echo/query?int32_value=1&int32_value=2")
    assert response.status_code == 400
    assert response.json()["message"] == "query parameter 'int32_value' is given more than once"
    # Its JSON name names it too.
    response = await client.get("/v1/echo/query?int32_value=1&int32Value=2")
    assert response.status_code == 400
    assert response.json()["message"] == "query parameter 'int32Value' is given more than once"


async def test_query_parameters_are_read_by_json_name_too(client: httpx.AsyncClient) -> None:
    # As the body's fields are: grpc-gateway's clients send either.
    params = [("int32Value", "-2"), ("inner.child.label", "deep"), ("uint64Value", "7")]
    response = await client.get("/v1/echo/query", params=params)
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert (echoed["int32_value"], echoed["uint64_value"]) == (-2, "7")
    assert echoed["inner"]["child"]["label"] == "deep"
    unknown = await client.get("/v1/echo/query", params=[("int32value", "1")])
    assert unknown.status_code == 400
    assert unknown.json()["message"] == "unknown query parameter 'int32value': no such field"


async def test_two_authorizations_are_refused(client: httpx.AsyncClient) -> None:
    both = [(b"authorization", b"Bearer a"), (b"grpc-metadata-authorization", b"Bearer b")]
    response = await client.get("/v1/echo/x", headers=both)
    assert response.status_code == 401
    assert response.json()["message"] == "malformed authorization: given more than once"


async def test_body_field_with_nested_path_variable(client: httpx.AsyncClient) -> None:
    response = await client.put(
        "/v1/echo/from-path/details", json={"count": "5"}, params={"text": "t"}
    )
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["inner"]["label"] == "from-path"
    assert echoed["inner"]["count"] == "5"
    assert echoed["text"] == "t"
    other = await client.put("/v1/echo/from-path/details", json={"label": "from-body"})
    assert other.status_code == 400
    assert "inner.label is 'from-body' in the request but 'from-path'" in other.json()["message"]


async def test_query_parameter_cannot_set_a_body_field(client: httpx.AsyncClient) -> None:
    response = await client.put("/v1/echo/x/details", json={}, params={"inner.count": "1"})
    assert response.status_code == 400
    assert "inner.count" in response.json()["message"]


async def test_response_body_selects_a_message_field(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/echo/x/details", params={"inner.label": "y"})
    assert response.json() == {"label": "y", "count": "0", "color": "COLOR_UNSPECIFIED"}


async def test_repeated_body_field_and_repeated_response_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/echo/x/tags", json=["a", "b"])
    assert response.status_code == 200
    assert response.json() == ["a", "b"]


async def test_pattern_variables(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/texts/abc")).json()["text"] == "texts/abc"
    assert (await client.get("/v1/files/a/b/c.txt:read")).json()["text"] == "a/b/c.txt"
    # A multi-segment value keeps an encoded slash encoded.
    assert (await client.get("/v1/files/a%2Fb/c:read")).json()["text"] == "a%2Fb/c"
    assert (await client.get("/v1/others/abc")).status_code == 404
    assert (await client.get("/v1/texts/a/b")).status_code == 404


async def test_nested_path_variables_are_typed(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/deep/leaf/42")
    assert response.json()["inner"]["child"]["label"] == "leaf"
    assert response.json()["inner"]["count"] == "42"
    response = await client.get("/v1/deep/leaf/many")
    assert response.status_code == 400
    assert "inner.count" in response.json()["message"]


@pytest.mark.parametrize("path", ["/v1/echo/x/", "/v1/texts/abc/", "/v1/files/a:read/", "/items/"])
async def test_trailing_slash_is_tolerated(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.get(path)).status_code == 200


async def test_x_http_code_metadata_sets_the_status(client: httpx.AsyncClient) -> None:
    first = await client.post("/v1/things", json={"name": "a"})
    assert first.status_code == 201
    assert first.json()["serial"] == "1"
    assert first.json()["create_time"].endswith("Z")
    again = await client.post("/v1/things/", json={"name": "a"})
    assert again.status_code == 200
    assert again.json() == first.json()


@pytest.mark.parametrize(
    ("metadata", "status"),
    [
        ([("x-http-code", "201")], 201),
        ([("x-other", "1"), ("x-http-code", b"202")], 202),
        ([("x-http-code", "204")], 200),  # a 204 cannot carry the response body
        ([("x-http-code", "nope")], 200),
        ([], 200),
    ],
)
async def test_success_status_reads_x_http_code(
    metadata: list[tuple[str, str | bytes]], status: int
) -> None:
    assert gateway.app.success_status(metadata) == status


async def test_metadata_becomes_response_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/echo/x")
    assert response.headers["grpc-metadata-x-echo"] == "yes"
    created = await client.post("/v1/things", json={"name": "b"})
    assert created.headers["grpc-trailer-x-created"] == "yes"
    assert "grpc-metadata-x-http-code" not in created.headers
    assert "grpc-trailer-x-http-code" not in created.headers
    # A key given twice: both values, in order, as HTTP combines a field's lines.
    twice = await client.get("/v1/echo/twice")
    assert twice.headers.get_list("grpc-metadata-x-echo") == ["yes, again"]
    # An error's metadata too, as a success's.
    failed = await client.get("/v1/fail/NOT_FOUND")
    assert (failed.status_code, failed.headers["grpc-trailer-echo-failed"]) == (404, "1")
    failed = await client.get("/v1/fail/NOT_FOUND", params={"message": "twice"})
    assert failed.headers["grpc-trailer-echo-failed"] == "1, 2"
    bare = await client.get("/v1/fail/NOT_FOUND", params={"message": "without metadata"})
    assert not [name for name in bare.headers if name.startswith("grpc-")]
    refused = await client.get("/v1/count/101")  # a stream's, before its first message
    assert (refused.status_code, refused.headers["grpc-trailer-echo-failed"]) == (400, "1")


async def test_object_answer_keeps_the_page_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/items", params={"total": 7})
    assert response.json() == {
        "items": [{"index": 0}, {"index": 1}, {"index": 2}],
        "next_page_token": "3",
    }


@pytest.mark.parametrize("total", [0, 2, 3, 7, 100])
async def test_bare_array_answer_concatenates_every_page(
    client: httpx.AsyncClient, total: int
) -> None:
    response = await client.get("/items", params={"total": total})
    assert response.status_code == 200
    assert response.json() == [{"index": index} for index in range(total)]


@pytest.mark.parametrize("field", ["page_size", "page_token"])
async def test_bare_array_answer_takes_no_paging_fields(
    client: httpx.AsyncClient, field: str
) -> None:
    # The gateway sets them itself; a client's page_size of 1 would only
    # turn one request into a call for each item.
    response = await client.get("/items", params={"total": 7, field: "1"})
    assert response.status_code == 400
    assert response.json()["message"] == (
        f"unknown query parameter '{field}': this route answers with every page at once"
    )
    kept = await client.get("/v1/items", params={"total": 7, field: "1"})
    assert kept.status_code == 200


async def test_bare_array_of_many_pages_is_sent_as_its_pages_come(live: Live) -> None:
    several = await live.client.get("/items", params={"total": 700})  # 7 pages
    assert several.json() == [{"index": index} for index in range(700)]
    assert several.headers["content-type"] == "application/json"
    assert several.headers["transfer-encoding"] == "chunked"
    one = await live.client.get("/items", params={"total": 2})
    assert one.json() == [{"index": 0}, {"index": 1}]
    assert one.headers["content-length"] == str(len(one.content))


@pytest.mark.parametrize(
    ("total", "reason"),
    [(FAILING_TOTAL, "invalid page_token"), (LOOPING_TOTAL, "ListItems repeated a page token")],
)
async def test_later_page_failing_cuts_the_answer_short(
    live: Live, caplog: pytest.LogCaptureFixture, total: int, reason: str
) -> None:
    # The status went out with the first page; a shorter list would pass for
    # the whole one, so the connection closes mid-body instead.
    with pytest.raises(httpx.RemoteProtocolError):
        await live.client.get("/items", params={"total": total})
    assert "page 2 failed after the answer began" in caplog.text
    assert reason in caplog.text
    # The server goes on serving.
    assert (await live.client.get("/items", params={"total": 1})).json() == [{"index": 0}]


async def test_error_on_a_later_page_is_the_answer(client: httpx.AsyncClient) -> None:
    response = await client.get("/items", params={"total": 2000})
    assert response.status_code == 400


STATUS_MAP = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


@pytest.mark.parametrize(("number", "name"), list(enumerate(STATUS_MAP)))
async def test_grpc_codes_map_to_http_statuses(
    client: httpx.AsyncClient, number: int, name: str
) -> None:
    by_name = await client.get(f"/v1/fail/{name}", params={"message": f"it is {name}"})
    by_number = await client.get(f"/v1/fail/{number}")
    assert by_name.status_code == by_number.status_code == STATUS_MAP[name]
    if name == "OK":
        assert by_name.json() == {}
        return
    assert by_name.json() == {"code": number, "message": f"it is {name}", "details": []}
    assert by_number.json()["message"] == name


async def test_error_details_are_rendered(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/fail/NOT_FOUND", params={"message": "with details"})
    assert response.status_code == 404
    assert response.json()["details"] == [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "TEST", "domain": "echo.v1"}
    ]


async def test_unknown_path_is_404_status_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json() == {"code": 5, "message": "no route for this path", "details": []}


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/echo/x/details")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, PUT"
    assert response.json()["code"] == 12
    streamed = await client.delete("/v1/count/3")
    assert "HEAD" not in streamed.headers["allow"]  # a stream's head would never end
    fixed = await client.post("/healthz")
    assert fixed.status_code == 405
    assert set(fixed.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert fixed.json()["code"] == 12


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{", "the request body is not JSON"),
        (b"[1]", "JSON object"),
        (b'{"int32_value": "x"}', "int32_value"),
        (b'{"int32_value": 1e20}', "int32_value"),
        (b'{"nope": 1}', "nope"),
        (b'{"inner": {"nope": 1}}', "nope"),
        (b'{"color": "PURPLE"}', "color"),
        (b'{"when": "noon"}', "when"),
        (b"\xff", "UTF-8"),
    ],
)
async def test_bad_body_is_400_naming_the_problem(
    client: httpx.AsyncClient, body: bytes, named: str
) -> None:
    response = await client.post(
        "/v1/echo", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert named in response.json()["message"]


async def test_empty_body_is_an_empty_message(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/echo")
    assert response.status_code == 200
    assert response.json()["text"] == ""


async def test_body_star_takes_no_query_parameters(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/echo", json={}, params={"text": "x"})
    assert response.status_code == 400
    assert "'text'" in response.json()["message"]


async def test_a_transfer_coding_other_than_chunked_is_501_naming_it(
    client: httpx.AsyncClient,
) -> None:
    # Read as it came, a gzip-coded body would be taken for JSON that is not.
    for codings in (["gzip, chunked"], ["chunked", "GZIP, chunked"], ["compress"]):
        headers = [("content-type", "application/json")]
        headers += [("transfer-encoding", coding) for coding in codings]
        response = await client.post("/v1/echo", content=b'{"text": "hi"}', headers=headers)
        assert response.status_code == 501, codings
        message = response.json()["message"]
        assert message.startswith("the request body is sent with Transfer-Encoding g") or (
            "Transfer-Encoding compress:" in message
        ), message
    chunked = [("content-type", "application/json"), ("transfer-encoding", "Chunked")]
    response = await client.post("/v1/echo", content=b'{"text": "hi"}', headers=chunked)
    assert response.status_code == 200, response.text


async def test_a_compressed_body_is_415_naming_its_encoding(client: httpx.AsyncClient) -> None:
    body = gzip.compress(b'{"text": "hi"}')
    headers = {"content-encoding": "gzip", "content-type": "application/json"}
    response = await client.post("/v1/echo", content=body, headers=headers)
    assert response.status_code == 415
    assert response.json()["message"].startswith("the request body is sent with Content-Encoding")
    plain = await client.post(
        "/v1/echo", json={"text": "hi"}, headers={"content-encoding": "identity"}
    )
    assert plain.status_code == 200
    # Only a body is refused: a request without one carries nothing encoded.
    bodiless = await client.get("/v1/echo/x", headers={"content-encoding": "gzip"})
    assert bodiless.status_code == 200
    # Every Content-Encoding header counts, each a list of codings.
    twice = [("content-encoding", "identity"), ("content-encoding", "GZIP")]
    response = await client.post("/v1/echo", content=body, headers=twice)
    assert response.status_code == 415 and "Content-Encoding gzip:" in response.json()["message"]


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    too_big = b'{"text": "' + b"x" * MAX_BODY + b'"}'
    response = await client.post("/v1/echo", content=too_big)
    assert response.status_code == 413
    assert response.json()["code"] == 8


async def test_streamed_body_over_the_limit_is_413_without_content_length(live: Live) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = await live.client.post("/v1/echo", content=chunks())
    assert response.status_code == 413
    assert response.request.headers.get("transfer-encoding") == "chunked"


async def test_a_large_body_is_read_while_other_calls_are_answered(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading a large body into its message holds the event loop up no more:
    # a small call is answered while the large one is still being read.
    monkeypatch.setattr(gateway_app, "THREAD_BODY_BYTES", 1024)
    reading, read = threading.Event(), threading.Event()
    answered_meanwhile: list[bool] = []
    build_request = gateway_app.build_request

    def slow_build_request(*args: Any) -> Any:
        if len(args[2]) > 1024:
            reading.set()
            answered_meanwhile.append(read.wait(3))
        return build_request(*args)

    monkeypatch.setattr(gateway_app, "build_request", slow_build_request)
    large = asyncio.create_task(live.client.post("/v1/echo", json={"text": "x" * 2000}))
    assert await asyncio.to_thread(reading.wait, 3)
    small = await live.client.post("/v1/echo", json={"text": "hi"})
    read.set()
    assert small.json()["text"] == "hi"
    assert (await large).json()["text"] == "x" * 2000
    assert answered_meanwhile == [True]


async def test_headers_are_forwarded_as_metadata(client: httpx.AsyncClient) -> None:
    headers = {
        "Authorization": "Bearer secret",
        "Grpc-Metadata-X-Trace": "t-1",
        "Grpc-Metadata-Blob-Bin": base64.b64encode(b"\x01\x02").decode(),
        "X-Not-Forwarded": "no",
    }
    response = await client.get("/v1/echo/x", headers=headers)
    assert response.json()["metadata"] == {
        "authorization": "Bearer secret",
        "x-trace": "t-1",
        "blob-bin": "0102",
    }


async def test_reserved_metadata_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/echo/x", headers={"Grpc-Metadata-Grpc-Timeout": "1S"})
    assert response.status_code == 400


async def test_percent_encoded_bytes_that_are_not_utf8_are_refused(
    client: httpx.AsyncClient,
) -> None:
    # Not stored with U+FFFD in their place.
    in_path = await client.get("/v1/echo/caf%FF")
    assert in_path.status_code == 400
    assert in_path.json()["message"] == "path variable 'text' is not UTF-8 once percent-decoded"
    in_query = await client.get("/v1/echo/query?inner.child.label=caf%FF")
    assert in_query.status_code == 400
    assert in_query.json()["message"] == (
        "query parameter 'inner.child.label' is not UTF-8 once percent-decoded"
    )
    assert (await client.get("/v1/echo/caf%C3%A9")).json()["text"] == "caf\u00e9"


async def test_an_authorization_grpc_cannot_carry_is_401(client: httpx.AsyncClient) -> None:
    # As the server would answer a malformed token, not a 400.
    raw = [(b"authorization", "Bearer h\u00e9llo".encode())]
    response = await client.get("/v1/echo/x", headers=raw)
    assert response.status_code == 401
    assert response.json()["message"] == (
        "malformed authorization: it has characters gRPC cannot carry"
    )
    other = await client.get("/v1/echo/x", headers=[(b"grpc-metadata-x-note", "\u00e9".encode())])
    assert other.status_code == 400


async def test_grpc_timeout_header_sets_the_deadline(client: httpx.AsyncClient) -> None:
    slow = await client.get(
        "/v1/echo/sleep", params={"wait": "2s"}, headers={"Grpc-Timeout": "50m"}
    )
    assert slow.status_code == 504
    assert slow.json()["code"] == 4
    fast = await client.get("/v1/echo/sleep", params={"wait": "0s"}, headers={"Grpc-Timeout": "5S"})
    assert fast.status_code == 200
    # The longest the header allows, 11,000 years: grpcio took it as passed.
    for longest in ("99999999H", "99999999M"):
        far = await client.get(
            "/v1/echo/sleep", params={"wait": "0s"}, headers={"Grpc-Timeout": longest}
        )
        assert far.status_code == 200, far.text
    bad = await client.get("/v1/echo/x", headers={"Grpc-Timeout": "soon"})
    assert bad.status_code == 400


async def test_unavailable_backend_is_503_in_the_gateways_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = unused_target()
    app = gateway.create_app(echo_options(target))
    with caplog.at_level(logging.WARNING, logger="gateway"):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway"
        ) as http:
            answers = [await http.get("/v1/echo/x"), await http.get("/v1/count/2")]
            answers.append(await http.get("/v1/echo/x"))
            server = grpc.aio.server()
            echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(EchoState()), server)
            server.add_insecure_port(target)
            await server.start()
            try:
                for _ in range(100):  # until gRPC, backing off, tries again
                    if (await http.get("/v1/echo/x")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
            finally:
                await server.stop(None)
        await app.state.gateway.upstream.close()
    for response in answers:
        assert response.status_code == 503
        assert response.json() == {"code": 14, "message": UNREACHABLE, "details": []}
        assert target not in response.text
    # gRPC's words are the operator's: once, however many calls fail alike.
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith(f"cannot reach the gRPC server at {target}: ")
    assert target.split(":")[1] in said[0].split(": ", 1)[1]  # the address gRPC names
    assert said[1:] == [f"the gRPC server at {target} answers again"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize(
    ("code", "status", "logged"),
    [
        ("UNAVAILABLE", 503, "cannot reach the gRPC server at {target}: without metadata"),
        # As gRPC ends a call that reaches a server as it stops: the caller,
        # who left nothing, is told to try again, not the 499 of one who left.
        (
            "CANCELLED",
            499,
            "the gRPC server at {target} ended a call unanswered, most likely as it stopped:"
            " without metadata",
        ),
    ],
)
async def test_a_servers_failure_keeps_its_words_if_it_sends_metadata(
    backend: Backend,
    upstream: str,
    code: str,
    status: int,
    logged: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = echo_app(backend, upstream)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        own = await http.get(f"/v1/fail/{code}", params={"message": "the disk is full"})
        bare = await http.get(f"/v1/fail/{code}", params={"message": "without metadata"})
    await app.state.gateway.upstream.close()
    assert (own.status_code, own.json()["message"]) == (status, "the disk is full")
    # With none, it cannot be told from gRPC's own but in the handler's process.
    if upstream == "channel":
        assert (bare.status_code, bare.json()) == (
            503,
            {"code": 14, "message": UNREACHABLE, "details": []},
        )
        said = [r.getMessage() for r in caplog.records if r.name == "gateway.upstream"]
        assert said == [logged.format(target=backend.target)]
    else:
        assert (bare.status_code, bare.json()["message"]) == (status, "without metadata")


async def test_a_call_the_servers_shutdown_grace_cut_short_may_have_been_done(
    backend: Backend,
) -> None:
    app = echo_app(backend, "channel")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        cut = await http.get("/v1/fail/UNAVAILABLE", params={"message": "Cancelling all calls"})
    await app.state.gateway.upstream.close()
    assert (cut.status_code, cut.json()) == (503, {"code": 14, "message": CUT_SHORT, "details": []})


async def test_over_a_real_socket(live: Live) -> None:
    response = await live.client.get("/v1/echo/over-tcp", params={"int64_value": "5"})
    assert response.status_code == 200
    assert response.json()["int64_value"] == "5"
    created = await live.client.post("/v1/things", json={"name": "tcp"})
    assert created.status_code == 201
    assert (await live.client.get("/items", params={"total": 5})).json() == [
        {"index": i} for i in range(5)
    ]


async def test_responses_are_not_held_back_by_nagles_algorithm(live: Live) -> None:
    # The head and the body of a response are written apart; with Nagle's
    # algorithm on, each response waited out the client's delayed ACK (~40 ms).
    await live.client.get("/v1/echo/warm-up")
    elapsed = []
    for _ in range(15):
        start = time.perf_counter()
        response = await live.client.get("/v1/echo/quick")
        elapsed.append(time.perf_counter() - start)
        assert response.status_code == 200
    assert statistics.median(elapsed) < 0.02


async def test_an_unpaired_surrogate_in_a_map_value_is_named_by_its_key(
    client: httpx.AsyncClient,
) -> None:
    for key in ("plain", "content-type", "x] Unpaired surrogate at X.evil"):
        body = '{"text": "t", "labels": {' + json.dumps(key) + ': "\\ud800"}}'
        response = await client.post("/v1/echo", content=body.encode())
        assert response.status_code == 400
        message = response.json()["message"]
        if "]" in key:  # the caller's words are not taken for protobuf's
            assert not message.startswith("evil"), message
        else:
            assert message.startswith(f"labels[{key}]: a string holds an unpaired"), message


@pytest.mark.parametrize("kind", UPSTREAMS)
async def test_metadata_the_server_keeps_for_its_clients_is_no_header(
    backend: Backend, kind: str
) -> None:
    app = echo_app(backend, kind, hidden_metadata=("echo-failed",))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        failed = await http.get("/v1/fail/NOT_FOUND")
        assert failed.status_code == 404
        assert "grpc-trailer-echo-failed" not in failed.headers
        echoed = await http.get("/v1/echo/x")
        assert echoed.headers["grpc-metadata-x-echo"] == "yes"
    await app.state.gateway.upstream.close()


async def test_metadata_no_grpc_server_could_send_is_no_header(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # An in-process handler's: a line break would have ended the headers,
    # a character past Latin-1 failed the answer with a 500.
    app = echo_app(backend, "in-process")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        with caplog.at_level(logging.WARNING, logger="gateway"):
            failed = await http.get("/v1/fail/NOT_FOUND", params={"message": "no header"})
    await app.state.gateway.upstream.close()
    assert failed.status_code == 404, failed.text
    assert failed.json()["message"] == "no header"
    assert [name for name in failed.headers if name.startswith("grpc-")] == [
        "grpc-trailer-echo-failed"
    ]
    assert "set-cookie" not in failed.headers
    assert sum("is not sent as a header" in message for message in caplog.messages) == 3


async def test_two_fields_of_a_oneof_are_refused_from_the_query_and_the_path(
    client: httpx.AsyncClient,
) -> None:
    # Setting one clears the other: which was meant depended on their order.
    said = "a request sets one of them"
    for url, params in (
        ("/v1/echo/x", [("choice_text", "a"), ("choice_number", "2")]),
        ("/v1/echo/x", [("choice_number", "2"), ("choice_text", "a")]),
        ("/v1/echo/x", [("choice_inner.count", "3"), ("choice_text", "a")]),
        ("/v1/echo/x", [("choice_text", "a"), ("choice_inner.count", "3")]),
        ("/v1/choices/a", [("choice_number", "1")]),
    ):
        response = await client.get(url, params=params)
        assert response.status_code == 400, (url, params, response.text)
        message = response.json()["message"]
        assert "of the same oneof ('choice') is set already" in message and said in message
    # One of them, however given, and a message's fields together, pass.
    for url, params, echoed in (
        ("/v1/echo/x", [("choice_number", "2")], {"choice_number": 2}),
        (
            "/v1/echo/x",
            [("choice_inner.count", "3"), ("choice_inner.label", "l")],
            {"choice_inner": {"label": "l", "count": "3", "color": "COLOR_UNSPECIFIED"}},
        ),
        ("/v1/choices/a", [], {"choice_text": "a"}),
        ("/v1/choices/a", [("choice_text", "a")], {"choice_text": "a"}),
    ):
        response = await client.get(url, params=params)
        assert response.status_code == 200, (url, params, response.text)
        answer = response.json()
        assert {key: answer[key] for key in echoed if key in answer} == echoed
    # The body refuses two itself.
    both = await client.post("/v1/echo", json={"text": "x", "choice_text": "a", "choice_number": 1})
    assert both.status_code == 400
