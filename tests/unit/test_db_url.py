"""A database URL that cannot be parsed is named without its password."""

from __future__ import annotations

import pytest

from porch_server.db.engine import make_engine


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("u:SECRETPW@h/x", "u:***@h/x"),
        ("pg sql://u:se:cret@h/db", "pg sql://u:***@h/db"),
        ("pg sql://u:se/cret@h/db", "pg sql://u:***@h/db"),
        ("pg sql://u:s@cret@h/db", "pg sql://u:***@h/db"),
        ("notaurl", "notaurl"),
    ],
)
def test_an_unparsed_url_is_named_without_its_password(url: str, shown: str) -> None:
    with pytest.raises(ValueError) as raised:
        make_engine(url)
    assert str(raised.value) == f"not a database URL: {shown!r}"
