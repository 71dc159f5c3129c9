"""Alembic environment: runs porch's migrations on one connection, in one transaction.

``porch_server.db.migrate`` hands over an open connection in
``config.attributes["connection"]``. Run from the alembic command line, the
database comes from ``-x url=...`` (and ``-x schema=...`` for PostgreSQL).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from porch_server.db import migrate
from porch_server.db.engine import make_engine, writer
from porch_server.db.tables import metadata


def run_migrations(connection: Connection) -> None:
    """Run the pending migrations in one transaction, one migrator at a time."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        transactional_ddl=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with migrate.foreign_keys_unchecked(connection), context.begin_transaction():
        migrate.lock_migrations(connection)
        found = context.get_context().get_current_revision()
        migrate.check_tables_are_porchs(connection, found)
        # Rows already pointing at none (a row deleted by hand, say) are not
        # the migrations' doing: only those they would leave are refused.
        before = migrate.broken_foreign_keys(connection) if found != migrate.head_revision() else []
        context.run_migrations()
        if context.get_context().get_current_revision() != found:
            migrate.check_foreign_keys(connection, before)


def run_from_command_line() -> None:
    """Connect to the database named by -x url=... and run the migrations."""
    arguments = context.get_x_argument(as_dictionary=True)
    if "url" not in arguments:
        raise SystemExit("give the database with: alembic -x url=... [-x schema=...]")
    schema = arguments.get("schema")
    engine = make_engine(arguments["url"], schema)
    try:
        with writer(engine).connect() as connection:
            migrate.create_schema(connection, schema)
            run_migrations(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("porch's migrations run online only")

connection = context.config.attributes.get("connection")
if connection is None:
    run_from_command_line()
else:
    run_migrations(connection)
