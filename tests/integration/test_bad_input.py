"""Bad plans and bad targets: one clear message, exit 2, nothing written to Redis or the store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import run_cli
from tests.integration.helpers import seed_hash, write_plan
from tests.servers import RedisServer, free_port


def _snapshot(r: redis.Redis) -> dict[bytes, bytes]:
    return {k: r.type(k) for k in r.scan_iter(count=1000)}


def _assert_refused(res, needle: str, state_db: Path) -> None:  # type: ignore[no-untyped-def]
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.count("error:") == 1
    assert not state_db.exists(), "the state store was written"


PLAN_CASES = {
    "broken-yaml": ("name: [oops\n", "not valid YAML"),
    "missing-field": ("name: a\nsource: {key: k}\n", "target: field required"),
    "unknown-field": (
        "name: a\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 4}\nextra: 1\n",
        "extra: unknown field",
    ),
    "bad-name": (
        "name: Not_OK\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 4}\n",
        "is not a job name",
    ),
    "no-shard-placeholder": (
        "name: a\nsource: {key: k}\ntarget: {key: 'x:y', shards: 4}\n",
        "must contain {shard}",
    ),
    "one-shard": (
        "name: a\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 1}\n",
        "target.shards",
    ),
    "unknown-hash": (
        "name: a\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 4, hash: sha1}\n",
        "unknown hash function 'sha1'",
    ),
    "url-unknown-option": (
        "name: a\nredis: {url: 'redis://127.0.0.1:6379/0?ssl=true'}\nsource: {key: k}\n"
        "target: {key: 'x:{shard}', shards: 4}\n",
        "redis.url: redis://127.0.0.1:6379/0?ssl=*** is not a usable Redis URL: unknown "
        "option 'ssl'",
    ),
    "url-pool-option": (
        "name: a\nredis: {url: 'redis://127.0.0.1:6379/0?timeout=5'}\nsource: {key: k}\n"
        "target: {key: 'x:{shard}', shards: 4}\n",
        "unknown option 'timeout'",
    ),
    "url-ill-typed-option": (
        "name: a\nredis: {url: 'redis://127.0.0.1:6379/0?socket_keepalive=off'}\n"
        "source: {key: k}\ntarget: {key: 'x:{shard}', shards: 4}\n",
        "option 'socket_keepalive' is 1, 0, true, false, yes, no or on, not 'off'",
    ),
    "unix-without-path": (
        "name: a\nredis: {url: 'unix://'}\nsource: {key: k}\n"
        "target: {key: 'x:{shard}', shards: 4}\n",
        "a unix:// URL names the socket",
    ),
    "sentinel-unknown-option": (
        "name: a\nredis: {url: 'redis+sentinel://h1/svc?notls=1'}\nsource: {key: k}\n"
        "target: {key: 'x:{shard}', shards: 4}\n",
        "unknown option 'notls'",
    ),
    "impossible-date": (
        "name: 2025-02-30\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 4}\n",
        "2025-02-30 reads as a date but is not one",
    ),
    "date-for-text": (
        "name: 2025-01-15\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 4}\n",
        "name: YAML reads this unquoted value as a date (2025-01-15), not text: put it in quotes",
    ),
    "number-for-text": (
        "name: a\nsource: {key: 12345}\ntarget: {key: 'x:{shard}', shards: 4}\n",
        "source.key: YAML reads this unquoted value as a number (12345), not text",
    ),
    "unset-env": (
        "name: a\nredis: {url: '${MIGRATOR_TEST_UNSET_VAR}'}\nsource: {key: k}\n"
        "target: {key: 'x:{shard}', shards: 4}\n",
        "${MIGRATOR_TEST_UNSET_VAR} is not set",
    ),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_bad_plan_is_refused(case: str, tmp_path: Path) -> None:
    text, needle = PLAN_CASES[case]
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    for verb in (["plan", "validate"], ["plan", "apply"]):
        res = run_cli(*verb, str(plan), cwd=tmp_path)
        _assert_refused(res, needle, tmp_path / ".migrator" / "state.db")


def test_a_url_message_never_echoes_the_password(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "p.yaml", "redis://app:zq1?xw9@127.0.0.1:6379/0")
    for verb in (["plan", "validate"], ["plan", "apply"]):
        res = run_cli(*verb, str(plan), cwd=tmp_path)
        _assert_refused(res, "must be percent-encoded", tmp_path / ".migrator" / "state.db")
        assert "redis://app:***@127.0.0.1:6379/0" in res.stderr
        assert "zq1" not in res.stderr and "xw9" not in res.stderr, res.stderr


def test_a_plan_file_that_is_not_utf8(tmp_path: Path) -> None:
    plan = tmp_path / "p.yaml"
    plan.write_bytes("name: a\nsource: {key: caf\xe9}\n".encode("latin-1"))
    res = run_cli("plan", "validate", str(plan), cwd=tmp_path)
    _assert_refused(res, f"{plan}: a plan file is UTF-8 text", tmp_path / ".migrator" / "state.db")


def test_missing_plan_file(tmp_path: Path) -> None:
    res = run_cli("plan", "apply", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    _assert_refused(res, "cannot read plan file", tmp_path / ".migrator" / "state.db")


@pytest.mark.parametrize("case", ["missing-source", "wrong-type", "shard-exists", "no-instances"])
def test_bad_target_is_refused(
    case: str, redis_server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    flags = ["--allow-no-instances"]
    if case == "missing-source":
        needle = "source key 'big:hash' does not exist"
    elif case == "wrong-type":
        r.rpush("big:hash", "x")
        needle = "is a list"
    elif case == "shard-exists":
        seed_hash(r, "big:hash", 100)
        r.set("big:3", "taken")
        needle = "shard key(s) of target.key 'big:{shard}' already exist: 'big:3'"
    else:
        seed_hash(r, "big:hash", 100)
        flags = []
        needle = "no live application instance"
    before = _snapshot(r)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    res = run_cli("plan", "apply", str(plan), *flags, cwd=tmp_path)
    _assert_refused(res, needle, tmp_path / ".migrator" / "state.db")
    assert _snapshot(r) == before, "Redis was written"


def test_unreachable_server_is_a_clear_message(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "p.yaml", f"redis://127.0.0.1:{free_port()}/0")
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", cwd=tmp_path)
    assert res.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / ".migrator" / "state.db").exists()


def test_refused_credentials_on_a_new_plan_offer_nothing_to_resume(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Nothing was registered, so there is no checkpoint: the message used to end "the job
    keeps its checkpoint; run plan apply again to resume"."""
    url = redis_server.url.replace("redis://", "redis://nobody:wrong@")
    plan = write_plan(tmp_path / "p.yaml", url)
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "refused the credentials" in res.stderr and "wrong" not in res.stderr
    assert "checkpoint" not in res.stderr and "resume" not in res.stderr, res.stderr
    assert not (tmp_path / ".migrator" / "state.db").exists()


ENV_CASES = {
    "niceness": (
        {"MIGRATOR_NICE": "low"},
        "$MIGRATOR_NICE must be a whole number (0-19), not 'low'",
    ),
    "spin": (
        {"MIGRATOR_SPIN_US": "50000"},
        "$MIGRATOR_SPIN_US must be between 0 and 10000 µs, not 50000",
    ),
}


@pytest.mark.parametrize("case", list(ENV_CASES))
def test_a_bad_runner_setting_is_refused_before_anything_is_written(
    case: str, redis_server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    env, message = ENV_CASES[case]
    seed_hash(r, "big:hash", 100)
    before = _snapshot(r)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", cwd=tmp_path, env=env)
    _assert_refused(res, message, tmp_path / ".migrator" / "state.db")
    assert _snapshot(r) == before, "Redis was written"


VERB_CASES = {
    # int() takes these too: "1_0" is 10, "+10" is 10, "٣" is 3.
    "underscored-ratio": (["set-ratio", "t-job", "1_0"], "'1_0' is not a whole percentage"),
    "arabic-indic-ratio": (["set-ratio", "t-job", "٣"], "is not a whole percentage"),
    "ratio-over-100": (["set-ratio", "t-job", "101"], "101 is outside 0..100"),
    "infinite-rate": (["set-rate", "t-job", "inf"], "'inf' is not a number of at least 0"),
    "nan-rate": (["set-rate", "t-job", "nan"], "'nan' is not a number of at least 0"),
    "negative-delay": (["verify", "t-job", "--delay", "-1"], "'-1' is not a number of at least 0"),
    "nan-barrier-timeout": (
        ["cleanup", "t-job", "--barrier-timeout", "nan"],
        "'nan' is not a number of at least 1",
    ),
    # 0 s would time out at once, after cleanup moved to `cleaning`, which has no way back.
    "zero-barrier-timeout": (
        ["cleanup", "t-job", "--barrier-timeout", "0"],
        "'0' is not a number of at least 1",
    ),
    "sub-second-barrier-timeout-run": (
        ["run", "--once", "--barrier-timeout", "0.5"],
        "'0.5' is not a number of at least 1",
    ),
    # `migrator run` creates no store to watch for nothing: a mistyped --state, or no plan yet.
    "run-without-store": (["run", "--once"], "there is no state store at sqlite:///.migrator"),
    "run-mistyped-state": (
        ["run", "--once", "--state", "sqlite:///.migrator/stat.db"],
        "there is no state store at sqlite:///.migrator/stat.db",
    ),
    # An in-memory store is gone, with the job, when the command exits.
    "in-memory-store": (
        ["status", "--state", "sqlite://"],
        "state store URL 'sqlite://' is an in-memory SQLite database",
    ),
    "in-memory-store-named": (
        ["pause", "t-job", "--state", "sqlite:///:memory:"],
        "state store URL 'sqlite:///:memory:' is an in-memory SQLite database",
    ),
    "in-memory-store-run": (
        ["run", "--once", "--state", "sqlite+pysqlite:///file::memory:?uri=true"],
        "is an in-memory SQLite database",
    ),
    "nan-interval": (["run", "--once", "--interval", "nan"], "'nan' is not a number"),
    "unknown-job": (["pause", "t-job"], "no state store at sqlite:///.migrator/state.db"),
    "unknown-job-history": (["history", "t-job"], "so no job is registered there"),
    "unknown-job-status": (["status", "t-job"], "so no job is registered there"),
    "unparsable-state-url": (
        ["pause", "t-job", "--state", "bogus"],
        "state store URL 'bogus' is not usable",
    ),
    "unknown-database": (
        ["status", "--state", "foo://x"],
        "state store URL 'foo://x' is not usable",
    ),
    "state-url-port": (
        ["status", "--state", "postgresql://u:s3cret@h:abc/db"],
        "state store URL 'postgresql://u:***@h:abc/db' is not usable",
    ),
    "state-url-without-scheme": (
        ["status", "--state", "u:s3cret@h/db"],
        "state store URL 'u:***@h/db' is not usable",
    ),
}


@pytest.mark.parametrize("case", sorted(VERB_CASES))
def test_a_bad_argument_or_store_is_refused_before_anything_is_written(
    case: str, tmp_path: Path
) -> None:
    args, needle = VERB_CASES[case]
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "s3cret" not in res.stderr
    assert not (tmp_path / ".migrator").exists(), "a state store was created"


def test_status_without_a_store_says_no_jobs_and_creates_none(tmp_path: Path) -> None:
    res = run_cli("status", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "no jobs", res
    assert not (tmp_path / ".migrator").exists()


def test_a_state_file_that_is_not_a_database_is_bad_input(tmp_path: Path) -> None:
    notes = tmp_path / "README.md"
    notes.write_text("# not a database\n")
    for args in (["status"], ["pause", "t-job"], ["run", "--once"]):
        res = run_cli(*args, "--state", "sqlite:///README.md", cwd=tmp_path)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "state store sqlite:///README.md: file is not a database" in res.stderr
        assert "Traceback" not in res.stderr and res.stderr.count("error:") == 1
    assert notes.read_text() == "# not a database\n"


PG = os.environ.get("MIGRATOR_TEST_POSTGRES_URL")


@pytest.mark.skipif(not PG, reason="PostgreSQL: set MIGRATOR_TEST_POSTGRES_URL")
@pytest.mark.parametrize(
    ("part", "needle"),
    [
        ({"database": "migrator_no_such_db"}, 'database "migrator_no_such_db" does not exist'),
        ({"username": "migrator_no_such_role"}, 'role "migrator_no_such_role" does not exist'),
    ],
)
def test_a_postgresql_url_the_server_refuses_is_bad_input(
    part: dict[str, str], needle: str, tmp_path: Path
) -> None:
    url = sa.engine.make_url(PG).set(**part).render_as_string(hide_password=False)
    res = run_cli("status", "--state", url, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_an_unreachable_state_store_is_a_clear_message(tmp_path: Path) -> None:
    url = f"postgresql://u:s3cret@127.0.0.1:{free_port()}/x"
    res = run_cli("status", "--state", url, cwd=tmp_path)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "cannot open the state store postgresql://u:***@127.0.0.1:" in res.stderr
    assert "s3cret" not in res.stderr and "Traceback" not in res.stderr


def test_a_source_whose_fields_expire_on_their_own_is_refused(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    model = seed_hash(r, "big:hash", 2_000)
    try:
        r.execute_command("HEXPIRE", "big:hash", 3600, "FIELDS", 1, next(iter(model)))
    except redis.ResponseError:
        pytest.skip("this server has no field expiry (HEXPIRE: Redis 7.4+, Valkey 9)")
    half = list(model)[::2]
    r.execute_command("HEXPIRE", "big:hash", 3600, "FIELDS", len(half), *half)
    before = _snapshot(r)
    plan = write_plan(tmp_path / "p.yaml", redis_server.url)
    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", cwd=tmp_path)
    _assert_refused(
        res, "has fields with their own expiry (HEXPIRE)", tmp_path / ".migrator" / "state.db"
    )
    assert "of 1000 sampled" in res.stderr and "HPERSIST" in res.stderr
    assert _snapshot(r) == before, "Redis was written"
