"""Index tasks by status, for listings by a status other than PENDING or DONE.

Such a listing read every task of its pipeline (or of every pipeline) to
find a few: 138 ms with two million tasks, growing as tasks finish. The
indexes are partial, as ix_task_pending is, so they hold only the tasks
claimed, running, failed or cancelled: by status in id order, for
listings of every pipeline, and by pipeline and status, for one's.

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


_INDEXES = {
    "ix_task_status_id": ["status", "id"],
    "ix_task_pipeline_id_status_id": ["pipeline_id", "status", "id"],
}


def upgrade() -> None:
    for name, columns in _INDEXES.items():
        op.create_index(
            name,
            "task",
            columns,
            postgresql_where=sa.text(_LISTED_APART),
            sqlite_where=sa.text(_LISTED_APART),
        )


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, "task")
