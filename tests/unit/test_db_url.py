"""A database URL that cannot be parsed is named without its password; the
libpq settings a PostgreSQL URL gives are kept, with porch's after them."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from porch_server.config import db_settings
from porch_server.db.engine import CONNECT_TIMEOUT_SECONDS, make_engine, postgresql_session


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


def test_a_urls_libpq_settings_come_first_and_porchs_hold() -> None:
    url = make_url(
        "postgresql://u@h/db?sslmode=require&options=-c%20search_path%3Ds1&application_name=a"
    )
    rest, session = postgresql_session(url, "porch")
    assert session.options == '-c search_path=s1 -c timezone=UTC -c search_path="porch"'
    assert (session.application_name, session.connect_timeout) == ("a", CONNECT_TIMEOUT_SECONDS)
    assert rest.render_as_string() == "postgresql://u@h/db?sslmode=require"
    _, plain = postgresql_session(make_url("postgresql://u@h/db"), None)
    assert (plain.options, plain.application_name) == ("-c timezone=UTC", "porch")


@pytest.mark.parametrize(("given", "seconds"), [("5", 5), ("0", None), ("-1", None)])
def test_a_urls_connect_timeout_is_libpqs(given: str, seconds: int | None) -> None:
    _, session = postgresql_session(make_url(f"postgresql://u@h/db?connect_timeout={given}"), None)
    assert session.connect_timeout == seconds


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("connect_timeout=5s", "connect_timeout='5s' in the database URL is not a whole number"),
        ("options=-c%20a%3D1&options=-c%20b%3D2", "options is given 2 times in the database URL"),
    ],
)
def test_a_urls_settings_porch_cannot_read_are_named(query: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_engine(f"postgresql+psycopg2://u@h/db?{query}")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h:5433/db?sslmode=require",
        "postgresql+asyncpg://u@h:5433/db?sslmode=require",  # npg_porch's own DB_URL
        "postgresql+psycopg2://u@h:5433/db?sslmode=require",
    ],
)
def test_a_postgresql_url_of_another_driver_takes_porchs(url: str) -> None:
    assert db_settings(url, None, {}) == ("postgresql+psycopg2://u@h:5433/db?sslmode=require", None)


@pytest.mark.parametrize(
    ("query", "translated"),
    [
        ("ssl=require", "sslmode=require"),
        ("ssl=true", "sslmode=require"),
        ("ssl=False", "sslmode=disable"),
        ("ssl=verify-full&sslrootcert=/etc/ca.pem", "sslmode=verify-full&sslrootcert=/etc/ca.pem"),
        ("host=/run/pg&ssl=prefer", "host=/run/pg&sslmode=prefer"),
        ("ssl=require&sslmode=disable", "ssl=require&sslmode=disable"),  # left for libpq to refuse
    ],
)
def test_npg_porchs_asyncpg_ssl_parameter_becomes_libpqs(query: str, translated: str) -> None:
    url, _ = db_settings(f"postgresql+asyncpg://u@h/db?{query}", None, {})
    assert url == f"postgresql+psycopg2://u@h/db?{translated}"


def test_ssl_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="ssl is given 2 times in the database URL"):
        db_settings("postgresql+asyncpg://u@h/db?ssl=require&ssl=disable", None, {})


def test_ssl_in_a_url_for_libpq_is_left_for_libpq_to_name() -> None:
    assert db_settings("postgresql://u@h/db?ssl=require", None, {})[0].endswith("?ssl=require")


def test_npg_porchs_variables_come_after_porchs() -> None:
    npg = {"DB_URL": "postgresql+asyncpg://npg@h/db", "DB_SCHEMA": "npg"}
    assert db_settings(None, None, npg) == ("postgresql+psycopg2://npg@h/db", "npg")
    both = npg | {"PORCH_DB_URL": "sqlite:///p.db", "PORCH_DB_SCHEMA": "porch"}
    assert db_settings(None, None, both) == ("sqlite:///p.db", "porch")
    assert db_settings("sqlite:///f.db", "s", both) == ("sqlite:///f.db", "s")
