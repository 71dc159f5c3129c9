"""The transition table of the specification, every pair of states."""

import itertools

import pytest

from porch_server.errors import FailedPrecondition
from porch_server.states import State, check_transition, is_noop

S = State
ALLOWED = {
    (S.PENDING, S.CANCELLED),
    (S.PENDING, S.PENDING),
    *((S.CLAIMED, new) for new in (S.RUNNING, S.DONE, S.FAILED, S.CANCELLED, S.PENDING)),
    *((S.RUNNING, new) for new in (S.RUNNING, S.DONE, S.FAILED, S.CANCELLED, S.PENDING)),
    (S.DONE, S.PENDING),
    (S.FAILED, S.PENDING),
    (S.CANCELLED, S.PENDING),
}
ALL_PAIRS = list(itertools.product(State, State))


@pytest.mark.parametrize(("old", "new"), sorted(ALLOWED))
def test_allowed(old: State, new: State) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), [p for p in ALL_PAIRS if p not in ALLOWED])
def test_forbidden_names_both_states(old: State, new: State) -> None:
    with pytest.raises(FailedPrecondition) as raised:
        check_transition(old, new)
    assert str(old) in str(raised.value)
    assert str(new) in str(raised.value)


def test_only_a_claim_claims() -> None:
    with pytest.raises(FailedPrecondition, match="only ClaimTasks"):
        check_transition(S.PENDING, S.CLAIMED)


def test_pending_to_pending_is_the_only_noop() -> None:
    assert [p for p in ALL_PAIRS if is_noop(*p)] == [(S.PENDING, S.PENDING)]
