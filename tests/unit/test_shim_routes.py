"""The shim's routing table (pure): which keys each phase writes and reads."""

from __future__ import annotations

import dataclasses

import pytest

from migrator.control import ControlRecord
from migrator.phases import Phase
from migrator.routing import sticky_bucket
from migrator.shim.routes import (
    SHADOW_PHASES,
    ReadPath,
    WriteMode,
    read_path,
    scans_shards,
    shadow_read,
    write_mode,
)

P = Phase
MEMBERS = [f"user:{i}" for i in range(2000)]


def rec(phase: Phase, ratio: int = 0, **kw: object) -> ControlRecord:
    base = ControlRecord(
        job="j",
        phase=phase,
        ratio=ratio,
        epoch=1,
        source_key="big",
        source_type="hash",
        template="big:{shard}",
        shards=8,
        hash="crc32",
        salt="s1",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("phase", "mode"),
    [
        (None, WriteMode.OLD),
        (P.PLANNED, WriteMode.OLD),
        (P.DUAL_WRITE, WriteMode.DUAL),
        (P.COPYING, WriteMode.DUAL),
        (P.VERIFYING, WriteMode.DUAL),
        (P.VERIFIED, WriteMode.DUAL),
        (P.GRAY, WriteMode.DUAL),
        (P.CUTOVER, WriteMode.DUAL),
        (P.CLEANING, WriteMode.MIRROR),
        (P.DONE, WriteMode.SHARDS),
        (P.ROLLING_BACK, WriteMode.OLD),
        (P.ROLLED_BACK, WriteMode.OLD),
    ],
)
def test_write_mode_follows_the_phase_table(phase: Phase | None, mode: WriteMode) -> None:
    assert write_mode(None if phase is None else rec(phase)) is mode


def test_cleaning_writes_shards_only_once_the_old_key_is_retired() -> None:
    assert write_mode(rec(P.CLEANING, retire_old=0)) is WriteMode.MIRROR
    assert write_mode(rec(P.CLEANING, retire_old=1)) is WriteMode.SHARDS


@pytest.mark.parametrize(
    ("phase", "path"),
    [
        (P.PLANNED, ReadPath.OLD),
        (P.DUAL_WRITE, ReadPath.OLD),
        (P.COPYING, ReadPath.OLD),
        (P.VERIFYING, ReadPath.OLD),
        (P.VERIFIED, ReadPath.OLD),
        (P.CUTOVER, ReadPath.SHARD),
        (P.CLEANING, ReadPath.SHARD_ONLY),
        (P.DONE, ReadPath.SHARD_ONLY),
        (P.ROLLING_BACK, ReadPath.OLD),
        (P.ROLLED_BACK, ReadPath.OLD),
    ],
)
def test_read_path_outside_gray_is_the_same_for_every_member(phase: Phase, path: ReadPath) -> None:
    assert {read_path(rec(phase), m) for m in MEMBERS[:200]} == {path}


def test_no_record_reads_old() -> None:
    assert read_path(None, "x") is ReadPath.OLD
    assert not scans_shards(None)


def test_gray_sticky_bucket_decides_and_ratio_bounds() -> None:
    r30 = rec(P.GRAY, 30)
    paths = {m: read_path(r30, m) for m in MEMBERS}
    for m, p in paths.items():
        assert (p is ReadPath.SHARD) == (sticky_bucket(m, "s1") < 30)
    share = sum(p is ReadPath.SHARD for p in paths.values()) / len(MEMBERS)
    assert 0.25 < share < 0.35
    assert {read_path(rec(P.GRAY, 0), m) for m in MEMBERS[:200]} == {ReadPath.OLD}
    assert {read_path(rec(P.GRAY, 100), m) for m in MEMBERS[:200]} == {ReadPath.SHARD}


def test_raising_the_ratio_never_moves_a_member_back_to_old() -> None:
    for m in MEMBERS:
        if read_path(rec(P.GRAY, 30), m) is ReadPath.SHARD:
            assert read_path(rec(P.GRAY, 60), m) is ReadPath.SHARD


def test_another_salt_buckets_differently() -> None:
    a = [read_path(rec(P.GRAY, 50), m) for m in MEMBERS[:500]]
    b = [read_path(rec(P.GRAY, 50, salt="s2"), m) for m in MEMBERS[:500]]
    assert a != b


def test_random_bucketing_draws_per_call() -> None:
    r = rec(P.GRAY, 30, bucketing="random")
    assert read_path(r, "m", rand=lambda: 0.29) is ReadPath.SHARD
    assert read_path(r, "m", rand=lambda: 0.30) is ReadPath.OLD


def test_shadow_reads_only_once_the_copy_is_done() -> None:
    always = lambda: 0.0  # noqa: E731
    for phase in Phase:
        assert shadow_read(rec(phase, shadow_sample=0.5), rand=always) is (phase in SHADOW_PHASES)
    assert not shadow_read(rec(P.GRAY, shadow_sample=0.0), rand=always)
    assert not shadow_read(rec(P.GRAY, shadow_sample=0.1), rand=lambda: 0.5)
    assert not shadow_read(None, rand=always)


def test_scans_shards_only_once_the_source_is_being_removed() -> None:
    assert {p for p in Phase if scans_shards(rec(p))} == {P.CLEANING, P.DONE}
