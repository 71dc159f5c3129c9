"""Shared fixtures: a fresh database per test, on SQLite and on PostgreSQL.

PostgreSQL tests clone a template database migrated once per session
(CREATE DATABASE ... TEMPLATE), which takes milliseconds. The server comes
from PORCH_TEST_PG_URL; when it is unreachable the tests are skipped, or
fail when the CI environment variable is set.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, exc, make_url

from porch_server.db import migrate
from porch_server.db.engine import make_engine
from porch_server.store import Store

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
TEST_SCHEMA = "porch_test_schema"


@dataclass(frozen=True)
class SchemaDatabase:
    """A PostgreSQL database whose porch tables live in a non-default schema."""

    url: str
    schema: str


class PostgresServer:
    """Creates and drops uniquely named databases on the test PostgreSQL server."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._admin = create_engine(base_url, isolation_level="AUTOCOMMIT")

    def create_database(self, template: str | None = None) -> str:
        """Create an empty (or cloned) database; return its URL."""
        name = f"porch_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        clause = f' TEMPLATE "{template}"' if template else ""
        with self._admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"{clause}')
        return self.url_of(name)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        with self._admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url_of(self, database: str) -> str:
        return make_url(self.base_url).set(database=database).render_as_string(hide_password=False)

    def close(self) -> None:
        self._admin.dispose()


# What porch's commands read from the environment. A developer's own (their
# server, token or database) must not reach the commands the tests run.
PORCH_VARIABLES = (
    "PORCH_TARGET",
    "PORCH_TOKEN",
    "PORCH_TOKEN_FILE",
    "PORCH_TIMEOUT",
    "PORCH_DB_URL",
    "PORCH_DB_SCHEMA",
    "DB_URL",
    "DB_SCHEMA",
)


@pytest.fixture(scope="session", autouse=True)
def _no_porch_settings() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name in PORCH_VARIABLES:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The test PostgreSQL server; skips (or fails under CI) when unreachable."""
    base_url = os.environ.get("PORCH_TEST_PG_URL", DEFAULT_PG_URL)
    server = PostgresServer(base_url)
    try:
        with server._admin.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except exc.OperationalError as error:
        server.close()
        shown = make_url(base_url).render_as_string(hide_password=True)
        reason = f"PostgreSQL not reachable at {shown}; set PORCH_TEST_PG_URL"
        if os.environ.get("CI"):
            raise RuntimeError(f"{reason} ({error.orig})") from error
        pytest.skip(reason)
    yield server
    server.close()


@pytest.fixture(scope="session")
def pg_template(postgres_server: PostgresServer) -> Iterator[str]:
    """The name of a database migrated to head, to clone per test."""
    url = postgres_server.create_database()
    migrate.upgrade(url)
    yield str(make_url(url).database)
    postgres_server.drop_database(url)


@pytest.fixture
def pg_url(postgres_server: PostgresServer, pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test only."""
    url = postgres_server.create_database(template=pg_template)
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def pg_schema_db(postgres_server: PostgresServer) -> Iterator[SchemaDatabase]:
    """A fresh PostgreSQL database migrated into the schema porch_test_schema."""
    url = postgres_server.create_database()
    migrate.upgrade(url, TEST_SCHEMA)
    yield SchemaDatabase(url, TEST_SCHEMA)
    postgres_server.drop_database(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head, to copy per test."""
    path = tmp_path_factory.mktemp("template") / "porch.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh, migrated SQLite database file for this test only."""
    path = tmp_path / "porch.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database for this test, once on each backend."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on this test's database."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> Iterator[Store]:
    """A Store on this test's database."""
    store = Store(engine)
    yield store
    store.close()
