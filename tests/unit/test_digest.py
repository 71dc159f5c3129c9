"""The task_input_id algorithm: the specification's vectors and canonical form."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from porch_server import digest
from porch_server.digest import canonical_json, task_input_id
from porch_server.errors import InvalidArgument


@pytest.mark.parametrize(
    ("task_input", "expected"),
    [
        (
            {"to_do": "stuff", "why": "reasons"},
            "8cb72a9439dc643d67e859ceca424b9327a9c1abf9c772525df299f656137c22",
        ),
        (
            {"study_id": 100, "id_run": 45925},
            "ea058ea93114d621c1897f1e47cad245ba2a5b04edbd23a1d61ef502d5d5b76e",
        ),
        (
            {"study_id": 100.0, "id_run": 45925.0},
            "ea058ea93114d621c1897f1e47cad245ba2a5b04edbd23a1d61ef502d5d5b76e",
        ),
        (
            {"path": "/seq/45925/x.cram", "name": "é"},
            "221f0396210458adc86f23cbfca4b8deee7b82387515a6e20c0e23bdf156351b",
        ),
    ],
)
def test_specification_vectors(task_input: dict[str, object], expected: str) -> None:
    assert task_input_id(task_input) == expected


def test_key_order_never_matters() -> None:
    first = {"b": {"y": 1, "x": [1, {"q": 2, "p": 3}]}, "a": "z"}
    second = {"a": "z", "b": {"x": [1, {"p": 3, "q": 2}], "y": 1}}
    assert task_input_id(first) == task_input_id(second)


def test_canonical_form() -> None:
    assert canonical_json({"b": 1.0, "a": [2.5, 3.0]}) == '{"a":[2.5,3],"b":1}'
    assert canonical_json({"p": "a/b"}) == '{"p":"a\\/b"}'
    assert canonical_json({"n": "é☃"}) == '{"n":"\\u00e9\\u2603"}'
    assert canonical_json({"t": True, "f": None}) == '{"f":null,"t":true}'


def test_nested_integral_floats_become_integers() -> None:
    assert canonical_json({"a": {"b": [1.0, {"c": -2.0}]}}) == '{"a":{"b":[1,{"c":-2}]}}'


def test_numbers_that_are_not_finite_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="not finite"):
        task_input_id({"x": float("nan")})


@pytest.mark.parametrize(
    ("task_input", "expected"),
    [
        # npg_porch's encoder (ujson) wrote these; Python's json module would
        # write 1e-05 and \u007f and so give other ids.
        ({"f": 1e-5}, "756157f652758d1156a7d170db12cb0c7057f7442b387fab4b42e35dbfe4e804"),
        ({"s": "a\x7fb"}, "8f8675bc3c1b43644730acf12db2473c92a6a1668eb2b89c20b9d5a6930148f7"),
        (
            {"x": [1.5e-7, -2.5e-5, 0.5, "p/q\x7f"], "k\x7f": {"z": 1e-10}},
            "68146b38a5bc3f8e4c3fa385ccc77cb11b6ca94e8e680d65515ba5beddab73b1",
        ),
    ],
)
def test_small_numbers_and_del_as_npg_porch_wrote_them(
    task_input: dict[str, object], expected: str
) -> None:
    assert task_input_id(task_input) == expected


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=5))
def test_the_exact_writer_differs_from_json_only_where_npg_porch_did(
    task_input: dict[str, object],
) -> None:
    value = digest._integral(task_input)
    plain = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    exact = digest._exact(value)
    if "e-0" not in plain and "\\u007f" not in plain:
        assert exact == plain
    assert json.loads(exact) == json.loads(plain)
    assert canonical_json(task_input) == exact.replace("/", "\\/")
