"""The hand-written recipe the benchmark compares against, as people run it today.

Usage: bench_recipe.py URL SOURCE_KEY TARGET_TEMPLATE SHARDS [SECONDS]

HSCAN with COUNT 1000; for each returned field one HSET to shard ``crc32(field) % SHARDS``, in
a pipeline executed once per scan step; no throttle, no budget. (Not race-safe: a value the app
changes between the HSCAN and the HSET is overwritten with the old one, and a member deleted
meanwhile comes back.) Prints ``members started ended`` (wall-clock seconds) on stdout. With
SECONDS, it stops after the scan step that passes that time (the bench's interleaved rounds).
"""

from __future__ import annotations

import sys
import time
import zlib
from typing import Any

import redis


def main() -> int:
    url, source, template, shards = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    seconds = float(sys.argv[5]) if len(sys.argv) > 5 else float("inf")
    client = redis.Redis.from_url(url, client_name="bench:recipe")
    keys = [template.replace("{shard}", str(i)) for i in range(shards)]
    started = time.time()
    cursor, copied = 0, 0
    while True:
        reply: Any = client.hscan(source, cursor, count=1000)
        cursor, items = reply
        pipe = client.pipeline(transaction=False)
        for field, value in items.items():
            pipe.hset(keys[zlib.crc32(field) % shards], field, value)
        pipe.execute()
        copied += len(items)
        if cursor == 0 or time.time() - started > seconds:
            break
    print(copied, started, time.time())
    return 0


if __name__ == "__main__":
    sys.exit(main())
