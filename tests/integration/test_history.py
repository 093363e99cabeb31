"""migrator history: the audit trail — what changed, from what to what, when, by whom, where."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import redis

from tests.conftest import run_cli
from tests.integration.helpers import seed_hash, write_plan
from tests.integration.life import JOB, cli_env
from tests.servers import RedisServer


def test_history_records_every_change_with_actor_host_and_time(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    seed_hash(r, "big:hash", 2000)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url, shards=4)
    started = datetime.now(timezone.utc) - timedelta(seconds=1)

    def as_(actor: str, *args: str) -> None:
        res = run_cli(*args, env={**cli_env(state_url), "MIGRATOR_ACTOR": actor})
        assert res.returncode == 0, res.stderr

    as_("alice", "plan", "apply", str(plan), "--allow-no-instances")
    as_("bob", "set-ratio", JOB, "25")
    as_("carol", "pause", JOB)
    as_("carol", "resume", JOB)
    as_("carol", "set-rate", JOB, "5000")
    as_("bob", "set-ratio", JOB, "100")
    as_("dave", "cleanup", JOB)

    res = run_cli("history", JOB, "--json", env=cli_env(state_url))
    assert res.returncode == 0, res.stderr
    events = json.loads(res.stdout)
    host = socket.gethostname()
    assert {e["host"] for e in events} == {host}
    times = [datetime.fromisoformat(e["at"]) for e in events]
    assert times == sorted(times) and times[0] >= started and times[0].tzinfo is not None

    def changes(kind: str) -> list[tuple[str | None, str | None, str]]:
        return [(e["from_value"], e["to_value"], e["actor"]) for e in events if e["kind"] == kind]

    assert changes("phase") == [
        ("planned", "dual_write", "alice"),
        ("dual_write", "copying", "alice"),
        ("copying", "verifying", "alice"),
        ("verifying", "verified", "alice"),
        ("verified", "gray", "bob"),
        ("gray", "cutover", "bob"),
        ("cutover", "cleaning", "dave"),
        ("cleaning", "done", "dave"),
    ]
    assert changes("ratio") == [("0", "25", "bob"), ("25", "100", "bob")]
    assert changes("pause") == [("False", "True", "carol")]
    assert changes("resume") == [("True", "False", "carol")]
    assert changes("set-rate") == [(None, "5000.0", "carol")]
    assert changes("flag") == [(None, "allow_no_instances", "alice")]

    res = run_cli("history", JOB, env=cli_env(state_url))
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if "verified -> gray" in x)
    assert f"bob@{host}" in line and line[:4].isdigit()


def test_history_of_an_unknown_job_is_a_usage_error(state_url: str, tmp_path: Path) -> None:
    res = run_cli("history", "no-such-job", env=cli_env(state_url), cwd=tmp_path)
    assert res.returncode == 2
    assert "no-such-job" in res.stderr
