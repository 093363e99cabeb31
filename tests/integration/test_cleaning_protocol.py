"""Cleanup's two barriers: while instances move from cutover to cleaning no update is lost.

Instances in cutover write old first then shard; in cleaning (before the old key is retired)
shard first then old; after retirement the shards only. Any two neighbouring modes may run at
once (a barrier separates the others), and every mix must give the serial result.
"""

from __future__ import annotations

import time

import redis

from migrator import control
from migrator.control import ControlRecord
from migrator.phases import Phase
from migrator.routing import shard_of
from migrator.shim import ShardRouter
from migrator.shim.dual import DualCall, DualWriter

SHARDS = 4
MEMBER = "counter"
SHARD_KEY = f"big:{shard_of(MEMBER, SHARDS)}"


def _cutover(w: DualWriter, *args: object) -> None:
    w.run([DualCall("big", SHARD_KEY, list(args))])


def _mirror(w: DualWriter, *args: object) -> None:
    w.run([DualCall(SHARD_KEY, "big", list(args))])


def test_delete_on_retired_then_increment_on_mirroring_is_not_resurrected(
    r: redis.Redis,
) -> None:
    w = DualWriter(r)
    r.hset("big", MEMBER, 10)
    r.hset(SHARD_KEY, MEMBER, 10)
    r.hdel(SHARD_KEY, MEMBER)  # an instance that already writes the shards only
    _mirror(w, "hincrby", MEMBER, 1)  # one still mirroring into the old key
    assert r.hget(SHARD_KEY, MEMBER) == b"1"  # the serial result: delete, then +1
    assert r.hget("big", MEMBER) == b"1"


def test_cutover_and_mirroring_instances_keep_both_sides_equal(r: redis.Redis) -> None:
    w = DualWriter(r)
    r.hset("big", MEMBER, 10)
    r.hset(SHARD_KEY, MEMBER, 10)
    for i in range(20):
        (_cutover if i % 2 else _mirror)(w, "hincrby", MEMBER, i)
    _mirror(w, "hset", "other", "x")
    _cutover(w, "hdel", "other")
    assert r.hget("big", MEMBER) == r.hget(SHARD_KEY, MEMBER) == str(10 + sum(range(20))).encode()
    assert not r.hexists("big", "other")
    assert not r.hexists(f"big:{shard_of('other', SHARDS)}", "other")


def _publish(r: redis.Redis, retire_old: int, epoch: int) -> None:
    control.publish(
        r,
        ControlRecord(
            job="t-job",
            phase=Phase.CLEANING,
            ratio=100,
            epoch=epoch,
            source_key="big",
            source_type="hash",
            template="big:{shard}",
            shards=SHARDS,
            hash="crc32",
            salt="s",
            retire_old=retire_old,
        ),
    )


def test_shim_mirrors_until_the_old_key_is_retired(r: redis.Redis) -> None:
    _publish(r, retire_old=0, epoch=7)
    router = ShardRouter.attach(r, "t-job", refresh_interval=0.1)
    try:
        router.hset(MEMBER, "a")
        assert r.hget("big", MEMBER) == r.hget(SHARD_KEY, MEMBER) == b"a"
        _publish(r, retire_old=1, epoch=8)
        deadline = time.monotonic() + 2
        while router.applied_epoch != 8:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        router.hset(MEMBER, "b")
        assert r.hget(SHARD_KEY, MEMBER) == b"b"
        assert r.hget("big", MEMBER) == b"a"  # the retired old key is no longer written
        assert router.hget(MEMBER) == b"b"
    finally:
        router.close()
