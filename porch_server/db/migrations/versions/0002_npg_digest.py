"""Task ids of inputs with a small number or DEL, as npg_porch computes them.

porch wrote a number such as 1e-5 in a task's canonical JSON as Python
does (``1e-05``) and DEL (U+007F) escaped (``\\u007f``); npg_porch writes
``1e-5`` and DEL as itself. Such an input had an id of its own, so the same
input registered again after an npg_porch import was a second task. This
rewrites the canonical text and id of every task that holds either; no
other task's text or id changes. A task whose input was registered again
under its npg_porch id keeps its old id, with a warning naming both.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 00:00:00
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from porch_server.digest import canonical_json, digest_of

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TASK = sa.table(
    "task",
    sa.column("id"),
    sa.column("pipeline_id"),
    sa.column("task_input_id"),
    sa.column("task_input"),
)
log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    bind = op.get_bind()
    # A superset of what may change (a LIKE may also find "e-0" in a string);
    # each is written again only if its canonical text is new.
    suspects = sa.select(_TASK.c.id, _TASK.c.pipeline_id, _TASK.c.task_input).where(
        sa.or_(_TASK.c.task_input.contains("e-0"), _TASK.c.task_input.contains("u007f"))
    )
    for task_id, pipeline_id, text in bind.execute(suspects).all():
        canonical = canonical_json(json.loads(text))
        if canonical == text:
            continue
        new_id = digest_of(canonical)
        twin = sa.select(_TASK.c.id).where(
            _TASK.c.pipeline_id == pipeline_id, _TASK.c.task_input_id == new_id
        )
        if bind.execute(twin).first() is not None:
            # The same input was registered again under its npg_porch id (an
            # import, say): two tasks, each with its own history, which no
            # migration can merge. This one keeps its old id; both are named.
            log.warning(
                "task %s (pipeline %s) keeps its id: its input is also task %s's",
                task_id,
                pipeline_id,
                new_id,
            )
            continue
        rewrite = _TASK.update().where(_TASK.c.id == task_id)
        bind.execute(rewrite.values(task_input=canonical, task_input_id=new_id))


def downgrade() -> None:
    """Ids stay as npg_porch computes them: the old writer is gone."""
