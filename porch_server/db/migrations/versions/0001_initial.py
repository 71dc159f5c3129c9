"""Pipelines, tokens, tasks and their events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_STATES = "'PENDING', 'CLAIMED', 'RUNNING', 'DONE', 'FAILED', 'CANCELLED'"


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "pipeline",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("create_time", _TIME, nullable=False),
        sa.UniqueConstraint("name", name=op.f("uq_pipeline_name")),
    )
    op.create_table(
        "token",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column(
            "pipeline_id",
            sa.Integer,
            sa.ForeignKey("pipeline.id", name=op.f("fk_token_pipeline_id_pipeline")),
            nullable=True,
        ),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("create_time", _TIME, nullable=False),
        sa.Column("revoke_time", _TIME, nullable=True),
        sa.UniqueConstraint("token_hash", name=op.f("uq_token_token_hash")),
        sa.CheckConstraint(
            "role IN ('ADMIN', 'PIPELINE', 'READER')", name=op.f("ck_token_role_valid")
        ),
    )
    op.create_table(
        "task",
        sa.Column("id", _BIG_ID, sa.Identity(), primary_key=True),
        sa.Column(
            "pipeline_id",
            sa.Integer,
            sa.ForeignKey("pipeline.id", name=op.f("fk_task_pipeline_id_pipeline")),
            nullable=False,
        ),
        sa.Column("task_input_id", sa.String(64), nullable=False),
        sa.Column("task_input", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("create_time", _TIME, nullable=False),
        sa.Column("update_time", _TIME, nullable=False),
        sa.Column("claim_time", _TIME, nullable=True),
        sa.Column("claimed_by_token_id", sa.Integer, nullable=True),
        sa.Column("lease_seconds", sa.Integer, nullable=True),
        sa.Column("lease_expire_time", _TIME, nullable=True),
        sa.UniqueConstraint(
            "pipeline_id", "task_input_id", name=op.f("uq_task_pipeline_id_task_input_id")
        ),
        sa.CheckConstraint(f"status IN ({_STATES})", name=op.f("ck_task_status_valid")),
        sa.CheckConstraint("lease_seconds > 0", name=op.f("ck_task_lease_seconds_positive")),
    )
    op.create_index(
        "ix_task_pending",
        "task",
        ["pipeline_id", "id"],
        postgresql_where=sa.text("status = 'PENDING'"),
        sqlite_where=sa.text("status = 'PENDING'"),
    )
    op.create_index(
        "ix_task_lease_expire_time",
        "task",
        ["lease_expire_time"],
        postgresql_where=sa.text("lease_expire_time IS NOT NULL"),
        sqlite_where=sa.text("lease_expire_time IS NOT NULL"),
    )
    op.create_index("ix_task_pipeline_id_id", "task", ["pipeline_id", "id"])
    op.create_table(
        "event",
        sa.Column("id", _BIG_ID, sa.Identity(), primary_key=True),
        sa.Column("time", _TIME, nullable=False),
        sa.Column(
            "task_id",
            _BIG_ID,
            sa.ForeignKey("task.id", name=op.f("fk_event_task_id_task")),
            nullable=False,
        ),
        sa.Column("pipeline_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("old_status", sa.String(16), nullable=True),
        sa.Column("new_status", sa.String(16), nullable=True),
        sa.Column("token_id", sa.Integer, nullable=True),
        sa.Column("token_description", sa.Text, nullable=True),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column(
            "xid",
            sa.BigInteger,
            # The writing transaction's id; xid8 fits a bigint for 2^63 transactions.
            server_default=sa.text("(pg_current_xact_id()::text)::bigint") if postgresql else None,
            nullable=True,
        ),
        sa.CheckConstraint(
            "kind IN ('CREATED', 'CLAIMED', 'STATUS_CHANGED', 'LEASE_EXPIRED')",
            name=op.f("ck_event_kind_valid"),
        ),
        # Event ids are cursors: SQLite must never hand out an id again after pruning.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_event_task_id_id", "event", ["task_id", "id"])
    if postgresql:
        op.create_index("ix_event_xid_id", "event", ["xid", "id"])
        op.create_index("ix_event_pipeline_id_xid_id", "event", ["pipeline_id", "xid", "id"])
    else:
        op.create_index("ix_event_pipeline_id_id", "event", ["pipeline_id", "id"])
    op.create_table(
        "event_horizon",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("xid", sa.BigInteger, nullable=False),
        sa.Column("event_id", sa.BigInteger, nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_event_horizon_one_row")),
    )


def downgrade() -> None:
    op.drop_table("event_horizon")
    op.drop_table("event")
    op.drop_table("task")
    op.drop_table("token")
    op.drop_table("pipeline")
