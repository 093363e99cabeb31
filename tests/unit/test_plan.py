from __future__ import annotations

from pathlib import Path

import pytest

from migrator.errors import PlanError
from migrator.plan import load_plan, mask_url, parse_duration, parse_plan
from migrator.urls import check_redis_url, parse_sentinel_url

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
    # Any query option not known to be harmless: the URL is quoted to refuse such options.
    assert (
        mask_url("rediss://h:1/0?ssl_password=K&PASSWORD=P&passwd=W&db=2&socket_timeout=")
        == "rediss://h:1/0?ssl_password=***&PASSWORD=***&passwd=***&db=2&socket_timeout="
    )
    assert mask_url("redis://u:a?b@h/0?password=x") == "redis://u:***@h/0?password=***"
    # A password longer than what follows it: the query is found in the URL as given.
    long = "redis://default:twenty-characters-pw@10.0.0.5:6379/0?ssl_password=K&password=P"
    assert mask_url(long) == "redis://default:***@10.0.0.5:6379/0?ssl_password=***&password=***"
    for url in ("rediss://h:1/0?ssl_password=Key", "redis://h:1/0?PASSWORD=Pw"):
        with pytest.raises(PlanError) as e:
            parse_plan(GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", url), env={})
        assert "Key" not in str(e.value) and "Pw" not in str(e.value), e.value
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
        # A flag is not a number (pydantic read true as 1: a ceiling of 1 member/s).
        (GOOD + "copy: {rate: on}\n", "copy.rate: a number, not true"),
        (GOOD.replace("shards: 100", "shards: yes"), "target.shards: a number, not true"),
        # PyYAML keeps the last of two equal keys: the plan would silently be another one.
        (GOOD + "name: other-job\n", "'name' is given twice in one mapping"),
        (
            GOOD.replace("shards: 100}", "shards: 100, shards: 4}"),
            "'shards' is given twice in one mapping",
        ),
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
            "redis.url: redis://h:abc/0 is not a usable Redis URL: the port is not a number from 1",
        ),
        (
            GOOD.replace(
                "${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis://h:1/0?socket_timeout=x"
            ),
            "redis.url: redis://h:1/0?socket_timeout=x is not a usable Redis URL: option "
            "'socket_timeout' is a number of seconds above 0, not 'x'",
        ),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis://h:1/users"),
            "the path names the db, a number, not 'users'",
        ),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis+sentinel://h1:abc/svc"),
            "the port of the sentinel is not a number from 1 to 65535",
        ),
        (
            GOOD.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", "redis+sentinel://h1:1/svc/x"),
            "after the service name comes at most a db number",
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


BASE = "name: a\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 4}\n"


def _with_url(url: str) -> str:
    return BASE + f"redis: {{url: '{url}'}}\n"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        # Options redis-py does not take would be a TypeError at the first command.
        ("redis://127.0.0.1:6379/0?ssl=true", "unknown option 'ssl'; for TLS use rediss://"),
        (
            "redis://127.0.0.1:6379/0?timeout=5",
            "unknown option 'timeout'; redis:// URLs take client_name, db,",
        ),
        ("redis://127.0.0.1:6379/0?foo=1", "unknown option 'foo'"),
        ("rediss://h/0?ssl=1", "unknown option 'ssl'; rediss:// is TLS already"),
        ("unix:///tmp/r.sock?socket_keepalive=1", "unknown option 'socket_keepalive'"),
        (
            "redis://h/0?socket_timeout=inf",
            "option 'socket_timeout' is a number of seconds above 0",
        ),
        (
            "redis://h/0?socket_keepalive=off",
            "option 'socket_keepalive' is 1, 0, true, false, yes, no or on",
        ),
        (
            "redis://h/0?health_check_interval=-1",
            "option 'health_check_interval' is a whole number",
        ),
        ("rediss://h/0?ssl_cert_reqs=NONE", "option 'ssl_cert_reqs' is none, optional or required"),
        ("redis://h?db=", "option 'db' has no value"),
        ("redis://h?db=1&db=2", "option 'db' is given twice"),
        ("redis://h/1?db=2", "the db is given twice"),
        ("redis://h:0/0", "the port is not a number from 1 to 65535"),
        ("redis://h:70000/0", "the port is not a number from 1 to 65535"),
        ("unix://", "a unix:// URL names the socket"),
        ("unix://tmp/redis.sock", "a unix:// URL names no host"),
        # Sentinel URLs: exact options, exact host lists.
        (
            "redis+sentinel://h1/svc?notls=1",
            "unknown option 'notls'; redis+sentinel:// URLs take tls",
        ),
        ("redis+sentinel://h1/svc?ssl=1", "unknown option 'ssl'; for TLS (sentinels and master)"),
        ("redis+sentinel://h1/svc?tls=maybe", "option 'tls' is 1, 0, true, false, yes, no or on"),
        ("redis+sentinel://:26379/svc", "the sentinel is not host[:port]"),
        ("redis+sentinel://h1,,h2/svc", "sentinel 2 of 3 is not host[:port]"),
        ("redis+sentinel://h1:1,h2:0/svc", "the port of sentinel 2 of 2 is not a number"),
        ("redis://h/0?protocol=3", "option 'protocol' is 2 (migrator reads RESP2 replies)"),
        # An '@' in an option's value is no password's tail: the real fault is named.
        (
            "redis://h/0?username=a@corp&socket_timeout=0",
            "option 'socket_timeout' is a number of seconds above 0",
        ),
    ],
)
def test_redis_url_options_and_forms_are_exact(url: str, needle: str) -> None:
    with pytest.raises(PlanError) as e:
        parse_plan(_with_url(url), env={})
    # An unknown option's value is masked: it may be a secret (ssl_password=, PASSWORD=).
    assert f"redis.url: {mask_url(url)} is not a usable Redis URL: {needle}" in str(e.value)
    assert e.value.exit_code == 2


@pytest.mark.parametrize(
    "url",
    [
        "redis://h/0?username=u&password=p&socket_timeout=2.5&socket_connect_timeout=1"
        "&health_check_interval=0&socket_keepalive=yes",
        "redis://h?db=3",
        "rediss://h/0?ssl_cert_reqs=none&ssl_check_hostname=false&ssl_ca_certs=/etc/ca.pem"
        "&ssl_ca_path=/etc/ca&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
        "unix:///run/redis/redis.sock?db=2&socket_timeout=3",
        # Taken before this check existed: jobs applied then may carry them.
        "redis://h/0?client_name=app&max_connections=5&retry_on_timeout=on&protocol=2"
        "&socket_keepalive=on",
        "redis+sentinel://h1,h2:26380,[::1]:26381/svc/2?tls=true",
    ],
)
def test_supported_redis_url_options_pass(url: str) -> None:
    assert check_redis_url(url) is None
    assert parse_plan(_with_url(url), env={}).redis.url == url


def test_sentinel_url_hosts_and_tls() -> None:
    s = parse_sentinel_url("redis+sentinel://h1,h2:26380,[::1]:26381/svc/2?tls=true")
    assert s.hosts == [("h1", 26379), ("h2", 26380), ("::1", 26381)]
    assert (s.service, s.db, s.tls) == ("svc", 2, True)
    assert parse_sentinel_url("redis+sentinel://h1/svc?tls=1").tls
    assert not parse_sentinel_url("redis+sentinel://h1/svc?tls=no").tls
    assert not parse_sentinel_url("redis+sentinel://h1/svc").tls


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:zq1?xw9@host:6379/0",  # urllib would say "...as 'u:zq1'"
        "redis://u:zq1/xw9@host:6379/0",
        "redis://:zq1?xw9@host/0",  # the password's tail would be read as an option name
        "redis://:123/xw9@host/0",  # ... or as the db
        "redis+sentinel://u:zq1/xw9@h1/svc",  # the sentinel host would be "u:zq1"
        "redis+sentinel://u:zq1?xw9@h1/svc",
    ],
)
def test_url_messages_never_echo_the_password(url: str) -> None:
    with pytest.raises(PlanError) as e:
        parse_plan(_with_url(url), env={})
    message = str(e.value)
    assert "zq1" not in message and "xw9" not in message and "123" not in message, message
    assert "must be percent-encoded (%2F, %3F, %23, %40)" in message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            BASE.replace("name: a", "name: 2025-02-30"),
            "not valid YAML at line 1, column 7: 2025-02-30 reads as a date but is not one "
            "(day is out of range for month); quote it if it is text",
        ),
        (
            BASE.replace("name: a", "name: 2025-01-15"),
            "name: YAML reads this unquoted value as a date (2025-01-15), not text: put it in "
            "quotes",
        ),
        (
            BASE.replace("key: k", "key: 12345"),
            "source.key: YAML reads this unquoted value as a number (12345), not text",
        ),
        (
            BASE.replace("key: k", "key: yes"),
            "source.key: YAML reads this unquoted value as a boolean (true), not text",
        ),
        (BASE.replace("key: k", "key: !!int abc"), "cannot read 'abc' as int"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
)
def test_yaml_values_that_are_not_text_are_plan_errors(text: str, needle: str) -> None:
    with pytest.raises(PlanError) as e:
        parse_plan(text, env={})
    assert needle in str(e.value)
    assert e.value.exit_code == 2


def test_quoted_date_and_number_are_text() -> None:
    p = parse_plan(BASE.replace("name: a", "name: '2025-01-15'").replace("key: k", 'key: "12345"'))
    assert (p.name, p.source.key) == ("2025-01-15", "12345")


def test_a_plan_file_that_is_not_utf8_is_a_plan_error(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(BASE.replace("key: k", "key: caf\xe9").encode("latin-1"))
    with pytest.raises(PlanError) as e:
        load_plan(plan, env={})
    assert str(e.value) == (
        f"{plan}: a plan file is UTF-8 text, and this one is not (byte 0xe9 at offset 25)"
    )


@pytest.mark.parametrize("kind", ["set", "zset"])
def test_a_set_or_zset_source_is_refused_by_validation_not_only_by_apply(kind: str) -> None:
    text = BASE.replace("source: {key: k}", f"source: {{key: k, type: {kind}}}")
    with pytest.raises(PlanError) as e:
        parse_plan(text, env={})
    assert f"source.type: {kind} sources are in the plan format" in str(e.value)
    assert e.value.exit_code == 2


def test_yaml_merge_keys_still_work_beside_the_duplicate_key_check() -> None:
    """A merged key given again overrides it, as YAML says: not a key given twice."""
    text = (
        "name: a-job\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 4}\n"
        "copy: {<<: {batch: 200, rate: 100}, rate: 50}\n"
    )
    plan = parse_plan(text, env={})
    assert (plan.copy_.batch, plan.copy_.rate) == (200, 50.0)
