"""Task ids of inputs with a small number or DEL, as npg_porch computes them.

porch wrote a number such as 1e-5 in a task's canonical JSON as Python
does (``1e-05``) and DEL (U+007F) escaped (``\\u007f``); npg_porch writes
``1e-5`` and DEL as itself. Such an input had an id of its own, so the same
input registered again after an npg_porch import was a second task. This
rewrites the canonical text and id of every task that holds either; no
other task's text or id changes, and no new id can be another task's.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 00:00:00
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from porch_server.digest import canonical_json, digest_of

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TASK = sa.table("task", sa.column("id"), sa.column("task_input_id"), sa.column("task_input"))


def upgrade() -> None:
    bind = op.get_bind()
    # A superset of what may change (a LIKE may also find "e-0" in a string);
    # each is written again only if its canonical text is new.
    suspects = sa.select(_TASK.c.id, _TASK.c.task_input).where(
        sa.or_(_TASK.c.task_input.contains("e-0"), _TASK.c.task_input.contains("u007f"))
    )
    for task_id, text in bind.execute(suspects).all():
        canonical = canonical_json(json.loads(text))
        if canonical != text:
            rewrite = _TASK.update().where(_TASK.c.id == task_id)
            bind.execute(rewrite.values(task_input=canonical, task_input_id=digest_of(canonical)))


def downgrade() -> None:
    """Ids stay as npg_porch computes them: the old writer is gone."""
