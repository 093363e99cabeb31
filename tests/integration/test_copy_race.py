"""The copy against writes made between its scan and its insert, through the real shim.

The copy reads a page of members with their values (HSCAN), and inserts them a packet or more
later (HSETNX, or groups of HSETEX FNX that fall back to HSETNX where a member is there: both
ways run where the server has them). Here, in that gap, the shim overwrites, increments, deletes
and deletes-then-re-adds members of the page just read. The copy must leave every one of them
as the shim left it: never the stale value it read (SPEC §1). A second test shows the gap is
real: without the delete marks the shim leaves while the copy may run, the stale insert
resurrects a deleted member.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from migrator import control
from migrator.copier import HashCopier
from migrator.phases import TOMBSTONE, Phase
from migrator.redisio import Scripts
from migrator.shim import ShardRouter
from migrator.verifier import HashVerifier
from tests.integration.helpers import INSERTS, make_copier, read_hash, read_shards
from tests.integration.shimkit import JOB, SHARDS, SOURCE, TEMPLATE, record

SHARD_KEYS = [TEMPLATE.replace("{shard}", str(i)) for i in range(SHARDS)]


@pytest.fixture
def router(r: redis.Redis) -> Iterator[ShardRouter]:
    control.publish(r, record(Phase.COPYING))
    with ShardRouter.attach(r, JOB, refresh_interval=0.05) as router:
        yield router


@pytest.fixture(params=INSERTS)
def insert(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _racing_copier(
    r: redis.Redis, router: ShardRouter, insert: str
) -> tuple[HashCopier, dict[str, set[bytes]]]:
    """A copier that, as each scan page arrives, has the shim write members of that page before
    the copier inserts them (the values it read are stale from then on)."""
    copier = make_copier(insert, r, SOURCE, SHARD_KEYS, 1000.0, scan=40)
    raced: dict[str, set[bytes]] = {"set": set(), "incr": set(), "del": set(), "readd": set()}
    received = copier._received

    def race(sent: Any, reply: Any) -> Any:
        out = received(sent, reply)
        # The page read just now, not yet inserted (an insert packet brings no page).
        page = reply[2][1][0::2] if sent[0] == "scan" else []
        for i, m in enumerate(page):
            kind = ("set", "incr", "del", "readd", None)[i % 5]
            if kind is None or any(m in ms for ms in raced.values()):
                continue
            raced[kind].add(m)
            if kind == "set":
                router.hset(m, b"newer")
            elif kind == "incr":
                router.hincrby(m, 1000)
            elif kind == "del":
                router.hdel(m)
            else:
                router.hdel(m)
                router.hset(m, b"back")
        return out

    copier._received = race  # type: ignore[method-assign]
    return copier, raced


def _copy(copier: HashCopier) -> None:
    cursor = copier.step("0", 10).cursor
    while cursor != "0":
        cursor = copier.step(cursor, 10).cursor


def _seed(r: redis.Redis, n: int) -> dict[bytes, int]:
    values = {f"m{i}".encode(): i for i in range(n)}
    r.hset(SOURCE, mapping=values)  # type: ignore[arg-type]
    return values


def test_writes_between_scan_and_insert_are_never_undone(
    r: redis.Redis, router: ShardRouter, insert: str
) -> None:
    seeded = _seed(r, 600)
    copier, raced = _racing_copier(r, router, insert)
    _copy(copier)
    assert all(len(ms) > 20 for ms in raced.values()), {k: len(v) for k, v in raced.items()}
    shards = read_shards(r, TEMPLATE, SHARDS)
    source = read_hash(r, SOURCE)
    for m in raced["set"]:
        assert shards[m] == source[m] == b"newer"
    for m in raced["incr"]:
        assert shards[m] == source[m] == str(seeded[m] + 1000).encode()  # applied once
    for m in raced["readd"]:
        assert shards[m] == source[m] == b"back"
    for m in raced["del"]:
        assert m not in source and shards[m] == TOMBSTONE  # a mark, never the stale value
    assert copier.present >= sum(len(ms) for ms in raced.values())
    # Everything else was inserted as scanned, and nothing else is in the shards.
    assert {m: v for m, v in shards.items() if v != TOMBSTONE} == source

    # Verify's shard passes remove the marks: the shards then equal the source exactly.
    verifier = HashVerifier(r, Scripts(r), SOURCE, SHARD_KEYS)
    found: list[Any] = []
    for i in range(SHARDS):
        step = verifier.backward(i, found.extend)
        cursor = step("0", 50).cursor
        while cursor != "0":
            cursor = step(cursor, 50).cursor
    assert found == []
    assert verifier.marks_removed == len(raced["del"])
    assert read_shards(r, TEMPLATE, SHARDS) == source


def test_without_delete_marks_a_stale_insert_would_resurrect(
    r: redis.Redis, router: ShardRouter, insert: str
) -> None:
    """The same race with the shim in a phase that deletes plainly (as it does once the copy
    is over): the copy inserts the stale value of a member deleted after its scan. This is
    what the marks prevent, so the test above is not vacuous."""
    control.publish(r, record(Phase.VERIFIED, epoch=2))
    router._watcher.refresh()  # type: ignore[attr-defined]
    assert router.record is not None and router.record.phase is Phase.VERIFIED
    _seed(r, 200)
    copier, raced = _racing_copier(r, router, insert)
    _copy(copier)
    shards = read_shards(r, TEMPLATE, SHARDS)
    resurrected = [m for m in raced["del"] if m in shards]
    assert resurrected and all(shards[m] != TOMBSTONE for m in resurrected)


def _copy_around_plain_deletes(r: redis.Redis, insert: str, *, rescan: bool) -> list[bytes]:
    """Seed, copy one step (which scans ahead of what it inserts), delete every member not yet
    in a shard the way a shim from before the marks does (no mark), optionally rescan, copy the
    rest; return the deleted members found in the shards."""
    r.delete(SOURCE, *SHARD_KEYS)
    _seed(r, 2_000)
    copier = make_copier(insert, r, SOURCE, SHARD_KEYS, 1000.0, scan=40)
    cursor = copier.step("0", 10).cursor
    assert cursor != "0"
    copied = read_shards(r, TEMPLATE, SHARDS)
    gone = [m for m in read_hash(r, SOURCE) if m not in copied]
    r.hdel(SOURCE, *gone)
    if rescan:
        copier.rescan()
    while cursor != "0":
        cursor = copier.step(cursor, 10).cursor
    shards = read_shards(r, TEMPLATE, SHARDS)
    if rescan:
        assert shards == read_hash(r, SOURCE)
    return [m for m in gone if m in shards]


def test_a_rescan_drops_what_an_old_shim_may_have_deleted_meanwhile(
    r: redis.Redis, insert: str
) -> None:
    """While a shim without marks is live the copy holds (gates.ShimProtocolGate), but it
    holds members it scanned before: deleted meanwhile without a mark, they would come back.
    Runner.copy therefore rescans from the checkpoint after such a hold."""
    assert _copy_around_plain_deletes(r, insert, rescan=False)  # the hazard is real
    assert _copy_around_plain_deletes(r, insert, rescan=True) == []
