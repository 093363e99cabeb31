"""Server-side scripts: loaded from ``lua/``, each prepended with ``lib.lua`` (time, TTL). No
script routes members: the runner and the shim do, in Python (``routing.py``), and name the
shard keys a call needs.

Scripts are registered once per client and run with EVALSHA (redis-py's Script falls back to
EVAL/SCRIPT LOAD after a restart or failover flushed the script cache).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from typing import Any, cast

import redis
from redis.commands.core import Script

NAMES = (
    "hash_follow_ttl",
    "hash_sync",
    "hash_verify_members",
    "hash_missing_members",
    "hash_check",
    "hash_dual",
    "delete_step",
    "hash_expire",
)


@cache
def source(name: str) -> str:
    """The full Lua source of script ``name``, lib.lua prepended."""
    lua = resources.files("migrator.redisio") / "lua"
    body = (lua / f"{name}.lua").read_text()
    return (lua / "lib.lua").read_text() + "\n" + body


class Scripts:
    """The project's scripts bound to one client; call as ``scripts.hash_sync(keys, args)``."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Script] = {n: client.register_script(source(n)) for n in NAMES}

    def script(self, name: str) -> Script:
        """The registered script ``name``: its ``sha`` for EVALSHA queued on a raw pipeline
        (no SCRIPT EXISTS round trip per execute); on NoScriptError, ``load`` and re-run."""
        return self._scripts[name]

    def load(self, name: str) -> None:
        script = self._scripts[name]
        script.sha = cast(str, self._client.script_load(script.script))

    def __getattr__(self, name: str) -> Any:
        try:
            script = self.__dict__["_scripts"][name]
        except KeyError:
            raise AttributeError(name) from None

        def call(keys: list[str], args: list[Any], client: Any = None) -> Any:
            return script(keys=keys, args=args, client=client or self._client)

        return call


def member_keys(
    source_key: str, shard_keys: Sequence[str], members: Iterable[tuple[bytes, int, int]]
) -> tuple[list[str], list[object], list[int]]:
    """KEYS and ARGV for hash_sync / hash_check over ``members`` (member, its shard, the shard
    it was found in or -1): KEYS[1] the source, then only the shard keys the members name;
    ARGV member, its shard's KEYS index, the found shard's KEYS index (0: none). Also the
    shard of each KEYS index (``shards[i]`` for ``KEYS[i]``; -1 for the source)."""
    keys, shards = [source_key], [-1, -1]  # 1-based: shards[1] is the source
    index: dict[int, int] = {}
    args: list[object] = []

    def at(shard: int) -> int:
        if shard not in index:
            keys.append(shard_keys[shard])
            shards.append(shard)
            index[shard] = len(keys)
        return index[shard]

    for m, shard, found in members:
        args += [m, at(shard), at(found) if found >= 0 else 0]
    return keys, args, shards
