from __future__ import annotations

import pytest

from migrator.errors import IllegalTransition
from migrator.phases import BEFORE_CLEANING, TRANSITIONS, Phase, check_transition, phase_for_ratio

P = Phase

FORWARD = [
    P.PLANNED,
    P.DUAL_WRITE,
    P.COPYING,
    P.VERIFYING,
    P.VERIFIED,
    P.GRAY,
    P.CUTOVER,
    P.CLEANING,
    P.DONE,
]


def test_the_forward_path_is_legal() -> None:
    for a, b in zip(FORWARD, FORWARD[1:], strict=False):
        check_transition(a, b)


@pytest.mark.parametrize("phase", sorted(BEFORE_CLEANING))
def test_rollback_is_possible_from_every_phase_before_cleaning(phase: Phase) -> None:
    check_transition(phase, P.ROLLING_BACK)


@pytest.mark.parametrize("phase", [P.CLEANING, P.DONE, P.ROLLED_BACK])
def test_no_rollback_once_cleaning_started(phase: Phase) -> None:
    with pytest.raises(IllegalTransition, match="cannot move"):
        check_transition(phase, P.ROLLING_BACK)


def test_illegal_jumps_are_errors_not_no_ops() -> None:
    with pytest.raises(IllegalTransition, match="copying to done"):
        check_transition(P.COPYING, P.DONE)
    with pytest.raises(IllegalTransition):
        check_transition(P.DUAL_WRITE, P.GRAY)
    assert TRANSITIONS[P.DONE] == frozenset()


def test_ratio_maps_to_phase() -> None:
    assert phase_for_ratio(100) == P.CUTOVER
    assert phase_for_ratio(99) == P.GRAY
    assert phase_for_ratio(1) == P.GRAY
