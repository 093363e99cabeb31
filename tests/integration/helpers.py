"""Shared helpers for integration tests: plans, seeding, exact comparisons."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from migrator.copier import GroupedHashCopier, HashCopier, insert_group
from migrator.redisio import Scripts
from migrator.routing import shard_of


def write_plan(
    path: Path,
    url: str,
    *,
    name: str = "t-job",
    source: str = "big:hash",
    shards: int = 8,
    extra: str = "",
) -> Path:
    path.write_text(
        f"name: {name}\n"
        f"redis: {{url: '{url}'}}\n"
        f"source: {{key: '{source}'}}\n"
        f"target: {{key: 'big:{{shard}}', shards: {shards}}}\n" + extra
    )
    return path


def seed_hash(r: redis.Redis, key: str, n: int, *, prefix: str = "m") -> dict[bytes, bytes]:
    model: dict[bytes, bytes] = {}
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        f = f"{prefix}{i}".encode()
        v = json.dumps({"id": i, "name": f"user {i}", "email": f"u{i}@example.com"}).encode()
        model[f] = v
        pipe.hset(key, f, v)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    return model


def read_hash(r: redis.Redis, key: str) -> dict[bytes, bytes]:
    """Whole hash via HSCAN (test-side only; never how the product reads a big key)."""
    return {k: v for k, v in r.hscan_iter(key, count=1000)}


def read_shards(r: redis.Redis, template: str, shards: int) -> dict[bytes, bytes]:
    """Union of all shard keys; asserts every member sits in the shard routing names."""
    out: dict[bytes, bytes] = {}
    for i in range(shards):
        for k, v in read_hash(r, template.replace("{shard}", str(i))).items():
            assert shard_of(k, shards) == i, (
                f"{k!r} is in shard {i}, routes to {shard_of(k, shards)}"
            )
            assert k not in out
            out[k] = v
    return out


def eventually(check: Callable[[], Any], timeout: float = 3.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what or check}")
        time.sleep(0.02)


#: The copy's two ways of inserting: one HSETNX a member (every server), and HSETEX FNX groups
#: (servers that have it: Valkey 9, Redis 8). Copy tests run both where the server allows.
INSERTS = ("hsetnx", "hsetex")


def make_copier(
    insert: str, r: redis.Redis, source: str, shard_keys: list[str], *args: Any, **kwargs: Any
) -> HashCopier:
    """The copier that inserts ``insert``'s way; skips where the server cannot."""
    if insert == "hsetnx":
        return HashCopier(r, Scripts(r), source, shard_keys, *args, **kwargs)
    group = insert_group(r, len(shard_keys), "migrator:{test}:hsetex-probe")
    if not group:
        pytest.skip("this server has no HSETEX ... FNX (Valkey 9, Redis 8): it copies by HSETNX")
    return GroupedHashCopier(r, Scripts(r), source, shard_keys, *args, group=group, **kwargs)
