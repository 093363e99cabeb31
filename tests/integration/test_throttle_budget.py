"""The server-time budget on real servers: a copy script that runs past it stops between shards
and the rest is sent in smaller scripts; the batch sizer shrinks the next ones; nothing is lost.
The copy streams small commands, a bounded number in flight, and survives losing them."""

from __future__ import annotations

import contextlib
from typing import Any

import redis

from migrator.copier import COPY_SCRIPT, HashCopier
from migrator.redisio import Scripts
from migrator.scanloop import drive
from migrator.stream import DEPTH
from migrator.throttle import SLICE, BatchSizer, Pacer
from tests.integration.helpers import read_shards, seed_hash

SHARDS = 50


def _shard_keys() -> list[str]:
    return [f"dst:{i}" for i in range(SHARDS)]


def _copy_all(copier: HashCopier, sizer: BatchSizer, *, rate: float = 0, step: Any = None) -> int:
    """The whole copy through the runner's loop (``step``: one wrapping ``copier.step``), at
    a rate ceiling or unpaced; the members it counted."""
    return drive(
        step or copier.step,
        stage="copy",
        cursor="0",
        done=0,
        total=None,
        sizer=sizer,
        pacer=Pacer(rate),
        save=lambda cursor, done, finished: None,
    )


def test_copy_script_stops_between_shards_once_past_its_budget(r: redis.Redis) -> None:
    seed_hash(r, "src", 200)
    scripts = Scripts(r)
    members = [f"m{i}".encode() for i in range(200)]
    groups = {k: members[i::20] for i, k in enumerate(_shard_keys()[:20])}  # 20 shards x 10
    keys = ["src", *groups]
    args = [0, *(len(g) for g in groups.values()), *(m for g in groups.values() for m in g)]
    scripts.load(COPY_SCRIPT)
    sha = scripts.script(COPY_SCRIPT).sha

    done, elapsed = r.evalsha(sha, len(keys), *keys, *args)  # budget 0 µs: over at once

    assert 0 < done < 20  # stopped between shards, some written, the rest left
    written = [k for k in groups if r.exists(k)]
    assert written == list(groups)[:done]
    for k in written:
        assert sorted(r.hkeys(k)) == sorted(groups[k])

    budget = 10_000_000
    done, _ = r.evalsha(sha, len(keys), *keys, budget, *args[1:])
    assert done == 20 and all(r.exists(k) for k in groups)


def test_a_step_that_overruns_is_split_and_copies_everything(r: redis.Redis) -> None:
    model = seed_hash(r, "src", 5_000)
    copier = HashCopier(r, Scripts(r), "src", _shard_keys(), budget_us=1.0, scan=1000)
    cursor, copied = "0", 0
    while True:
        step = copier.step(cursor, 500)
        copied += step.members
        cursor = step.cursor
        if cursor == "0" and not step.members:
            # The scan's last page came back empty: nothing left to send, the copy is over.
            # (Where HSCAN's pages fall depends on the table, so this step may or may not come.)
            assert step.command_members == 0
            break
        assert step.elapsed_us > 1.0 and 0 < step.command_members <= 500
        if cursor == "0":
            break
    assert copier.leftover_batches > 0  # scripts past the budget handed their rest on
    assert copied == 5_000
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_overruns_shrink_the_batch_and_the_copy_still_completes(r: redis.Redis) -> None:
    model = seed_hash(r, "src", 3_000)
    copier = HashCopier(r, Scripts(r), "src", _shard_keys(), budget_us=1.0, scan=500)
    sizer = BatchSizer(500, 1.0, start=500)
    done = _copy_all(copier, sizer)
    assert done == 3_000
    assert sizer.overruns > 0 and sizer.batch < 500
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_copy_within_budget_needs_no_split(r: redis.Redis) -> None:
    model = seed_hash(r, "src", 2_000)
    copier = HashCopier(r, Scripts(r), "src", _shard_keys(), budget_us=10_000_000.0, scan=500)
    cursor = "0"
    while True:
        cursor = copier.step(cursor, 500).cursor
        if cursor == "0":
            break
    assert copier.leftover_batches == 0
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_resuming_from_any_checkpoint_loses_nothing(r: redis.Redis) -> None:
    """A step's cursor is a checkpoint: what a copier copied before it, plus what a new copier
    copies from it, is the whole source, whichever step the first copier stopped after."""
    model = seed_hash(r, "src", 6_000)

    def copier_into(prefix: str) -> HashCopier:
        # Steps end where windows do: small windows and short steps make many checkpoints.
        keys = [f"{prefix}:{i}" for i in range(SHARDS)]
        return HashCopier(r, Scripts(r), "src", keys, 1000.0, window=250, step_scripts=1)

    for stop_after in (1, 2, 5, 9):
        first = copier_into("a")
        cursor = "0"
        for _ in range(stop_after):
            cursor = first.step(cursor, 150).cursor
        assert cursor != "0"
        second = copier_into("b")
        while cursor != "0":
            cursor = second.step(cursor, 150).cursor
        copied = {**read_shards(r, "a:{shard}", SHARDS), **read_shards(r, "b:{shard}", SHARDS)}
        assert copied == model, f"stopped after {stop_after} steps"
        r.delete(*[f"{p}:{i}" for p in "ab" for i in range(SHARDS)])


def test_the_copy_streams_small_commands_with_a_bounded_number_in_flight(r: redis.Redis) -> None:
    """Each command is sized by the sizer at a slice of the budget, and the next is sent while
    the server runs the current one, never more than DEPTH at once."""
    model = seed_hash(r, "src", 8_000)
    sizer = BatchSizer(500, 1000.0, aim=SLICE)
    copier = HashCopier(r, Scripts(r), "src", _shard_keys(), 1000.0, sizer=sizer)
    done = _copy_all(copier, sizer)
    assert done == 8_000
    assert copier.most_inflight == DEPTH
    # Aimed at 40 µs of a 1 ms budget, a command carries a few dozen members at most, not the
    # 500 the plan's batch allows.
    assert sizer.batch < 200
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_every_script_is_shown_to_the_sizer_as_it_returns(r: redis.Redis) -> None:
    seed_hash(r, "src", 3_000)
    sizer = BatchSizer(500, 1.0, start=500)  # a budget no script can meet
    copier = HashCopier(r, Scripts(r), "src", _shard_keys(), 1.0, sizer=sizer)
    step = copier.step("0", 500)
    assert step.observed  # so drive() does not count it twice
    assert sizer.overruns >= 2 and sizer.batch == 1  # cut down at the first overrun, and kept


def test_a_copy_that_loses_its_scripts_mid_stream_reloads_them_and_loses_nothing(
    r: redis.Redis,
) -> None:
    model = seed_hash(r, "src", 6_000)
    copier = HashCopier(r, Scripts(r), "src", _shard_keys(), 1000.0, burst_s=0.0)
    cursor = copier.step("0", 100).cursor
    flushes = 0
    while cursor != "0":
        if flushes < 3:
            r.script_flush()  # as after a restart or failover: the next EVALSHA gets NOSCRIPT
            flushes += 1
        cursor = copier.step(cursor, 100).cursor
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_a_copy_whose_last_scan_finds_nothing_still_finishes(r: redis.Redis) -> None:
    seed_hash(r, "src", 2_000)
    batches: list[tuple[int, list[bytes]]] = []
    cursor = 0
    while True:
        cursor, found = r.hscan("src", cursor, count=500)
        batches.append((cursor, list(found)))
        if cursor == 0:
            break
    # Empty the tail: an HSCAN from the last cursor but one now finds nothing, and ends.
    if batches[-1][1]:
        r.hdel("src", *batches[-1][1])
    copier = HashCopier(r, Scripts(r), "src", _shard_keys(), 1000.0, scan=500)
    step = copier.step(str(batches[-2][0]), 250)  # HSCAN COUNT 500, as above
    assert (step.cursor, step.members) == ("0", 0)


def test_under_a_rate_ceiling_each_step_carries_about_its_burst(r: redis.Redis) -> None:
    """A step finishes the window it opened, and without a ceiling a window is ~20 members per
    shard: under a low ceiling that would be one big burst and then a long sleep. With one, the
    loop caps each step at the ceiling's burst (a quarter second's worth)."""
    seed_hash(r, "src", 5_000)
    steps: dict[str, list[int]] = {"ceiling": [], "none": []}
    for name, rate in (("ceiling", 1_000), ("none", 0)):
        copier = HashCopier(
            r,
            Scripts(r),
            "src",
            _shard_keys(),
            budget_us=1000.0,
            scan=1000,
            sizer=(sizer := BatchSizer(500, 1000.0, aim=SLICE)),
        )

        def step(cursor: str, count: int, copier: HashCopier = copier, name: str = name) -> Any:
            if len(steps[name]) == 4:
                raise TimeoutError  # enough steps seen
            result = copier.step(cursor, count)
            steps[name].append(result.members)
            return result

        with contextlib.suppress(TimeoutError):
            _copy_all(copier, sizer, rate=rate, step=step)
    burst = 250  # 1000/s for a quarter second
    assert all(0 < n <= 2 * burst for n in steps["ceiling"]), steps
    assert max(steps["none"]) >= 1000, steps  # a whole window (20 members x 50 shards)
