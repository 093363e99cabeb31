"""The applied epoch: reported only once no call of an older record is still in flight."""

from __future__ import annotations

import dataclasses
import threading

from migrator.control import ControlRecord
from migrator.phases import Phase
from migrator.shim.inflight import EpochTracker


def rec(epoch: int, phase: Phase = Phase.DUAL_WRITE, **kw: object) -> ControlRecord:
    base = ControlRecord(
        job="j",
        phase=phase,
        ratio=0,
        epoch=epoch,
        source_key="big",
        source_type="hash",
        template="big:{shard}",
        shards=4,
        hash="crc32",
        salt="s",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_no_record_is_epoch_zero() -> None:
    t = EpochTracker()
    assert t.record is None
    assert t.applied_epoch() == 0


def test_new_record_applied_at_once_when_nothing_in_flight() -> None:
    t = EpochTracker(rec(1))
    assert t.install(rec(2))
    assert t.applied_epoch() == 2
    assert not t.install(rec(2)), "an unchanged record is not a new generation"


def test_call_of_an_older_record_holds_the_applied_epoch_back() -> None:
    t = EpochTracker(rec(1))
    gen, seen = t.enter()
    assert seen == rec(1)
    t.install(rec(2))
    assert t.applied_epoch() == 1
    gen2, seen2 = t.enter()  # a new call uses the new record and does not hold anything back
    assert seen2 == rec(2)
    assert t.applied_epoch() == 1
    t.exit(gen)
    assert t.applied_epoch() == 2
    t.exit(gen2)
    assert t.in_flight() == 0


def test_republished_record_with_the_same_epoch_is_tracked_by_generation() -> None:
    t = EpochTracker(rec(3, ratio=10))
    gen, _ = t.enter()
    t.install(rec(3, ratio=20))
    t.install(rec(4, ratio=30))
    assert t.applied_epoch() == 3
    t.exit(gen)
    assert t.applied_epoch() == 4


def test_threads_in_flight_across_several_records() -> None:
    t = EpochTracker(rec(1))
    entered, release = threading.Barrier(5), threading.Event()

    def call() -> None:
        gen, _ = t.enter()
        entered.wait()
        release.wait()
        t.exit(gen)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for th in threads:
        th.start()
    entered.wait()
    t.install(rec(2))
    t.install(rec(3))
    assert t.in_flight() == 4
    assert t.applied_epoch() == 1
    release.set()
    for th in threads:
        th.join()
    assert t.applied_epoch() == 3
