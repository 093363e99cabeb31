"""Streamed verification of a Hash migration, both directions, never loading a whole key.

Forward: each source member against its shard (``hash_verify_members.lua``); backward: each
shard member against its routing and the source (``hash_missing_members.lua``). The runner
scans (HSCAN) and routes members itself (``routing.py``), so the scripts only read; a step is
one round trip carrying the script that checks what the previous HSCAN returned and the HSCAN
of the next step. Each script is read-only and atomic, and reports its own server time for the
budget. Later rounds re-check only the suspects (``hash_check.lua``), so in-flight writes drop
out (RedisFullCheck's method).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError

from migrator.redisio.scripts import Scripts
from migrator.routing import HASH_FUNCTIONS
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
        self,
        client: redis.Redis,
        scripts: Scripts,
        source_key: str,
        shard_keys: Sequence[str],
        *,
        hash_name: str = "crc32",
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.source_key = source_key
        self.shard_keys = list(shard_keys)
        self.keys = [source_key, *shard_keys]
        self._hash: Callable[[bytes], int] = (
            zlib.crc32 if hash_name == "crc32" else HASH_FUNCTIONS[hash_name]
        )
        self._novalues: bool | None = None

    def _supports_novalues(self, key: str) -> bool:
        """HSCAN ... NOVALUES (Redis 7.4+, Valkey 8+): the scripts read the values themselves."""
        if self._novalues is None:
            try:
                reply: Any = self.client.hscan(key, 0, count=1, no_values=True)
                _cur, found = reply
            except redis.ResponseError:
                self._novalues = False
            else:
                # A server without NOVALUES answers an HSCAN of a missing key (an empty shard)
                # before parsing the option: only a reply with members proves support. Without
                # proof, scan with values (NOVALUES only saves bytes).
                if found:
                    self._novalues = True
                else:
                    return False
        return self._novalues

    def _walk(
        self,
        key: str,
        check: Callable[[Any, list[bytes]], Callable[[Any], list[Found]] | None],
        sink: Callable[[list[Found]], None],
    ) -> Callable[[str, int], Step]:
        """A scan of ``key`` whose next HSCAN rides in the round trip of the current check.

        ``check(pipe, members)`` queues one script checking what an HSCAN found (or nothing)
        and returns the function turning its reply into differences."""
        novalues = self._supports_novalues(key)
        prefetched: dict[str, tuple[str, list[bytes]]] = {}

        def scan(pipe: Any, cursor: str, count: int) -> None:
            if novalues:
                pipe.hscan(key, int(cursor), count=count, no_values=True)
            else:
                pipe.hscan(key, int(cursor), count=count)

        def step(cursor: str, count: int) -> Step:
            got = prefetched.pop(cursor, None)
            if got is None:
                pipe = self.client.pipeline(transaction=False)
                scan(pipe, cursor, count)
                nxt, found = pipe.execute()[0]
                got = (_cursor(nxt), list(found))
            next_cursor, members = got
            for attempt in (1, 2):
                pipe = self.client.pipeline(transaction=False)
                finish = check(pipe, members)
                if next_cursor != "0":
                    scan(pipe, next_cursor, count)
                try:
                    replies = pipe.execute() if len(pipe) else []
                    break
                except NoScriptError:  # the server lost its script cache: load, re-run
                    if attempt == 2:
                        raise
                    self.scripts.load_all()
            if next_cursor != "0":
                nxt, more = replies.pop()
                prefetched[next_cursor] = (_cursor(nxt), list(more))
            elapsed = 0.0
            if finish is not None:
                elapsed = float(replies[0][0])
                diffs = finish(replies[0][1])
                if diffs:
                    sink(diffs)
            return Step(next_cursor, len(members), elapsed)

        return step

    def forward(self, sink: Callable[[list[Found]], None]) -> Callable[[str, int], Step]:
        """Source → shards: each member in its shard, with the source's value."""
        n, h, keys = len(self.shard_keys), self._hash, self.shard_keys
        script = self.scripts.script("hash_verify_members")

        def check(pipe: Any, members: list[bytes]) -> Callable[[Any], list[Found]] | None:
            if not members:
                return None
            by_shard: dict[int, list[bytes]] = {}
            for m in members:
                by_shard.setdefault(h(m) % n, []).append(m)
            shards = list(by_shard)
            args: list[Any] = [len(by_shard[s]) for s in shards]
            for s in shards:
                args += by_shard[s]
            pipe.evalsha(
                script.sha, 1 + len(shards), self.source_key, *[keys[s] for s in shards], *args
            )

            def finish(flat: Any) -> list[Found]:
                return [(m, k, shards[g - 1]) for m, k, g in _triples(flat)]

            return finish

        return self._walk(self.source_key, check, sink)

    def backward(
        self, index: int, sink: Callable[[list[Found]], None]
    ) -> Callable[[str, int], Step]:
        """Shard ``index`` → source: each member routes here and exists in the source (values
        of members in both are the forward pass's business: one difference is stored once)."""
        n, h = len(self.shard_keys), self._hash
        script = self.scripts.script("hash_missing_members")

        def check(pipe: Any, members: list[bytes]) -> Callable[[Any], list[Found]] | None:
            misrouted = [m for m in members if h(m) % n != index]
            routed = [m for m in members if h(m) % n == index]
            if not members:
                return None
            # The script runs even with nothing routed here, to report the step's server time.
            pipe.evalsha(script.sha, 1, self.source_key, *routed)

            def finish(missing: Any) -> list[Found]:
                return [(m, "extra_in_shard", index) for m in [*misrouted, *missing]]

            return finish

        return self._walk(self.shard_keys[index], check, sink)

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
