import pytest

from mensajero_common.models import MessageStatus as S
from mensajero_common.status import can_transition, predecessors


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (S.PENDING, S.ASSIGNED, True),
        (S.ASSIGNED, S.SENDING, True),
        (S.ASSIGNED, S.SENT, True),
        (S.SENT, S.DELIVERED, True),
        (S.SENDING, S.FAILED, True),
        (S.SENT, S.FAILED, True),
        (S.DELIVERED, S.SENT, False),
        (S.DELIVERED, S.FAILED, False),
        (S.FAILED, S.SENT, False),
        (S.SENT, S.SENDING, False),
        (S.SENT, S.SENT, False),
        (S.EXPIRED, S.ASSIGNED, False),
        (S.RECEIVED, S.SENT, False),
        (S.PENDING, S.RECEIVED, False),
    ],
)
def test_can_transition_table(current: S, new: S, allowed: bool) -> None:
    assert can_transition(current, new) is allowed


def test_predecessors_of_delivered() -> None:
    assert predecessors(S.DELIVERED) == {S.PENDING, S.ASSIGNED, S.SENDING, S.SENT}
