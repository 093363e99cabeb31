"""The benchmark's concurrent application load: paced GET / HGET, one at a time, until SIGTERM.

Usage: bench_load.py URL HASH_KEY MEMBERS OUT [INTERVAL_S]

Every ``INTERVAL_S`` (default 1 ms) it sends one command, alternating a GET of a small string
and an HGET of a random member of ``HASH_KEY``, and records (wall time, latency). On SIGTERM it
writes both as float64 arrays to ``OUT`` (``.npy``-free: ``array('d')`` bytes, wall times first)
so the bench can cut the samples to the window of each copy.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from array import array

import redis


def main() -> int:
    url, key, members, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    interval = float(sys.argv[5]) if len(sys.argv) > 5 else 0.001
    client = redis.Redis.from_url(url)
    client.set("bench:probe", b"x" * 80)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    at, lat = array("d"), array("d")
    clock, wall = time.perf_counter, time.time
    fields = [f"user:{random.randrange(members)}" for _ in range(4096)]
    print("ready", flush=True)
    i = 0
    due = clock()
    while not stop:
        i += 1
        t = clock()
        if i & 1:
            client.get("bench:probe")
        else:
            client.hget(key, fields[i & 4095])
        lat.append(clock() - t)
        at.append(wall())
        due += interval
        pause = due - clock()
        if pause > 0:
            time.sleep(pause)
        else:
            due = clock()
    with open(out, "wb") as f:
        at.tofile(f)
        lat.tofile(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
