"""Run porch's Alembic migrations from Python; they ship inside the package."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, exc, inspect
from sqlalchemy.engine import Connection, make_url

from porch_server.db.engine import make_engine, quote_schema, sqlite_file, writer
from porch_server.db.tables import metadata
from porch_server.errors import FailedPrecondition, first_line

_ALEMBIC_INI = Path(__file__).with_name("alembic.ini")

# An arbitrary constant naming porch's advisory lock on PostgreSQL, so that
# servers started together do not run the same migration twice.
_MIGRATION_LOCK_KEY = 0x706F726368

# PostgreSQL's SQLSTATE for a statement the role has no right to run.
_INSUFFICIENT_PRIVILEGE = "42501"


def upgrade(url: str, schema: str | None = None, revision: str = "head") -> None:
    """Create porch's tables in the database at url, or bring them up to date
    (or up to revision)."""
    engine = make_engine(url, schema, pool_size=1)
    if engine.dialect.name == "sqlite":
        _create_private_file(sqlite_file(url))
    creating = None
    try:
        with writer(engine).connect() as connection:
            creating = schema
            create_schema(connection, schema)
            creating = None
            config = _config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        if engine.dialect.name == "sqlite":
            _use_wal(engine)
    except exc.ProgrammingError as error:
        if getattr(error.orig, "pgcode", None) != _INSUFFICIENT_PRIVILEGE:
            raise
        reason = first_line(error.orig)
        raise FailedPrecondition(_refused(url, schema, creating, reason)) from None
    finally:
        engine.dispose()


def _create_private_file(path: str | None) -> None:
    """Create a SQLite file that does not exist yet readable and writable by
    its owner only, as SQLite then creates its -wal and -shm files: it holds
    the tasks' inputs and the tokens' hashes. A file that exists keeps its
    mode; a path that cannot be made is left for SQLite to refuse."""
    if path is not None:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _use_wal(engine: Engine) -> None:
    """Put porch's SQLite file in WAL mode (readers do not wait for the
    writer), which the file keeps. Outside any transaction, as SQLite requires."""
    connection = engine.raw_connection()
    try:
        connection.cursor().execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def _refused(url: str, schema: str | None, creating: str | None, reason: str) -> str:
    """What to tell an operator whose role may not run porch's migrations
    (creating: the schema the role may not create, if that was the step)."""
    user = make_url(url).username
    role = f"the role porch connects as ({user})" if user else "the role porch connects as"
    said = f"the database refused porch's migration: {reason}. Nothing was changed."
    if creating is not None:
        return (
            f"the database refused to let porch create schema {creating}: {reason}. "
            f"Nothing was changed. Grant {role} the right to create schemas in the "
            f"database, or create the schema for it (CREATE SCHEMA "
            f"{quote_schema(creating)} AUTHORIZATION {_quoted(user) if user else '<role>'})"
        )
    if reason.startswith("must be owner of"):
        # porch's tables are there, made by another role: a new schema
        # would be a new, empty store.
        return f"{said} Run `porch db upgrade` as the role that owns porch's tables"
    if schema is not None:
        return (
            f"{said} Grant {role} CREATE on schema {schema}, or run `porch db upgrade` "
            "as the schema's owner"
        )
    return (
        f"{said} Grant {role} CREATE on porch's schema (GRANT CREATE ON SCHEMA), or "
        "give porch a schema of its own with --db-schema (or PORCH_DB_SCHEMA), which "
        "it creates if the role may create schemas"
    )


def _quoted(name: str) -> str:
    """name as a quoted SQL identifier, for a statement shown to an operator."""
    escaped = name.replace('"', '""')
    return f'"{escaped}"'


def current_revision(engine: Engine) -> str | None:
    """Return the database's migration revision, None when it has none."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """Return the newest migration revision shipped with porch."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found beside {_ALEMBIC_INI}")
    return head


def is_at_head(engine: Engine) -> bool:
    """True when the database has every migration porch ships."""
    return current_revision(engine) == head_revision()


def create_schema(connection: Connection, schema: str | None) -> None:
    """Create the PostgreSQL schema porch lives in, unless it exists already."""
    if schema is None or connection.dialect.name != "postgresql":
        return
    lock_migrations(connection)  # CREATE SCHEMA IF NOT EXISTS races with itself
    # Only when it is missing: even with IF NOT EXISTS, PostgreSQL asks for
    # the right to create schemas, which a role given its schema need not have.
    if not schema_exists(connection, schema):
        connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_schema(schema)}")
    connection.commit()


@contextlib.contextmanager
def foreign_keys_unchecked(connection: Connection) -> Iterator[None]:
    """On SQLite, foreign keys unchecked while the block runs, as SQLite's
    own advice for changing a table's shape has it: a migration copies a
    table, drops it and renames the copy, which the rows pointing at it
    (a task's events) would refuse. check_foreign_keys checks them all
    before the transaction commits. Elsewhere, nothing.

    SQLite reads the setting only outside a transaction: the block must
    begin the connection's transaction, not run inside one."""
    if connection.dialect.name != "sqlite":
        yield
        return
    raw = connection.connection.driver_connection
    assert raw is not None and not connection.in_transaction()
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        raw.execute("PRAGMA foreign_keys=ON")


def broken_foreign_keys(connection: Connection) -> list[tuple[Any, ...]]:
    """On SQLite, the rows that point at none: (table, rowid, parent table,
    key); elsewhere none, as the database checks every statement."""
    if connection.dialect.name != "sqlite":
        return []
    return [tuple(row) for row in connection.exec_driver_sql("PRAGMA foreign_key_check")]


def check_foreign_keys(connection: Connection, before: Sequence[tuple[Any, ...]] = ()) -> None:
    """Refuse (and so roll back) a migration that left a row pointing at
    none, but for those in before (broken_foreign_keys before it ran)."""
    known = set(before)
    broken = [row for row in broken_foreign_keys(connection) if row not in known]
    if broken:
        table, row_id, parent, _ = broken[0]
        raise FailedPrecondition(
            f"the migration would leave {len(broken)} row(s) pointing at none, the first row"
            f" {row_id} of {table}, which points into {parent}. Nothing was changed"
        )


def schema_exists(connection: Connection, schema: str) -> bool:
    """True when the PostgreSQL schema exists."""
    found = connection.exec_driver_sql(
        "SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s", {"schema": schema}
    )
    return found.first() is not None


def check_tables_are_porchs(connection: Connection, found: str | None) -> None:
    """Refuse a database whose tables are not porch's, before a migration
    or instead of advising one (found: the revision the database records,
    or None): tables or views named as
    porch's with no record of its migrations (npg_porch names its tables
    alike), a record of a migration this porch does not know, or a record
    of one of porch's with none of its tables (another program's, whose
    revisions are numbered as porch's are). The first would fail at its
    first CREATE TABLE; the others have no way on. On PostgreSQL, refuse
    too a search_path on which no schema exists that the role may use."""
    schema, where, unchanged = None, "the database", "None of its tables was changed"
    advice = "Give porch a database file of its own"
    if connection.dialect.name == "postgresql":
        # Tables in the schema porch's would go in; search_path may show others.
        schema = connection.exec_driver_sql("SELECT current_schema()").scalar()
        if schema is None:
            # CREATE TABLE would fail with "no schema has been selected".
            search_path = connection.exec_driver_sql("SHOW search_path").scalar()
            raise FailedPrecondition(
                f"the database has no schema to hold porch's tables: none on the "
                f"search_path ({search_path}) exists, or the role porch connects as "
                "may not use it. Nothing was changed. Grant the role USAGE and CREATE "
                "on the schema, or name with --db-schema (or PORCH_DB_SCHEMA) one it "
                "may use or create"
            )
        where, unchanged = f"schema {schema}", "Nothing was changed"
        advice = (
            "Give porch a schema of its own (--db-schema or PORCH_DB_SCHEMA) "
            "or a database of its own"
        )
    inspector = inspect(connection)
    present = {*inspector.get_table_names(schema), *inspector.get_view_names(schema)}
    if found is None:
        clashing = sorted(present & set(metadata.tables))
        if clashing:
            raise FailedPrecondition(
                f"{where} already holds tables porch would create ({', '.join(clashing)}) "
                "with no record of porch's migrations: another program's, npg_porch's "
                f"perhaps. {unchanged}. {advice}"
            )
    elif found not in revisions():
        raise FailedPrecondition(
            f"{where} records migration {found!r}, which this porch does not know: "
            f"a newer porch or another program set it up. {unchanged}"
        )
    elif not {"pipeline", "task"} <= present:
        raise FailedPrecondition(
            f"{where} records migration {found!r} but has no tables pipeline and task, "
            f"which every porch migration has: the record is another program's, "
            f"perhaps. {unchanged}. {advice}"
        )


def revisions() -> set[str]:
    """Every migration revision shipped with porch."""
    return {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}


def lock_migrations(connection: Connection) -> None:
    """Wait until no other process migrates the database, until this transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")


def _config() -> Config:
    return Config(str(_ALEMBIC_INI))
