"""What `porch db upgrade` tells an operator whose role may not migrate."""

from __future__ import annotations

from porch_server.db.migrate import _refused

URL = "postgresql+psycopg2://loader@db.example.org/porch"


def test_a_schema_the_role_may_not_create_is_made_for_it() -> None:
    said = _refused(URL, "mine", "mine", "permission denied for database porch")
    assert said.startswith("the database refused to let porch create schema mine: permission")
    assert 'CREATE SCHEMA "mine" AUTHORIZATION "loader"' in said


def test_tables_another_role_owns_are_migrated_by_it_not_moved_elsewhere() -> None:
    said = _refused(URL, None, None, "must be owner of table task")
    assert said.endswith("Run `porch db upgrade` as the role that owns porch's tables")
    assert "--db-schema" not in said  # a new schema would be a new, empty store


def test_a_schema_named_is_granted_not_replaced() -> None:
    said = _refused(URL, "porch", None, "permission denied for schema porch")
    assert "Grant the role porch connects as (loader) CREATE on schema porch" in said
    assert "--db-schema" not in said


def test_without_a_schema_named_one_of_porchs_own_is_offered() -> None:
    said = _refused(URL, None, None, "permission denied for schema public")
    assert "CREATE on porch's schema (GRANT CREATE ON SCHEMA)" in said
    assert "--db-schema (or PORCH_DB_SCHEMA)" in said
