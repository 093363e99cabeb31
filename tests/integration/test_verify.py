"""migrator verify: both directions, multi-round, every confirmed difference stored, repair."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from migrator import commands
from migrator.errors import Interrupted
from migrator.routing import shard_of
from migrator.scanloop import Progress
from migrator.store import open_store
from tests.conftest import run_cli
from tests.integration.helpers import read_hash, read_shards, seed_hash, write_plan
from tests.integration.life import JOB, SOURCE, TEMPLATE, Writers, cli_env, decoded, job_state
from tests.servers import RedisServer

SHARDS = 8


def shard_key(member: str | bytes) -> str:
    return TEMPLATE.replace("{shard}", str(shard_of(member, SHARDS)))


def _applied(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str, n: int
) -> dict[bytes, bytes]:
    model = seed_hash(r, SOURCE, n)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=SHARDS)
    job = commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert job.phase == "verified"
    return model


def _wait_for_suspects(state_url: str, n: int) -> None:
    """Until the current verify run has recorded ``n`` suspects (its passes are over)."""
    store = open_store(state_url)
    try:
        job = store.get_job(JOB)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            run = store.last_verify_run(job)
            if run and sum(store.count_diffs(job, run, status="suspect").values()) >= n:
                return
            time.sleep(0.01)
        raise AssertionError(f"no {n} suspects recorded within 30 s")
    finally:
        store.close()


def test_injected_differences_are_found_stored_shown_and_repaired(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    model = _applied(redis_server, r, tmp_path, state_url, 10_000)
    env = cli_env(state_url)
    # One member altered in its shard, one deleted from its shard, one extra in a shard, and
    # one copied into a shard it does not route to (also extra).
    r.hset(shard_key("m17"), "m17", "tampered")
    r.hdel(shard_key("m42"), "m42")
    r.hset(shard_key("ghost"), "ghost", "never in the source")
    wrong = (shard_of("m99", SHARDS) + 1) % SHARDS
    r.hset(TEMPLATE.replace("{shard}", str(wrong)), "m99", model[b"m99"])

    res = run_cli("verify", JOB, "--json", "--delay", "0.1", env=env)
    assert res.returncode == 3, res.stderr
    report = json.loads(res.stdout)
    assert report["confirmed"] == {"value_differs": 1, "missing_in_shard": 1, "extra_in_shard": 2}
    assert report["source_checked"] == 10_000
    assert report["shard_checked"] == 10_001  # both directions were walked
    assert job_state(state_url)["phase"] == "verifying"  # a failed verify un-verifies

    # Stored, all of them, with their kind and shard.
    stored = {
        (d["member"], d["kind"], d["shard"]) for d in commands.diffs(JOB, state_url=state_url)
    }
    assert stored == {
        ("m17", "value_differs", shard_of("m17", SHARDS)),
        ("m42", "missing_in_shard", shard_of("m42", SHARDS)),
        ("ghost", "extra_in_shard", shard_of("ghost", SHARDS)),
        ("m99", "extra_in_shard", wrong),
    }

    res = run_cli("verify", JOB, "--show", "--delay", "0.1", env=env)
    assert res.returncode == 3, res.stderr
    shown = [line.split() for line in res.stdout.splitlines() if line.startswith("  ")]
    assert sorted((s[0], s[-1]) for s in shown) == sorted(
        [
            ("value_differs", "m17"),
            ("missing_in_shard", "m42"),
            ("extra_in_shard", "ghost"),
            ("extra_in_shard", "m99"),
        ]
    )

    res = run_cli("verify", JOB, "--repair", "--json", "--delay", "0.1", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["repaired"] == 4

    res = run_cli("verify", JOB, "--json", "--delay", "0.1", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["confirmed"] == {}
    assert json.loads(res.stdout)["differences"] is None  # not asked for (--show): not []
    # The run's event carries its report as JSON (history --json passes it on).
    [*_, ended] = [e for e in commands.history(JOB, state_url=state_url) if e.kind == "verify"]
    assert json.loads((ended.detail or "").removeprefix("clean: "))["clean"] is True
    assert job_state(state_url)["phase"] == "verified"
    assert read_shards(r, TEMPLATE, SHARDS) == model
    assert read_hash(r, SOURCE) == model  # repair never touches the source


def test_plan_apply_runs_verify_for_its_verify_phase(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    _applied(redis_server, r, tmp_path, state_url, 3000)
    r.hdel(shard_key("m5"), "m5")
    env = cli_env(state_url)
    assert run_cli("verify", JOB, "--delay", "0.1", env=env).returncode == 3
    plan = str(tmp_path / "p.yaml")
    # The job is back in verifying: apply runs the verification again and stops on it.
    res = run_cli("plan", "apply", plan, "--allow-no-instances", env=env)
    assert res.returncode == 3, res.stderr
    assert "missing_in_shard" in res.stderr
    assert run_cli("verify", JOB, "--repair", "--delay", "0.1", env=env).returncode == 0
    res = run_cli("plan", "apply", plan, "--allow-no-instances", env=env)
    assert res.returncode == 0, res.stderr
    assert job_state(state_url)["phase"] == "verified"


def test_differences_that_heal_between_rounds_are_not_confirmed(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """RedisFullCheck's method: a first-round difference that an in-flight write fixes before
    the re-check is cleared, not confirmed."""
    model = _applied(redis_server, r, tmp_path, state_url, 3000)
    r.hset(shard_key("m1"), "m1", "in flight")
    r.hset(shard_key("m2"), "m2", "stays wrong")

    def healer() -> None:
        # Once the first round has recorded both as suspects, m1's in-flight write lands.
        _wait_for_suspects(state_url, 2)
        r.hset(shard_key("m1"), "m1", model[b"m1"])

    t = threading.Thread(target=healer)
    t.start()
    report = commands.verify(JOB, state_url=state_url, rounds=3, delay=1.0)
    t.join()
    assert report.suspects == 2
    assert report.confirmed == {"value_differs": 1}
    assert [d["member"] for d in commands.diffs(JOB, state_url=state_url)] == ["m2"]
    cleared = commands.diffs(JOB, state_url=state_url, status="cleared")
    assert [d["member"] for d in cleared] == ["m1"]


def test_verify_is_rate_limited_and_resumes_after_interruption(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    _applied(redis_server, r, tmp_path, state_url, 8000)
    r.hdel(shard_key("m7"), "m7")
    commands.set_rate(JOB, 8000, state_url=state_url)  # 16k members to walk: about 2 s

    stop = threading.Event()
    seen: list[Progress] = []

    def on_progress(p: Progress) -> None:
        seen.append(p)
        if p.done >= 3000:
            stop.set()

    started = time.monotonic()
    with pytest.raises(Interrupted):
        commands.verify(JOB, state_url=state_url, stop=stop, on_progress=on_progress)
    assert time.monotonic() - started >= 0.3  # paced, not flat out
    cp = job_state(state_url)["checkpoints"]["verify"]
    assert not cp.finished and cp.members_done >= 3000
    run = cp.extra["run"]

    started = time.monotonic()
    report = commands.verify(JOB, state_url=state_url, delay=0.1)
    elapsed = time.monotonic() - started
    assert report.run == run  # the same run, resumed
    assert report.source_checked == 8000
    assert report.confirmed == {"missing_in_shard": 1}
    # The resumed run walked only what was left (source rest + all shards) at the ceiling.
    assert 0.8 <= elapsed < 10
    store = open_store(state_url)
    try:
        starts = [e for e in store.history(JOB) if e.kind == "verify" and e.detail == "started"]
    finally:
        store.close()
    assert len([e for e in starts if e.to_value == str(run)]) == 1


def test_verify_never_sends_a_whole_key_command(
    start_server, tmp_path: Path, state_url: str
) -> None:
    server = start_server(slowlog_log_slower_than="0", slowlog_max_len="200000")
    r = server.client()
    _applied(server, r, tmp_path, state_url, 5000)
    r.slowlog_reset()
    report = commands.verify(JOB, state_url=state_url)
    assert report.clean
    sent = [e for e in r.slowlog_get(200_000) if e["client_name"].startswith(b"migrator:")]
    assert sent, "the runner's commands should be in the slow log"
    whole_key = {b"HGETALL", b"HKEYS", b"HVALS", b"DEL", b"KEYS", b"SMEMBERS", b"DUMP"}
    data = {SOURCE.encode()} | {TEMPLATE.replace("{shard}", str(i)).encode() for i in range(8)}
    for e in sent:
        words = e["command"].split()
        # (Valkey logs the commands a script runs too; DEL of migrator's own lock key is fine.)
        assert not (words[0].upper() in whole_key and set(words[1:]) & data), e["command"]
    r.close()


def test_verify_under_live_writers_confirms_zero_differences(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    initial = seed_hash(r, SOURCE, 10_000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=SHARDS)
    with Writers(redis_server.url, n=3, members=10_000, rate=400) as writers:
        job = commands.apply(str(plan), state_url=state_url)
        assert job.phase == "verified"
        reports = [commands.verify(JOB, state_url=state_url, delay=0.3) for _ in range(2)]
    assert not writers.errors, writers.errors
    assert sum(writers.ops) > 500, "the writers barely wrote: the test proves nothing"
    for report in reports:
        assert report.clean, report.as_dict()
        assert report.source_checked > 9000
    expected = writers.expected(initial)
    assert decoded(read_hash(r, SOURCE)) == expected
    assert decoded(read_shards(r, TEMPLATE, SHARDS)) == expected


def test_a_verify_resumed_at_an_empty_shard_completes(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """A run interrupted during the shard passes resumes there; the shard it resumes at may
    not exist (no member routes to it): nothing about that key may be taken for the others."""
    members = [f"m{i}" for i in range(6)]
    r.hset(SOURCE, mapping={m: "v" for m in members})
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=SHARDS)
    commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    used = {shard_of(m, SHARDS) for m in members}
    empty = min(set(range(SHARDS)) - used)
    assert any(s > empty for s in used)
    store = open_store(state_url)
    try:
        job = store.get_job(JOB)
        run = store.last_verify_run(job) + 1
        # As left by a verify stopped at the start of the empty shard's pass.
        store.save_checkpoint(
            job, "verify", "0", 0, extra={"run": run, "pass": 1 + empty, "source_checked": 6}
        )
    finally:
        store.close()
    report = commands.verify(JOB, state_url=state_url, delay=0.1)
    assert report.run == run
    assert report.shard_checked == sum(1 for m in members if shard_of(m, SHARDS) >= empty)


def test_the_run_is_marked_finished_only_at_its_end(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """Each pass ends at cursor 0, but only the run's last save marks it finished: cleanup and
    `migrator run` go by that mark, and a crash between passes must resume the same run."""
    _applied(redis_server, r, tmp_path, state_url, 3000)
    marks: list[tuple[int, bool]] = []  # (pass, finished) as saved while the run goes on

    def on_progress(_p: Progress) -> None:
        cp = job_state(state_url)["checkpoints"]["verify"]
        marks.append((int(cp.extra.get("pass", -1)), cp.finished))

    report = commands.verify(JOB, state_url=state_url, on_progress=on_progress)
    assert report.clean
    # Every pass reported its end (the source's, then each shard's), saved as the next pass's
    # start (the last one's: past every pass), none of them finished.
    assert {p for p, _ in marks} >= set(range(1, 2 + SHARDS)), marks
    assert not any(finished for _, finished in marks), marks
    assert job_state(state_url)["checkpoints"]["verify"].finished


def test_a_member_deleted_from_both_sides_after_its_scan_is_no_difference(
    r: redis.Redis,
) -> None:
    """The shard pass scans a member, then a delete removes it from source and shard before
    the check runs: neither side holds it, so it is no difference (it used to be reported as
    extra in the shard, and confirmed with --rounds 1). A member the shard alone holds is one;
    a delete mark the source lacks is swept."""
    from migrator.phases import TOMBSTONE
    from migrator.redisio import Scripts

    r.hset("dst", mapping={"extra": "x", "mark": TOMBSTONE})
    r.hset("src", "both", "v")
    r.hset("dst", "both", "v")
    scripts = Scripts(r)
    _us, missing, swept = scripts.hash_missing_members(
        ["src", "dst"], ["gone", "extra", "mark", "both"]
    )
    assert missing == [b"extra"] and swept == 1
    assert r.hgetall("dst") == {b"extra": b"x", b"both": b"v"}


def test_repair_sizes_its_scripts_to_the_budget(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """Repair scripts move whole values, so they are sized by the server time they report, as
    the copy's packets are: under a budget none can meet (1 µs), after the first few of
    them every repair script carries one member, and everything is repaired."""
    import hashlib

    from migrator.redisio.scripts import source
    from tests.slowlog import runner_sent

    model = seed_hash(r, SOURCE, 300)
    plan = write_plan(
        tmp_path / "p.yaml",
        redis_server.url,
        shards=SHARDS,
        extra="copy: {max_command_ms: 0.001}\n",
    )
    assert commands.apply(str(plan), state_url=state_url, allow_no_instances=True).phase == (
        "verified"
    )
    r.delete(*[TEMPLATE.replace("{shard}", str(i)) for i in range(SHARDS)])
    for name in ("hash_sync", "hash_check"):  # no first EVALSHA refused NOSCRIPT, then re-sent
        r.script_load(source(name))
    r.config_set("slowlog-log-slower-than", 0)
    r.config_set("slowlog-max-len", 100_000)
    r.slowlog_reset()
    report = commands.verify(JOB, state_url=state_url, repair=True, rounds=2, delay=0.1)
    assert report.repaired == 300
    assert read_shards(r, TEMPLATE, SHARDS) == model

    sync = hashlib.sha1(source("hash_sync").encode()).hexdigest().encode()
    calls = [s for s in reversed(runner_sent(r, 100_000)) if s.kind == (b"EVALSHA", sync)]
    members = [s.work // 3 for s in calls]  # member, its shard's key, the key it was found in
    assert sum(members) == 300
    first = next(i for i, s in enumerate(calls) if members[i] == 1)
    assert first <= 3 and set(members[first:]) == {1}, members[:10]


def test_repair_and_recheck_scripts_name_only_the_shard_keys_they_touch(r: redis.Redis) -> None:
    """With 1,000 shards a script naming every shard key cost the server about 0.2 ms before
    it ran (2 ms at 16,384): repair and re-check calls name the source and the shards their
    members route to or were found in, and map what the script reports back to shard numbers."""
    from migrator.copier import HashCopier
    from migrator.redisio import Scripts
    from migrator.verifier import HashVerifier
    from tests.slowlog import runner_sent

    n = 1000
    shard_keys = [f"s:{i}" for i in range(n)]
    members = [f"m{i}".encode() for i in range(20)]
    r.hset("src", mapping={m: b"v-" + m for m in members})
    home = {m: shard_of(m, n) for m in members}
    stray = members[0]
    wrong = (home[stray] + 1) % n
    r.hset(shard_keys[wrong], stray, b"v-" + stray)  # found in a shard it does not route to
    r.hset(shard_keys[home[members[1]]], members[1], b"tampered")
    scripts = Scripts(r)
    verifier = HashVerifier(r, scripts, "src", shard_keys)
    still, _ = verifier.recheck([(stray, wrong), (members[1], home[members[1]])], chunk=10)
    assert sorted(still) == sorted(
        [
            (stray, "missing_in_shard", home[stray]),
            (stray, "extra_in_shard", wrong),
            (members[1], "value_differs", home[members[1]]),
        ]
    )

    r.client_setname("migrator:t")
    scripts.load("hash_sync")  # no first EVALSHA refused NOSCRIPT, then re-sent
    r.config_set("slowlog-log-slower-than", 0)
    r.config_set("slowlog-max-len", 1000)
    r.slowlog_reset()
    copier = HashCopier(r, scripts, "src", shard_keys, 1000)
    copier.sync([stray], chunk=10, found=wrong)
    copier.sync(members[1:], chunk=10)
    assert not r.exists(shard_keys[wrong]) or not r.hexists(shard_keys[wrong], stray)
    for m in members:
        assert r.hget(shard_keys[home[m]], m) == b"v-" + m
    assert verifier.recheck([(m, home[m]) for m in members], chunk=7)[0] == []
    sent = [s for s in runner_sent(r, 1000, b"migrator:t") if s.command.startswith(b"EVALSHA")]
    assert len(sent) == 1 + 2 + 3  # the syncs (1 member, then 19 by 10), the re-checks by 7
    assert all(int(s.command.split()[2]) <= 1 + 10 + 1 for s in sent)  # numkeys


def test_verify_rounds_hold_on_pause_and_give_way_to_a_rollback(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """The re-check rounds are paced as the passes are: a pause holds them, and a rollback
    stops them at once (it used to wait for every round, past the rollback's lease wait)."""
    model = _applied(redis_server, r, tmp_path, state_url, 3000)
    pipe = r.pipeline(transaction=False)
    for m in list(model)[:2000]:
        pipe.hset(shard_key(m), m, "changed outside the shim")
    pipe.execute()
    outcome: list[BaseException | None] = []

    def verify() -> None:
        try:
            commands.verify(JOB, state_url=state_url, rounds=10, delay=1.0)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=verify, daemon=True)
    t.start()
    _wait_for_suspects(state_url, 2000)
    commands.pause(JOB, state_url=state_url)
    time.sleep(0.5)  # the batch under way ends

    def scripts_run() -> int:
        return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    before = scripts_run()
    time.sleep(2)
    assert scripts_run() == before and t.is_alive()  # held: no re-check sent meanwhile
    # Before, the rounds went on, and the rollback gave up waiting for their lease (exit 1).
    assert commands.rollback(JOB, state_url=state_url).phase == "rolled_back"
    t.join(10)
    assert isinstance(outcome[0], Interrupted), outcome
    assert "a rollback took job t-job over" in str(outcome[0]), outcome  # not "run it again"


def test_a_clean_verify_whose_move_was_lost_is_not_run_again(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """A crash between a clean verify run and the move to verified leaves the job verifying
    with a finished, clean run: `migrator run` finishes it, and plan apply moves it on,
    neither with a second run (on a big key, hours)."""
    from datetime import timedelta

    from migrator.phases import Phase
    from migrator.scheduler import due

    _applied(redis_server, r, tmp_path, state_url, 2000)
    store = open_store(state_url)
    try:
        job = store.transition(JOB, Phase.VERIFYING, detail="as if the move was lost")
        d = due(store, job, job.phase_changed_at + timedelta(seconds=10), grace=3)
        assert d is not None and d.work == "apply"
    finally:
        store.close()
    res = run_cli("plan", "apply", str(tmp_path / "p.yaml"), env=cli_env(state_url))
    assert res.returncode == 0, res.stderr
    state = job_state(state_url)
    assert state["phase"] == "verified"
    store = open_store(state_url)
    try:
        assert store.last_verify_run(store.get_job(JOB)) == 1  # no second run
    finally:
        store.close()


def test_a_pass_end_is_saved_as_the_next_pass_start(
    redis_server: RedisServer,
    r: redis.Redis,
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint at cursor 0 must mean one thing per pass: its start. A pass's end saved as
    (that pass, cursor 0, all its members) was taken for its start by a resume after a crash
    right there, which walked the pass again and counted its members twice."""
    from migrator.store.repository import Store

    _applied(redis_server, r, tmp_path, state_url, 3000)
    saves: list[tuple[int, str, int]] = []
    real = Store.save_checkpoint

    def spy(self: Store, job: Any, stage: str, cursor: str, done: int, **kw: Any) -> Any:
        extra = kw.get("extra") or {}
        if stage == "verify" and "pass" in extra and not kw.get("finished"):
            saves.append((int(extra["pass"]), cursor, done))
        return real(self, job, stage, cursor, done, **kw)

    monkeypatch.setattr(Store, "save_checkpoint", spy)
    report = commands.verify(JOB, state_url=state_url, rounds=1)
    assert report.clean and report.source_checked == 3000 and report.shard_checked == 3000
    starts: dict[int, set[int]] = {}
    for p, cursor, done in saves:
        if cursor == "0":
            starts.setdefault(p, set()).add(done)
    assert starts and all(len(d) == 1 for d in starts.values()), starts


def test_a_pass_end_saved_by_an_earlier_release_is_not_walked_again(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """An earlier release saved the source pass's end as (pass 0, cursor 0, its members); a
    run resumed from it goes on with the shard passes and counts the source once."""
    _applied(redis_server, r, tmp_path, state_url, 3000)
    store = open_store(state_url)
    try:
        job = store.get_job(JOB)
        run = store.last_verify_run(job) + 1
        extra = {"run": run, "pass": 0, "source_checked": 0}
        store.save_checkpoint(job, "verify", "0", 3000, finished=False, extra=extra)
    finally:
        store.close()
    report = commands.verify(JOB, state_url=state_url, rounds=1)
    assert report.run == run and report.clean
    assert (report.source_checked, report.shard_checked) == (3000, 3000)


def test_json_on_stdout_stays_parseable_while_a_terminal_shows_the_bar(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """With stderr on a terminal the progress bar is drawn, on stderr: it used to go to
    stdout, ahead of `--json`'s document, so `verify --json > report.json` wrote a bar."""
    import os
    import pty
    import subprocess
    import sys

    _applied(redis_server, r, tmp_path, state_url, 20_000)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "migrator", "verify", JOB, "--json", "--delay", "0.1"],
            stdout=subprocess.PIPE,
            stderr=slave,
            env={**os.environ, **cli_env(state_url), "COLUMNS": "100"},
        )
        os.close(slave)
        drawn = b""
        while True:  # read the terminal as it fills, or the bar would block on a full pty
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            drawn += chunk
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
    assert proc.returncode == 0, drawn
    assert json.loads(out)["clean"] is True, out
    assert b"verify" in drawn  # the bar was drawn, on the terminal


def test_verify_is_not_held_by_memory_near_the_limit(
    start_server: Any, tmp_path: Path, state_url: str
) -> None:
    """Verify adds no memory (it removes the copy's marks at most): memory near maxmemory,
    after a copy that only just fitted, used to hold it, and the job could never reach the
    cleanup that brings memory down."""
    from migrator.gates import MemoryGate

    server = start_server(maxmemory="16mb")
    r = server.client()
    _applied(server, r, tmp_path, state_url, 2000)
    pipe, i = r.pipeline(transaction=False), 0
    while int(r.info("memory")["used_memory"]) < 0.92 * 16 * 1_048_576:
        for _ in range(100):
            pipe.set(f"fill:{i}", b"x" * 1000)
            i += 1
        pipe.execute()
    assert MemoryGate(r).check() is not None  # the copy would be held here
    stop = threading.Event()
    timer = threading.Timer(30, stop.set)  # held, it would wait for ever: stopped instead
    timer.start()
    try:
        report = commands.verify(JOB, state_url=state_url, rounds=1, stop=stop)
    finally:
        timer.cancel()
    assert report.clean and report.source_checked == 2000


def test_status_shows_a_new_verify_run_held_before_its_first_batch(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """A verify run held from its start (here by a pause file) showed nothing in status: its
    reason went into the last run's finished checkpoint, which status does not show."""
    _applied(redis_server, r, tmp_path, state_url, 500)
    pause_file = Path(state_url.removeprefix("sqlite:///")).parent / f"pause-{JOB}"
    pause_file.touch()
    outcome: list[Any] = []

    def verify() -> None:
        try:
            outcome.append(commands.verify(JOB, state_url=state_url, rounds=1))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=verify, daemon=True)
    t.start()
    try:
        deadline, st = time.monotonic() + 10, {}
        while time.monotonic() < deadline:
            [st] = commands.status(state_url, JOB)
            if st["throttle"]:
                break
            time.sleep(0.05)
        assert st["stage"] == "verify" and st["throttle"] == f"pause file {pause_file}", st
        assert st["verify"]["run"] == 2 and st["stage_done"] == 0
    finally:
        pause_file.unlink()
        t.join(30)
    assert outcome and getattr(outcome[0], "clean", False), outcome
