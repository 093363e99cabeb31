"""Memory headroom: how much the copy will add, and how much the server has room for.

The shards end up holding every member of the source once more, so the copy adds about the
source's own size. That size is estimated in O(samples), never O(N):

* ``MEMORY USAGE key SAMPLES n`` where the server allows it (the server averages ``n``
  members and scales by the member count);
* else (MEMORY renamed away or denied by an ACL) from ``HRANDFIELD key 100 WITHVALUES``, n/100
  times (each within the budget): the mean field + value length times HLEN, plus a per-member
  overhead.

The room is what lies below :data:`PAUSE_AT` of ``maxmemory`` (the fraction at which the memory
gate pauses the copy, ``gates.MemoryGate``), so a copy that passes the preflight does not run
into that pause by itself. With no ``maxmemory`` the same fraction of the host's memory
(``total_system_memory``) stands in for it, in the preflight and in the gate: a server that
fills its host is stopped by the kernel, not by an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis

#: The memory gate pauses work above this fraction of maxmemory; the preflight plans below it.
PAUSE_AT = 0.90
#: Members sampled by the estimate.
SAMPLES = 1000
#: Bytes a hashtable-encoded member costs beyond its field and value (entry, headers, bucket).
MEMBER_OVERHEAD = 64
#: Bytes each shard key costs on its own (key object, dict, expiry bookkeeping).
KEY_OVERHEAD = 256


@dataclass(frozen=True)
class Headroom:
    """The copy's estimated size against the room the server has for it (bytes)."""

    estimate: int
    method: str  # how the estimate was made
    used: int
    maxmemory: int  # 0: not configured
    limit: int  # what the copy must stay under: PAUSE_AT of maxmemory, or of the host's memory

    @property
    def free(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def shortfall(self) -> int:
        return max(0, self.estimate - self.free)

    @property
    def fits(self) -> bool:
        return self.limit <= 0 or self.shortfall == 0

    def describe(self) -> str:
        if self.maxmemory:
            where = f"{PAUSE_AT:.0%} of maxmemory {mb(self.maxmemory)}"
        else:
            where = f"{PAUSE_AT:.0%} of the host's memory (no maxmemory set)"
        return (
            f"the copy needs about {mb(self.estimate)} ({self.method}); {mb(self.free)} is free "
            f"below {where}, with {mb(self.used)} used"
            + (f": short by {mb(self.shortfall)}" if self.shortfall else "")
        )


def info(client: redis.Redis, section: str) -> dict[str, Any]:
    """One INFO section, parsed (typed: redis-py's stubs also allow an async client)."""
    return cast(dict[str, Any], client.info(section))


def mb(n: int) -> str:
    return f"{n / 1_048_576:,.1f} MiB"


#: HRANDFIELD of 1,000 fields of a large hash takes the server over a millisecond (the
#: budget); samples are taken this many at a time.
SAMPLE_ROUND = 100


def sample_fields(
    client: redis.Redis, key: str, n: int, *, withvalues: bool = False
) -> Iterator[list[bytes]]:
    """About ``n`` random fields of ``key`` (``withvalues``: field, value, ...), one HRANDFIELD
    of SAMPLE_ROUND at a time; a hash smaller than a round gives all its fields once."""
    per = 2 if withvalues else 1
    taken = 0
    while taken < n:
        got = cast(list[bytes], client.hrandfield(key, SAMPLE_ROUND, withvalues=withvalues) or [])
        if not got:
            return
        yield got
        taken += len(got) // per
        if len(got) // per < SAMPLE_ROUND:
            return


def estimate_hash_bytes(client: redis.Redis, key: str, shards: int) -> tuple[int, str]:
    """Bytes the shards of ``key`` will take once copied, and how that was estimated."""
    overhead = shards * KEY_OVERHEAD
    try:
        usage = cast("int | None", client.memory_usage(key, samples=SAMPLES))
    except redis.ResponseError:
        usage = None
    if usage:
        return int(usage) + overhead, f"MEMORY USAGE with {SAMPLES} samples"
    members = cast(int, client.hlen(key))
    sample = [x for got in sample_fields(client, key, SAMPLES, withvalues=True) for x in got]
    if not members or not sample:
        return overhead, "empty source"
    data = sum(len(x) for x in sample) / (len(sample) / 2)
    return int(members * (data + MEMBER_OVERHEAD)) + overhead, f"{len(sample) // 2} members sampled"


def headroom(client: redis.Redis, key: str, shards: int) -> Headroom:
    estimate, method = estimate_hash_bytes(client, key, shards)
    mem = info(client, "memory")
    used = int(mem.get("used_memory", 0))
    maxmemory = int(mem.get("maxmemory", 0))
    return Headroom(estimate, method, used, maxmemory, int(PAUSE_AT * memory_limit(mem)))


def memory_limit(mem: dict[str, Any]) -> int:
    """What the server's memory is held against (INFO memory): ``maxmemory``, else the host's
    memory (0: neither known)."""
    return int(mem.get("maxmemory", 0)) or int(mem.get("total_system_memory", 0))
