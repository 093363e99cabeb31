"""plan apply end to end on a real server: copy, verify, status, idempotence, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from migrator import commands, keys
from migrator.errors import PlanConflict
from migrator.store import open_store
from tests.conftest import run_cli
from tests.integration.helpers import read_hash, read_shards, seed_hash, write_plan
from tests.servers import RedisServer


def test_apply_copies_verifies_and_reports(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    model = seed_hash(r, "big:hash", 20_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    job = commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert job.phase == "verified"
    assert read_shards(r, "big:{shard}", 8) == model
    assert read_hash(r, "big:hash") == model  # the old key is untouched

    [st] = commands.status(state_url, "t-job")
    assert st["phase"] == "verified" and st["copied"] == st["total"] == 20_000
    assert st["progress"] == 1.0 and st["last_error"] is None
    control = r.hgetall(keys.control("t-job"))
    assert control[b"phase"] == b"verified" and int(control[b"epoch"]) == st["epoch"]

    # Applying the same plan again is a no-op at `verified`.
    again = commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert again.phase == "verified" and again.epoch == job.epoch

    # A changed plan for the active job is refused, showing the difference.
    changed = write_plan(tmp_path / "p2.yaml", redis_server.url, shards=16)
    with pytest.raises(PlanConflict) as e:
        commands.apply(str(changed), state_url=state_url, allow_no_instances=True)
    assert '"shards": 8' in str(e.value) and '"shards": 16' in str(e.value)


def test_a_job_name_another_store_drives_is_refused_and_epochs_never_restart(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """The barrier counts a shim as caught up when it has applied the published epoch or a
    later one, so a job name applied again from another state store (another working
    directory, a lost SQLite file) must not start its epochs over below what shims still
    hold; and while the first store's job is under way the second is refused outright."""
    seed_hash(r, "big:hash", 2000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    other = f"sqlite:///{tmp_path}/other.db"
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)

    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", "--state", other)
    assert res.returncode == 2, res.stderr
    assert "already under way on this Redis (phase verified" in res.stderr
    assert "--state" in res.stderr
    assert not (tmp_path / "other.db").exists()  # refused before anything was written

    rolled = commands.rollback("t-job", state_url=state_url)
    again = commands.apply(str(plan), state_url=other, allow_no_instances=True)
    assert again.phase == "verified" and again.epoch > rolled.epoch
    assert int(r.hget(keys.control("t-job"), "epoch")) == again.epoch


def test_a_done_jobs_name_refuses_another_plan(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    seed_hash(r, "big:hash", 500)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    commands.set_ratio(100, name="t-job", state_url=state_url)
    assert commands.cleanup("t-job", state_url=state_url).phase == "done"
    same = run_cli("plan", "apply", str(plan), "--state", state_url)
    assert same.returncode == 0, same.stderr  # the same plan: nothing to do
    changed = write_plan(tmp_path / "p2.yaml", redis_server.url, shards=16)
    res = run_cli("plan", "apply", str(changed), "--state", state_url)
    assert res.returncode == 2, res.stderr
    assert "is done" in res.stderr and '"shards": 16' in res.stderr


def test_an_active_jobs_redis_url_may_change_to_the_same_server_only(
    start_server: Any, tmp_path: Path, state_url: str
) -> None:
    """A server that moved (a failover to a new address, a rotated password) must not strand
    a job: applying the same plan with the new redis.url points the job there (audited), once
    that server holds the job's control record at its epoch; any other server is refused."""
    server, stranger = start_server(), start_server()
    r = server.client()
    seed_hash(r, "big:hash", 500)
    commands.apply(
        str(write_plan(tmp_path / "p.yaml", server.url)),
        state_url=state_url,
        allow_no_instances=True,
    )
    other = write_plan(tmp_path / "o.yaml", stranger.url)
    res = run_cli("plan", "apply", str(other), "--state", state_url)
    assert res.returncode == 2 and "is not that server" in res.stderr, res.stderr

    moved_url = server.url.replace("127.0.0.1", "localhost")
    assert moved_url != server.url
    moved = write_plan(tmp_path / "m.yaml", moved_url)
    res = run_cli("plan", "apply", str(moved), "--state", state_url)
    assert res.returncode == 0, res.stderr
    events = [e for e in commands.history("t-job", state_url=state_url) if e.kind == "redis_url"]
    assert events and events[-1].to_value == moved_url
    assert commands.rollback("t-job", state_url=state_url).phase == "rolled_back"
    r.close()


def test_status_json_via_cli(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    seed_hash(r, "big:hash", 3000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", "--state", state_url)
    assert res.returncode == 0, res.stderr
    res = run_cli("status", "t-job", "--json", "--state", state_url)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    for field in (
        "name",
        "phase",
        "ratio",
        "epoch",
        "copied",
        "total",
        "progress",
        "rate",
        "eta_seconds",
        "throttle",
        "stage",
        "stage_done",
        "last_error",
        "instances",
        "counters",
    ):
        assert field in st
    assert st["phase"] == "verified" and st["total"] == 3000
    assert st["stage"] is None and st["stage_done"] is None  # idle: null, as README says
    # Which insert this server got is test_throttle_budget.py's business; status says it.
    assert st["copy_insert"].startswith(("HSETNX, one member", "HSETEX FNX, up to"))
    text = run_cli("status", "t-job", "--state", state_url).stdout
    assert f"copy inserts: {st['copy_insert']}" in text
    # Watched: one compact document a line, each one parseable (they were indented documents
    # back to back, which no reader could split).
    watch = subprocess.Popen(
        [sys.executable, "-m", "migrator", "status", "t-job", "--json", "--watch"]
        + ["--state", state_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    lines = [watch.stdout.readline() for _ in range(2)]  # two refreshes, however slow
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=30)
    docs = [json.loads(line) for line in lines + out.splitlines() if line.strip()]
    assert len(docs) >= 2 and all(d["phase"] == "verified" for d in docs), lines
    # Ctrl-C is how a watch ends: no word of batches or checkpoints, which it has none of.
    assert watch.returncode == 130 and err.strip() == "interrupted", err


def _copy_checkpoint(state_url: str) -> tuple[str, int] | None:
    store = open_store(state_url)
    try:
        job = store.get_job("t-job")
        cp = store.get_checkpoint(job, "copy")
        return (job.phase.value, cp.members_done) if cp else (job.phase.value, 0)
    except Exception:
        return None
    finally:
        store.close()


def test_sigkill_mid_copy_then_resume_from_checkpoint(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    model = seed_hash(r, "big:hash", 200_000)
    # A rate ceiling makes the copy last ~4 s, so the kill lands in the middle of it.
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, extra="copy: {rate: 50000}\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migrator",
            "plan",
            "apply",
            str(plan),
            "--allow-no-instances",
            "--state",
            state_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        seen = None
        while time.monotonic() < deadline:
            seen = _copy_checkpoint(state_url)
            if seen and seen[0] == "copying" and seen[1] >= 40_000:
                break
            time.sleep(0.05)
        assert seen and seen[0] == "copying", f"copy never got going: {seen}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _copy_checkpoint(state_url)
    assert killed_at is not None and 0 < killed_at[1] < 200_000
    # Its lease outlives it (TTL), but status sees the holder is gone from this host.
    [st] = commands.status(state_url, "t-job")
    assert st["interrupted"] and st["stage"] == "copy" and st["runner"] is None
    assert st["stage_done"] == killed_at[1]
    assert "interrupted: copy stopped at" in run_cli("status", "--state", state_url).stdout

    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", "--state", state_url)
    assert res.returncode == 0, res.stderr
    assert read_shards(r, "big:{shard}", 8) == model

    history = commands.history("t-job", state_url=state_url)
    resumed = [e for e in history if e.kind == "resume"]
    assert len(resumed) == 1
    assert resumed[0].to_value != "0"  # a real cursor, not a restart from zero
    assert f"after {killed_at[1]} members" in (resumed[0].detail or "")


def test_status_shows_a_verify_run_after_verifying_and_its_interruption(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """`migrator verify NAME` runs in verified, gray and cutover too: status shows its stage,
    progress and runner there as it does in verifying, and says when it was interrupted."""
    seed_hash(r, "big:hash", 50_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    commands.set_ratio(30, name="t-job", state_url=state_url)
    assert run_cli("set-rate", "t-job", "5000", "--state", state_url).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator", "verify", "t-job", "--state", state_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline, st = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            [st] = commands.status(state_url, "t-job")
            # The first progress saved may precede the first rate measured: wait for both.
            working = st["stage"] == "verify" and (st["stage_done"] or 0) > 0 and st["runner"]
            if working and st["rate"] > 0:
                break
            time.sleep(0.1)
        assert st is not None and st["phase"] == "gray" and st["stage"] == "verify", st
        assert "verify" in st["runner"] and st["rate"] > 0 and not st["interrupted"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    [st] = commands.status(state_url, "t-job")
    assert st["interrupted"] and st["stage"] == "verify" and st["runner"] is None
    # `migrator run` does not resume a verify begun after verifying: the line says what does.
    shown = run_cli("status", "--state", state_url).stdout
    assert "(run `migrator verify t-job` again to go on)" in shown, shown
    # Rolled back, the unfinished verify is nobody's work to resume: not shown as interrupted.
    assert commands.rollback("t-job", state_url=state_url).phase == "rolled_back"
    [st] = commands.status(state_url, "t-job")
    assert not st["interrupted"] and st["stage"] is None and st["stage_done"] is None


def test_set_ratio_never_moves_past_a_verify_that_found_differences_meanwhile(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """`set-ratio 100` (no --force) reads verified; before it writes, a `migrator verify` that
    found differences moves the job back to verifying. The ratio change must not then move it
    on from verifying, the way only --force may."""
    from migrator.errors import IllegalTransition
    from migrator.phases import Phase
    from migrator.runner import Runner

    seed_hash(r, "big:hash", 2_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    store, other = open_store(state_url), open_store(state_url)
    runner = Runner(store, "t-job")
    read = runner.refresh

    def read_then_verify_moves_it_back() -> Any:
        job = read()
        other.transition("t-job", Phase.VERIFYING, detail="verify found differences")
        return job

    runner.refresh = read_then_verify_moves_it_back  # type: ignore[method-assign]
    try:
        with pytest.raises(IllegalTransition):
            runner.set_ratio(100)
        assert other.get_job("t-job").phase == Phase.VERIFYING
    finally:
        runner.close()
        store.close()
        other.close()


def test_apply_whose_verify_is_skipped_past_says_where_the_job_went(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """`set-ratio --force` during plan apply's verify moves the job on to gray; apply stops
    there. Its message used to say "run plan apply again to resume", which does nothing in
    gray: it points at status now, and a rollback meanwhile is named as such."""
    seed_hash(r, "big:hash", 6000)
    # Verify walks 12,000 members at 1,500/s: 8 s for a set-ratio process to land in.
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, extra="copy: {rate: 1500}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator", "plan", "apply", str(plan), "--state", state_url]
        + ["--allow-no-instances"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, st = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            jobs = commands.status(state_url) if Path(state_url[10:]).exists() else []
            st = jobs[0] if jobs else {}
            if st.get("phase") == "verifying" and (st["stage_done"] or 0) > 0:
                break
            time.sleep(0.05)
        assert st.get("phase") == "verifying", st
        forced = run_cli("set-ratio", "t-job", "10", "--force", "--state", state_url)
        assert forced.returncode == 0, forced.stderr
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "moved to phase gray" in err and "`migrator status t-job`" in err, err
    assert "plan apply" not in err, err


def test_a_job_left_in_planned_is_preflighted_again_before_it_writes(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """A first apply that failed before dual_write (a busy lease, a Redis blip) leaves the
    job in planned. A shard key made meanwhile is someone else's: applying again, or
    `migrator run`, used to skip the preflight, copy beside it, and a rollback then removed
    it with the job's own shards."""
    from migrator.errors import PreflightError
    from migrator.plan import load_plan
    from migrator.runner import Runner

    seed_hash(r, "big:hash", 500)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=4)
    store = open_store(state_url)
    try:
        store.create_job(load_plan(str(plan)), allow_no_instances=True)  # as apply does first
        r.hset("big:1", "foreign", "precious")
        res = run_cli("plan", "apply", str(plan), "--allow-no-instances", "--state", state_url)
        assert res.returncode == 2, res.stderr
        assert "shard key(s) of target.key 'big:{shard}' already exist: 'big:1'" in res.stderr
        assert store.get_job("t-job").phase == "planned"
        runner = Runner(store, "t-job")  # what `migrator run` does with it
        try:
            with pytest.raises(PreflightError, match="'big:1'"):
                runner.apply()
        finally:
            runner.close()
        job = store.get_job("t-job")
        assert job.phase == "planned" and "stays in planned" in (job.last_error or "")
    finally:
        store.close()
    assert r.hgetall("big:1") == {b"foreign": b"precious"}
    assert not r.exists("big:0", "big:2", "big:3")
    # The way out the refusal points at: a rollback from planned removes no shard key (it
    # wrote none); it used to remove them all, the foreign one too.
    assert commands.rollback("t-job", state_url=state_url).phase == "rolled_back"
    assert r.hgetall("big:1") == {b"foreign": b"precious"}


def test_a_stop_requested_before_the_copy_registers_and_moves_nothing(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """Ctrl-C during the preflight or the first moves: the stop was checked only between copy
    batches, so the job was registered, published and moved on to copying first (and live
    shims started their dual writes) before apply stopped."""
    import threading

    from migrator.errors import Interrupted
    from migrator.runner import Runner

    seed_hash(r, "big:hash", 500)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        commands.apply(str(plan), state_url=state_url, allow_no_instances=True, stop=stop)
    assert not Path(state_url.removeprefix("sqlite:///")).exists()  # nothing registered
    assert r.keys("migrator:*") == [] and r.keys("big:[0-9]*") == []

    store = open_store(state_url)
    try:
        from migrator.plan import load_plan

        store.create_job(load_plan(str(plan)), allow_no_instances=True)
        runner = Runner(store, "t-job", stop=stop)
        try:
            with pytest.raises(Interrupted):
                runner.apply()
        finally:
            runner.close()
        assert store.get_job("t-job").phase == "planned"
    finally:
        store.close()
    assert r.keys("big:[0-9]*") == []
    # Resumed without --allow-no-instances: the first apply's flag stands for the job it made
    # (the hint says "run plan apply FILE again", with no flags).
    res = run_cli("plan", "apply", str(plan), "--state", state_url)
    assert res.returncode == 0, res.stderr
    assert "phase verified" in res.stdout
    # A stop that comes once the job is verified changes nothing: apply's work is done.
    store = open_store(state_url)
    try:
        runner = Runner(store, "t-job", stop=stop)
        try:
            assert runner.apply().phase == "verified"
        finally:
            runner.close()
    finally:
        store.close()
