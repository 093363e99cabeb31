"""plan apply end to end on a real server: copy, verify, status, idempotence, resume."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from migrator import commands, keys
from migrator.errors import PlanConflict
from migrator.redisio import Scripts
from migrator.routing import shard_of
from migrator.store import open_store
from tests.conftest import run_cli
from tests.integration.helpers import read_hash, read_shards, seed_hash, write_plan
from tests.servers import RedisServer


def test_lua_crc32_routes_like_python(r: redis.Redis) -> None:
    # Random bytes of every length up to 59, from a fixed seed: os.urandom(1) drew b"a" (a
    # duplicate, so one member short) about once in 256 runs.
    rng = random.Random(20261121)
    members = [b"", b"a", b"user:1", b"123456789", "ünï".encode(), bytes(range(256))] + [
        rng.randbytes(n) for n in range(1, 60)
    ]
    assert len(set(members)) == len(members)
    r.hset("src", mapping={m or b"\x00empty": b"v" for m in members})
    shard_keys = [f"s:{i}" for i in range(13)]
    args: list[object] = []
    for m in members:
        args += [m or b"\x00empty", -1]
    Scripts(r).hash_sync(["src", *shard_keys], args)  # routes with the Lua crc32 of crc32.lua
    for i, k in enumerate(shard_keys):
        for m in r.hkeys(k):
            assert shard_of(m, 13) == i
    assert sum(r.hlen(k) for k in shard_keys) == len(members)


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
        "last_error",
        "instances",
        "counters",
    ):
        assert field in st
    assert st["phase"] == "verified" and st["total"] == 3000
    # Which insert this server got is test_throttle_budget.py's business; status says it.
    assert st["copy_insert"].startswith(("HSETNX, one member", "HSETEX FNX, up to"))
    text = run_cli("status", "t-job", "--state", state_url).stdout
    assert f"copy inserts: {st['copy_insert']}" in text


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

    res = run_cli("plan", "apply", str(plan), "--allow-no-instances", "--state", state_url)
    assert res.returncode == 0, res.stderr
    assert read_shards(r, "big:{shard}", 8) == model

    history = commands.history("t-job", state_url=state_url)
    resumed = [e for e in history if e.kind == "resume"]
    assert len(resumed) == 1
    assert resumed[0].to_value != "0"  # a real cursor, not a restart from zero
    assert f"after {killed_at[1]} members" in (resumed[0].detail or "")
