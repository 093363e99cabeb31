"""The whole life under concurrent app writers: apply → gray → cutover → cleanup → done.

Writers (each its own client and ShardRouter) keep writing through every phase. At the end
the old key is gone, the shards equal the model of acknowledged writes, and no command the
runner sent overran the 1 ms budget: SLOWLOG logs every command, those of the runner's
connections (CLIENT SETNAME migrator:<job>) are picked out, and any over 1 ms must be a host
stall on a command that did no more work than its peers, not an overrun
(tests/slowlog.py: over_budget)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from migrator import commands
from tests.integration.helpers import read_shards, seed_hash, write_plan
from tests.integration.life import (
    JOB,
    SOURCE,
    TEMPLATE,
    Writers,
    decoded,
    eventually,
    job_state,
    over_budget,
    runner_sent,
)
from tests.slowlog import calibrate

N, SHARDS = 10_000, 16
BUDGET_US = 1000  # the plan's copy.max_command_ms, the default
SLOWLOG_LEN = 300_000
CALIBRATION = "migrator-calibration"


class ClientNames(threading.Thread):
    """Polls CLIENT LIST: which connection names were seen while the runner worked."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.names: set[str] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.names |= {c["name"] for c in self.client.client_list() if c["name"]}

    def stop(self) -> set[str]:
        self.done.set()
        self.join()
        self.client.close()
        return self.names


def _favour(pid: int) -> None:
    """SLOWLOG counts wall time. On a shared test host (2 vCPUs, other suites and benchmarks
    running), other processes preempting the server mid-command add milliseconds to whatever
    command it runs, even a 3-member script, and would be counted against the runner. Where
    allowed (root), the server's command thread gets a real-time priority, so the slow log
    measures the commands themselves; this changes nothing the runner sends."""
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, -10)


@pytest.mark.parametrize("mode", ["auto", "hdel"])
def test_whole_life_under_concurrent_writers(
    mode: str, start_server: Any, tmp_path: Path, state_url: str
) -> None:
    server = start_server(slowlog_log_slower_than="0", slowlog_max_len=str(SLOWLOG_LEN))
    _favour(server.proc.pid)
    r = server.client()
    initial = seed_hash(r, SOURCE, N)
    plan = write_plan(
        tmp_path / "p.yaml", server.url, shards=SHARDS, extra=f"cleanup: {{mode: {mode}}}\n"
    )
    names = ClientNames(server.url)
    names.start()
    with Writers(server.url, n=3, members=N, rate=300) as writers:
        r.slowlog_reset()
        calibrate(server.url, SOURCE, CALIBRATION)
        job = commands.apply(str(plan), state_url=state_url)
        assert job.phase == "verified"
        for ratio in (10, 50, 100):
            commands.set_ratio(ratio, name=JOB, state_url=state_url)
            time.sleep(0.5)
        assert job_state(state_url)["phase"] == "cutover"
        assert commands.cleanup(JOB, state_url=state_url).phase == "done"
        ops = sum(writers.ops)
        eventually(lambda: sum(writers.ops) > ops + 100, 10, "writes go on after done")
    seen = names.stop()

    assert not writers.errors, writers.errors
    assert sum(writers.ops) > 1000, "the writers barely wrote: the test proves nothing"
    assert not r.exists(SOURCE)
    assert decoded(read_shards(r, TEMPLATE, SHARDS)) == writers.expected(initial)
    removal = [e for e in commands.history(JOB, state_url=state_url) if e.kind == "cleanup"]
    assert removal[-1].to_value == ("hdel" if mode == "hdel" else "unlink")

    assert f"migrator:{JOB}" in seen, seen  # the runner's commands carry its name
    sent = runner_sent(r, SLOWLOG_LEN)
    witnesses = runner_sent(r, SLOWLOG_LEN, CALIBRATION.encode())
    r.close()
    assert len(sent) > 100, "the slow log should hold every command the runner sent"
    assert len(witnesses) >= 9 * 2 + 7 * 2
    # The one-offs (the preflight's sample, cleanup's UNLINK) are judged by the witnesses:
    # the same commands on the same key, sent by the test before the copy.
    overruns, stalls = over_budget(sent, BUDGET_US, peers=[*sent, *witnesses])
    assert overruns == [], [(s.duration_us, s.work, s.command[:90]) for s in overruns]
    # Stalls are the host's, a few a minute; many would mean the check is excusing too much.
    excused = [(s.duration_us, s.command[:90]) for s in stalls]
    assert len(stalls) <= max(3, len(sent) // 100), excused


def test_cutover_and_cleaning_writers_side_by_side_lose_no_update(r: redis.Redis) -> None:
    """cutover → cleaning: until the first cleanup barrier, instances still in cutover (source
    first, then shard) run beside instances in cleaning (shard first, then source). Both keep
    every member equal on the two sides, so no increment is undone (a shards-only writer beside
    a cutover one once lost increments: the whole-life test caught a counter short by a few)."""
    from migrator.redisio import Scripts

    shard = "big:3"
    r.hset(SOURCE, mapping={"n": 10, "f": "1.5", "nx": "old"})
    r.hset(shard, mapping={"n": 10, "f": "1.5", "nx": "old"})
    scripts = Scripts(r)
    assert int(scripts.hash_dual([shard, SOURCE], ["hincrby", "n", 3])) == 13  # cleaning instance
    scripts.hash_dual([shard, SOURCE], ["hincrbyfloat", "f", "1.0"])
    scripts.hash_dual([shard, SOURCE], ["hset", "nx", "new"])
    assert int(scripts.hash_dual([SOURCE, shard], ["hincrby", "n", 5])) == 18  # cutover instance
    scripts.hash_dual([SOURCE, shard], ["hincrbyfloat", "f", "0.5"])
    assert scripts.hash_dual([SOURCE, shard], ["hsetnx", "nx", "lost"]) == 0
    for key in (SOURCE, shard):
        assert r.hget(key, "n") == b"18"
        assert float(r.hget(key, "f")) == 3.0
        assert r.hget(key, "nx") == b"new"
