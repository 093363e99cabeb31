"""Runtime failures outside a copy batch: Redis lost while the runner waits at a barrier, the
state store failing under a verb, a cleanup stopped between retiring the old key and telling
the shims. Each is one message and exit 1 (never a traceback), the job keeps its place, and
the same command (or `migrator run`) goes on from there."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from migrator import commands, control, keys
from migrator.errors import StoreUnavailable
from migrator.phases import Phase
from migrator.runner import Runner
from migrator.store import open_store
from tests.conftest import run_cli
from tests.integration.helpers import eventually, seed_hash, write_plan
from tests.integration.life import JOB, cli_env, job_state, migrator_popen
from tests.servers import RedisServer


def _wait_for_stage(state_url: str, stage: str, past: int) -> None:
    """Until the unfinished ``stage`` (copy, verify) has saved more than ``past`` members."""

    def going() -> bool:
        cp = job_state(state_url)["checkpoints"].get(stage)
        return cp is not None and not cp.finished and cp.members_done > past

    eventually(going, 30, f"the {stage} got past {past} members")


def _restart_under(
    proc: subprocess.Popen[str], server: RedisServer, state_url: str, stage: str, past: int
) -> str:
    """Restart the server once ``proc``'s ``stage`` got past ``past`` members; its stderr."""
    try:
        _wait_for_stage(state_url, stage, past)
        server.restart()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return err


def _lagging_instance(r: redis.Redis, stop: threading.Event) -> threading.Thread:
    """An app instance that heartbeats but never applies an epoch: barriers wait for it."""

    def beat() -> None:
        payload = {"host": "h", "pid": 1, "epoch": 0, "started": 0, "protocol": 2}
        while not stop.is_set():
            try:
                control.heartbeat(r, JOB, "lagging", payload)
            except redis.RedisError:
                return
            stop.wait(0.3)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    return t


def test_redis_lost_at_a_barrier_is_one_message_and_run_once_says_the_job_failed(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    seed_hash(r, "big:hash", 1000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    stop = threading.Event()
    _lagging_instance(redis.Redis.from_url(redis_server.url), stop)
    try:
        rollback = migrator_popen("rollback", JOB, env=cli_env(state_url))
        eventually(lambda: job_state(state_url)["phase"] == "rolling_back", 20, "rolling back")
        time.sleep(0.5)  # at the barrier, waiting for the lagging instance
        redis_server.stop()
        out, err = rollback.communicate(timeout=60)
    finally:
        stop.set()
    assert rollback.returncode == 1, err
    assert "Traceback" not in err and "Redis error" in err
    assert "run the same command again" in err
    assert job_state(state_url)["phase"] == "rolling_back"
    assert "Redis error" in (job_state(state_url)["job"].last_error or "")

    # plan apply runs jobs forward: it says which verb resumes this one.
    res = run_cli("plan", "apply", str(plan), "--state", state_url)
    assert res.returncode == 2, res.stderr
    assert "rollback was interrupted" in res.stderr and f"migrator rollback {JOB}" in res.stderr

    # `migrator run --once` finds the rollback to resume (once the phase is older than its
    # grace of 3 s), fails on the same server: exit 1.
    time.sleep(3.2)
    res = run_cli("run", "--once", env=cli_env(state_url), timeout=120)
    assert res.returncode == 1, res.stderr
    assert f"stopped on an error: {JOB}" in res.stderr and "Traceback" not in res.stderr


def test_a_state_store_failing_under_a_verb_is_store_unavailable(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"
    seed_hash(r, "big:hash", 500)
    commands.apply(
        str(write_plan(tmp_path / "p.yaml", redis_server.url)),
        state_url=url,
        allow_no_instances=True,
    )
    store = open_store(url)
    # Wait 0.2 s for a lock rather than migrator's 10 s (a connect hook after migrator's own).
    sa.event.listen(store.engine, "connect", lambda c, _: c.execute("PRAGMA busy_timeout=200"))
    store.engine.dispose()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable) as e:
            store.update_job(JOB, paused=True, audit="pause")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "database is locked" in e.value.message and e.value.exit_code == 1
    assert "run the same command again" in str(e.value)
    assert store.get_job(JOB).paused is False  # nothing half-written; the store works again
    store.close()


def test_cleanup_stopped_between_retiring_and_publishing_passes_no_barrier_early(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """The retirement of the old key takes a new epoch: a cleanup stopped at any point of it
    and resumed must still make every shim acknowledge retire_old under an epoch of its own."""
    seed_hash(r, "big:hash", 500)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    commands.set_ratio(100, name=JOB, state_url=state_url)

    store = open_store(state_url)
    real_save = store.save_checkpoint

    class Killed(BaseException):
        pass

    def killed_after_retiring(job, stage, *a, **kw):  # type: ignore[no-untyped-def]
        out = real_save(job, stage, *a, **kw)
        if stage == "retire":
            raise Killed  # the runner dies right after recording the retirement
        return out

    published: list[tuple[int, int]] = []
    real_publish = control.publish

    def spy(client: redis.Redis, rec: control.ControlRecord) -> None:
        published.append((rec.epoch, rec.retire_old))
        real_publish(client, rec)

    control.publish = spy  # type: ignore[assignment]
    try:
        store.save_checkpoint = killed_after_retiring  # type: ignore[method-assign]
        with pytest.raises(Killed):
            Runner(store, JOB).cleanup()
        store.save_checkpoint = real_save  # type: ignore[method-assign]
        job = Runner(store, JOB).cleanup()  # resumed
    finally:
        control.publish = real_publish  # type: ignore[assignment]
        store.close()
    assert job.phase == Phase.DONE
    plain = {e for e, retired in published if not retired}
    retired = {e for e, retired in published if retired}
    # Shims acknowledged the plain record's epoch; retire_old under that same epoch would
    # pass its barrier without a single shim having seen it.
    assert retired and not (plain & retired), published


def test_a_runner_that_loses_its_lease_says_so_and_keeps_its_checkpoint(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """Another process taking the lease over mid-copy stops the runner after its batch in
    flight: the message names the lost lease and its new holder, not a stop on request."""
    seed_hash(r, "big:hash", 200_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, extra="copy: {rate: 20000}\n")
    env = cli_env(state_url)
    apply = migrator_popen("plan", "apply", str(plan), "--allow-no-instances", env=env)
    try:
        _wait_for_stage(state_url, "copy", past=0)
        other = {"purpose": "apply", "host": "elsewhere", "pid": 4242, "token": "t", "since": 0}
        r.set(keys.lock(JOB), json.dumps(other))
        out, err = apply.communicate(timeout=60)
    finally:
        if apply.poll() is None:
            apply.kill()
    assert apply.returncode == 1, err
    assert "lost the lease" in err and "apply on elsewhere pid 4242" in err, err
    assert "stopped on request" not in err and "Traceback" not in err
    assert "run the same command again" in err
    state = job_state(state_url)
    assert state["phase"] == "copying"
    assert 0 < state["checkpoints"]["copy"].members_done < 200_000
    # Audited, not written as last_error: the job may be the other holder's by now.
    [event] = [e for e in commands.history(JOB, state_url=state_url) if e.kind == "lease_lost"]
    assert event.to_value == "apply" and "apply on elsewhere pid 4242" in (event.detail or "")
    assert state["job"].last_error is None
    # The lease is the other holder's still: ours was not released over it.
    assert json.loads(r.get(keys.lock(JOB)) or b"{}") == other


def test_a_runner_paused_past_its_lease_writes_nothing_when_it_wakes(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """A runner paused (SIGSTOP here; a VM or GC stall in life) until its lease expired may
    find, when it wakes, another holder at work: here one that removed the shard keys, as a
    rollback does. It must not send another write. Its renewal thread was paused too, so the
    runner fences its writes by its own clock (Lease.fresh) and stops with LeaseLost."""
    seed_hash(r, "big:hash", 200_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, extra="copy: {rate: 20000}\n")
    apply = migrator_popen(
        "plan", "apply", str(plan), "--allow-no-instances", env=cli_env(state_url)
    )
    shard_keys = [f"big:{i}" for i in range(8)]
    try:
        _wait_for_stage(state_url, "copy", past=0)
        os.kill(apply.pid, signal.SIGSTOP)
        try:
            eventually(
                lambda: not r.exists(keys.lock(JOB)), 10, "the paused runner's lease expired"
            )
            other = {"purpose": "rollback", "host": "elsewhere", "pid": 1, "token": "t", "since": 0}
            r.set(keys.lock(JOB), json.dumps(other))
            assert r.exists(*shard_keys)  # the copy had written some
            r.unlink(*shard_keys)
        finally:
            os.kill(apply.pid, signal.SIGCONT)
        out, err = apply.communicate(timeout=60)
    finally:
        if apply.poll() is None:
            apply.kill()
    assert apply.returncode == 1, err
    assert "lost the lease" in err and "Traceback" not in err, err
    assert r.exists(*shard_keys) == 0, "the woken runner wrote after its lease expired"
    assert json.loads(r.get(keys.lock(JOB)) or b"{}") == other  # not released over the other
    assert 0 < job_state(state_url)["checkpoints"]["copy"].members_done < 200_000


def test_a_server_restarted_mid_copy_makes_the_copy_scan_again_from_the_start(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """An HSCAN cursor is a position in one process's hash tables, which a restarted (or
    failed-over) server seeds afresh: resumed there, the copy skipped about a quarter of the
    key and still finished (an audit's reproduction). The runner notices the new run_id at its
    next checkpoint and stops; run again, the copy starts over (its inserts are idempotent)."""
    from tests.integration.helpers import read_shards

    # 100,000 at 20,000/s: the restart lands with over 4 s of the copy left.
    model = seed_hash(r, "big:hash", 100_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, extra="copy: {rate: 20000}\n")
    env = cli_env(state_url)
    apply = migrator_popen("plan", "apply", str(plan), "--allow-no-instances", env=env)
    err = _restart_under(apply, redis_server, state_url, "copy", past=15_000)
    assert apply.returncode == 1, err
    assert "the server restarted or failed over" in err and "Traceback" not in err, err
    state = job_state(state_url)
    assert state["phase"] == "copying" and not state["checkpoints"]["copy"].finished
    r = redis_server.client()
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", env=env, timeout=120)
    assert res.returncode == 0, res.stderr  # verify found nothing missing
    assert read_shards(r, "big:{shard}", 8) == model
    # (A shim-protocol check that failed while the server was down may add a rescan of its own.)
    rescans = [e.detail or "" for e in commands.history(JOB, state_url=state_url)]
    assert sum("copy scans again from the start" in d for d in rescans) == 1, rescans


def test_a_server_restarted_mid_verify_makes_its_pass_start_over(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """Verify's passes are scans too: resumed at a cursor of the server before its restart,
    the pass skipped members unchecked. The pass under way starts over; the counts stay those
    of one walk."""
    seed_hash(r, "big:hash", 40_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    env = cli_env(state_url)
    assert run_cli("plan", "apply", str(plan), "--allow-no-instances", env=env).returncode == 0
    commands.set_rate(JOB, 15_000, state_url=state_url)
    verify = migrator_popen("verify", JOB, "--rounds", "1", env=env)
    err = _restart_under(verify, redis_server, state_url, "verify", past=10_000)
    assert verify.returncode == 1 and "restarted or failed over" in err, err
    commands.set_rate(JOB, 0, state_url=state_url)
    res = run_cli("verify", JOB, "--rounds", "1", "--json", env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["source_checked"] == 40_000 and report["shard_checked"] == 40_000, report
    rescans = [e.detail or "" for e in commands.history(JOB, state_url=state_url)]
    assert sum("verify scans again from the start" in d for d in rescans) == 1, rescans


def test_status_with_redis_down_shows_the_stores_view_and_one_line_why(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    seed_hash(r, "big:hash", 500)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    redis_server.stop()
    [st] = commands.status(state_url, JOB)
    assert st["phase"] == "verified" and st["total"] == 500  # the store's view
    assert st["redis"].startswith("unreachable: cannot reach Redis at redis://"), st["redis"]
    assert "\n" not in st["redis"]  # the hint, on lines of its own, broke the human status
