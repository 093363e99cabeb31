"""The shim's control loop against real servers: refresh, heartbeat/applied epoch, counters,
stickiness across processes, robustness to errors, and fork safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from migrator import control, keys
from migrator.phases import Phase
from migrator.shim import ReadPath, ShardRouter
from migrator.shim.watcher import STALE_AFTER_S
from tests.integration.shimkit import (
    JOB,
    SOURCE,
    eventually,
    record,
    shard_key,
)

P = Phase
ROOT = Path(__file__).resolve().parents[2]
Attach = Callable[..., ShardRouter]


def acked_epoch(r: redis.Redis, instance_id: str) -> int | None:
    found = [i for i in control.live_instances(r, JOB) if i.id == instance_id]
    return found[0].epoch if found else None


@pytest.fixture
def attach(r: redis.Redis) -> Iterator[Attach]:
    routers: list[ShardRouter] = []

    def _attach(client: redis.Redis | None = None, **kw: Any) -> ShardRouter:
        router = ShardRouter.attach(client or r, JOB, **kw)
        routers.append(router)
        return router

    yield _attach
    for router in routers:
        router.close()


def test_attach_registers_a_live_instance_before_any_record(r: redis.Redis, attach: Attach) -> None:
    users = attach(source_key=SOURCE)
    [instance] = control.live_instances(r, JOB)
    assert instance.id == users.instance_id
    assert instance.epoch == 0
    assert instance.pid == os.getpid()
    assert instance.protocol == control.PROTOCOL  # what the runner checks before copying


def test_an_instance_that_reports_no_protocol_counts_as_the_first(r: redis.Redis) -> None:
    # What a shim from before the protocol field heartbeats.
    control.heartbeat(r, JOB, "old:1:x", {"host": "old", "pid": 1, "epoch": 0, "started": 0})
    [instance] = control.live_instances(r, JOB)
    assert instance.protocol == 1
    assert control.outdated([instance], control.MARKS_PROTOCOL) == [instance]


def test_a_ratio_change_is_in_effect_within_two_seconds(r: redis.Redis, attach: Attach) -> None:
    members = [f"user:{i}" for i in range(50)]
    for m in members:
        r.hset(SOURCE, m, "old")
        r.hset(shard_key(m), m, "new")
    control.publish(r, record(P.GRAY, ratio=0))
    users = attach()  # default refresh_interval
    assert set(users.hmget(members)) == {b"old"}
    published = time.monotonic()
    control.publish(r, record(P.GRAY, epoch=2, ratio=99))
    eventually(lambda: users.hmget(members).count(b"new") >= 45, timeout=2.0)
    assert time.monotonic() - published < 2.0
    control.publish(r, record(P.GRAY, epoch=3, ratio=0))  # rollback of the ratio is as fast
    eventually(lambda: set(users.hmget(members)) == {b"old"}, timeout=2.0)


def test_heartbeat_reports_the_applied_epoch(r: redis.Redis, attach: Attach) -> None:
    control.publish(r, record(P.PLANNED, epoch=1))
    users = attach(refresh_interval=0.1)
    assert acked_epoch(r, users.instance_id) == 1
    control.publish(r, record(P.DUAL_WRITE, epoch=7))
    eventually(lambda: acked_epoch(r, users.instance_id) == 7, timeout=2.0)
    assert users.applied_epoch == 7
    # the runner's own barrier sees it too
    assert [i.id for i in control.wait_for_ack(r, JOB, 7, timeout=2)] == [users.instance_id]


def test_the_epoch_is_acknowledged_only_after_older_calls_finished(
    redis_server: Any, r: redis.Redis, attach: Attach
) -> None:
    control.publish(r, record(P.DUAL_WRITE, epoch=1))
    users = attach(refresh_interval=1.0)  # first refresh 1 s from now
    control.publish(r, record(P.COPYING, epoch=2))  # not yet seen by the shim
    admin = redis_server.client()
    # Hold a dual write (EVALSHA) in flight: the server delays writes, reads still run.
    admin.client_pause(2000, all=False)
    writer = threading.Thread(target=users.hset, args=("m", "v"))
    writer.start()
    eventually(lambda: users.in_flight == 1, timeout=1.0)
    eventually(lambda: users.record is not None and users.record.epoch == 2, timeout=1.9)
    assert writer.is_alive(), "the write must still be in flight for this test to mean anything"
    assert users.applied_epoch == 1
    assert acked_epoch(r, users.instance_id) == 1
    writer.join(5)
    assert users.applied_epoch == 2
    eventually(lambda: acked_epoch(r, users.instance_id) == 2, timeout=3.0)
    assert r.hget(SOURCE, "m") == b"v" and r.hget(shard_key("m"), "m") == b"v"
    admin.close()


def test_counters_are_flushed_periodically_and_on_close(r: redis.Redis, attach: Attach) -> None:
    r.hset(SOURCE, "a", "1")
    control.publish(r, record(P.CUTOVER))
    users = attach(loader=lambda m: "db", flush_interval=0.1, refresh_interval=0.05)
    users.hget("a")  # shard miss → source
    users.hget("ghost")  # shard miss → source miss → loader
    field = f"{users.instance_id}|{{}}".format

    def flushed() -> dict[str, int]:
        h: dict[bytes, bytes] = r.hgetall(keys.counters(JOB))  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in h.items()}

    eventually(lambda: flushed().get(field("reads_shard")) == 2, timeout=2.0)
    assert flushed()[field("fallbacks")] == 2
    assert flushed()[field("loader_calls")] == 1
    users.hget("a")
    users.close()
    assert flushed()[field("reads_shard")] == 3, "close() flushes what is pending"


def test_forgotten_instances_counts_are_folded_not_lost(r: redis.Redis, attach: Attach) -> None:
    """Every process that ever attached adds its own counter fields, which status reads whole:
    an instance forgotten after an hour of silence has them folded into totals."""
    from migrator.shim.counters import NAMES

    r.hset(SOURCE, "a", "1")
    control.publish(r, record(P.CUTOVER))
    gone, staying = attach(), attach()
    for users in (gone, staying):
        users.hget("a")
    gone.close()
    staying._watcher.flush()
    # Silent for two hours, as far as its heartbeat says.
    r.hset(keys.heartbeats(JOB), gone.instance_id, int(time.time() * 1000) - 7_200_000)
    forgotten = control.forget_stale(r, JOB, counters=NAMES)
    assert forgotten == [gone.instance_id]
    fields = {k.decode() for k in r.hkeys(keys.counters(JOB))}  # type: ignore[union-attr]
    assert not any(f.startswith(f"{gone.instance_id}|") for f in fields)
    assert "(forgotten)|reads_shard" in fields
    assert gone.instance_id not in {i.id for i in control.instances(r, JOB)}
    totals: dict[str, int] = {}
    for f, v in r.hgetall(keys.counters(JOB)).items():  # type: ignore[union-attr]
        name = f.decode().split("|", 1)[-1]
        totals[name] = totals.get(name, 0) + int(v)
    assert totals["reads_shard"] == 2  # both instances' reads, as before the fold

    # A fleet's worth at once: folded a few instances a script (each inside the budget).
    old_ms = int(time.time() * 1000) - 7_200_000
    many = [f"pod-{i}" for i in range(45)]
    for iid in many:
        r.hset(keys.instances(JOB), iid, json.dumps({"host": "h", "pid": 1, "epoch": 1}))
        r.hset(keys.heartbeats(JOB), iid, old_ms)
        r.hset(keys.counters(JOB), f"{iid}|reads_old", 3)
    assert sorted(control.forget_stale(r, JOB, counters=NAMES)) == sorted(many)
    assert int(r.hget(keys.counters(JOB), "(forgotten)|reads_old")) == 45 * 3  # type: ignore[arg-type]
    assert not any(i.id in many for i in control.instances(r, JOB))


def test_sticky_read_paths_agree_across_processes(
    redis_server: Any, r: redis.Redis, attach: Attach
) -> None:
    control.publish(r, record(P.GRAY, ratio=30))
    users = attach()
    members = [f"user:{i}" for i in range(300)]
    here = [str(users.read_path(m)) for m in members]
    child = (
        "import json, sys, redis\n"
        "from migrator.shim import ShardRouter\n"
        "users = ShardRouter.attach(redis.Redis.from_url(sys.argv[1]), sys.argv[2])\n"
        "members = json.loads(sys.stdin.read())\n"
        "print(json.dumps([str(users.read_path(m)) for m in members]))\n"
        "users.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child, redis_server.url, JOB],
        cwd=ROOT,
        input=json.dumps(members),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    there = json.loads(out)
    assert there == here
    assert {ReadPath.OLD.value, ReadPath.SHARD.value} == set(here)


def test_refresh_survives_a_broken_control_record_and_keeps_the_last(
    r: redis.Redis, attach: Attach, caplog: pytest.LogCaptureFixture
) -> None:
    r.hset(SOURCE, "a", "old")
    r.hset(shard_key("a"), "a", "new")
    control.publish(r, record(P.CUTOVER, epoch=3))
    users = attach(refresh_interval=0.05)
    # The refresh now fails (WRONGTYPE on HGETALL): the shim keeps routing with the last record.
    r.delete(keys.control(JOB))
    r.set(keys.control(JOB), "garbage")
    time.sleep(0.3)
    assert users.record == record(P.CUTOVER, epoch=3)
    assert users.hget("a") == b"new"
    assert any("keeping the last record" in m for m in caplog.messages)
    # A vanished record is kept too (done → shards stays safer than "no job").
    r.delete(keys.control(JOB))
    time.sleep(0.2)
    assert users.record == record(P.CUTOVER, epoch=3)
    # And a republished record is picked up again.
    control.publish(r, record(P.GRAY, epoch=4, ratio=0))
    eventually(lambda: users.hget("a") == b"old", timeout=2.0)
    eventually(lambda: acked_epoch(r, users.instance_id) == 4, timeout=2.0)


def test_a_stale_record_is_refreshed_inline_before_it_is_used(
    r: redis.Redis, attach: Attach
) -> None:
    control.publish(r, record(P.DUAL_WRITE, epoch=1))
    users = attach(refresh_interval=1.0)  # the thread's next refresh is 1 s away
    control.publish(r, record(P.COPYING, epoch=2))
    # As if the refresh thread had been unable to refresh for longer than the fence allows
    # (stalled, starved of the GIL): the runner may already have stopped waiting for us.
    users._watcher._confirmed_at -= STALE_AFTER_S + 1
    users.hset("m", "v")
    assert users.record == record(P.COPYING, epoch=2)
    assert acked_epoch(r, users.instance_id) == 2
    assert r.hget(shard_key("m"), "m") == b"v"


def test_refresh_interval_is_at_most_one_second(r: redis.Redis) -> None:
    with pytest.raises(ValueError, match="refresh_interval"):
        ShardRouter.attach(r, JOB, source_key=SOURCE, refresh_interval=2.0)


def _child_writes(router: ShardRouter, out: Any) -> None:
    router.hset("from-child", "1")
    out.put(router.instance_id)


def test_a_forked_child_heartbeats_as_its_own_instance(r: redis.Redis, attach: Attach) -> None:
    control.publish(r, record(P.DUAL_WRITE, epoch=5))
    users = attach(refresh_interval=0.05)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_writes, args=(users, out))
    child.start()
    child_id = out.get(timeout=10)
    child.join(10)
    assert child.exitcode == 0
    assert child_id != users.instance_id
    ids = {i.id: i for i in control.instances(r, JOB)}
    assert ids[child_id].epoch == 5 and ids[child_id].pid == child.pid
    assert r.hget(shard_key("from-child"), "from-child") == b"1"


def test_a_record_published_late_never_replaces_a_later_epoch(r: redis.Redis) -> None:
    """Two commands can publish out of order (a runner that read the job before it waited for
    the lease, a set-ratio racing a rollback); shims install any record that differs from
    theirs, so an older epoch must not overwrite a newer one. The same epoch may be published
    again (a resumed step re-publishes its record)."""
    assert control.publish(r, record(Phase.ROLLING_BACK, epoch=8))
    assert not control.publish(r, record(Phase.COPYING, epoch=7))
    now = control.read(r, JOB)
    assert now is not None and (now.phase, now.epoch) == (Phase.ROLLING_BACK, 8)
    assert control.publish(r, record(Phase.ROLLING_BACK, epoch=8))
    assert control.publish(r, record(Phase.ROLLED_BACK, epoch=9))
    now = control.read(r, JOB)
    assert now is not None and (now.phase, now.epoch) == (Phase.ROLLED_BACK, 9)


def test_a_refresh_whose_reply_came_late_never_undoes_a_later_one(
    r: redis.Redis, attach: Attach, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh thread reads epoch 1 and stalls (a late reply, a starved thread); a call
    meanwhile refreshes inline, installs epoch 2 (dual_write) and acknowledges it, so the
    runner starts the copy. The stalled read must not then put the instance back on planned
    routing (old key only, unfenced) or its heartbeat back on epoch 1."""
    control.publish(r, record(P.PLANNED, epoch=1))
    users = attach(refresh_interval=0.2)
    real_read = control.read
    stall, resumed = threading.Event(), threading.Event()

    def late_read(client: Any, job: str) -> Any:
        rec = real_read(client, job)
        if stall.is_set() and threading.current_thread().name.startswith("migrator-shim"):
            stall.clear()
            time.sleep(2.0)
            resumed.set()
        return rec

    monkeypatch.setattr("migrator.shim.watcher.control.read", late_read)
    tracker = users._watcher.tracker
    installed: list[int] = []
    install = tracker.install

    def logged(rec: Any) -> bool:
        changed = install(rec)
        if changed:
            installed.append(rec.epoch)
        return changed

    monkeypatch.setattr(tracker, "install", logged)
    stall.set()
    eventually(lambda: not stall.is_set())  # the thread has read epoch 1 and stalls
    control.publish(r, record(P.DUAL_WRITE, epoch=2))
    users._watcher._confirmed_at -= 10  # its refresh is late: the next call refreshes inline
    users.hlen()
    assert not resumed.is_set()  # the call did not wait for the stalled read
    assert users.record is not None and users.record.epoch == 2
    assert acked_epoch(r, users.instance_id) == 2
    assert resumed.wait(5)  # the stalled refresh is over
    time.sleep(0.1)
    assert installed == [2]  # epoch 1 was never installed again, not even for a moment
    assert users.record.epoch == 2 and acked_epoch(r, users.instance_id) == 2
    users.hset("m", "v")
    assert r.hget(SOURCE, "m") == b"v" and r.hget(shard_key("m"), "m") == b"v"
