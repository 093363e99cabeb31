"""A plan whose URL is redis+sentinel:// reaches the master through a real sentinel."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from migrator import commands
from migrator.redisio.client import parse_sentinel_url
from tests.integration.helpers import read_shards, seed_hash, write_plan
from tests.servers import RedisServer, free_port


@pytest.fixture
def sentinel_port(redis_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
    )
    proc = subprocess.Popen(
        [redis_server.binary.path, str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if Sentinel([("127.0.0.1", port)]).discover_master("mymaster"):
                    break
            except (redis.RedisError, MasterNotFoundError):
                pass
            assert time.monotonic() < deadline, "sentinel did not come up"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def test_parse_sentinel_url() -> None:
    s = parse_sentinel_url("redis+sentinel://u:p%40ss@h1:26379,h2:26380/svc/3")
    assert s.hosts == [("h1", 26379), ("h2", 26380)]
    assert (s.service, s.db, s.username, s.password) == ("svc", 3, "u", "p@ss")


def test_apply_through_sentinel(
    sentinel_port: int, r: redis.Redis, tmp_path: Path, state_url: str
) -> None:
    model = seed_hash(r, "big:hash", 5000)
    url = f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0"
    plan = write_plan(tmp_path / "p.yaml", url)
    job = commands.apply(str(plan), state_url=state_url, allow_no_instances=True)
    assert job.phase == "verified"
    assert read_shards(r, "big:{shard}", 8) == model
