"""Which keys a call goes to, decided from the cached control record. Pure: no I/O.

The phase table (SPEC §2) is the single source: :mod:`migrator.phases` says which side a
phase writes; this module adds the read side and gray bucketing. ``record is None`` means no
job is published yet, which routes exactly like ``planned``: the source key only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import Enum

from migrator.control import ControlRecord
from migrator.phases import Phase, reads_shards_only, writes_old, writes_shards
from migrator.routing import Member, sticky_bucket

Rand = Callable[[], float]


class ReadPath(str, Enum):
    """Where a read of one member is served from, in order, before the app loader."""

    OLD = "old"  # source key → loader
    SHARD = "shard"  # member's shard → source key → loader
    SHARD_ONLY = "shard_only"  # member's shard → loader (the source key is being removed)

    def __str__(self) -> str:
        return self.value


class WriteMode(str, Enum):
    OLD = "old"  # plain commands on the source key
    DUAL = "dual"  # one hash_dual script per shard touched: source, then shard := source's value
    SHARDS = "shards"  # plain commands on the shard keys
    # cleaning, before the old key is retired: the same script with the roles swapped, the
    # shard first, then source := the shard's value (the shards are the truth from cleaning on)
    MIRROR = "mirror"

    def __str__(self) -> str:
        return self.value


#: Phases in which the copy has finished, so a shard that differs from the source is a real
#: finding. Earlier (dual_write, copying) most shards are still empty and every shadow read
#: would "mismatch".
SHADOW_PHASES = frozenset({Phase.VERIFYING, Phase.VERIFIED, Phase.GRAY})


def phase_of(record: ControlRecord | None) -> Phase | None:
    return record.phase if record is not None else None


def write_mode(record: ControlRecord | None) -> WriteMode:
    phase = phase_of(record)
    if phase is Phase.CLEANING and record is not None and not record.retire_old:
        return WriteMode.MIRROR
    old, shards = writes_old(phase), writes_shards(phase)
    if old and shards:
        return WriteMode.DUAL
    return WriteMode.SHARDS if shards else WriteMode.OLD


def read_path(
    record: ControlRecord | None, member: Member, *, rand: Rand = random.random
) -> ReadPath:
    """The read path of ``member`` under ``record``.

    In gray, sticky bucketing gives a member the same path in every process for a given
    (salt, ratio), and raising the ratio only moves members from OLD to SHARD, never back;
    ``bucketing == "random"`` draws per call instead.
    """
    phase = phase_of(record)
    if record is None or phase is None:
        return ReadPath.OLD
    if reads_shards_only(phase):
        return ReadPath.SHARD_ONLY
    if phase is Phase.CUTOVER:
        return ReadPath.SHARD
    if phase is Phase.GRAY:
        if record.ratio >= 100:
            return ReadPath.SHARD
        if record.ratio <= 0:
            return ReadPath.OLD
        if record.bucketing == "random":
            hit = rand() * 100 < record.ratio
        else:
            hit = sticky_bucket(member, record.salt) < record.ratio
        return ReadPath.SHARD if hit else ReadPath.OLD
    return ReadPath.OLD


def shadow_read(record: ControlRecord | None, *, rand: Rand = random.random) -> bool:
    """Whether one old-path read should also read the shard and compare (shadow_sample)."""
    return (
        record is not None
        and record.phase in SHADOW_PHASES
        and record.shadow_sample > 0
        and rand() < record.shadow_sample
    )


def scans_shards(record: ControlRecord | None) -> bool:
    """hscan_iter/hlen over the shards (cleaning, done) rather than the complete source key."""
    return reads_shards_only(phase_of(record))
