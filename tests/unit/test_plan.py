from __future__ import annotations

import pytest

from migrator.errors import PlanError
from migrator.plan import mask_url, parse_duration, parse_plan

GOOD = """
name: user-info-split
redis:
  url: ${REDIS_URL:-redis://127.0.0.1:6379/0}
source: {key: "user:info:all", type: hash}
target: {key: "user:info:{shard}", shards: 100}
cleanup: {after: 7d}
"""


def test_good_plan_resolves_defaults_and_env() -> None:
    p = parse_plan(GOOD, env={})
    assert p.redis.url == "redis://127.0.0.1:6379/0"
    assert p.target.hash == "crc32"
    assert p.copy_.batch == 500 and p.copy_.max_command_ms == 1.0
    assert p.cleanup.after == 7 * 86400
    assert p.target.shard_key(7) == "user:info:7"
    p2 = parse_plan(GOOD, env={"REDIS_URL": "redis://h:1/2"})
    assert p2.redis.url == "redis://h:1/2"
    assert p.spec_hash() != p2.spec_hash()


def test_secrets_are_masked() -> None:
    p = parse_plan(GOOD, env={"REDIS_URL": "redis://app:s3cret@h:6379/0"})
    assert "s3cret" not in str(p.masked())
    assert p.masked()["redis"]["url"] == "redis://app:***@h:6379/0"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"
    assert mask_url("redis://h:1/0?password=s3cret&db=2") == "redis://h:1/0?password=***&db=2"
    # On the text, so a URL that does not parse is masked too; nothing to mask: unchanged.
    assert mask_url("redis://u:abc?def@h/0") == "redis://u:***@h/0"
    assert mask_url("u:s3cret@h/db") == "u:***@h/db"
    assert mask_url("unix:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert mask_url("redis://user@h/0") == "redis://user@h/0"
    bad = GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis://u:s3cret@h:x/0")
    with pytest.raises(PlanError) as e:
        parse_plan(bad, env={})
    assert "s3cret" not in str(e.value) and "redis://u:***@h:x/0" in str(e.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "YAML mapping"),
        (
            GOOD.replace("name: user-info-split", "name: Bad_Name"),
            "name: 'Bad_Name' is not a job name",
        ),
        (GOOD.replace("name: user-info-split\n", ""), "name: field required"),
        (GOOD + "surprise: 1\n", "surprise: unknown field"),
        (GOOD.replace("user:info:{shard}", "user:info:x"), "target.key: must contain {shard}"),
        (GOOD.replace("shards: 100", "shards: 1"), "target.shards"),
        (GOOD.replace("shards: 100}", "shards: 100, hash: md5}"), "unknown hash function 'md5'"),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "${NOPE_VAR}"),
            "redis.url: environment variable ${NOPE_VAR} is not set",
        ),
        (GOOD.replace("after: 7d", "after: soon"), "cleanup.after"),
        (GOOD.replace("type: hash", "type: list"), "source.type"),
        (GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "http://x"), "unsupported scheme"),
        # Values the runner would only trip over once the job is written.
        (GOOD + "copy: {rate: .inf}\n", "copy.rate"),
        (GOOD + "copy: {rate: .nan}\n", "copy.rate"),
        (GOOD + "copy: {max_command_ms: .nan}\n", "copy.max_command_ms"),
        (GOOD + "gray: {shadow_sample: .nan}\n", "gray.shadow_sample"),
        (GOOD.replace("after: 7d", "after: .nan"), "cleanup.after: nan is not a duration"),
        (GOOD.replace("after: 7d", "after: .inf"), "cleanup.after: inf is longer than ten years"),
        (GOOD.replace("after: 7d", "after: 99999999999d"), "longer than ten years"),
        (GOOD.replace("after: 7d", "after: " + "9" * 400), "longer than ten years"),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis://h:abc/0"),
            "redis.url: redis://h:abc/0 is not a usable Redis URL: Port could not be cast",
        ),
        (
            GOOD.replace(
                "${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis://h:1/0?socket_timeout=x"
            ),
            "Invalid value for 'socket_timeout'",
        ),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis://h:1/users"),
            "the path names the db, a number, not 'users'",
        ),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis+sentinel://h1:abc/svc"),
            "sentinel 'h1:abc': the port is not a number",
        ),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis+sentinel://h1:1/svc/x"),
            "after the service comes at most a db number",
        ),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis+sentinel://h1:1"),
            "a sentinel URL names the service",
        ),
    ],
)
def test_bad_plans_name_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(PlanError) as e:
        parse_plan(text, env={})
    assert needle in str(e.value)
    assert e.value.exit_code == 2


def test_durations() -> None:
    assert parse_duration(0) == 0
    assert parse_duration("2s") == 2
    assert parse_duration("15m") == 900
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration(-1)
