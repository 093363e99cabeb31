"""migrator cleanup: from cutover only; barrier; UNLINK where the server has it, else budgeted,
checkpointed HSCAN+HDEL batches that survive a SIGKILL."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from migrator import commands
from migrator.store import open_store
from tests.conftest import run_cli
from tests.integration.helpers import read_hash, read_shards, seed_hash, write_plan
from tests.integration.life import (
    JOB,
    SOURCE,
    TEMPLATE,
    cli_env,
    data_keys,
    eventually,
    job_state,
    migrator_popen,
)
from tests.servers import RedisServer


def _at_cutover(url: str, r: redis.Redis, tmp_path: Path, state_url: str, n: int, extra: str = ""):
    model = seed_hash(r, SOURCE, n)
    plan = write_plan(tmp_path / "p.yaml", url, shards=8, extra=extra)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    commands.set_ratio(100, name=JOB, state_url=state_url)
    return model


def _removal(state_url: str) -> str | None:
    events = [e for e in commands.history(JOB, state_url=state_url) if e.kind == "cleanup"]
    return events[-1].to_value if events else None


def test_cleanup_only_from_cutover_then_unlink(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    model = seed_hash(r, SOURCE, 10_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=8)
    env = cli_env(state_url)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    for ratio in (None, 50):  # verified, then gray: refused, nothing touched
        if ratio is not None:
            commands.set_ratio(ratio, name=JOB, state_url=state_url)
        res = run_cli("cleanup", JOB, env=env)
        assert res.returncode == 2, res.stderr
        assert "only from cutover" in res.stderr
        assert read_hash(r, SOURCE) == model

    commands.set_ratio(100, name=JOB, state_url=state_url)
    res = run_cli("cleanup", JOB, env=env)
    assert res.returncode == 0, res.stderr
    assert "done" in res.stdout
    assert not r.exists(SOURCE)
    assert read_shards(r, TEMPLATE, 8) == model
    assert _removal(state_url) == "unlink"
    phases = [
        (e.from_value, e.to_value)
        for e in commands.history(JOB, state_url=state_url)
        if e.kind == "phase"
    ]
    assert phases[-2:] == [("cutover", "cleaning"), ("cleaning", "done")]


def test_cleanup_needs_a_finished_verify_which_removes_the_copy_s_delete_marks(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """A job pushed to cutover without a finished verify (set-ratio --force) may still hold the
    delete marks the copy needed; the shards-only phases would take them for values. So
    cleanup is refused (exit 2, nothing touched) until a verify run has finished."""
    model = _at_cutover(redis_server.url, r, tmp_path, state_url, 2_000)
    store = open_store(state_url)
    try:  # as if the verify had been interrupted and the ratio forced
        store.save_checkpoint(store.get_job(JOB), "verify", "0", 0, finished=False)
    finally:
        store.close()
    env = cli_env(state_url)
    res = run_cli("cleanup", JOB, env=env)
    assert res.returncode == 2, res.stderr
    assert "no finished verify run" in res.stderr and f"migrator verify {JOB}" in res.stderr
    assert read_hash(r, SOURCE) == model and job_state(state_url)["phase"] == "cutover"

    assert run_cli("verify", JOB, env=env).returncode == 0
    res = run_cli("cleanup", JOB, env=env)
    assert res.returncode == 0, res.stderr
    assert read_shards(r, TEMPLATE, 8) == model


@pytest.mark.parametrize("way", ["repair", "force"])
def test_cleanup_refuses_differences_the_last_verify_confirmed(
    way: str, redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """After cleanup the shards are all there is, so a last verify run whose differences nobody
    repaired stops it (exit 3, nothing touched) until a repair, or --force (audited)."""
    model = _at_cutover(redis_server.url, r, tmp_path, state_url, 2_000)
    member = next(iter(model))
    shard = next(
        TEMPLATE.replace("{shard}", str(i))
        for i in range(8)
        if r.hexists(TEMPLATE.replace("{shard}", str(i)), member)
    )
    r.hset(shard, member, b"not what the source holds")  # written outside the shim
    env = cli_env(state_url)
    assert run_cli("verify", JOB, env=env).returncode == 3
    res = run_cli("cleanup", JOB, env=env)
    assert res.returncode == 3, res.stderr
    assert "confirmed differences nobody repaired (value_differs 1)" in res.stderr
    assert f"migrator verify {JOB} --show, then --repair" in res.stderr
    assert read_hash(r, SOURCE) == model and job_state(state_url)["phase"] == "cutover"

    if way == "repair":
        assert run_cli("verify", JOB, "--repair", env=env).returncode == 0
        res = run_cli("cleanup", JOB, env=env)
    else:
        res = run_cli("cleanup", JOB, "--force", env=env)
    assert res.returncode == 0, res.stderr
    assert not r.exists(SOURCE) and job_state(state_url)["phase"] == "done"
    forced = [
        e
        for e in commands.history(JOB, state_url=state_url)
        if e.kind == "flag" and e.to_value == "force"
    ]
    if way == "repair":
        assert read_shards(r, TEMPLATE, 8) == model and forced == []
    else:
        assert read_shards(r, TEMPLATE, 8)[member] == b"not what the source holds"
        [event] = forced
        assert "cleanup --force past verify run" in (event.detail or "")
        assert "value_differs 1" in (event.detail or "")


def test_cleanup_mode_forces_hdel_even_where_unlink_exists(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    model = _at_cutover(
        redis_server.url, r, tmp_path, state_url, 5000, extra="cleanup: {mode: hdel}\n"
    )
    assert commands.cleanup(JOB, state_url=state_url).phase == "done"
    assert not r.exists(SOURCE)
    assert read_shards(r, TEMPLATE, 8) == model
    assert _removal(state_url) == "hdel"


def test_cleanup_mode_unlink_is_refused_at_apply_where_the_server_has_no_unlink(
    start_server: Any, tmp_path: Path, state_url: str
) -> None:
    """Asked for in the plan and missing (renamed away): refused before anything is written,
    not found out at cleanup, where the job's plan can no longer change."""
    server = start_server(rename_command='UNLINK ""')
    r = server.client()
    seed_hash(r, SOURCE, 200)
    plan = write_plan(tmp_path / "p.yaml", server.url, shards=8, extra="cleanup: {mode: unlink}\n")
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", env=cli_env(state_url))
    assert res.returncode == 2
    assert "cleanup.mode is unlink, but this server has no UNLINK" in res.stderr
    assert data_keys(r) == {SOURCE}
    r.close()


def test_a_server_that_lost_unlink_since_apply_is_cleaned_up_by_hdel(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """UNLINK denied after apply (an ACL change; a failover to a server with renamed commands
    is alike): the cleanup removes the old key by HSCAN+HDEL, audited, rather than leave the
    job stuck in cleaning, whose plan cannot change (it used to fail there every time)."""
    _at_cutover(redis_server.url, r, tmp_path, state_url, 2000, extra="cleanup: {mode: unlink}\n")
    r.execute_command("ACL", "SETUSER", "default", "-unlink")
    try:
        res = run_cli("cleanup", JOB, env=cli_env(state_url))
        assert res.returncode == 0, res.stderr
        assert not r.exists(SOURCE) and job_state(state_url)["phase"] == "done"
        assert _removal(state_url) == "hdel"
        flags = [e for e in commands.history(JOB, state_url=state_url) if e.kind == "flag"]
        assert any("no UNLINK" in (e.detail or "") for e in flags)
    finally:
        r.execute_command("ACL", "SETUSER", "default", "+unlink")


def test_hdel_cleanup_without_unlink_survives_sigkill(
    start_server: Any, tmp_path: Path, state_url: str
) -> None:
    server = start_server(rename_command='UNLINK ""')
    r = server.client()
    with pytest.raises(redis.ResponseError):
        r.unlink("anything")
    n = 50_000
    model = _at_cutover(server.url, r, tmp_path, state_url, n)
    commands.set_rate(JOB, 15_000, state_url=state_url)  # about 3 s of HDEL batches

    env = cli_env(state_url)
    proc = migrator_popen("cleanup", JOB, env=env)
    try:

        def midway() -> bool:
            cp = job_state(state_url)["checkpoints"].get("cleanup")
            return cp is not None and cp.members_done >= 10_000

        eventually(midway, 30, "cleanup under way")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = r.hlen(SOURCE)
    assert 0 < left < n
    state = job_state(state_url)
    assert state["phase"] == "cleaning"
    killed_at = state["checkpoints"]["cleanup"]
    assert killed_at.cursor != "0" and killed_at.extra["mode"] == "hdel"

    commands.set_rate(JOB, 0, state_url=state_url)
    started = time.monotonic()
    res = run_cli("cleanup", JOB, env=env)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started < 20  # the dead process's lease did not hold it up
    assert not r.exists(SOURCE)
    assert read_shards(r, TEMPLATE, 8) == model
    assert job_state(state_url)["phase"] == "done"
    history = commands.history(JOB, state_url=state_url)
    resumed = [e for e in history if e.kind == "resume" and "cleanup" in (e.detail or "")]
    assert len(resumed) == 1 and resumed[0].to_value == killed_at.cursor
    assert _removal(state_url) == "hdel"
    r.close()


@pytest.mark.parametrize("hold", ["pause", "pause file"])
def test_an_unlink_cleanup_holds_on_a_pause_and_on_a_pause_file(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str, hold: str
) -> None:
    """Pause acts on cleanup (SPEC §4) however the old key goes: an UNLINK cleanup used to
    remove it at once past `migrator pause` and the pause file, where HDEL batches hold."""
    import threading

    _at_cutover(redis_server.url, r, tmp_path, state_url, 2000, extra="cleanup: {mode: unlink}\n")
    pause_file = Path(state_url.removeprefix("sqlite:///")).parent / f"pause-{JOB}"
    if hold == "pause":
        commands.pause(JOB, state_url=state_url)
    else:
        pause_file.touch()
    outcome: list[Any] = []

    def cleanup() -> None:
        try:
            outcome.append(commands.cleanup(JOB, state_url=state_url))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=cleanup, daemon=True)
    t.start()

    def held() -> Any:
        [st] = commands.status(state_url, JOB)
        return st["stage"] == "cleanup" and st["throttle"]

    reason = eventually(held, 10, "status to show the held cleanup")
    assert reason == ("paused by operator" if hold == "pause" else f"pause file {pause_file}")
    time.sleep(0.5)
    assert r.exists(SOURCE) and t.is_alive() and not outcome, outcome
    if hold == "pause":
        commands.resume(JOB, state_url=state_url)
    else:
        pause_file.unlink()
    t.join(10)
    assert outcome and getattr(outcome[0], "phase", None) == "done", outcome
    assert not r.exists(SOURCE)
