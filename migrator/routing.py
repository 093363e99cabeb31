"""Member → shard functions (a permanent contract) and gray-read bucketing.

The shard of a member must be identical in every process, language and release, so it is
defined on the member's UTF-8 bytes by a standard checksum, never by Python's salted
``hash()``. Test vectors (also asserted in tests/unit/test_routing.py and implemented again in
Lua for server-side scripts)::

    crc32(b"")          == 0x00000000  → shard 0 of any N
    crc32(b"a")         == 0xE8B7BE43  (3904355907; % 100 == 7)
    crc32(b"user:1")    == 0x7BA5C282  (% 100 == 2)
    crc32(b"123456789") == 0xCBF43926  (% 100 == 62)

shard(member) = crc32(member) mod shards, crc32 being the IEEE 802.3 polynomial (zlib.crc32).

Gray bucketing: a member's sticky bucket is ``crc32(salt + b":" + member) % 100``; the member
reads from its shard when ``bucket < ratio``. The salt is per job, published in the control
record, so every instance agrees and the bucket survives restarts.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

Member = bytes | str


def to_bytes(member: Member | int | float | memoryview) -> bytes:
    """The bytes redis-py (with hiredis) sends for a member: the copy routes those."""
    if isinstance(member, bytes):
        return member
    if isinstance(member, memoryview):
        return member.tobytes()
    if isinstance(member, str):
        return member.encode("utf-8")
    return str(member).encode("utf-8")


def crc32(member: bytes) -> int:
    return zlib.crc32(member) & 0xFFFFFFFF


HASH_FUNCTIONS: dict[str, Callable[[bytes], int]] = {"crc32": crc32}


def shard_of(member: Member, shards: int, hash_name: str = "crc32") -> int:
    return HASH_FUNCTIONS[hash_name](to_bytes(member)) % shards


def sticky_bucket(member: Member, salt: str) -> int:
    """0..99, identical across processes and restarts for the same (salt, member)."""
    return crc32(salt.encode() + b":" + to_bytes(member)) % 100
