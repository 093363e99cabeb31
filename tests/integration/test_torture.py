"""Torture: several app processes write through the shim while apply runs dual_write → copy →
verify (one apply SIGKILLed mid-copy and resumed), then the ratio walks 0 → 1 → 10 → 50 → 100.
At the end the old key and the shards both equal, member for member, the model of
acknowledged writes, and no process ever read back a stale value of its own member."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from migrator import commands, control
from migrator.store import open_store
from tests.conftest import ROOT, run_cli
from tests.integration.helpers import read_hash, read_shards, seed_hash, write_plan
from tests.servers import RedisServer

COUNTERS = 20


def _start_writers(url: str, tmp: Path, nproc: int, members: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.shim_writer",
                url,
                "t-job",
                str(i),
                str(nproc),
                str(members),
                str(COUNTERS),
                str(tmp / "stop"),
                str(tmp / f"w{i}.json"),
            ],
            cwd=ROOT,
        )
        for i in range(nproc)
    ]


def _phase_and_copied(state_url: str) -> tuple[str, int]:
    store = open_store(state_url)
    try:
        job = store.get_job("t-job")
        cp = store.get_checkpoint(job, "copy")
        return job.phase.value, cp.members_done if cp else 0
    except Exception:
        return "", 0
    finally:
        store.close()


def test_torture_concurrent_writers_kill_resume_and_ratio_walk(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    _torture(
        redis_server,
        r,
        tmp_path,
        state_url,
        nproc=3,
        members=60_000,
        rate=20_000,
        kill_after=15_000,
        hold=1.5,
        # About correctness, like the soak: a niced runner behind three writers on 2 vCPUs
        # crawls, and on a host with heavy CPU steal its resume overran the 300 s timeout.
        runner_env={"MIGRATOR_NICE": "0"},
    )


@pytest.mark.soak
def test_torture_soak(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    """The same, bigger and longer: run on demand with `scripts/test -m soak`. Six writers
    in tight loops saturate both CPUs, and a runner at its default niceness yields to them as
    it would to a busy application (it crawls); the soak is about correctness, so the runner
    keeps the shell's priority here."""
    _torture(
        redis_server,
        r,
        tmp_path,
        state_url,
        nproc=6,
        members=500_000,
        rate=50_000,
        kill_after=200_000,
        hold=20,
        runner_env={"MIGRATOR_NICE": "0"},
    )


def _torture(
    redis_server: RedisServer,
    r: redis.Redis,
    tmp_path: Path,
    state_url: str,
    *,
    nproc: int,
    members: int,
    rate: int,
    kill_after: int,
    hold: float,
    runner_env: dict[str, str] | None = None,
) -> None:
    initial = seed_hash(r, "big:hash", members)
    plan = write_plan(
        tmp_path / "p.yaml",
        redis_server.url,
        shards=16,
        extra=f"copy: {{rate: {rate}, batch: 200}}\n",
    )
    writers = _start_writers(redis_server.url, tmp_path, nproc, members)
    try:
        deadline = time.monotonic() + 30
        while len(control.live_instances(r, "t-job")) < nproc:
            assert time.monotonic() < deadline, "writers never heartbeated"
            time.sleep(0.1)

        apply_cmd = [
            sys.executable,
            "-m",
            "migrator",
            "plan",
            "apply",
            str(plan),
            "--state",
            state_url,
        ]
        first = subprocess.Popen(
            apply_cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(runner_env or {})},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            phase, copied = _phase_and_copied(state_url)
            if phase == "copying" and copied >= kill_after:
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert _phase_and_copied(state_url)[0] == "copying"

        res = run_cli("plan", "apply", str(plan), "--state", state_url, cwd=ROOT, env=runner_env)
        assert res.returncode == 0, res.stderr
        assert commands.status(state_url, "t-job")[0]["phase"] == "verified"

        for ratio in (1, 10, 50, 100):
            res = run_cli("set-ratio", "t-job", str(ratio), "--state", state_url, cwd=ROOT)
            assert res.returncode == 0, res.stderr
            time.sleep(hold)
        assert commands.status(state_url, "t-job")[0]["phase"] == "cutover"
    finally:
        (tmp_path / "stop").touch()
        for w in writers:
            w.wait(30)
    assert all(w.returncode == 0 for w in writers)

    expected = {k.decode(): v.decode() for k, v in initial.items()}
    total_ops = 0
    for i in range(nproc):
        model = json.loads((tmp_path / f"w{i}.json").read_text())
        assert model["stale"] == [], model["stale"][:5]
        total_ops += model["ops"]
        for member, value in model["final"].items():
            if value is None:
                expected.pop(member, None)
            else:
                expected[member] = value
        for counter, by in model["increments"].items():
            expected[counter] = str(int(expected.get(counter, "0")) + by)
    assert total_ops > 1000, "the writers barely wrote: the test proves nothing"

    old = {k.decode(): v.decode() for k, v in read_hash(r, "big:hash").items()}
    shards = {k.decode(): v.decode() for k, v in read_shards(r, "big:{shard}", 16).items()}
    assert old == expected
    assert shards == expected
