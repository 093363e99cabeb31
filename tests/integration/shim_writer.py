"""A writer process for the torture tests: an "application" writing through the shim.

Usage: python -m tests.integration.shim_writer URL JOB INDEX NPROC MEMBERS COUNTERS STOPFILE OUT

Process INDEX owns members m<i> with i % NPROC == INDEX: it HSETs them (fresh values), HDELs
and re-creates them, and after every acknowledged write reads the member back through the
shim, recording any stale read. All processes HINCRBY the shared counters c<j>. On STOPFILE it
writes a JSON model of what was acknowledged to OUT: the final value (or null) of each member
it touched, and the sum of its increments per counter.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import redis

from migrator.shim import ShardRouter


def main() -> None:
    url, job, index, nproc, members, counters, stop_file, out = sys.argv[1:9]
    idx, n, m, c = int(index), int(nproc), int(members), int(counters)
    client = redis.Redis.from_url(url)
    router = ShardRouter.attach(client, job, source_key="big:hash")
    rnd = random.Random(idx)
    mine = [f"m{i}" for i in range(m) if i % n == idx]
    final: dict[str, str | None] = {}
    increments: dict[str, int] = {}
    stale: list[str] = []
    ops = 0
    seq = 0
    while not os.path.exists(stop_file):
        roll = rnd.random()
        member = rnd.choice(mine)
        if roll < 0.45:
            seq += 1
            value = json.dumps({"by": idx, "seq": seq})
            router.hset(member, value)
            final[member] = value
        elif roll < 0.6:
            router.hdel(member)
            final[member] = None
        else:
            counter = f"c{rnd.randrange(c)}"
            by = rnd.randint(1, 5)
            router.hincrby(counter, by)
            increments[counter] = increments.get(counter, 0) + by
            ops += 1
            continue
        got = router.hget(member)
        got = got.decode() if isinstance(got, bytes) else got
        if got != final[member]:
            stale.append(f"{member}: wrote {final[member]!r}, read back {got!r}")
        ops += 1
        if ops % 200 == 0:
            time.sleep(0.001)
    router.close()
    with open(out, "w") as f:
        json.dump({"final": final, "increments": increments, "stale": stale, "ops": ops}, f)


if __name__ == "__main__":
    main()
