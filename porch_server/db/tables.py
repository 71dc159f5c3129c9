"""porch's tables, as SQLAlchemy Core definitions.

The migrations, applied in order, create exactly these; change both together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    FetchedValue,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from porch_server.models import EventKind, Role
from porch_server.states import State


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that goes in and comes out as a timezone-aware UTC datetime.

    PostgreSQL stores it as timestamptz. SQLite has no time zones, so the
    value is stored as naive UTC and made aware again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("porch stores only timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


# SQLite makes only an INTEGER PRIMARY KEY an alias of its auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _one_of(column: str, values: type[State] | type[Role] | type[EventKind]) -> CheckConstraint:
    listed = ", ".join(f"'{value}'" for value in values)
    return CheckConstraint(f"{column} IN ({listed})", name=f"{column}_valid")


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

pipeline = Table(
    "pipeline",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("uri", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
)

token = Table(
    "token",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    # sha256 hex of the secret; the secret itself is never stored.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("pipeline_id", Integer, ForeignKey("pipeline.id"), nullable=True),
    Column("description", Text, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("revoke_time", UtcDateTime, nullable=True),
    _one_of("role", Role),
)

# The tasks the status index holds: every status but PENDING (the claims'
# ix_task_pending holds those) and DONE (most tasks, which a listing finds by
# id at once). SQLite's planner uses a partial index only for a query that
# names its terms, as parsed, and in this order.
OUTSIDE_STATUS_INDEX = (State.PENDING, State.DONE)
LISTED_APART = f"status NOT IN ({', '.join(repr(s.value) for s in OUTSIDE_STATUS_INDEX)})"

task = Table(
    "task",
    metadata,
    Column("id", BigId, Identity(), primary_key=True),
    Column("pipeline_id", Integer, ForeignKey("pipeline.id"), nullable=False),
    Column("task_input_id", String(64), nullable=False),
    # The canonical JSON text, from which task_input_id was computed.
    Column("task_input", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("update_time", UtcDateTime, nullable=False),
    Column("claim_time", UtcDateTime, nullable=True),
    # Deliberately no foreign key: tokens are never deleted, and a key would
    # make every claim take a share lock on the claiming token's row.
    Column("claimed_by_token_id", Integer, nullable=True),
    Column("lease_seconds", Integer, nullable=True),
    Column("lease_expire_time", UtcDateTime, nullable=True),
    # 1 for the task's first claim, one more for each claim after; kept when
    # a claim ends, so that an update naming an older claim can be refused.
    Column("claim_number", Integer, nullable=False, server_default=text("0")),
    UniqueConstraint("pipeline_id", "task_input_id"),
    _one_of("status", State),
    CheckConstraint("lease_seconds > 0", name="lease_seconds_positive"),
    # Claims read only this, so their cost does not grow with finished tasks.
    Index(
        "ix_task_pending",
        "pipeline_id",
        "id",
        postgresql_where=text("status = 'PENDING'"),
        sqlite_where=text("status = 'PENDING'"),
    ),
    Index(
        "ix_task_lease_expire_time",
        "lease_expire_time",
        postgresql_where=text("lease_expire_time IS NOT NULL"),
        sqlite_where=text("lease_expire_time IS NOT NULL"),
    ),
    Index("ix_task_pipeline_id_id", "pipeline_id", "id"),
    # A listing by a status other than PENDING or DONE reads only the tasks
    # in that status, in id order, not every task: it does not slow as tasks
    # finish. On SQLite only a listing of every pipeline does (see
    # store._tasks_listed); a second index, by pipeline too, for SQLite's
    # listings of one pipeline, cost the lifecycle 5 %.
    Index(
        "ix_task_status_id",
        "status",
        "id",
        postgresql_where=text(LISTED_APART),
        sqlite_where=text(LISTED_APART),
    ),
)

event = Table(
    "event",
    metadata,
    Column("id", BigId, Identity(), primary_key=True),
    Column("time", UtcDateTime, nullable=False),
    Column("task_id", BigId, ForeignKey("task.id"), nullable=False),
    # pipeline_id and token_id are copies for readers of the log, not keys:
    # a key would lock the pipeline's and token's rows on every event.
    Column("pipeline_id", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("old_status", String(16), nullable=True),
    Column("new_status", String(16), nullable=True),
    Column("token_id", Integer, nullable=True),
    Column("token_description", Text, nullable=True),
    Column("message", Text, nullable=True),
    # PostgreSQL only: the id of the writing transaction, set by the column's
    # default (pg_current_xact_id()); readers that stay below the oldest
    # running transaction's xmin see events in commit-safe (xid, id) order.
    # NULL on SQLite, where writers are serialised and id order is enough.
    # The migration also indexes (xid, id) on PostgreSQL.
    Column("xid", BigInteger, server_default=FetchedValue(), nullable=True),
    _one_of("kind", EventKind),
    Index("ix_event_task_id_id", "task_id", "id"),
    # Event ids are cursors: SQLite must never hand out an id again after pruning.
    sqlite_autoincrement=True,
)

# The newest event pruned: cursors at or after it can still resume, older
# ones get OUT_OF_RANGE. One row at most.
event_horizon = Table(
    "event_horizon",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("xid", BigInteger, nullable=False),
    Column("event_id", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="one_row"),
)
