"""The server-time budget on real servers: a copy packet measures all the server did for it; one
that runs past the budget shrinks the next ones, so a scan page goes out in smaller packets;
nothing is lost. The copy streams small packets, a bounded number in flight, and survives
losing them."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import redis

from migrator.copier import GroupedHashCopier, HashCopier, hash_copier
from migrator.errors import SourceVanished
from migrator.redisio import Scripts, server_info
from migrator.routing import shard_of
from migrator.scanloop import drive
from migrator.stream import DEPTH
from migrator.throttle import SLICE, BatchSizer, Pacer
from tests.integration.helpers import INSERTS, make_copier, read_shards, seed_hash

SHARDS = 50
#: Where a budget no packet can meet (1 µs) keeps the batch: one member a packet. TIME counts
#: whole µs, so a one-member packet now and then reads 0 µs (1.5% of them on this host), which
#: is cheap, and the batch grows to 2 until the next packet's overrun halves it again.
ONE_OR_A_TICK_MORE = 2


@pytest.fixture(params=INSERTS)
def insert(request: pytest.FixtureRequest) -> str:
    return str(request.param)


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


def _packet_times(r: redis.Redis, insert: str, size: int) -> list[float]:
    """Server time of each packet of a whole copy whose packets carry ``size`` members."""
    sizer = BatchSizer(size, 1_000_000.0, start=size)  # a budget that never shrinks them
    copier = make_copier(insert, r, "src", _shard_keys(), 1_000_000.0, sizer=sizer)
    seen: list[float] = []
    observe = sizer.observe

    def spy(elapsed_us: float, members: int, *, whole: bool = False) -> None:
        assert whole  # nothing is added for what a script could not see of itself
        if members == size:
            seen.append(elapsed_us)
        observe(elapsed_us, members, whole=whole)

    sizer.observe = spy  # type: ignore[method-assign]
    assert _copy_all(copier, sizer) == 4_000
    r.delete(*_shard_keys())
    return seen


def test_a_packet_measures_all_the_server_did_for_it(r: redis.Redis, insert: str) -> None:
    """A packet is TIME, its inserts, maybe an HSCAN, TIME: the server runs it back to back, so
    the two TIMEs bound what it spent, arguments and replies included, and packets that carry
    more take longer."""
    seed_hash(r, "src", 4_000)
    small, large = _packet_times(r, insert, 4), _packet_times(r, insert, 64)
    times = small + large
    # TIME reads the server's wall clock: a clock step (NTP) or a host stall can spoil a packet
    # or two (one CI run saw it), never the run.
    assert small and large and sum(0 < us < 1_000_000 for us in times) >= 0.98 * len(times)
    assert sorted(large)[len(large) // 2] > sorted(small)[len(small) // 2]


def test_a_step_that_overruns_is_split_and_copies_everything(r: redis.Redis, insert: str) -> None:
    """A budget no packet can meet: the first one past it cuts the batch to one member, so a
    scan page (asked for 2 x 500) goes out over many packets, and everything arrives."""
    model = seed_hash(r, "src", 5_000)
    sizer = BatchSizer(500, 1.0, start=500)
    copier = make_copier(insert, r, "src", _shard_keys(), budget_us=1.0, scan=1000, sizer=sizer)
    copied = _copy_all(copier, sizer)
    assert sizer.overruns > 0 and sizer.batch <= ONE_OR_A_TICK_MORE
    assert copier.packets > 4_000  # one member a packet, after the first overrun
    assert copied == 5_000
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_overruns_shrink_the_batch_and_the_copy_still_completes(
    r: redis.Redis, insert: str
) -> None:
    model = seed_hash(r, "src", 3_000)
    copier = make_copier(insert, r, "src", _shard_keys(), budget_us=1.0, scan=500)
    sizer = BatchSizer(500, 1.0, start=500)
    done = _copy_all(copier, sizer)
    assert done == 3_000
    assert sizer.overruns > 0 and sizer.batch < 500
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_resuming_from_any_checkpoint_loses_nothing(r: redis.Redis, insert: str) -> None:
    """A step's cursor is a checkpoint: what a copier copied before it, plus what a new copier
    copies from it, is the whole source, whichever step the first copier stopped after."""
    model = seed_hash(r, "src", 6_000)

    def copier_into(prefix: str) -> HashCopier:
        # One packet a step: many checkpoints.
        keys = [f"{prefix}:{i}" for i in range(SHARDS)]
        return make_copier(insert, r, "src", keys, 1000.0, step_scripts=1)

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


def test_the_copy_streams_small_commands_with_a_bounded_number_in_flight(
    r: redis.Redis, insert: str
) -> None:
    """Each command is sized by the sizer at a slice of the budget, and the next is sent while
    the server runs the current one, never more than DEPTH at once."""
    model = seed_hash(r, "src", 8_000)
    sizer = BatchSizer(500, 1000.0, aim=SLICE)
    copier = make_copier(insert, r, "src", _shard_keys(), 1000.0, sizer=sizer)
    done = _copy_all(copier, sizer)
    assert done == 8_000
    assert copier.most_inflight == DEPTH
    # Aimed at 40 µs of a 1 ms budget, a command carries a few dozen members at most, not the
    # 500 the plan's batch allows.
    assert sizer.batch < 200
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_every_packet_is_shown_to_the_sizer_as_it_returns(r: redis.Redis, insert: str) -> None:
    seed_hash(r, "src", 3_000)
    sizer = BatchSizer(500, 1.0, start=500)  # a budget no packet can meet
    copier = make_copier(insert, r, "src", _shard_keys(), 1.0, sizer=sizer)
    step = copier.step("0", 500)
    assert step.observed  # so drive() does not count it twice
    # Cut down at the first overrun, and kept there.
    assert sizer.overruns >= 2 and sizer.batch <= ONE_OR_A_TICK_MORE


def test_a_copy_whose_connection_drops_mid_stream_loses_nothing(
    r: redis.Redis, insert: str
) -> None:
    """Killed with packets in flight: they go out again (an insert is idempotent), from the
    members the lost packets carried, and the copy completes."""
    model = seed_hash(r, "src", 6_000)
    copier = make_copier(insert, r, "src", _shard_keys(), 1000.0)
    copier.client.client_setname("copier")
    sent = 0
    received = copier._received

    def kill_after_some(sent_: Any, reply: Any) -> Any:
        nonlocal sent
        sent += 1
        if sent in (3, 10, 40):
            # Kill the copier's own connection while the next packet is in flight.
            for c in r.client_list():
                if c["name"] == "copier":
                    r.client_kill_filter(_id=c["id"])
        return received(sent_, reply)

    copier._received = kill_after_some  # type: ignore[method-assign]
    cursor, errors = "0", 0
    while True:
        try:
            cursor = copier.step(cursor, 100).cursor
        except redis.ConnectionError:
            errors += 1
            copier.client.client_setname("copier")
            continue
        if cursor == "0":
            break
    assert errors >= 1
    assert read_shards(r, "dst:{shard}", SHARDS) == model


@pytest.mark.parametrize("failing", [(2,), (5, 17, 60)])
def test_a_copy_whose_send_fails_loses_nothing(
    r: redis.Redis, insert: str, failing: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send that raises (the server reset the connection, a full send buffer timed out):
    its command had already been taken from the copier's queue and was not yet in flight, so
    nothing sent it again. The copy said it had finished with members missing (the grouped
    copy, whose first page never completed, ended its first step at cursor 0) or never
    finished (an audit's fault injection)."""
    import migrator.stream

    model = seed_hash(r, "src", 6_000)
    copier = make_copier(insert, r, "src", _shard_keys(), 1000.0)
    sends = 0
    real_wire_for = migrator.stream.wire_for

    def failing_wire(conn: Any, spin: Any) -> Any:
        wire = real_wire_for(conn, spin)
        send, send_packed = wire.send, wire.send_packed

        def fail_some(real: Any) -> Any:
            def go(data: Any) -> None:
                nonlocal sends
                sends += 1
                if sends in failing:
                    raise redis.ConnectionError("injected: connection reset by peer")
                real(data)

            return go

        wire.send, wire.send_packed = fail_some(send), fail_some(send_packed)
        return wire

    monkeypatch.setattr(migrator.stream, "wire_for", failing_wire)
    cursor, errors, steps = "0", 0, 0
    while True:
        steps += 1
        assert steps < 5_000, "the copy never finished"
        try:
            cursor = copier.step(cursor, 100).cursor
        except redis.ConnectionError:
            errors += 1
            continue
        if cursor == "0":
            break
    assert errors == len(failing)
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_a_source_that_vanishes_mid_copy_stops_it(r: redis.Redis, insert: str) -> None:
    """Expired (its shards expire with it) or deleted outside the shim: inserting what was
    scanned would bring members back in shards without a deadline, so the copy stops."""
    seed_hash(r, "src", 3_000)
    copier = make_copier(insert, r, "src", _shard_keys(), 1000.0, scan=100, step_scripts=1)
    cursor = copier.step("0", 50).cursor
    assert cursor != "0"
    r.delete("src")
    with pytest.raises(SourceVanished, match="disappeared during the copy"):
        while cursor != "0":
            cursor = copier.step(cursor, 50).cursor


def test_a_copy_whose_last_scan_finds_nothing_still_finishes(r: redis.Redis, insert: str) -> None:
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
    copier = make_copier(insert, r, "src", _shard_keys(), 1000.0, scan=500)
    step = copier.step(str(batches[-2][0]), 250)  # HSCAN COUNT 500, as above
    assert (step.cursor, step.members) == ("0", 0)


def test_under_a_rate_ceiling_each_step_carries_about_its_burst(
    r: redis.Redis, insert: str
) -> None:
    """Without a ceiling a step streams a few dozen packets: under a low ceiling that would be
    one big burst and then a long sleep. With one, the loop caps each step at the ceiling's
    burst (a quarter second's worth)."""
    seed_hash(r, "src", 5_000)
    steps: dict[str, list[int]] = {"ceiling": [], "none": []}
    for name, rate in (("ceiling", 200), ("none", 0)):
        copier = make_copier(
            insert,
            r,
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
    burst = 50  # 200/s for a quarter second
    assert all(0 < n <= 2 * burst for n in steps["ceiling"]), steps
    assert max(steps["none"]) > 2 * burst, steps


def test_the_copy_inserts_in_groups_where_the_server_can(r: redis.Redis) -> None:
    """hash_copier asks the server: HSETEX ... FNX (Valkey 9, Redis 8) means groups, and the
    question writes nothing; with too many shards for a group to pay, one HSETNX a member."""
    info = server_info(r)
    major = int(info.version.split(".")[0])
    can = major >= (9 if info.flavour == "valkey" else 8)
    model = seed_hash(r, "src", 3_000)
    copier = hash_copier(r, Scripts(r), "src", _shard_keys(), 1000.0, probe_key="probe:{t}")
    assert isinstance(copier, GroupedHashCopier) is can
    assert not r.exists("probe:{t}")
    assert copier.insert == (
        "HSETEX FNX, up to 32 members of a shard a command"
        if can
        else "HSETNX, one member a command"
    )
    r.config_resetstat()
    _copy_all(copier, BatchSizer(500, 1000.0, aim=SLICE))
    calls = {k: v["calls"] for k, v in r.info("commandstats").items()}
    assert bool(calls.get("cmdstat_hsetex")) is can
    assert read_shards(r, "dst:{shard}", SHARDS) == model
    many = [f"d:{i}" for i in range(2_000)]
    assert (
        type(hash_copier(r, Scripts(r), "src", many, 1000.0, probe_key="probe:{t}")) is HashCopier
    )


def test_where_most_groups_are_refused_the_copy_inserts_one_by_one(r: redis.Redis) -> None:
    """The application rewrote most of the key during the copy, so most members are in their
    shards already and most groups would be refused: after a few, groups go as HSETNX (bar
    every 16th, to notice a change), and the copy still ends equal to the source."""
    model = seed_hash(r, "src", 6_000)
    for m, v in model.items():
        if int(m[1:]) % 5:  # four members in five: a shim put them in their shard already
            r.hset(f"dst:{shard_of(m, SHARDS)}", m, v)
    copier = make_copier("hsetex", r, "src", _shard_keys(), 1000.0)
    r.config_resetstat()
    _copy_all(copier, BatchSizer(500, 1000.0, aim=SLICE))
    calls = {k: v["calls"] for k, v in r.info("commandstats").items()}
    # Groups taken from the buckets (as large as each packet's batch allows): most never went
    # as HSETEX.
    assert 0 < calls["cmdstat_hsetex"] < copier._groups // 4
    assert copier.present == 4_800 and copier.inserted == 1_200
    assert copier.insert.endswith(
        "(most groups lately found a member there: HSETNX, one member a command)"
    )
    assert read_shards(r, "dst:{shard}", SHARDS) == model


def test_with_large_values_the_runners_scans_start_small(
    redis_server: Any, r: redis.Redis, tmp_path: Any, state_url: str
) -> None:
    """Nothing is known of the values before the first measure, and two commands go out
    before it returns: the copy's first HSCAN asked for 64 members and verify's for 128,
    which with 50 KB values took 2.7 and 5.4 ms of a 1 ms budget (an audit's SLOWLOG)."""
    from migrator import commands
    from tests.integration.helpers import write_plan
    from tests.slowlog import runner_sent

    pipe = r.pipeline(transaction=False)
    for i in range(300):
        pipe.hset("big:hash", f"m{i}", b"v" * 50_000)
    pipe.execute()
    r.config_set("slowlog-log-slower-than", 0)
    r.config_set("slowlog-max-len", 100_000)
    r.slowlog_reset()
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    assert commands.apply(str(plan), state_url=state_url, allow_no_instances=True).phase == (
        "verified"
    )
    scans = [
        s.command.split(b" ") for s in reversed(runner_sent(r, 100_000)) if s.kind == (b"HSCAN",)
    ]
    counts = [int(w[w.index(b"COUNT") + 1]) for w in scans if w[1] == b"big:hash"]
    assert counts and max(counts[:2]) <= 8, counts[:10]  # the copy's first, then verify's
    # Each member costs about 40 µs to read: the slice (40 µs) keeps every scan small.
    assert max(counts) <= 16, counts
