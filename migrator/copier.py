"""Copy of a Hash source into its shard keys, one budgeted, race-safe script per step.

The copy never touches the state store; the runner drives it through :func:`scanloop.drive`.
Why it is safe under concurrent dual writes is argued in ``redisio/lua/hash_copy.lua``.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from migrator.redisio.scripts import Scripts
from migrator.scanloop import Step


def _cursor(raw: bytes | str | int) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class HashCopier:
    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        source_key: str,
        shard_keys: Sequence[str],
        budget_us: float,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.keys = [source_key, *shard_keys]
        self.budget_us = budget_us
        self.leftover_batches = 0

    def step(self, cursor: str, count: int) -> Step:
        """One HSCAN step from ``cursor`` copied into the shards (leftovers synced after)."""
        next_cursor, scanned, elapsed, leftovers = self.scripts.hash_copy(
            self.keys, [cursor, count, int(self.budget_us * 0.8)]
        )
        elapsed = float(elapsed)
        if leftovers:
            # The writes ran past the budget: the rest of the step goes in smaller scripts,
            # each re-reading the current source value, so the split loses nothing.
            self.leftover_batches += 1
            elapsed = max(elapsed, self.sync(leftovers, chunk=max(1, len(leftovers) // 4)))
        return Step(_cursor(next_cursor), int(scanned), elapsed)

    def sync(self, members: Sequence[bytes], *, chunk: int = 100, found: int = -1) -> float:
        """Make ``members`` in the shards equal to the source; return the largest server time."""
        worst = 0.0
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(members), chunk):
            args: list[object] = []
            for m in members[i : i + chunk]:
                args += [m, found]
            self.scripts.hash_sync(self.keys, args, client=pipe)
        for _written, _removed, elapsed in pipe.execute():
            worst = max(worst, float(elapsed))
        return worst
