"""What the server is and can do: version, commands present (renamed away or not), memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis


@dataclass(frozen=True)
class ServerInfo:
    flavour: str  # "redis" or "valkey"
    version: str
    used_memory: int
    maxmemory: int
    connected_slaves: int


def server_info(client: redis.Redis) -> ServerInfo:
    info = cast(dict, client.info("server")) | cast(dict, client.info("memory"))
    info |= cast(dict, client.info("replication"))
    flavour = "valkey" if "valkey_version" in info else "redis"
    version = str(info.get("valkey_version") or info.get("redis_version"))
    return ServerInfo(
        flavour=flavour,
        version=version,
        used_memory=int(info.get("used_memory", 0)),
        maxmemory=int(info.get("maxmemory", 0)),
        connected_slaves=int(info.get("connected_slaves", 0)),
    )


def supports_unlink(client: redis.Redis, probe_key: str) -> bool:
    """True when UNLINK works here; False where it is missing, renamed away (rename-command)
    or denied to this user (ACL: NOPERM).

    Asks by running it on ``probe_key``, a key of ours that does not exist, rather than through
    COMMAND INFO, whose reply for an unknown name differs between servers and client versions.
    """
    try:
        client.unlink(probe_key)
    except redis.ResponseError as e:
        # redis-py raises NoPermissionError for NOPERM (and strips the code from the text).
        if "unknown command" in str(e).lower() or isinstance(e, redis.exceptions.NoPermissionError):
            return False
        raise
    return True


def keys_exist(client: redis.Redis, keys: Sequence[str], per_trip: int = 1000) -> list[bool]:
    """Whether each of ``keys`` exists: one EXISTS a key (O(1)), ``per_trip`` a round trip."""
    found: list[bool] = []
    for i in range(0, len(keys), per_trip):
        pipe = client.pipeline(transaction=False)
        for key in keys[i : i + per_trip]:
            pipe.exists(key)
        found += [bool(n) for n in pipe.execute()]
    return found
