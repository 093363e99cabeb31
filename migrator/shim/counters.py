"""Shim counters: counted in memory on the hot path, flushed with HINCRBY now and then.

Flushed to ``keys.counters(job)`` as fields ``<instance>|<counter>`` (what ``migrator status``
sums). A failed flush puts its deltas back, so counts are delayed, not lost.
"""

from __future__ import annotations

import threading
from collections import Counter

import redis

from migrator import keys

READS_SHARD = "reads_shard"  # members read on the shard path (SHARD, SHARD_ONLY)
READS_OLD = "reads_old"  # members read on the old path
FALLBACKS = "fallbacks"  # shard-path reads that missed the shard and went to the source key
LOADER_CALLS = "loader_calls"  # members that missed Redis entirely and went to the app loader
SHADOW_MISMATCHES = "shadow_mismatches"  # shadow reads whose shard value differed from the source
DUAL_WRITE_ERRORS = "dual_write_errors"  # dual-write script calls that raised
STALE_RETRIES = "stale_retries"  # members of dual writes refused as stale and routed again

NAMES = (
    READS_SHARD,
    READS_OLD,
    FALLBACKS,
    LOADER_CALLS,
    SHADOW_MISMATCHES,
    DUAL_WRITE_ERRORS,
    STALE_RETRIES,
)


class Counters:
    """Thread-safe counters with a pending (not yet flushed) part and totals since start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._totals: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._pending[name] += n
                self._totals[name] += n

    def totals(self) -> dict[str, int]:
        """Every counter (zeros included) since this process attached."""
        with self._lock:
            return {name: self._totals[name] for name in NAMES}

    def flush(self, client: redis.Redis, job: str, instance_id: str) -> None:
        """HINCRBY the pending deltas in one MULTI (all or none); on error keep them and raise."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        try:
            pipe = client.pipeline(transaction=True)
            for name, n in sorted(pending.items()):
                pipe.hincrby(keys.counters(job), f"{instance_id}|{name}", n)
            pipe.execute()
        except BaseException:
            with self._lock:
                self._pending.update(pending)
            raise
