"""The task_input_id algorithm: the specification's vectors and canonical form."""

import pytest

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
