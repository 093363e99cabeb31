"""migrator run: the long-running runner resumes interrupted jobs, runs scheduled cleanups,
keeps to one runner per job, and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from migrator import commands, keys
from tests.conftest import run_cli
from tests.integration.helpers import read_hash, read_shards, seed_hash, write_plan
from tests.integration.life import (
    JOB,
    SOURCE,
    TEMPLATE,
    cli_env,
    eventually,
    job_state,
    migrator_popen,
)
from tests.servers import RedisServer


def _terminate(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(f"migrator run ignored SIGTERM for {timeout}s:\n{err}") from None
    return proc.returncode, err


def test_run_cleans_up_once_cutover_has_lasted_cleanup_after(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    model = seed_hash(r, SOURCE, 5000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, extra="cleanup: {after: 2s}\n")
    env = cli_env(state_url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    runner = migrator_popen("run", "--interval", "0.3", env=env)
    try:
        time.sleep(1.0)
        assert job_state(state_url)["phase"] == "verified"  # nothing is due before cutover
        commands.set_ratio(100, name=JOB, state_url=state_url)
        eventually(lambda: job_state(state_url)["phase"] == "done", 20, "scheduled cleanup")
    finally:
        code, err = _terminate(runner)
    assert code == 0, err
    assert not r.exists(SOURCE)
    assert read_shards(r, TEMPLATE, 8) == model

    history = commands.history(JOB, state_url=state_url)
    cut = next(e for e in history if e.kind == "phase" and e.to_value == "cutover")
    clean = next(e for e in history if e.kind == "phase" and e.to_value == "cleaning")
    assert "scheduled cleanup" in (clean.detail or "")
    assert (clean.at - cut.at).total_seconds() >= 2.0


def test_run_resumes_an_interrupted_job_and_stops_cleanly_on_sigterm(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    n = 30_000
    model = seed_hash(r, SOURCE, n)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, extra="copy: {rate: 8000}\n")
    env = cli_env(state_url)

    def copied() -> int:
        cp = job_state(state_url)["checkpoints"].get("copy")
        return cp.members_done if cp else 0

    applying = migrator_popen("plan", "apply", str(plan), "--allow-no-instances", env=env)
    try:
        eventually(lambda: copied() >= 3000, 30, "copy under way")
        # While one runner works the job, a second one is turned away, naming the first.
        res = run_cli("plan", "apply", str(plan), "--allow-no-instances", env=env)
        assert res.returncode == 1, res.stderr
        assert f"pid {applying.pid}" in res.stderr and "apply" in res.stderr
        applying.send_signal(signal.SIGKILL)
        applying.wait(10)
    finally:
        if applying.poll() is None:
            applying.kill()
    killed_at = copied()
    assert job_state(state_url)["phase"] == "copying"

    runner = migrator_popen("run", "--interval", "0.3", env=env)
    try:
        eventually(lambda: copied() >= killed_at + 3000, 30, "migrator run resumed the copy")
    finally:
        code, err = _terminate(runner)
    assert code == 0, err
    state = job_state(state_url)
    assert state["phase"] == "copying"
    cp = state["checkpoints"]["copy"]
    assert not cp.finished and killed_at < cp.members_done < n  # stopped mid-way, kept
    assert not r.exists(keys.lock(JOB))  # the lease was given back
    resumed = [e for e in commands.history(JOB, state_url=state_url) if e.kind == "resume"]
    assert len(resumed) == 1  # run resumed from the checkpoint, it did not restart

    commands.set_rate(JOB, 0, state_url=state_url)
    res = run_cli("run", "--once", env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    state = job_state(state_url)
    assert state["phase"] == "verified" and state["checkpoints"]["copy"].finished
    assert read_shards(r, TEMPLATE, 8) == model
    assert read_hash(r, SOURCE) == model
    assert len([e for e in commands.history(JOB, state_url=state_url) if e.kind == "resume"]) == 2


def test_run_leaves_a_failed_verification_to_the_operator(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    seed_hash(r, SOURCE, 2000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=4)
    env = cli_env(state_url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    r.hset("big:0", "intruder", "x")
    assert run_cli("verify", JOB, "--delay", "0.1", env=env).returncode == 3
    time.sleep(3.2)  # past the grace period
    before = len(commands.history(JOB, state_url=state_url))
    res = run_cli("run", "--once", env=env)
    assert res.returncode == 0, res.stderr
    assert "alembic" not in res.stderr, res.stderr  # its INFO lines came with every start
    assert job_state(state_url)["phase"] == "verifying"
    assert len(commands.history(JOB, state_url=state_url)) == before  # nothing was re-run


def test_a_scheduled_cleanup_waits_for_unrepaired_differences_without_spinning(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """cleanup.after has passed, but the last verify run (in cutover) confirmed a difference:
    the runner leaves the old key, says why in status, asks again with backoff rather than
    every tick, and cleans up once a repair made the run clean."""
    seed_hash(r, SOURCE, 2000)
    plan = write_plan(
        tmp_path / "p.yaml", redis_server.url, shards=4, extra="cleanup: {after: 1s}\n"
    )
    env = cli_env(state_url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    commands.set_ratio(100, name=JOB, state_url=state_url)
    r.hset("big:0", "intruder", "x")  # written outside the shim
    assert run_cli("verify", JOB, "--delay", "0.1", env=env).returncode == 3
    runner = migrator_popen("run", "--interval", "0.2", env=env)
    try:
        eventually(
            lambda: "cleanup refused" in (commands.status(state_url, JOB)[0]["last_error"] or ""),
            20,
            "the refusal in status",
        )
        time.sleep(3.0)  # 15 ticks: backoff asks 2-3 times
        assert job_state(state_url)["phase"] == "cutover" and r.exists(SOURCE)
        assert run_cli("verify", JOB, "--repair", "--delay", "0.1", env=env).returncode == 0
        eventually(lambda: job_state(state_url)["phase"] == "done", 30, "the cleanup")
    finally:
        code, err = _terminate(runner)
    assert code == 0, err
    refusals = err.count("confirmed differences nobody repaired")
    assert 1 <= refusals <= 4, err  # not once a tick


def test_run_started_before_any_plan_waits_for_the_store_and_then_works_it(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    """A service started before the first plan apply: `migrator run` creates no store (a
    mistyped --state would otherwise be watched, empty, for ever) and does not exit in a loop
    either; it says it is waiting, and works the jobs once a plan apply made the store."""
    state_url = f"sqlite:///{tmp_path}/later/state.db"
    env = cli_env(state_url)
    runner = migrator_popen("run", "--interval", "0.3", env=env)
    try:
        time.sleep(1.5)
        assert runner.poll() is None, "migrator run exited without a store"
        assert not (tmp_path / "later" / "state.db").exists()
        seed_hash(r, SOURCE, 2000)
        plan = write_plan(
            tmp_path / "p.yaml",
            redis_server.url,
            source=SOURCE,
            shards=8,
            extra="cleanup: {after: 1s}\n",
        )
        commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
        commands.set_ratio(100, name=JOB, state_url=state_url)
        eventually(lambda: job_state(state_url)["phase"] == "done", 30, "run cleaned it up")
    finally:
        code, err = _terminate(runner)
    assert code == 0, err
    assert "no state store at" in err and "waiting for one" in err, err
