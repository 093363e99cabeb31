"""Server-side scripts: loaded from ``lua/``, each prepended with ``lib.lua`` (time, TTL), and
with ``crc32.lua`` when it routes members itself.

Scripts are registered once per client and run with EVALSHA (redis-py's Script falls back to
EVAL/SCRIPT LOAD after a restart or failover flushed the script cache).
"""

from __future__ import annotations

import zlib
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


def _crc_table() -> str:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (0xEDB88320 ^ (c >> 1)) if c & 1 else (c >> 1)
        table.append(c)
    # The generated table must reproduce zlib's checksum; a wrong table would silently misroute.
    assert zlib.crc32(b"\x01") == _crc_with(table, b"\x01")
    return ",".join(str(x) for x in table)


def _crc_with(table: list[int], data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


@cache
def source(name: str) -> str:
    """The full Lua source of script ``name`` (lib, and crc32 where it is used, prepended)."""
    lua = resources.files("migrator.redisio") / "lua"
    body = (lua / f"{name}.lua").read_text()
    lib = (lua / "lib.lua").read_text()
    if "crc32(" in body:
        lib = (lua / "crc32.lua").read_text().replace("__CRC_TABLE__", _crc_table()) + lib
    return lib + "\n" + body


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
