"""Scripts given more members than Lua 5.1's ``unpack`` can return (under 8,000 values): each
command goes in parts inside the script (lib.lua's call_parts, hmget_parts), so a shim HSET of
thousands of fields into one shard, or a large verify or cleanup step, works and stays one
atomic step."""

from __future__ import annotations

import pytest
import redis

from migrator import control
from migrator.phases import Phase
from migrator.redisio import Scripts
from migrator.routing import shard_of
from migrator.shim import ShardRouter
from tests.integration.helpers import read_hash
from tests.integration.shimkit import JOB, SHARDS, SOURCE, record, shard_key

MANY = 9_000  # members, past the 8,000-value limit on their own


def _members_of_one_shard(n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        m = f"user:{i}"
        if shard_of(m, SHARDS) == 0:
            out.append(m)
        i += 1
    return out


@pytest.mark.parametrize("phase", [Phase.DUAL_WRITE, Phase.VERIFIED, Phase.CLEANING])
def test_a_shim_write_of_thousands_of_fields_into_one_shard(r: redis.Redis, phase: Phase) -> None:
    control.publish(r, record(phase))
    members = _members_of_one_shard(5_000)  # 10,000 values in one HSET
    with ShardRouter.attach(r, JOB, refresh_interval=0.05) as users:
        assert users.hset(mapping={m: "v" for m in members}) == len(members)
        assert read_hash(r, SOURCE) == read_hash(r, shard_key(members[0]))
        assert len(read_hash(r, SOURCE)) == len(members)
        assert users.hdel(*members) == len(members)
    assert not r.exists(SOURCE)
    # While the copy may run a delete leaves marks; afterwards it removes the members.
    left = read_hash(r, shard_key(members[0]))
    assert len(left) == (len(members) if phase is Phase.DUAL_WRITE else 0)


def test_verify_scripts_take_more_members_than_unpack_returns(r: redis.Redis) -> None:
    scripts = Scripts(r)
    members = [f"m{i}".encode() for i in range(MANY)]
    r.hset("src", mapping={m: b"v" for m in members[: MANY // 2]})
    r.hset("dst", mapping={m: b"v" for m in members})
    # Source → shard: every member is checked, and none differs where both hold it.
    _us, diffs = scripts.hash_verify_members(["src", "dst"], [MANY // 2, *members[: MANY // 2]])
    assert diffs == []
    _us, diffs = scripts.hash_verify_members(["src", "dst"], [MANY, *members])
    assert len(diffs) == 3 * (MANY - MANY // 2)  # the second half is only in the shard
    # Shard → source: the members the source lacks.
    _us, missing, swept = scripts.hash_missing_members(["src", "dst"], members)
    assert sorted(missing) == sorted(members[MANY // 2 :]) and swept == 0


def test_a_cleanup_step_that_scans_more_than_unpack_returns(r: redis.Redis) -> None:
    r.hset("big", mapping={f"m{i}": "v" for i in range(12_000)})
    cursor, removed, _us = Scripts(r).delete_step(["big"], ["0", MANY])
    assert removed >= 8_000 and r.hlen("big") == 12_000 - removed
    while cursor not in (b"0", 0, "0"):
        cursor, _removed, _us = Scripts(r).delete_step(["big"], [cursor, MANY])
    assert not r.exists("big")
