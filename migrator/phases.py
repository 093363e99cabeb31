"""Phases of a job and the table of legal transitions (SPEC §2). Pure: no I/O.

::

    planned → dual_write → copying → verifying → verified → gray ⇄ cutover → cleaning → done
    any phase before cleaning → rolling_back → rolled_back → (planned, when applied again)

What the shim does in each phase is derived here too, so the runner and every application
instance read one table.
"""

from __future__ import annotations

from enum import Enum

from migrator.errors import IllegalTransition


class Phase(str, Enum):
    PLANNED = "planned"
    DUAL_WRITE = "dual_write"
    COPYING = "copying"
    VERIFYING = "verifying"
    VERIFIED = "verified"
    GRAY = "gray"
    CUTOVER = "cutover"
    CLEANING = "cleaning"
    DONE = "done"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"

    def __str__(self) -> str:
        return self.value


P = Phase

BEFORE_CLEANING = frozenset(
    {P.PLANNED, P.DUAL_WRITE, P.COPYING, P.VERIFYING, P.VERIFIED, P.GRAY, P.CUTOVER}
)

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    P.PLANNED: frozenset({P.DUAL_WRITE}),
    P.DUAL_WRITE: frozenset({P.COPYING}),
    P.COPYING: frozenset({P.VERIFYING}),
    # verifying → gray/cutover only with set-ratio --force (a failed verify the operator accepts)
    P.VERIFYING: frozenset({P.VERIFIED, P.GRAY, P.CUTOVER}),
    P.VERIFIED: frozenset({P.VERIFYING, P.GRAY, P.CUTOVER}),
    P.GRAY: frozenset({P.GRAY, P.CUTOVER, P.VERIFIED}),
    P.CUTOVER: frozenset({P.GRAY, P.CLEANING, P.VERIFIED}),
    P.CLEANING: frozenset({P.DONE}),
    P.DONE: frozenset(),
    P.ROLLING_BACK: frozenset({P.ROLLED_BACK}),
    P.ROLLED_BACK: frozenset({P.PLANNED}),
}
for _p in BEFORE_CLEANING:
    TRANSITIONS[_p] = TRANSITIONS[_p] | {P.ROLLING_BACK}

#: Phases in which the runner has work to do when a job is resumed.
ACTIVE = frozenset({P.PLANNED, P.DUAL_WRITE, P.COPYING, P.VERIFYING, P.CLEANING, P.ROLLING_BACK})
TERMINAL = frozenset({P.DONE, P.ROLLED_BACK})
#: Phases in which the ratio may be moved without --force.
RATIO_PHASES = frozenset({P.VERIFIED, P.GRAY, P.CUTOVER})


def check_transition(current: Phase, new: Phase) -> None:
    """Raise IllegalTransition unless ``current → new`` is in the table."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(p.value for p in TRANSITIONS[current])) or "nothing (terminal)"
        raise IllegalTransition(
            f"cannot move from phase {current.value} to {new.value}; from {current.value} "
            f"the job can move to: {allowed}"
        )


def phase_for_ratio(ratio: int) -> Phase:
    return P.CUTOVER if ratio >= 100 else P.GRAY


# What application writes go to, per phase (SPEC §2 table).
def writes_old(phase: Phase | None) -> bool:
    return phase not in (P.CLEANING, P.DONE)


def writes_shards(phase: Phase | None) -> bool:
    return phase in (
        P.DUAL_WRITE,
        P.COPYING,
        P.VERIFYING,
        P.VERIFIED,
        P.GRAY,
        P.CUTOVER,
        P.CLEANING,
        P.DONE,
    )


#: What a dual write leaves in a shard in place of a member it deletes while the copy may run:
#: the copy only inserts members a shard lacks (copier.py), so a delete must not leave a gap
#: that a value scanned before it could fill. Verify's shard pass removes the marks, after a
#: barrier past which no shim writes them; reads through the shim never return one. Equal to
#: ``TOMBSTONE`` in redisio/lua/lib.lua.
TOMBSTONE = b"\x00migrator:deleted\x00"


def marks_deletes(phase: Phase | None) -> bool:
    """Whether a dual-write delete leaves a TOMBSTONE in the shard: while the copy may run."""
    return phase in (P.DUAL_WRITE, P.COPYING)


def reads_shards_only(phase: Phase | None) -> bool:
    """After cleaning starts the old key is being removed: shards are the truth."""
    return phase in (P.CLEANING, P.DONE)
