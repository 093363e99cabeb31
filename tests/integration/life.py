"""Helpers for the life-cycle tests (verify, rollback, cleanup, run, history, ttl).

:class:`Writers` are app instances: threads, each with its own client and ShardRouter, writing
at a modest pace and keeping a model of what was acknowledged. Each owns the members
``m<i>`` with ``i % n == index`` (HSET fresh values, HDEL); all share HINCRBY counters
``c<j>``. :meth:`Writers.expected` folds the models into what the key must hold.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import redis

from migrator.redisio.scripts import source
from migrator.shim import ShardRouter
from migrator.store import open_store
from tests.conftest import ROOT
from tests.integration.helpers import eventually as eventually  # shared with the tests

JOB = "t-job"
SOURCE = "big:hash"
TEMPLATE = "big:{shard}"


def data_keys(client: redis.Redis) -> set[str]:
    """Every key but migrator's own bookkeeping (test-side SCAN)."""
    out = set()
    for k in client.scan_iter(count=1000):
        name = k.decode() if isinstance(k, bytes) else k
        if not name.startswith("migrator:"):
            out.add(name)
    return out


def shard_keys_present(client: redis.Redis) -> set[str]:
    return {k for k in data_keys(client) if k != SOURCE}


#: SLOWLOG cuts a command past 32 arguments, the last one saying how many it left out.
_MORE_ARGS = re.compile(rb" ?\.\.\. \((\d+) more arguments\)$")
_DELETE_STEP = hashlib.sha1(source("delete_step").encode()).hexdigest().encode()
#: Commands whose cost is bounded by their arguments (Valkey also logs those a script runs).
_BOUNDED = {
    b"HMGET", b"HSET", b"HDEL", b"HGET", b"HEXISTS", b"HSETNX", b"HSETEX", b"HINCRBY",
    b"HINCRBYFLOAT",
    b"EXISTS", b"TYPE", b"TIME", b"PTTL", b"PEXPIRETIME", b"PEXPIREAT",
    b"INFO", b"PING",  # the gates' probes: nothing to do with the key's size
}  # fmt: skip


@dataclass(frozen=True)
class Sent:
    """One command migrator's own connections sent (CLIENT SETNAME migrator:<job>), as a
    SLOWLOG at threshold 0 logged it: its server time, what it was and how much work it did."""

    duration_us: int
    command: bytes

    def _words(self) -> tuple[list[bytes], int]:
        more = _MORE_ARGS.search(self.command)
        text = self.command[: more.start()] if more else self.command
        return text.split(b" "), int(more.group(1)) if more else 0

    @property
    def kind(self) -> tuple[bytes, ...] | None:
        """What its peers share; None for a command whose cost its arguments do not bound
        (a whole-key read or delete, EVAL of a script given as text, ...): never excused."""
        words, _ = self._words()
        name = words[0].upper()
        if name.endswith(b"SCAN"):
            return (name,)
        if name == b"EVALSHA":
            return (name, words[1])  # a script by its sha
        return (name,) if name in _BOUNDED else None

    @property
    def work(self) -> int:
        """Members the command touches, near enough: a scan's COUNT, a delete step's count,
        a script's number of arguments, another command's arguments after its key."""
        words, more = self._words()
        name = words[0].upper()
        if name.endswith(b"SCAN"):
            upper = [w.upper() for w in words]
            return int(words[upper.index(b"COUNT") + 1]) if b"COUNT" in upper else 10
        if name == b"EVALSHA":
            if words[1] == _DELETE_STEP:
                return max(1, int(words[-1]))
            return max(1, len(words) + more - 3 - int(words[2]))
        return max(1, len(words) + more - 2)


def runner_sent(client: redis.Redis, max_len: int) -> list[Sent]:
    """Every command of migrator's connections in a SLOWLOG kept at threshold 0."""
    assert client.slowlog_len() < max_len, "the slow log filled up: entries were lost"
    return [
        Sent(e["duration"], e["command"])
        for e in client.slowlog_get(max_len)
        if (e.get("client_name") or b"").startswith(b"migrator:")
    ]


def over_budget(sent: list[Sent], budget_us: int) -> tuple[list[Sent], list[Sent]]:
    """The runner's commands that took over ``budget_us`` of wall time: (overruns, stalls).

    SLOWLOG counts wall time, so a host stall (the hypervisor taking the server's vCPU, ~1 to
    4 ms a few times a minute on the test VMs, whatever the server runs) lands on a random
    command. A stall is a command whose work, at the median rate of its peers (at least five
    commands of its kind), should have taken well within the budget (at most 80% of it, where
    the batch sizer halves), and which took over twice that. Anything else over the budget
    is an overrun: more work than the budget allows, a kind whose cost its arguments do not
    bound (a whole-key command), or a one-off with no peers to vouch for it.
    """
    by_kind: dict[tuple[bytes, ...], list[Sent]] = defaultdict(list)
    for s in sent:
        if (kind := s.kind) is not None:
            by_kind[kind].append(s)
    overruns, stalls = [], []
    for s in sent:
        if s.duration_us <= budget_us:
            continue
        kind = s.kind
        peers = [p for p in by_kind[kind] if p is not s] if kind is not None else []
        if len(peers) >= 5:
            predicted = statistics.median(p.duration_us / p.work for p in peers) * s.work
            if predicted <= 0.8 * budget_us and s.duration_us >= 2 * predicted:
                stalls.append(s)
                continue
        overruns.append(s)
    return overruns, stalls


def job_state(state_url: str, name: str = JOB) -> dict[str, Any]:
    """Phase and checkpoints straight from the store (polled while another process works)."""
    store = open_store(state_url)
    try:
        job = store.get_job(name)
        cps = {}
        for stage in ("copy", "verify", "cleanup", "rollback"):
            cp = store.get_checkpoint(job, stage)
            if cp is not None:
                cps[stage] = cp
        return {"phase": job.phase.value, "ratio": job.ratio, "checkpoints": cps, "job": job}
    except Exception:
        return {"phase": "", "ratio": 0, "checkpoints": {}, "job": None}
    finally:
        store.close()


def migrator_popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    import os

    return subprocess.Popen(
        [sys.executable, "-m", "migrator", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


class Writers:
    def __init__(
        self,
        url: str,
        *,
        n: int = 3,
        members: int = 10_000,
        counters: int = 10,
        rate: float = 300.0,
        job: str = JOB,
    ) -> None:
        self.url = url
        self.n = n
        self.members = members
        self.counters = counters
        self.rate = rate
        self.job = job
        self.stop = threading.Event()
        self.finals: list[dict[str, str | None]] = [{} for _ in range(n)]
        self.increments: list[dict[str, int]] = [{} for _ in range(n)]
        self.ops = [0] * n
        self.errors: list[str] = []
        self.routers: list[ShardRouter] = []
        self.clients: list[redis.Redis] = []
        for _ in range(n):
            client = redis.Redis.from_url(url)
            self.clients.append(client)
            self.routers.append(ShardRouter.attach(client, job, source_key=SOURCE))
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def _run(self, idx: int) -> None:
        router = self.routers[idx]
        rnd = random.Random(idx)
        mine = [f"m{i}" for i in range(self.members) if i % self.n == idx]
        final, incs = self.finals[idx], self.increments[idx]
        seq = 0
        pause = 1.0 / self.rate if self.rate > 0 else 0.0
        try:
            while not self.stop.is_set():
                roll = rnd.random()
                if roll < 0.5:
                    member = rnd.choice(mine)
                    seq += 1
                    value = json.dumps({"by": idx, "seq": seq})
                    router.hset(member, value)
                    final[member] = value
                elif roll < 0.65:
                    member = rnd.choice(mine)
                    router.hdel(member)
                    final[member] = None
                else:
                    counter = f"c{rnd.randrange(self.counters)}"
                    by = rnd.randint(1, 5)
                    router.hincrby(counter, by)
                    incs[counter] = incs.get(counter, 0) + by
                self.ops[idx] += 1
                if pause:
                    time.sleep(pause)
        except Exception as e:  # reported by finish(); a writer must never fail
            self.errors.append(f"writer {idx}: {type(e).__name__}: {e}")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            if t.is_alive() or t.ident is not None:
                t.join(30)
        for router in self.routers:
            router.close()
        self.routers.clear()
        for c in self.clients:
            c.close()
        self.clients.clear()

    def expected(self, initial: dict[bytes, bytes]) -> dict[str, str]:
        out = {k.decode(): v.decode() for k, v in initial.items()}
        for final in self.finals:
            for member, value in final.items():
                if value is None:
                    out.pop(member, None)
                else:
                    out[member] = value
        for incs in self.increments:
            for counter, by in incs.items():
                out[counter] = str(int(out.get(counter, "0")) + by)
        return out


def decoded(h: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in h.items()}


def cli_env(state_url: str) -> dict[str, str]:
    return {"MIGRATOR_STATE_URL": state_url}
