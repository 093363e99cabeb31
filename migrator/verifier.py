"""Streamed verification of a Hash migration, both directions, never loading a whole key.

Forward: each source member against its shard (``hash_verify.lua``). Backward: each shard
member against the source and its routing (``hash_verify_shard.lua``). Later rounds re-check
only the suspects (``hash_check.lua``), so in-flight writes drop out (RedisFullCheck's method).
Every script is read-only and atomic, and reports its own server time for the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis

from migrator.redisio.scripts import Scripts
from migrator.scanloop import Step

Found = tuple[bytes, str, int]  # (member, kind, shard)


def _triples(flat: Sequence[bytes | str | int]) -> list[Found]:
    out = []
    for i in range(0, len(flat), 3):
        m, k, s = flat[i], flat[i + 1], flat[i + 2]
        out.append(
            (
                m if isinstance(m, bytes) else str(m).encode(),
                k.decode() if isinstance(k, bytes) else str(k),
                int(s),
            )
        )
    return out


def _cursor(raw: bytes | str | int) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class HashVerifier:
    def __init__(
        self, client: redis.Redis, scripts: Scripts, source_key: str, shard_keys: Sequence[str]
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.source_key = source_key
        self.shard_keys = list(shard_keys)
        self.keys = [source_key, *shard_keys]

    def forward(self, sink: Callable[[list[Found]], None]) -> Callable[[str, int], Step]:
        def step(cursor: str, count: int) -> Step:
            nxt, n, elapsed, diffs = self.scripts.hash_verify(self.keys, [cursor, count])
            if diffs:
                sink(_triples(diffs))
            return Step(_cursor(nxt), int(n), float(elapsed))

        return step

    def backward(
        self, index: int, sink: Callable[[list[Found]], None]
    ) -> Callable[[str, int], Step]:
        keys = [self.source_key, self.shard_keys[index]]

        def step(cursor: str, count: int) -> Step:
            nxt, n, elapsed, diffs = self.scripts.hash_verify_shard(
                keys, [cursor, count, index, len(self.shard_keys)]
            )
            if diffs:
                sink(_triples(diffs))
            return Step(_cursor(nxt), int(n), float(elapsed))

        return step

    def recheck(
        self, members: Sequence[tuple[bytes, int]], chunk: int = 200
    ) -> tuple[list[Found], float]:
        """The members (with the shard each was found in) that still differ, and worst time."""
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(members), chunk):
            args: list[object] = []
            for m, s in members[i : i + chunk]:
                args += [m, s]
            self.scripts.hash_check(self.keys, args, client=pipe)
        still: list[Found] = []
        worst = 0.0
        for elapsed, diffs in pipe.execute():
            worst = max(worst, float(elapsed))
            still += _triples(diffs)
        return still, worst
