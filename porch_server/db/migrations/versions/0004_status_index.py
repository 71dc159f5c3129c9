"""Index tasks by status, for listings by a status other than PENDING or DONE.

Such a listing read every task of its pipeline (or of every pipeline) to
find a few: 130 ms with two million tasks on PostgreSQL, growing as tasks
finish. The index is partial, as ix_task_pending is, so it holds only the
tasks claimed, running, failed or cancelled, by status in id order. (On
SQLite only listings of every pipeline use it: see store._tasks_listed.)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As tables.LISTED_APART, written out: a migration keeps what it made.
_LISTED_APART = "status NOT IN ('PENDING', 'DONE')"


def upgrade() -> None:
    op.create_index(
        "ix_task_status_id",
        "task",
        ["status", "id"],
        postgresql_where=sa.text(_LISTED_APART),
        sqlite_where=sa.text(_LISTED_APART),
    )


def downgrade() -> None:
    op.drop_index("ix_task_status_id", "task")
