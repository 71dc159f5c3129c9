"""Run porch's Alembic migrations from Python; they ship inside the package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect
from sqlalchemy.engine import Connection

from porch_server.db.engine import make_engine, quote_schema, writer
from porch_server.db.tables import metadata
from porch_server.errors import FailedPrecondition

_ALEMBIC_INI = Path(__file__).with_name("alembic.ini")

# An arbitrary constant naming porch's advisory lock on PostgreSQL, so that
# servers started together do not run the same migration twice.
_MIGRATION_LOCK_KEY = 0x706F726368


def upgrade(url: str, schema: str | None = None, revision: str = "head") -> None:
    """Create porch's tables in the database at url, or bring them up to date
    (or up to revision)."""
    engine = make_engine(url, schema, pool_size=1)
    try:
        with writer(engine).connect() as connection:
            create_schema(connection, schema)
            config = _config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


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
    connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_schema(schema)}")
    connection.commit()


def check_tables_are_porchs(connection: Connection, found: str | None) -> None:
    """Refuse a database whose tables are not porch's, before a migration
    or instead of advising one (found: the revision the database records,
    or None): tables or views named as
    porch's with no record of its migrations (npg_porch names its tables
    alike), a record of a migration this porch does not know, or a record
    of one of porch's with none of its tables (another program's, whose
    revisions are numbered as porch's are). The first would fail at its
    first CREATE TABLE; the others have no way on."""
    schema, where, unchanged = None, "the database", "None of its tables was changed"
    advice = "Give porch a database file of its own"
    if connection.dialect.name == "postgresql":
        # Tables in the schema porch's would go in; search_path may show others.
        schema = connection.exec_driver_sql("SELECT current_schema()").scalar()
        if schema is None:  # none on the search_path exists (or may be used): no clash
            return
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
