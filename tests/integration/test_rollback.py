"""migrator rollback: from any phase before cleaning, back to old-only with no shard key left."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from migrator import commands, control, keys
from migrator.errors import MigratorError
from migrator.gates import MemoryGate, state_dir
from migrator.phases import Phase
from tests.conftest import run_cli
from tests.integration.helpers import read_hash, seed_hash, write_plan
from tests.integration.life import (
    JOB,
    SOURCE,
    Writers,
    cli_env,
    data_keys,
    decoded,
    eventually,
    job_state,
)
from tests.servers import RedisServer

N = 20_000


class ApplyThread(threading.Thread):
    """``plan apply`` running in the background, as an operator's other shell would."""

    def __init__(self, plan: Path, state_url: str) -> None:
        super().__init__(daemon=True)
        self.plan, self.state_url = plan, state_url
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = commands.apply(str(self.plan), state_url=self.state_url)
        except MigratorError as e:
            self.result = e


def _progressed(state_url: str, phase: str, stage: str) -> bool:
    s = job_state(state_url)
    cp = s["checkpoints"].get(stage)
    return s["phase"] == phase and cp is not None and cp.members_done > 0


@pytest.mark.parametrize("phase", ["copying", "verifying", "gray", "cutover"])
def test_rollback_under_live_writers_leaves_the_old_key_equal_to_the_model(
    phase: str, redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    initial = seed_hash(r, SOURCE, N)
    # A rate ceiling keeps the copy and the verification running long enough to roll back
    # in the middle of them; gray and cutover are reached at full speed.
    rate = "copy: {rate: 10000}\n" if phase in ("copying", "verifying") else ""
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=8, extra=rate)
    with Writers(redis_server.url, n=3, members=N, rate=300) as writers:
        applying = ApplyThread(plan, state_url)
        applying.start()
        if phase == "copying":
            eventually(lambda: _progressed(state_url, "copying", "copy"), 30, "copy under way")
        elif phase == "verifying":
            eventually(lambda: _progressed(state_url, "verifying", "verify"), 30, "verify")
        else:
            applying.join(60)
            assert getattr(applying.result, "phase", None) == "verified", applying.result
            commands.set_ratio(30 if phase == "gray" else 100, name=JOB, state_url=state_url)
            assert job_state(state_url)["phase"] == phase
            eventually(lambda: shard_count(r) > 0, 5, "shards exist")

        res = run_cli("rollback", JOB, env=cli_env(state_url))
        assert res.returncode == 0, res.stderr
        assert "rolled_back" in res.stdout
        applying.join(30)
        assert not applying.is_alive()
        if phase in ("copying", "verifying"):
            # The apply running meanwhile noticed and stopped after its batch.
            assert "rolling_back" in str(applying.result), applying.result
        ops_at_rollback = sum(writers.ops)
        eventually(lambda: sum(writers.ops) > ops_at_rollback + 100, 10, "writes go on")

    assert not writers.errors, writers.errors
    expected = writers.expected(initial)
    assert decoded(read_hash(r, SOURCE)) == expected
    assert data_keys(r) == {SOURCE}, "a shard key was left behind"
    s = job_state(state_url)
    assert (s["phase"], s["ratio"]) == ("rolled_back", 0)
    kinds = [(e.kind, e.from_value, e.to_value) for e in commands.history(JOB, state_url=state_url)]
    assert ("phase", phase, "rolling_back") in kinds
    assert ("phase", "rolling_back", "rolled_back") in kinds


def shard_count(r: redis.Redis) -> int:
    return len(data_keys(r) - {SOURCE})


def test_rollback_removes_shards_by_hdel_where_unlink_is_renamed_away(
    start_server: Any, tmp_path: Path, state_url: str
) -> None:
    server = start_server(rename_command='UNLINK ""')
    r = server.client()
    with pytest.raises(redis.ResponseError):
        r.unlink("anything")
    model = seed_hash(r, SOURCE, 10_000)
    plan = write_plan(tmp_path / "p.yaml", server.url, shards=4)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    job = commands.rollback(JOB, state_url=state_url)
    assert job.phase == "rolled_back"
    assert data_keys(r) == {SOURCE}
    assert read_hash(r, SOURCE) == model
    removed = [e for e in commands.history(JOB, state_url=state_url) if e.kind == "rollback"]
    assert removed and removed[-1].to_value == "hdel"
    r.close()


def test_rollback_is_refused_once_cleanup_started_and_reapply_works_after_it(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    model = seed_hash(r, SOURCE, 3000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=4)
    env = cli_env(state_url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert run_cli("rollback", JOB, env=env).returncode == 0
    assert data_keys(r) == {SOURCE} and read_hash(r, SOURCE) == model

    # Rolled back, the job can be applied again from scratch, then cleaned up: no way back.
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", env=env)
    assert res.returncode == 0, res.stderr
    assert job_state(state_url)["phase"] == "verified"
    commands.set_ratio(100, name=JOB, state_url=state_url)
    commands.cleanup(JOB, state_url=state_url)
    # Cleanup again on a done job publishes its record once more (a lost last publish) and
    # succeeds, as running any interrupted step again does.
    assert run_cli("cleanup", JOB, env=env).returncode == 0
    res = run_cli("rollback", JOB, env=env)
    assert res.returncode == 2
    assert "only before cleanup" in res.stderr
    res = run_cli("set-ratio", JOB, "50", env=env)
    assert res.returncode == 2 and "reads go to the shards only once cleanup" in res.stderr
    assert job_state(state_url)["phase"] == "done"


def _lose_the_last_publish(r: redis.Redis, before: control.ControlRecord) -> None:
    """As if the last move's store write had landed and its publish had not (a Redis error, a
    crash between the two): Redis still holds the record published before it."""
    r.delete(keys.control(JOB))
    r.hset(keys.control(JOB), mapping=before.to_hash())


def _rolled_back(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> tuple[Path, dict[str, str], control.ControlRecord]:
    """A job applied and rolled back through the CLI: its plan, the CLI's environment, and the
    rolled_back record it published."""
    seed_hash(r, SOURCE, 500)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=4)
    env = cli_env(state_url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert run_cli("rollback", JOB, env=env).returncode == 0
    done = control.read(r, JOB)
    assert done is not None and done.phase == Phase.ROLLED_BACK
    return plan, env, done


def test_a_rollback_whose_last_publish_was_lost_is_finished_by_running_it_again(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """The store says rolled_back, Redis still says rolling_back: `rollback` again publishes
    the record and succeeds (it used to refuse, exit 2), and a re-apply is not taken for
    another store's job (it used to be refused too, and the name stuck for good)."""
    plan, env, done = _rolled_back(redis_server, r, tmp_path, state_url)
    rolling = dataclasses.replace(done, phase=Phase.ROLLING_BACK, epoch=done.epoch - 1)
    _lose_the_last_publish(r, rolling)
    res = run_cli("rollback", JOB, env=env)
    assert res.returncode == 0, res.stderr
    assert control.read(r, JOB) == done
    _lose_the_last_publish(r, rolling)
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", env=env)
    assert res.returncode == 0, res.stderr
    assert job_state(state_url)["phase"] == "verified"


def test_a_finished_job_never_takes_over_another_store_s_record_of_its_name(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """Rolled back here, its record removed, the name taken up by a job another store drives
    (another salt, a lower epoch): neither re-apply nor `rollback` again takes that record for
    this job's own."""
    plan, env, mine = _rolled_back(redis_server, r, tmp_path, state_url)
    theirs = dataclasses.replace(mine, phase=Phase.COPYING, epoch=2, salt="another-job")
    _lose_the_last_publish(r, theirs)
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", env=env)
    assert res.returncode == 2 and "another state store drives it" in res.stderr
    res = run_cli("rollback", JOB, env=env)
    assert res.returncode == 2 and "belongs to another job" in res.stderr
    assert control.read(r, JOB) == theirs


def test_a_paused_job_still_rolls_back_and_a_reapply_audits_its_flag(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """Pause acts on copy, verify and cleanup; rollback is the way out and goes on (here with
    HSCAN+HDEL, which runs through the pacer). Applying again after it audits
    --allow-no-instances as the first apply did."""
    model = seed_hash(r, SOURCE, 3000)
    plan = write_plan(
        tmp_path / "p.yaml", redis_server.url, shards=4, extra="cleanup: {mode: hdel}\n"
    )
    env = cli_env(state_url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert run_cli("pause", JOB, env=env).returncode == 0
    res = run_cli("rollback", JOB, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert data_keys(r) == {SOURCE} and read_hash(r, SOURCE) == model
    # Rolled back, the job has no work for the controls: they are refused, not audited.
    before = len(commands.history(JOB, state_url=state_url))
    for verb in (["pause", JOB], ["resume", JOB], ["set-rate", JOB, "100"]):
        res = run_cli(*verb, env=env)
        assert res.returncode == 2 and "is rolled_back: it has no work left" in res.stderr, res
    assert len(commands.history(JOB, state_url=state_url)) == before
    res = run_cli("set-ratio", JOB, "10", env=env)
    assert res.returncode == 2 and "a rolled-back job reads the old key only" in res.stderr

    def flags() -> int:
        return sum(
            e.kind == "flag" and e.to_value == "allow_no_instances"
            for e in commands.history(JOB, state_url=state_url)
        )

    assert flags() == 1
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", env=env)
    assert res.returncode == 0, res.stderr
    assert flags() == 2


def test_rollback_by_hdel_goes_on_near_maxmemory_and_past_a_pause_file(
    start_server: Any, tmp_path: Path, state_url: str
) -> None:
    """Memory near maxmemory holds the copy; it must not hold the rollback that brings memory
    down (with HSCAN+HDEL, which runs through the gates), nor may a pause file hold the way
    out, as `migrator pause` does not."""
    server = start_server()
    r = server.client()
    model = seed_hash(r, SOURCE, 20_000)
    plan = write_plan(tmp_path / "p.yaml", server.url, shards=4, extra="cleanup: {mode: hdel}\n")
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", int(used / 0.95))  # 95% used: the memory gate holds
    assert MemoryGate(r).check() is not None
    pause_file = state_dir(state_url) / "pause"
    pause_file.touch()
    res = run_cli("rollback", JOB, env=cli_env(state_url), timeout=60)
    assert res.returncode == 0, res.stderr
    assert data_keys(r) == {SOURCE} and read_hash(r, SOURCE) == model
    removed = [e for e in commands.history(JOB, state_url=state_url) if e.kind == "rollback"]
    assert removed and removed[-1].to_value == "hdel"
    r.close()


def test_status_after_a_reapply_shows_no_verify_run_of_the_attempt_rolled_back(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """The verify runs of an attempt that was rolled back say nothing about the shards of the
    next: until it verifies, status shows none (it used to show the last one's counts)."""
    from migrator.plan import load_plan
    from migrator.store import open_store

    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=4)
    seed_hash(r, SOURCE, 500)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    r.hset("big:0", "m-outside", "written past the shim")  # a confirmed difference
    assert commands.verify(JOB, state_url=state_url, rounds=1, delay=0.1).confirmed
    [st] = commands.status(state_url, JOB)
    assert st["verify"]["run"] == 2 and st["verify"]["confirmed"] == {"extra_in_shard": 1}, st
    commands.rollback(JOB, state_url=state_url)
    [st] = commands.status(state_url, JOB)
    assert st["verify"]["run"] == 2  # the rolled-back attempt's, still its news
    store = open_store(state_url)
    try:
        store.reset_for_reapply(JOB, load_plan(str(plan)))  # what plan apply does first
    finally:
        store.close()
    [st] = commands.status(state_url, JOB)
    assert st["phase"] == "planned" and st["verify"] is None, st  # a stable field: null
    assert "last verify run" not in run_cli("status", JOB, "--state", state_url).stdout
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    [st] = commands.status(state_url, JOB)
    assert st["verify"] == {"run": 3, "confirmed": {}, "repaired": {}}, st
