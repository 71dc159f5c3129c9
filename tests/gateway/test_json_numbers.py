"""JSON numbers: a `google.protobuf.Value` number that holds an integer is written as one.

protobuf keeps every Struct number as a double and its JSON printer writes
`1.0`; JSON has one number type, and clients expect back the `1` they sent.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest
from google.protobuf import struct_pb2

from gateway import integral_numbers, message_to_dict
from porch_server import client as porch_client
from porch_stubs.v1 import porch_pb2
from tests.gateway.testproto import echo_pb2

EXACT = 2**53


def task(task_input: dict[str, Any]) -> porch_pb2.Task:
    message = porch_pb2.Task(pipeline=porch_pb2.Pipeline(name="p"))
    message.task_input.update(task_input)
    return message


@pytest.mark.parametrize(
    ("number", "written"),
    [
        (1, "1"),
        (1.0, "1"),
        (-7.0, "-7"),
        (0.0, "0"),
        (-0.0, "0"),
        (EXACT, str(EXACT)),
        (-EXACT, str(-EXACT)),
        (1.5, "1.5"),
        (0.1, "0.1"),
        # Beyond 2^53 a whole double is still the integer sent, when one was.
        (float(EXACT * 2), "18014398509481984"),
        (2.0**60, "1152921504606846976"),
        (-1e20, "-100000000000000000000"),
        (1e21, "1e+21"),
        (1e300, "1e+300"),
    ],
)
def test_integral_numbers_below_10_to_the_21_are_integers(number: float, written: str) -> None:
    rendered = message_to_dict(task({"n": number}))["task_input"]["n"]
    assert json.dumps(rendered) == written


def test_nested_lists_and_objects_and_every_kind_of_field() -> None:
    registered = porch_pb2.RegisterTasksResponse(
        results=[
            porch_pb2.RegisterTaskResponse(
                task=task({"id_run": 45925, "tags": [1, 2.5, {"x": 3}]})
            ),
            porch_pb2.RegisterTaskResponse(task=task({"flag": True, "none": None, "s": "4"})),
        ]
    )
    results = message_to_dict(registered)["results"]
    assert json.dumps(results[0]["task"]["task_input"], sort_keys=True) == (
        '{"id_run": 45925, "tags": [1, 2.5, {"x": 3}]}'
    )
    assert results[1]["task"]["task_input"] == {"flag": True, "none": None, "s": "4"}


def test_well_known_json_types_at_the_top() -> None:
    assert json.dumps(message_to_dict(struct_pb2.Value(number_value=3))) == "3"
    values = struct_pb2.ListValue()
    values.extend([1, 2.25])
    assert json.dumps(message_to_dict(values)) == "[1, 2.25]"


def test_other_numbers_keep_their_proto_json_form() -> None:
    echoed = echo_pb2.EchoMessage(double_value=2.0, float_value=3.0, int64_value=5)
    echoed.data.update({"n": 2})
    rendered = message_to_dict(echoed)
    assert (rendered["double_value"], rendered["float_value"]) == (2.0, 3.0)
    assert isinstance(rendered["double_value"], float)
    assert rendered["int64_value"] == "5"
    assert json.dumps(rendered["data"]) == '{"n": 2}'


def test_plain_values_pass_through() -> None:
    data = {"a": [1.0, "b", None, False, {"c": 2.0}], "d": 0.5}
    assert integral_numbers(data) == {"a": [1, "b", None, False, {"c": 2}], "d": 0.5}
    assert json.dumps(data) == '{"a": [1, "b", null, false, {"c": 2}], "d": 0.5}'


async def test_the_gateway_answers_integers(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/echo", json={"text": "n", "data": {"id_run": 1, "ratio": 0.5, "ids": [7, 8.0]}}
    )
    assert response.status_code == 200
    # Decimal for every number written with a fraction or exponent: only 0.5 is.
    data = json.loads(response.text, parse_float=Decimal)["data"]
    assert data == {"id_run": 1, "ratio": Decimal("0.5"), "ids": [7, 8]}
    assert [type(each) for each in (data["id_run"], *data["ids"])] == [int, int, int]


def test_the_porch_command_prints_integers(capsys: pytest.CaptureFixture[str]) -> None:
    porch_client._print(task({"id_run": 1, "study_id": 100.0}))
    printed = json.loads(capsys.readouterr().out)
    assert json.dumps(printed["task_input"], sort_keys=True) == '{"id_run": 1, "study_id": 100}'


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (
            {"n": EXACT + 1},
            "data.n: the integer 9007199254740993 would be stored as 9007199254740992",
        ),
        ({"n": -EXACT - 1}, "data.n: the integer -9007199254740993 would be stored as"),
        # The first in the body is named, however deep.
        ({"a": [1, {"b": EXACT + 3}], "c": EXACT + 5}, "data.a[1].b: the integer 9007199254740995"),
        # A float beside it sends the body the general way: the same check.
        ({"f": 0.5, "n": EXACT + 1}, "data.n: the integer 9007199254740993"),
        # A key that would not read as a name is quoted.
        ({"a.b": [EXACT + 1]}, 'data["a.b"][0]: the integer 9007199254740993'),
        # JavaScript's and jq's form of the double 2^60: not its value.
        ({"n": 1152921504606847000}, "data.n: the integer 1152921504606847000 would be stored"),
        # Shortened, the number stored would read as the one sent.
        ({"n": 2**200 + 1}, "data.n: the integer 160693804425899027554196… (61 digits) is no"),
    ],
)
async def test_an_integer_a_double_would_change_is_refused(
    client: httpx.AsyncClient, data: dict[str, Any], named: str
) -> None:
    # A Struct holds numbers as doubles: stored, 2^53 + 1 would read back as
    # 2^53, and two inputs differing only there would be one task.
    response = await client.post("/v1/echo", content=json.dumps({"text": "n", "data": data}))
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith(named), message
    assert message.endswith(
        "(protobuf keeps a JSON value's numbers as doubles, exact up to 2^53); send it as a string"
    )


async def test_an_integer_past_any_double_is_named_by_its_size(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/echo", content=json.dumps({"text": "n", "data": {"n": 10**400}})
    )
    assert response.status_code == 400
    assert response.json()["message"] == (
        "data.n: the integer 100000000000000000000000… (401 digits) is past any double, the kind"
        " of number a JSON value holds in protobuf; send it as a string"
    )


async def refusal(client: httpx.AsyncClient, body: str) -> str:
    """The message of the 400 the echo gives body."""
    response = await client.post("/v1/echo", content=body)
    assert response.status_code == 400
    message: str = response.json()["message"]
    return message


@pytest.mark.parametrize(
    ("number", "named"),
    [
        ("1e-400", "1e-400"),
        ("-2.5E-330", "-2.5E-330"),
        ("0.00001e-399", "0.00001e-399"),
        # Shortened, the exponent that says why is kept.
        ("1." + "0" * 60 + "E-400", "1.000000000000000000…E-400"),
        ("0." + "0" * 400 + "1", "0.0000000000000000000000… (403 digits)"),
    ],
)
async def test_a_number_a_double_holds_only_as_0_is_refused(
    client: httpx.AsyncClient, number: str, named: str
) -> None:
    # Stored as 0, it would make {"n": 1e-400} and {"n": 0} one task.
    body = f'{{"text": "n", "data": {{"a": 0.0, "b": 0e7, "n": {number}}}}}'
    assert await refusal(client, body) == (
        f"the number {named} is too small for a double, which would hold it as 0;"
        " send it as a string"
    )


@pytest.mark.parametrize(
    ("number", "named"),
    [
        ("1e400", "1e400"),
        ("-2.5E+330", "-2.5E+330"),
        ("1.8e308", "1.8e308"),
        ("1." + "0" * 60 + "E400", "1.000000000000000000…E400"),
    ],
)
@pytest.mark.parametrize("field", ["data", "double_value"])
async def test_a_number_past_the_largest_double_is_refused_before_the_call(
    client: httpx.AsyncClient, number: str, named: str, field: str
) -> None:
    # Read as infinity, a Struct's took the call through, then its answer
    # had no JSON form: a 500 for a call that was made.
    value = f'{{"n": {number}}}' if field == "data" else number
    body = f'{{"text": "n", "{field}": {value}}}'
    assert await refusal(client, body) == (
        f"the number {named} is too large for a double, which would hold it as infinity;"
        " send it as a string"
    )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_written_bare_are_not_json(
    client: httpx.AsyncClient, constant: str
) -> None:
    body = f'{{"text": "n", "data": {{"n": {constant}}}}}'
    assert await refusal(client, body) == (
        f"the request body is not JSON: {constant} (at data.n) is not a JSON number; JSON has"
        " no NaN or infinity"
    )
    # As protobuf's JSON has them, in a string, a double field takes them.
    response = await client.post("/v1/echo", json={"text": "n", "double_value": constant})
    assert response.status_code == 200, response.text
    assert response.json()["double_value"] == constant


@pytest.mark.parametrize("sign", ["", "-"])
async def test_an_integer_of_more_digits_than_python_reads_is_named_by_its_size(
    client: httpx.AsyncClient, sign: str
) -> None:
    digits = "1" + "0" * 9_999
    body = f'{{"text": "n", "data": {{"a": 1, "n": {sign}{digits}}}}}'
    assert await refusal(client, body) == (
        "the request body holds a number too long to read: the integer"
        f" {sign}{digits[: 24 - len(sign)]}…"
        " (10000 digits) is past any number a field or a JSON value holds; send it as a string"
    )


async def test_integers_a_double_holds_exactly_pass_however_large(
    client: httpx.AsyncClient,
) -> None:
    data = {"at_2_53": EXACT, "far": 2**60, "round": 10**22, "f": 0.5}
    response = await client.post(
        "/v1/echo", json={"text": "n", "data": data, "int64_value": str(EXACT + 1)}
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"] == data
    # Not in a Struct: an int64 field holds it exactly.
    assert response.json()["int64_value"] == str(EXACT + 1)
    response = await client.post("/v1/echo", content=f'{{"text": "n", "int64_value": {EXACT + 1}}}')
    assert response.json()["int64_value"] == str(EXACT + 1)
