"""Number each task's claims, so that an update can name the claim it reports for.

A task claimed before this revision counts as claimed once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task") as batch:
        batch.add_column(
            sa.Column("claim_number", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
    op.execute("UPDATE task SET claim_number = 1 WHERE claim_time IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("task") as batch:
        batch.drop_column("claim_number")
