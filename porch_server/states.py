"""Task states and the transition table of the specification, as data."""

from __future__ import annotations

from enum import StrEnum

from porch_server.errors import FailedPrecondition


class State(StrEnum):
    """A task's status; the names are the proto enum's value names."""

    PENDING = "PENDING"
    CLAIMED = "CLAIMED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# Transitions an UpdateTask may make. PENDING → CLAIMED is absent on purpose:
# only a claim makes it. PENDING → PENDING is accepted as a no-op.
UPDATE_TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.PENDING, State.CANCELLED}),
    State.CLAIMED: frozenset(
        {State.RUNNING, State.DONE, State.FAILED, State.CANCELLED, State.PENDING}
    ),
    State.RUNNING: frozenset(
        {State.RUNNING, State.DONE, State.FAILED, State.CANCELLED, State.PENDING}
    ),
    State.DONE: frozenset({State.PENDING}),
    State.FAILED: frozenset({State.PENDING}),
    State.CANCELLED: frozenset({State.PENDING}),
}


def check_transition(old: State, new: State) -> None:
    """Raise FailedPrecondition unless an update may move a task from old to new."""
    if new not in UPDATE_TRANSITIONS[old]:
        hint = " (only ClaimTasks claims a task)" if new is State.CLAIMED else ""
        raise FailedPrecondition(f"a task cannot go from {old} to {new}{hint}")


def is_noop(old: State, new: State) -> bool:
    """True for the one accepted update that changes nothing: PENDING → PENDING."""
    return old is State.PENDING and new is State.PENDING
