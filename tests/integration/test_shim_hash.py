"""The shim's Hash commands against real servers: where writes land and where reads come from.

Each test publishes the control record itself (control.publish) to put the shim in a phase.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from migrator import control, keys
from migrator.control import ControlRecord
from migrator.phases import TOMBSTONE, Phase, marks_deletes
from migrator.routing import sticky_bucket
from migrator.shim import (
    ReadPath,
    ShardRouter,
    ShimClosed,
    ShimNotConfigured,
    ShimReservedValue,
    ShimWrongType,
)
from tests.integration.shimkit import (
    JOB,
    SALT,
    SHARDS,
    SOURCE,
    TEMPLATE,
    eventually,
    record,
    shard_key,
)

P = Phase
Attach = Callable[..., ShardRouter]


def data_keys(client: redis.Redis) -> set[str]:
    """Every key but migrator's own bookkeeping (a test helper: SCAN is fine here)."""
    return {
        k.decode() if isinstance(k, bytes) else k
        for k in client.scan_iter(count=1000)
        if not (k.decode() if isinstance(k, bytes) else k).startswith("migrator:")
    }


def move_to(r: redis.Redis, router: ShardRouter, rec: ControlRecord) -> None:
    control.publish(r, rec)
    eventually(lambda: router.record == rec)


@pytest.fixture
def attach(r: redis.Redis) -> Iterator[Attach]:
    routers: list[ShardRouter] = []

    def _attach(client: redis.Redis | None = None, **kw: Any) -> ShardRouter:
        kw.setdefault("refresh_interval", 0.05)
        router = ShardRouter.attach(client or r, JOB, **kw)
        routers.append(router)
        return router

    yield _attach
    for router in routers:
        router.close()


def no_loader(member: Any) -> Any:
    raise AssertionError(f"the loader was called for {member!r}")


# -- before the job exists ---------------------------------------------------------------------


def test_pass_through_before_a_record_exists(r: redis.Redis, attach: Attach) -> None:
    users = attach(source_key=SOURCE)
    assert users.record is None
    assert users.hset("a", "1") == 1
    assert users.hset(mapping={"b": "2", "c": "3"}) == 2
    assert users.hincrby("n", 5) == 5
    assert users.hincrbyfloat("f", 1.5) == 1.5
    assert users.hget("a") == b"1"
    assert users.hmget(["a", "b", "zz"]) == [b"1", b"2", None]
    assert users.hexists("c") and not users.hexists("zz")
    assert users.hdel("c", "zz") == 1
    assert users.hlen() == 4
    assert dict(users.hscan_iter()) == {b"a": b"1", b"b": b"2", b"n": b"5", b"f": b"1.5"}
    assert data_keys(r) == {SOURCE}


def test_without_record_or_source_key_calls_raise_until_the_job_is_published(
    r: redis.Redis, attach: Attach
) -> None:
    users = attach()
    with pytest.raises(ShimNotConfigured, match="source_key"):
        users.hget("a")
    with pytest.raises(ShimNotConfigured):
        users.hset("a", "1")
    r.hset(SOURCE, "a", "old")
    control.publish(r, record(P.PLANNED))
    eventually(lambda: users.record is not None)
    assert users.hget("a") == b"old"


def test_record_source_key_wins_over_the_attach_argument(r: redis.Redis, attach: Attach) -> None:
    control.publish(r, record(P.PLANNED))
    users = attach(source_key="something:else")
    users.hset("a", "1")
    assert r.hget(SOURCE, "a") == b"1"
    assert not r.exists("something:else")


def test_a_job_of_another_type_is_refused(r: redis.Redis, attach: Attach) -> None:
    control.publish(r, record(P.DUAL_WRITE, source_type="set"))
    users = attach()
    with pytest.raises(ShimWrongType, match="set"):
        users.hget("a")


# -- writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [P.PLANNED, P.ROLLING_BACK, P.ROLLED_BACK])
def test_old_only_phases_never_touch_the_shards(
    r: redis.Redis, attach: Attach, phase: Phase
) -> None:
    control.publish(r, record(phase))
    users = attach()
    users.hset(mapping={f"m{i}": str(i) for i in range(20)})
    users.hincrby("m1", 1)
    users.hdel("m2")
    assert data_keys(r) == {SOURCE}
    assert r.hlen(SOURCE) == 19 and r.hget(SOURCE, "m1") == b"2"


@pytest.mark.parametrize("phase", [P.DUAL_WRITE, P.COPYING, P.VERIFIED, P.GRAY, P.CUTOVER])
def test_dual_writes_land_in_old_and_in_the_right_shard(
    r: redis.Redis, attach: Attach, phase: Phase
) -> None:
    control.publish(r, record(phase, ratio=50 if phase is P.GRAY else 0))
    users = attach()
    members = {f"user:{i}": f"v{i}" for i in range(60)}
    assert users.hset(mapping=members) == 60
    assert users.hset("user:0", "changed") == 0
    members["user:0"] = "changed"
    for m, v in members.items():
        assert r.hget(SOURCE, m) == v.encode()
        assert r.hget(shard_key(m), m) == v.encode()
    # each member is in its own shard only
    lengths: list[int] = [r.hlen(TEMPLATE.replace("{shard}", str(s))) for s in range(SHARDS)]  # type: ignore[misc]
    assert sum(lengths) == 60
    assert data_keys(r) == {SOURCE} | {TEMPLATE.replace("{shard}", str(s)) for s in range(SHARDS)}

    gone = [f"user:{i}" for i in range(10)]
    assert users.hdel(*gone, "user:nope") == 10
    for m in gone:
        assert not r.hexists(SOURCE, m)
        # While the copy may run a delete leaves a mark in the shard (the copy inserts only
        # what a shard lacks); later it is a plain delete.
        left = TOMBSTONE if marks_deletes(phase) else None
        assert r.hget(shard_key(m), m) == left
        assert users.hget(m) is None and not users.hexists(m)
    # A member the source never held is not marked: no scan can have read it.
    assert r.hget(shard_key("user:nope"), "user:nope") is None
    assert users.hsetnx("user:20", "ignored") == 0
    assert users.hsetnx("fresh", "x") == 1
    assert r.hget(shard_key("fresh"), "fresh") == b"x"
    assert r.hget(shard_key("user:20"), "user:20") == b"v20"


def test_hincrby_in_dual_write_sets_the_shard_to_the_full_source_value(
    r: redis.Redis, attach: Attach
) -> None:
    # Members that exist in the source only: the copy has not reached them yet.
    r.hset(SOURCE, mapping={"count": 10, "ratio": "1.25", "nx": "kept"})
    control.publish(r, record(P.DUAL_WRITE))
    users = attach()
    assert users.hincrby("count", 5) == 15
    assert r.hget(shard_key("count"), "count") == b"15"
    assert r.hget(SOURCE, "count") == b"15"
    assert users.hincrbyfloat("ratio", 0.5) == 1.75
    assert r.hget(shard_key("ratio"), "ratio") == b"1.75"
    assert users.hsetnx("nx", "lost") == 0
    assert r.hget(shard_key("nx"), "nx") == b"kept"
    # the increment is applied once: a second call is not replayed from the shard
    assert users.hincrby("count", 1) == 16
    assert r.hget(shard_key("count"), "count") == b"16"


@pytest.mark.parametrize(
    ("phase", "ratio"), [(P.DUAL_WRITE, 0), (P.CUTOVER, 100), (P.CLEANING, 100)]
)
def test_hincrby_past_2_to_the_53_is_exact_on_both_sides(
    r: redis.Redis, attach: Attach, phase: Phase, ratio: int
) -> None:
    """Nanosecond timestamps and Snowflake ids are integers past 2^53, where a Lua number (a
    double) rounds: both sides, and the reply, carry the exact value, as plain HINCRBY's."""
    big = 1_700_000_000_000_000_000
    r.hset(SOURCE, "ts", big)
    r.hset(shard_key("ts"), "ts", big)
    control.publish(r, record(phase, ratio=ratio))  # cleaning: mirroring, shards first
    users = attach()
    assert users.hincrby("ts", 1) == big + 1
    assert users.hincrby("ts", 2**62) == big + 1 + 2**62
    want = str(big + 1 + 2**62).encode()
    assert r.hget(SOURCE, "ts") == want and r.hget(shard_key("ts"), "ts") == want
    assert users.hget("ts") == want


@pytest.mark.parametrize("phase", [P.CLEANING, P.DONE])
def test_after_cleaning_writes_go_to_the_shards_only(
    r: redis.Redis, attach: Attach, phase: Phase
) -> None:
    # in cleaning, once the runner retired the old key (its second barrier)
    control.publish(r, record(phase, retire_old=1))
    users = attach()
    assert users.hset(mapping={"a": "1", "b": "2"}) == 2
    assert users.hincrby("n", 3) == 3
    assert users.hdel("b") == 1
    assert not r.exists(SOURCE)
    assert r.hget(shard_key("a"), "a") == b"1"
    assert r.hget(shard_key("n"), "n") == b"3"
    assert not r.hexists(shard_key("b"), "b")


def test_multi_shard_dual_write_survives_a_flushed_script_cache(
    r: redis.Redis, attach: Attach
) -> None:
    control.publish(r, record(P.COPYING))
    users = attach()
    users.hset("warm", "1")
    r.script_flush()  # as after a restart or failover: every EVALSHA gets NOSCRIPT
    assert users.hset(mapping={f"k{i}": "v" for i in range(30)}) == 30
    assert r.hlen(SOURCE) == 31
    assert all(r.hget(shard_key(f"k{i}"), f"k{i}") == b"v" for i in range(30))


def test_a_failed_dual_write_is_counted_and_raised(r: redis.Redis, attach: Attach) -> None:
    r.set(SOURCE, "not a hash")
    control.publish(r, record(P.DUAL_WRITE))
    users = attach()
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        users.hset("a", "1")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        users.hset(mapping={f"k{i}": "v" for i in range(20)})
    assert users.counters()["dual_write_errors"] == 2


@pytest.mark.parametrize("op", ["hset", "hincrby", "hdel"])
def test_a_dual_write_whose_shard_is_not_a_hash_writes_nothing(
    r: redis.Redis, attach: Attach, op: str
) -> None:
    """A script is not undone by an error: it checks both keys first, so the old key is not
    written either, and an app that retries the failed call applies nothing twice."""
    r.hset(SOURCE, mapping={"a": "1", "n": "10"})
    r.set(shard_key("a"), "written outside the shim")
    r.set(shard_key("n"), "written outside the shim")
    control.publish(r, record(P.DUAL_WRITE))
    users = attach()
    call = {
        "hset": lambda: users.hset("a", "2"),
        "hincrby": lambda: users.hincrby("n", 5),
        "hdel": lambda: users.hdel("a"),
    }[op]
    for _ in range(3):
        with pytest.raises(redis.ResponseError, match="nothing was written"):
            call()
    assert r.hgetall(SOURCE) == {b"a": b"1", b"n": b"10"}


# -- reads -------------------------------------------------------------------------------------


def _seed_divergent(r: redis.Redis) -> None:
    """'both' differs between source and shard; the others exist on one side only."""
    r.hset(SOURCE, mapping={"both": "old", "only_old": "old"})
    r.hset(shard_key("both"), "both", "new")
    r.hset(shard_key("only_shard"), "only_shard", "new")


READS = {
    # phase: (both, only_old, only_shard); b"db" is the loader's answer
    P.PLANNED: (b"old", b"old", b"db"),
    P.DUAL_WRITE: (b"old", b"old", b"db"),
    P.COPYING: (b"old", b"old", b"db"),
    P.VERIFYING: (b"old", b"old", b"db"),
    P.VERIFIED: (b"old", b"old", b"db"),
    P.CUTOVER: (b"new", b"old", b"new"),
    P.CLEANING: (b"new", b"db", b"new"),
    P.DONE: (b"new", b"db", b"new"),
    P.ROLLING_BACK: (b"old", b"old", b"db"),
    P.ROLLED_BACK: (b"old", b"old", b"db"),
}


def test_reads_follow_the_phase_table(r: redis.Redis, attach: Attach) -> None:
    _seed_divergent(r)
    control.publish(r, record(P.PLANNED))
    users = attach(loader=lambda m: b"db")
    for epoch, (phase, expected) in enumerate(READS.items(), start=2):
        move_to(r, users, record(phase, epoch=epoch))
        members = ["both", "only_old", "only_shard"]
        assert tuple(users.hget(m) for m in members) == expected, phase
        assert tuple(users.hmget(members)) == expected, phase
        assert tuple(users.hexists(m) for m in members) == tuple(v != b"db" for v in expected)


def test_gray_reads_by_sticky_bucket_with_fallback(r: redis.Redis, attach: Attach) -> None:
    members = [f"user:{i}" for i in range(200)]
    for m in members:  # the shard has a newer value for every member
        r.hset(SOURCE, m, "old")
        r.hset(shard_key(m), m, "new")
    control.publish(r, record(P.GRAY, ratio=40))
    users = attach(loader=no_loader)
    on_shard = {m for m in members if sticky_bucket(m, SALT) < 40}
    assert 0 < len(on_shard) < len(members)
    expected = [b"new" if m in on_shard else b"old" for m in members]
    assert users.hmget(members) == expected
    assert [users.hget(m) for m in members] == expected
    assert {m for m in members if users.read_path(m) is ReadPath.SHARD} == on_shard
    counted = users.counters()
    assert counted["reads_shard"] == 2 * len(on_shard)
    assert counted["reads_old"] == 2 * (len(members) - len(on_shard))
    assert counted["fallbacks"] == 0


def test_gray_never_reaches_the_loader_while_the_member_is_in_old(
    r: redis.Redis, attach: Attach
) -> None:
    # Nothing copied yet: every shard-path read misses its shard.
    members = [f"user:{i}" for i in range(100)]
    r.hset(SOURCE, mapping={m: "old" for m in members})
    control.publish(r, record(P.GRAY, ratio=99))
    users = attach(loader=no_loader)
    assert users.hmget(members) == [b"old"] * 100
    assert all(users.hget(m) == b"old" for m in members)
    assert all(users.hexists(m) for m in members)
    counted = users.counters()
    assert counted["fallbacks"] >= 2 * 90  # ~99% of reads took the shard path and fell back
    assert counted["loader_calls"] == 0


@pytest.mark.parametrize("phase", [P.DUAL_WRITE, P.GRAY, P.CUTOVER, P.DONE])
def test_loader_results_are_not_written_back(r: redis.Redis, attach: Attach, phase: Phase) -> None:
    control.publish(r, record(phase, ratio=99 if phase is P.GRAY else 0))
    calls: list[Any] = []

    def loader(member: Any) -> str:
        calls.append(member)
        return f"db:{member}"

    users = attach(loader=loader)
    assert users.hget("ghost") == "db:ghost"
    assert users.hmget(["ghost", "ghost2"]) == ["db:ghost", "db:ghost2"]
    assert calls == ["ghost", "ghost", "ghost2"]
    assert data_keys(r) == set()
    assert users.counters()["loader_calls"] == 3


def test_without_a_loader_a_miss_is_none(r: redis.Redis, attach: Attach) -> None:
    control.publish(r, record(P.CUTOVER))
    users = attach()
    assert users.hget("ghost") is None
    assert users.hmget(["ghost"]) == [None]
    assert users.hmget([]) == []


def test_shadow_reads_count_mismatches_once_the_copy_is_done(
    r: redis.Redis, attach: Attach
) -> None:
    r.hset(SOURCE, mapping={"same": "1", "differs": "1", "not_copied": "1"})
    r.hset(shard_key("same"), "same", "1")
    r.hset(shard_key("differs"), "differs", "2")
    control.publish(r, record(P.COPYING, shadow_sample=1.0))
    users = attach()
    members = ["same", "differs", "not_copied"]
    assert users.hmget(members) == [b"1", b"1", b"1"]
    assert users.counters()["shadow_mismatches"] == 0, "no shadow reads while copying"
    move_to(r, users, record(P.GRAY, epoch=2, ratio=0, shadow_sample=1.0))
    assert users.hmget(members) == [b"1", b"1", b"1"]  # shadow values are never returned
    assert users.counters()["shadow_mismatches"] == 2
    assert users.hget("differs") == b"1"
    assert users.counters()["shadow_mismatches"] == 3


# -- logical scans -----------------------------------------------------------------------------


def test_hscan_iter_and_hlen_cover_the_logical_hash(r: redis.Redis, attach: Attach) -> None:
    members = {f"user:{i}".encode(): b"v" for i in range(300)}
    r.hset(SOURCE, mapping=members)
    for m in members:
        r.hset(shard_key(m.decode()), m.decode(), "v")
    r.hset(shard_key("stray"), "stray", "shard-only")  # tells which side is scanned
    control.publish(r, record(P.CUTOVER))
    users = attach()
    assert dict(users.hscan_iter(count=50)) == members
    assert users.hlen() == 300
    assert {k for k, _ in users.hscan_iter(match="user:1*")} == {
        m for m in members if m.startswith(b"user:1")
    }

    move_to(r, users, record(P.CLEANING, epoch=2))
    r.delete(SOURCE)  # what the cleaner does once every instance acknowledged cleaning
    assert dict(users.hscan_iter(count=50)) == {**members, b"stray": b"shard-only"}
    assert users.hlen() == 301


def test_hscan_iter_restarts_over_the_shards_when_cleaning_begins_mid_scan(
    r: redis.Redis, attach: Attach
) -> None:
    members = {f"user:{i}".encode(): b"v" for i in range(400)}
    r.hset(SOURCE, mapping=members)
    for m in members:
        r.hset(shard_key(m.decode()), m.decode(), "v")
    control.publish(r, record(P.CUTOVER))
    users = attach()
    it = users.hscan_iter(count=20)
    seen = {next(it)[0] for _ in range(30)}
    move_to(r, users, record(P.CLEANING, epoch=2))
    r.delete(SOURCE)
    seen |= {k for k, _ in it}
    assert seen == set(members)


# -- client settings and lifecycle -------------------------------------------------------------


def test_return_types_follow_decode_responses(redis_server: Any, attach: Attach) -> None:
    client = redis_server.client(decode_responses=True)
    try:
        control.publish(client, record(P.GRAY, ratio=50))
        users = attach(client)
        users.hset(mapping={f"m{i}": "v" for i in range(20)})
        assert users.hget("m1") == "v"
        assert users.hmget(["m1", "m2", "none"]) == ["v", "v", None]
        assert users.hincrbyfloat("f", 2.5) == 2.5
        assert users.hincrby("n", 2) == 2
        assert dict(users.hscan_iter())["m3"] == "v"
        assert isinstance(users.hexists("m1"), bool)
    finally:
        client.close()


def test_members_given_as_int_or_bytes_route_like_their_text(
    r: redis.Redis, attach: Attach
) -> None:
    control.publish(r, record(P.DUAL_WRITE))
    users = attach()
    users.hset(123, "x")
    users.hset(b"bytes", "y")
    assert r.hget(shard_key("123"), "123") == b"x"
    assert r.hget(shard_key("bytes"), "bytes") == b"y"


def test_members_route_by_the_bytes_the_client_sends(r: redis.Redis, attach: Attach) -> None:
    """The copy routes what HSCAN returns, the bytes on the wire: the shim must route those
    too, whatever form the member was given in, or the copy and the shim put one member into
    two shards. A memoryview is sent as its contents (not as its repr), a str as UTF-8."""
    control.publish(r, record(P.DONE))
    users = attach()
    users.hset(memoryview(b"user:1"), "mv")
    users.hset("caf\u00e9", "text")
    assert r.hget(shard_key("user:1"), b"user:1") == b"mv"
    assert r.hget(shard_key("caf\u00e9"), "caf\u00e9".encode()) == b"text"
    assert users.hget(b"user:1") == b"mv" and users.hget(memoryview(b"user:1")) == b"mv"


def test_hexists_on_a_mark_swept_meanwhile_asks_the_source(r: redis.Redis, attach: Attach) -> None:
    """A shard read that sees a mark's length and then finds the member gone (a verify pass
    swept the mark in between) must not report the member: it asks the source."""
    control.publish(r, record(P.CUTOVER, ratio=100))
    r.hset(shard_key("m"), "m", TOMBSTONE)  # source lacks m: it was deleted

    class SweepBeforeRead(redis.Redis):
        def hget(self, name: Any, key: Any) -> Any:
            r.hdel(name, key)  # the sweep lands between the shim's two round trips
            return super().hget(name, key)

    sweeping = SweepBeforeRead(connection_pool=r.connection_pool)
    users = attach(sweeping)
    assert users.hexists("m") is False
    assert r.hexists(shard_key("m"), "m") == 0


def test_a_write_routed_by_a_record_the_runner_has_moved_past_is_routed_again(
    r: redis.Redis, attach: Attach
) -> None:
    """A dual write held up past the runner's next steps (its instance silent for longer than
    the live window, so the barriers went on without it) must not write by the old routing:
    here cleanup has removed the old key and reached done while the instance still holds the
    cutover record. The script refuses it (nothing written), the shim reads the record
    afresh and writes the shards only."""
    control.publish(r, record(P.CUTOVER, ratio=100, epoch=4))
    users = attach()
    users.hset("c", 1000)
    # This instance stalls: its background refresh stops (what a stalled process looks like).
    watcher = users._watcher
    watcher._stop.set()
    assert watcher._thread is not None
    watcher._thread.join(5)
    assert r.hget(SOURCE, "c") == b"1000" and r.hget(shard_key("c"), "c") == b"1000"
    # The runner moves on without this instance: cleaning, retired, old key gone, done.
    r.delete(SOURCE)
    control.publish(r, record(P.DONE, epoch=7))
    assert users.record is not None and users.record.epoch == 4  # still the old routing
    assert users.hincrby("c", 5) == 1005
    assert not r.exists(SOURCE)  # an increment on the old routing would have recreated it
    assert r.hget(shard_key("c"), "c") == b"1005"
    assert users.record.epoch == 7 and users.counters()["stale_retries"] == 1


@pytest.mark.parametrize("before", [P.PLANNED, P.ROLLED_BACK])
def test_an_old_key_write_routed_before_dual_write_is_routed_again(
    r: redis.Redis, attach: Attach, before: Phase
) -> None:
    """An old-key-only write (planned, or rolled_back before a re-apply) held up past the move
    to dual_write and the start of the copy must not land on the old key alone: the copy may
    have passed its member, and the shard would keep the older value (a delete, the value it
    removed). Fenced as dual writes are, it is refused and routed again, to both sides."""
    r.hset(SOURCE, mapping={"c": "old", "d": "doomed"})
    control.publish(r, record(before, epoch=3))
    users = attach()
    users.hset("w", "1")
    assert r.hget(SOURCE, "w") == b"1" and not r.exists(shard_key("w"))
    watcher = users._watcher  # this instance stalls: its refresh stops
    watcher._stop.set()
    assert watcher._thread is not None
    watcher._thread.join(5)
    # The runner moves on without it: dual_write, and the copy inserts what it scans.
    control.publish(r, record(P.COPYING, epoch=5))
    r.hsetnx(shard_key("c"), "c", "old")
    r.hsetnx(shard_key("d"), "d", "doomed")
    assert users.record is not None and users.record.epoch == 3  # still the old routing
    assert users.hset("c", "new") == 0
    assert users.hdel("d") == 1
    assert r.hget(SOURCE, "c") == b"new" and r.hget(shard_key("c"), "c") == b"new"
    assert not r.hexists(SOURCE, "d") and r.hget(shard_key("d"), "d") == TOMBSTONE
    assert users.record.epoch == 5 and users.counters()["stale_retries"] == 1  # then refreshed


def test_old_key_writes_go_on_when_a_finished_job_s_record_is_removed(
    r: redis.Redis, attach: Attach
) -> None:
    """Rolled back, the job is finished, and someone tidies its keys up: with no record to
    fence by, an old-key-only write routes as it would with no job at all (it used to be
    refused as stale five times, then fail)."""
    control.publish(r, record(P.ROLLED_BACK, epoch=4))
    users = attach()
    users.hset("a", "1")
    r.delete(keys.control(JOB))
    assert users.hset("a", "2") == 0 and users.hincrby("n", 2) == 2
    assert r.hgetall(SOURCE) == {b"a": b"2", b"n": b"2"}


def test_a_closed_router_refuses_calls(r: redis.Redis, attach: Attach) -> None:
    users = attach(source_key=SOURCE)
    users.close()
    users.close()  # idempotent
    with pytest.raises(ShimClosed):
        users.hget("a")


@pytest.mark.parametrize("phase", [P.PLANNED, P.COPYING, P.GRAY, P.DONE])
def test_the_delete_mark_cannot_be_written_as_a_value(
    r: redis.Redis, attach: Attach, phase: Phase
) -> None:
    """Reads of the shards take the mark for an absent member, and a mark stored in the old key
    would be copied into one: the shim refuses it in every phase, before anything is written,
    however it is given."""
    control.publish(r, record(phase, ratio=50 if phase is P.GRAY else 0))
    users = attach()
    for write in (
        lambda: users.hset("a", TOMBSTONE),
        lambda: users.hset("a", TOMBSTONE.decode()),
        lambda: users.hset(mapping={"b": "fine", "a": TOMBSTONE}),
        lambda: users.hsetnx("a", TOMBSTONE),
        lambda: users.hset("a", memoryview(TOMBSTONE)),
    ):
        with pytest.raises(ShimReservedValue, match="delete mark"):
            write()
    assert data_keys(r) == set()
    assert users.hset("a", TOMBSTONE + b"!") == 1  # only the mark itself is reserved


def test_counters_and_keys_stay_under_the_job_prefix(r: redis.Redis, attach: Attach) -> None:
    control.publish(r, record(P.GRAY, ratio=50))
    users = attach(flush_interval=0.05)
    users.hset("a", "1")
    users.hget("a")
    users.close()
    written = {k.decode() for k in r.scan_iter(count=1000)}
    assert written - data_keys(r) <= set(keys.all_keys(JOB))
