"""Memory preflight: a copy that cannot fit below maxmemory is refused with the numbers, and
nothing is written; --force goes on (audited) and the memory gate then holds the copy."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from migrator import commands, keys, memory
from migrator.copier import HashCopier
from migrator.redisio import Scripts
from migrator.store import peek_job
from tests.conftest import run_cli
from tests.integration.helpers import write_plan
from tests.servers import RedisServer

MIB = 1_048_576
NEEDS = re.compile(
    r"the copy needs about ([\d,.]+) MiB \(MEMORY USAGE with \d+ samples\); ([\d,.]+) MiB is "
    r"free below 90% of maxmemory 50\.0 MiB, with ([\d,.]+) MiB used: short by ([\d,.]+) MiB"
)


def _seed_big_values(r: redis.Redis, key: str, members: int, size: int) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(members):
        pipe.hset(key, f"m{i}", f"{i:08d}".encode() * (size // 8))
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def _mib(s: str) -> float:
    return float(s.replace(",", ""))


def test_preflight_refuses_a_copy_that_cannot_fit_and_says_by_how_much(
    start_server: Callable[..., RedisServer], tmp_path: Path, state_url: str
) -> None:
    server = start_server(maxmemory="50mb")
    r = server.client()
    _seed_big_values(r, "big:hash", 30_000, 1000)  # ~30 MiB; a copy needs as much again
    plan = write_plan(tmp_path / "p.yaml", server.url)

    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", "--state", state_url)

    assert res.returncode == 2, res.stderr
    assert "not enough memory for the copy of 'big:hash'" in res.stderr
    m = NEEDS.search(res.stderr)
    assert m, res.stderr
    needs, free, used, short = (_mib(x) for x in m.groups())
    assert 28 < needs < 40  # the source's own size, estimated by sampling
    assert used > 28 and abs(free - (45.0 - used)) < 0.2
    assert short > 10 and abs(short - (needs - free)) < 0.2
    assert "--force" in res.stderr
    # Refused before anything was written: no job, no shard key, no control record.
    assert peek_job(state_url, "t-job") is None
    assert not r.exists(keys.control("t-job"), *[f"big:{i}" for i in range(8)])


def test_force_copies_anyway_audited_and_the_memory_gate_holds_it(
    start_server: Callable[..., RedisServer], tmp_path: Path, state_url: str
) -> None:
    server = start_server(maxmemory="50mb")
    r = server.client()
    _seed_big_values(r, "big:hash", 30_000, 1000)
    # A rate ceiling keeps the copy from overshooting the gate between two of its checks.
    plan = write_plan(tmp_path / "p.yaml", server.url, extra="copy: {rate: 5000}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator", "plan", "apply", str(plan), "--allow-no-instances"]
        + ["--force", "--state", state_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        throttle = None
        while time.monotonic() < deadline and proc.poll() is None:
            if peek_job(state_url, "t-job") is not None:
                [st] = commands.status(state_url, "t-job")
                throttle = st["throttle"]
                if throttle and throttle.startswith("memory:"):
                    break
            time.sleep(0.1)
        assert throttle and throttle.startswith("memory: used_memory"), (throttle, proc.poll())
        assert "of maxmemory 50.0 MiB (holding above 90%)" in throttle
        info = r.info("memory")
        assert info["used_memory"] < info["maxmemory"]
        [st] = commands.status(state_url, "t-job")
        assert st["phase"] == "copying" and st["last_error"] is None
        assert 0 < st["copied"] < 30_000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    flags = [e for e in commands.history("t-job", state_url=state_url) if e.kind == "flag"]
    forced = [e for e in flags if e.to_value == "force"]
    assert len(forced) == 1
    assert "memory preflight overridden" in (forced[0].detail or "")
    assert "short by" in (forced[0].detail or "")


def test_estimate_matches_what_the_copy_takes(redis_server: RedisServer, r: redis.Redis) -> None:
    _seed_big_values(r, "src", 20_000, 400)
    room = memory.headroom(r, "src", 16)
    assert room.maxmemory == 0 and room.fits  # no maxmemory: the host's memory is the limit
    before = int(r.info("memory")["used_memory"])
    shards = [f"dst:{i}" for i in range(16)]
    copier = HashCopier(r, Scripts(r), "src", shards, 1000.0)
    cursor = "0"
    while True:
        cursor = copier.step(cursor, 200).cursor
        if cursor == "0":
            break
    grown = int(r.info("memory")["used_memory"]) - before
    assert sum(int(r.hlen(k)) for k in shards) == 20_000
    assert 0.7 * grown < room.estimate < 1.5 * grown, (room.estimate, grown)


def test_estimate_samples_members_where_memory_usage_is_renamed_away(
    start_server: Callable[..., RedisServer],
) -> None:
    server = start_server(rename_command='MEMORY ""')
    r = server.client()
    _seed_big_values(r, "src", 5_000, 400)
    estimate, method = memory.estimate_hash_bytes(r, "src", 8)
    assert method == "1000 members sampled"
    data = 5_000 * (400 + len("m1234"))
    assert data < estimate < 2 * data
