"""A source with an expiry: its shards get the same absolute deadline, from the copy and from
the shim's dual writes alike."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import redis

from migrator import commands
from migrator.routing import shard_of
from migrator.shim import ShardRouter
from tests.conftest import run_cli
from tests.integration.helpers import eventually, read_shards, seed_hash, write_plan
from tests.integration.life import SOURCE, TEMPLATE, data_keys, decoded, job_state
from tests.servers import RedisServer


def _deadline_in(r: redis.Redis, seconds: int) -> int:
    sec, usec = r.time()
    at = (int(sec) + seconds) * 1000 + int(usec) // 1000
    r.pexpireat(SOURCE, at)
    return at


def test_copied_shards_get_the_sources_absolute_deadline(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    seed_hash(r, SOURCE, 5000)
    at = _deadline_in(r, 3600)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=8)
    time.sleep(0.05)  # a relative TTL copied late would land later than the source's deadline
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    shard_keys = sorted(data_keys(r) - {SOURCE})
    assert len(shard_keys) == 8
    assert {k: r.pexpiretime(k) for k in shard_keys} == {k: at for k in shard_keys}
    assert r.pexpiretime(SOURCE) == at


def test_no_expiry_on_the_source_means_none_on_the_shards(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    seed_hash(r, SOURCE, 1000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=4)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert {r.pttl(k) for k in data_keys(r) - {SOURCE}} == {-1}


def test_shard_keys_the_shim_creates_keep_the_deadline(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    shards = 8
    r.hset(SOURCE, mapping={"m0": "a", "m1": "b"})  # at most two shard keys get created
    at = _deadline_in(r, 3600)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=shards)
    client = redis.Redis.from_url(redis_server.url)
    router = ShardRouter.attach(client, "t-job", source_key=SOURCE)
    try:
        assert commands.apply(str(plan), state_url=state_url).phase == "verified"
        occupied = {shard_of(m, shards) for m in ("m0", "m1")}
        fresh = next(f"x{i}" for i in range(1000) if shard_of(f"x{i}", shards) not in occupied)
        key = TEMPLATE.replace("{shard}", str(shard_of(fresh, shards)))
        assert not r.exists(key)
        router.hset(fresh, "new")
    finally:
        router.close()
        client.close()
    assert r.hget(key, fresh) == b"new"
    assert r.pexpiretime(key) == at
    assert all(r.pexpiretime(k) == at for k in data_keys(r))


def test_a_deadline_set_moved_or_dropped_on_the_source_later_reaches_every_shard(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """An application may EXPIRE or PERSIST the source with its plain client at any time. A
    shim write makes its shard follow at once; verify makes every shard follow at the end of
    each run, and cleanup before the old key stops being the truth, so no shard outlives the
    source's deadline after cleanup, nor expires before it."""
    shards = 8
    seed_hash(r, SOURCE, 2000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=shards)
    assert commands.apply(str(plan), state_url=state_url, allow_no_instances=True).phase == (
        "verified"
    )
    shard_keys = sorted(data_keys(r) - {SOURCE})
    assert len(shard_keys) == shards and {r.pttl(k) for k in shard_keys} == {-1}
    own = TEMPLATE.replace("{shard}", str(shard_of("m1", shards)))
    client = redis.Redis.from_url(redis_server.url)
    router = ShardRouter.attach(client, "t-job")
    try:
        at = _deadline_in(r, 3600)  # set after the copy
        router.hset("m1", "x")
        assert r.pexpiretime(own) == at
        assert sum(r.pttl(k) == -1 for k in shard_keys) == shards - 1

        report = commands.verify("t-job", state_url=state_url)
        assert report.clean and report.deadlines_followed == shards - 1
        assert {r.pexpiretime(k) for k in shard_keys} == {at}

        later = _deadline_in(r, 7200)  # moved (a sliding expiry)
        router.hset("m1", "y")
        assert r.pexpiretime(own) == later
        r.persist(SOURCE)  # dropped
        router.hset("m1", "z")
        assert r.pttl(own) == -1
        assert commands.verify("t-job", state_url=state_url).deadlines_followed == shards - 1
        assert {r.pttl(k) for k in shard_keys} == {-1}

        last = _deadline_in(r, 1800)
        commands.set_ratio(100, name="t-job", state_url=state_url)
        assert commands.cleanup("t-job", state_url=state_url).phase == "done"
        assert not r.exists(SOURCE)
        assert {r.pexpiretime(k) for k in shard_keys} == {last}
    finally:
        router.close()
        client.close()


def test_the_shims_expiry_verbs_give_the_keys_each_phase_writes_one_deadline(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """expire/pexpire/expireat/pexpireat/persist/ttl/pttl act on the logical hash: the source
    before the split, the source and every shard while both are kept, the shards once the old
    key is gone (where a plain EXPIRE of the old key reaches nothing); all 100 shards in one
    script call, with one absolute deadline."""
    shards = 100
    seed_hash(r, SOURCE, 3000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=shards)
    client = redis.Redis.from_url(redis_server.url)
    router = ShardRouter.attach(client, "t-job", source_key=SOURCE)
    try:
        # No job published yet: the source alone.
        assert router.ttl() == -1 and router.expire(3600)
        assert 3590 <= router.ttl() <= 3600 and r.ttl(SOURCE) == router.ttl()
        assert router.persist() and not router.persist() and router.pttl() == -1

        assert commands.apply(str(plan), state_url=state_url).phase == "verified"
        shard_keys = sorted(data_keys(r) - {SOURCE})
        assert len(shard_keys) == shards
        assert router.pexpire(timedelta(hours=2))
        deadlines = {r.pexpiretime(k) for k in [SOURCE, *shard_keys]}
        assert len(deadlines) == 1 and deadlines != {-1}
        at = int(r.time()[0]) + 600
        assert router.expireat(at)
        assert {r.expiretime(k) for k in [SOURCE, *shard_keys]} == {at}
        assert 590 <= router.ttl() <= 600
        assert router.persist()
        assert {r.pttl(k) for k in [SOURCE, *shard_keys]} == {-1}

        commands.set_ratio(100, name="t-job", state_url=state_url)
        assert commands.cleanup("t-job", state_url=state_url).phase == "done"
        assert not r.exists(SOURCE)
        assert router.ttl() == -1
        at_ms = (int(r.time()[0]) + 900) * 1000
        assert router.pexpireat(at_ms)
        assert {r.pexpiretime(k) for k in shard_keys} == {at_ms}
        assert not r.exists(SOURCE)  # nothing recreated the old key
        assert 890_000 <= router.pttl() <= 900_000
        assert router.expire(timedelta(seconds=1200))
        assert len({r.pexpiretime(k) for k in shard_keys}) == 1
        assert router.persist() and router.pttl() == -1

        # A deadline in the past removes the hash, as EXPIRE does; then nothing exists.
        assert router.pexpire(-1)
        assert not any(r.exists(k) for k in shard_keys)
        assert router.pttl() == -2 and not router.expire(10) and not router.persist()
    finally:
        router.close()
        client.close()


def test_while_the_old_key_is_kept_it_answers_for_the_hash(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """Before cleanup the old key is the hash: PERSIST answers for its deadline (and clears a
    stray one on a shard), and with the old key gone (expired, deleted with a plain client)
    an expiry call touches nothing, as EXPIRE of a missing key does."""
    shards = 8
    seed_hash(r, SOURCE, 500)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=shards)
    client = redis.Redis.from_url(redis_server.url)
    router = ShardRouter.attach(client, "t-job", source_key=SOURCE)
    try:
        assert commands.apply(str(plan), state_url=state_url).phase == "verified"
        shard_keys = sorted(data_keys(r) - {SOURCE})
        r.pexpire(shard_keys[0], 10_000_000)  # a stray deadline, set with a plain client
        assert not router.persist()  # the hash had none
        assert {r.pttl(k) for k in shard_keys} == {-1}
        r.delete(SOURCE)
        assert router.ttl() == -2
        assert not router.expire(100) and not router.persist()
        assert {r.pttl(k) for k in shard_keys} == {-1}
    finally:
        router.close()
        client.close()


def test_cleanup_refuses_while_a_shard_that_expired_before_the_old_key_is_gone(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """The application slides the old key's deadline with its plain client after the last
    verify run, and no write reaches the shards: they expire at the deadline verify gave them
    while the old key lives on. Cleanup would make the old key's copy of their members the
    last to go, so it refuses (exit 3); verify --repair restores them, then cleanup goes on."""
    shards = 4
    model = seed_hash(r, SOURCE, 400)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=shards)
    assert commands.apply(str(plan), state_url=state_url, allow_no_instances=True).phase == (
        "verified"
    )
    shard_keys = sorted(data_keys(r) - {SOURCE})
    r.pexpire(SOURCE, 1500)
    assert commands.verify("t-job", state_url=state_url).deadlines_followed == shards
    r.expire(SOURCE, 3600)  # slid, with the plain client
    eventually(lambda: not any(r.exists(k) for k in shard_keys), 10, "the shards expired")
    commands.set_ratio(100, name="t-job", state_url=state_url)

    res = run_cli("cleanup", "t-job", "--state", state_url)
    assert res.returncode == 3, res.stderr
    assert "are gone" in res.stderr and shard_keys[0] in res.stderr
    assert "verify t-job --repair" in res.stderr
    assert r.hlen(SOURCE) == 400 and job_state(state_url)["phase"] == "cutover"

    report = commands.verify("t-job", state_url=state_url, repair=True)
    assert report.repaired == 400
    assert commands.cleanup("t-job", state_url=state_url).phase == "done"
    assert decoded(read_shards(r, TEMPLATE, shards)) == decoded(model)
    assert all(3500_000 < r.pttl(k) <= 3600_000 for k in shard_keys)


def test_shard_keys_empty_at_verify_do_not_hold_cleanup_back(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """A small hash leaves some shard keys empty, which the last verify run records: their
    absence is no loss."""
    r.hset(SOURCE, mapping={"m0": "a", "m1": "b"})
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=8)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert len(data_keys(r) - {SOURCE}) <= 2
    commands.set_ratio(100, name="t-job", state_url=state_url)
    assert commands.cleanup("t-job", state_url=state_url).phase == "done"


def test_shard_deadlines_are_followed_in_scripts_sized_to_the_budget(r: redis.Redis) -> None:
    """Each shard whose deadline changes costs a script about 5 µs: 64 of them a script was
    over 300 µs, past any budget under a third of a millisecond, which plans may set."""
    from migrator.copier import follow_deadline
    from migrator.redisio import Scripts

    r.hset("src", "a", "1")
    r.pexpire("src", 60_000)
    shards = [f"dst:{i}" for i in range(10)]
    for k in shards:
        r.hset(k, "a", "1")
    scripts = Scripts(r)
    scripts.load("hash_follow_ttl")
    r.config_set("slowlog-log-slower-than", 0)
    r.slowlog_reset()
    assert follow_deadline(scripts, "src", shards, budget_us=50.0) == 10
    sent = [e["command"] for e in r.slowlog_get(100) if e["command"].startswith(b"EVALSHA")]
    assert len(sent) == 4, sent  # 3 shards a script (30% of 50 µs at 5 µs a shard), then 1
    assert all(r.pexpiretime(k) == r.pexpiretime("src") for k in shards)
    assert follow_deadline(scripts, "src", shards) == 0  # followed already; 1 ms: one script
