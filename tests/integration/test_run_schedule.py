"""What `migrator run` is due to do for a job, read from a real state store (no Redis needed),
and the lease that keeps one runner per job, on real servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import redis

from migrator import keys
from migrator.errors import JobBusy
from migrator.lease import Lease
from migrator.phases import Phase
from migrator.plan import parse_plan
from migrator.scheduler import due
from migrator.store import Store, open_store

P = Phase
PLAN = """
name: t-job
redis: {url: 'redis://127.0.0.1:1/0'}
source: {key: big:hash}
target: {key: 'big:{shard}', shards: 4}
cleanup: {after: 1h}
"""


@pytest.fixture
def store(state_url: str):  # type: ignore[no-untyped-def]
    s = open_store(state_url)
    yield s
    s.close()


def _walk(store: Store, *phases: Phase) -> None:
    for p in phases:
        store.transition("t-job", p, ratio=100 if p == P.CUTOVER else None)


def test_what_is_due_in_each_phase(store: Store) -> None:
    job = store.create_job(parse_plan(PLAN))
    t = job.phase_changed_at
    assert due(store, job, t + timedelta(seconds=1), grace=3) is None  # just moved: its mover's
    assert due(store, job, t + timedelta(seconds=4), grace=3).work == "apply"  # type: ignore[union-attr]

    _walk(store, P.DUAL_WRITE, P.COPYING, P.VERIFYING)
    job = store.get_job("t-job")
    later = job.phase_changed_at + timedelta(seconds=10)
    assert due(store, job, later, grace=3).work == "apply"  # type: ignore[union-attr]
    store.save_checkpoint(job, "verify", "0", 100, finished=True, extra={"run": 1})
    # Finished clean, its move to verified lost (a crash): due for the move.
    assert "clean verification" in due(store, job, later, grace=3).reason  # type: ignore[union-attr]
    store.add_diffs(job, 1, [(b"m", "value_differs", 0)], status="confirmed")
    assert due(store, job, later, grace=3) is None  # verified with differences: the operator's

    _walk(store, P.VERIFIED, P.CUTOVER)
    job = store.get_job("t-job")
    cut = job.phase_changed_at
    assert due(store, job, cut + timedelta(minutes=59), grace=3) is None
    d = due(store, job, cut + timedelta(hours=1), grace=3)
    assert d is not None and d.work == "cleanup" and "scheduled" in d.reason
    paused = store.update_job("t-job", paused=True)
    assert due(store, paused, cut + timedelta(hours=2), grace=3) is None  # paused: left alone
    store.update_job("t-job", paused=False)

    _walk(store, P.ROLLING_BACK)
    job = store.get_job("t-job")
    d = due(store, job, job.phase_changed_at + timedelta(seconds=5), grace=3)
    assert d is not None and d.work == "rollback"
    # A rollback goes on while paused (it is the way out): an interrupted one is resumed.
    paused = store.update_job("t-job", paused=True)
    d = due(store, paused, job.phase_changed_at + timedelta(seconds=5), grace=3)
    assert d is not None and d.work == "rollback"
    _walk(store, P.ROLLED_BACK)
    job = store.get_job("t-job")
    assert due(store, job, job.phase_changed_at + timedelta(days=9), grace=3) is None


def test_cutover_without_cleanup_after_waits_for_a_command(store: Store) -> None:
    store.create_job(parse_plan(PLAN.replace("after: 1h", "after: 0")))
    _walk(store, P.DUAL_WRITE, P.COPYING, P.VERIFYING, P.VERIFIED, P.CUTOVER)
    job = store.get_job("t-job")
    assert due(store, job, job.phase_changed_at + timedelta(days=30), grace=3) is None


def test_one_lease_holder_at_a_time(r: redis.Redis) -> None:
    first = Lease(r, "t-job", purpose="apply", ttl=1.0).acquire()
    try:
        with pytest.raises(JobBusy) as e:
            Lease(r, "t-job", purpose="verify").acquire(wait=0.3)
        assert f"pid {os.getpid()}" in str(e.value)  # names the holder
        time.sleep(1.5)  # renewed meanwhile: still held after its TTL
        with pytest.raises(JobBusy):
            Lease(r, "t-job", purpose="verify").acquire(wait=0.0, preempting=True)
    finally:
        first.release()
    assert not r.exists(keys.lock("t-job"))
    Lease(r, "t-job", purpose="verify").acquire().release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(r: redis.Redis, redis_server) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import redis, sys, time\n"
        "from migrator.lease import Lease\n"
        f"Lease(redis.Redis(port={redis_server.port}), 't-job', purpose='apply').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(JobBusy):  # alive: not waited for by a non-preempting caller
            Lease(r, "t-job", purpose="apply").acquire(wait=10)
        holder.kill()
        holder.wait(10)
        started = time.monotonic()
        Lease(r, "t-job", purpose="apply").acquire(wait=10).release()
        assert time.monotonic() - started < 1.0  # no waiting for the 5 s TTL
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_lost_lease_stops_its_holder(r: redis.Redis) -> None:
    lost = threading.Event()
    lease = Lease(r, "t-job", purpose="apply", ttl=0.4, on_lost=lost.set).acquire()
    r.set(keys.lock("t-job"), "someone else")  # taken over (e.g. after a long network split)
    assert lost.wait(2)
    lease.release()
    assert r.get(keys.lock("t-job")) == b"someone else"  # release never removes another's


def test_a_holder_whose_renewals_stall_stops_writing_before_its_lease_can_expire(
    r: redis.Redis,
) -> None:
    """The fence (Lease.fresh) goes by the last renewal the server acknowledged, on this
    process's clock: renewals held up (here behind CLIENT PAUSE; a paused or starved process
    holds them up the same way) end the holder's right to write before the TTL could run
    out, and the reason names the renewal Redis has not answered."""
    lost = threading.Event()
    lease = Lease(r, "t-job", purpose="apply", ttl=0.5, on_lost=lost.set).acquire()
    try:
        time.sleep(0.6)  # past one TTL: renewed meanwhile, so still fresh
        assert lease.fresh() and not lost.is_set()
        r.client_pause(1500, all=True)  # every renewal now waits behind the pause
        time.sleep(0.5)
        assert not lease.fresh()  # 0.4 s = the TTL less the margin: it stops before 0.5 s
        assert lost.is_set() and lease.lost and not lease.held
        assert lease.lost_reason.startswith("Redis did not answer its renewals for")
        assert not lease.fresh()  # and stays down, whatever the renewal in flight brings
    finally:
        r.client_unpause()
        lease.release()
    assert not r.exists(keys.lock("t-job"))  # still ours when it gave up: released


def test_a_holder_cut_off_from_redis_says_so_and_lets_go_without_waiting(
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    """Renewals failing (the server gone) trip the fence too; the reason names Redis, not a
    paused process, and giving the lease back does not retry into the outage."""
    server = start_server()
    client = server.client()
    lost = threading.Event()
    lease = Lease(client, "t-job", purpose="apply", ttl=0.5, on_lost=lost.set).acquire()
    try:
        server.stop()
        time.sleep(0.6)
        assert not lease.fresh() and lost.is_set()
        assert lease.lost_reason.startswith("Redis did not answer"), lease.lost_reason
    finally:
        started = time.monotonic()
        lease.release()
        assert time.monotonic() - started < 1.0


def test_a_holder_in_another_pid_namespace_is_never_taken_for_dead(r: redis.Redis) -> None:
    """Two containers with host networking share a host name, not their pids: a holder whose
    pid this process cannot see may be alive in its own namespace, so its lease is waited for
    (it expires within the TTL if it is dead), never taken over at once."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid nobody has here
    holder = {
        "purpose": "apply",
        "host": socket.gethostname(),
        "pid": gone.pid,
        "pidns": "pid:[1]",
        "token": "t",
        "since": 0,
    }
    r.set(keys.lock("t-job"), json.dumps(holder), px=5000)
    with pytest.raises(JobBusy):
        Lease(r, "t-job", purpose="apply").acquire(wait=0.3, preempting=True)
    # The same holder in this namespace is dead for sure: taken over at once.
    holder["pidns"] = os.readlink("/proc/self/ns/pid")
    r.set(keys.lock("t-job"), json.dumps(holder), px=5000)
    Lease(r, "t-job", purpose="apply").acquire(wait=0.3).release()
