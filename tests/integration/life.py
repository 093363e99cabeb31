"""Helpers for the life-cycle tests (verify, rollback, cleanup, run, history, ttl).

:class:`Writers` are app instances: threads, each with its own client and ShardRouter, writing
at a modest pace and keeping a model of what was acknowledged. Each owns the members
``m<i>`` with ``i % n == index`` (HSET fresh values, HDEL); all share HINCRBY counters
``c<j>``. :meth:`Writers.expected` folds the models into what the key must hold.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from typing import Any

import redis

from migrator.shim import ShardRouter
from migrator.store import open_store
from tests.conftest import ROOT
from tests.integration.helpers import eventually as eventually  # shared with the tests
from tests.slowlog import Sent as Sent  # shared with the tests
from tests.slowlog import over_budget as over_budget
from tests.slowlog import runner_sent as runner_sent

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
