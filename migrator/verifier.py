"""Streamed verification of a Hash migration, both directions, never loading a whole key.

Forward: each source member against its shard (``hash_verify_members.lua``); backward: each
shard member against its routing and the source (``hash_missing_members.lua``), removing the
delete marks the copy needed (``phases.TOMBSTONE``). The runner scans (HSCAN) and routes members
itself (``routing.py``), so the scripts only read, but for those marks. A pass is a
:class:`~migrator.stream.CommandStream`, like the copy: small commands, two in flight, the next
HSCAN riding behind the checks of what the previous one found. Each script is atomic, and
reports its own server time for the budget. Later rounds re-check only the suspects
(``hash_check.lua``), so in-flight writes drop out (RedisFullCheck's method).
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

from migrator.redisio.scripts import Scripts, member_keys
from migrator.routing import HASH_FUNCTIONS
from migrator.scanloop import Step
from migrator.stream import CommandStream, Sent
from migrator.throttle import BatchSizer, Fence, check_fence, chunks

Found = tuple[bytes, str, int]  # (member, kind, shard)
#: Turns a check script's reply into (its server time, the differences it found).
Finish = Callable[[Any], tuple[float, list[Found]]]


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
        fence: Fence | None = None,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.fence = fence  # its passes remove delete marks: writes, fenced as the copy's
        self.source_key = source_key
        self.shard_keys = list(shard_keys)
        self._hash: Callable[[bytes], int] = (
            zlib.crc32 if hash_name == "crc32" else HASH_FUNCTIONS[hash_name]
        )
        self._novalues: bool | None = None
        self.marks_removed = 0  # delete marks the shard passes removed

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

    def forward(
        self, sink: Callable[[list[Found]], None], sizer: BatchSizer | None = None
    ) -> Callable[[str, int], Step]:
        """Source → shards: each member in its shard, with the source's value."""
        n, h, keys = len(self.shard_keys), self._hash, self.shard_keys
        name = "hash_verify_members"
        script = self.scripts.script(name)

        def check(members: list[bytes]) -> tuple[list[Any], Finish]:
            by_shard: dict[int, list[bytes]] = {}
            for m in members:
                by_shard.setdefault(h(m) % n, []).append(m)
            shards = list(by_shard)
            args: list[Any] = [len(by_shard[s]) for s in shards]
            for s in shards:
                args += by_shard[s]
            cmd = ["EVALSHA", script.sha, 1 + len(shards), self.source_key]
            cmd += [keys[s] for s in shards] + args

            def finish(reply: Any) -> tuple[float, list[Found]]:
                found = [(m, k, shards[g - 1]) for m, k, g in _triples(reply[1])]
                return float(reply[0]), found

            return cmd, finish

        return _Walk(self, self.source_key, name, check, sink, sizer).step

    def backward(
        self, index: int, sink: Callable[[list[Found]], None], sizer: BatchSizer | None = None
    ) -> Callable[[str, int], Step]:
        """Shard ``index`` → source: each member routes here and exists in the source (values
        of members in both are the forward pass's business: one difference is stored once).
        Delete marks (phases.TOMBSTONE) of members the source lacks are removed on the way."""
        n, h = len(self.shard_keys), self._hash
        name = "hash_missing_members"
        script = self.scripts.script(name)

        def check(members: list[bytes]) -> tuple[list[Any], Finish]:
            misrouted = [m for m in members if h(m) % n != index]
            routed = [m for m in members if h(m) % n == index]
            # The script runs even with nothing routed here, to report the step's server time.
            cmd = ["EVALSHA", script.sha, 2, self.source_key, self.shard_keys[index], *routed]

            def finish(reply: Any) -> tuple[float, list[Found]]:
                missing = [*misrouted, *reply[1]]
                self.marks_removed += int(reply[2])
                return float(reply[0]), [(m, "extra_in_shard", index) for m in missing]

            return cmd, finish

        return _Walk(self, self.shard_keys[index], name, check, sink, sizer).step

    def recheck(
        self,
        members: Sequence[tuple[bytes, int]],
        chunk: int = 200,
        *,
        sizer: BatchSizer | None = None,
    ) -> tuple[list[Found], float]:
        """The members (with the shard each was found in) that still differ, and worst time.
        ``sizer``: each script carries its batch and is shown to it (``chunk`` otherwise)."""
        n, h = len(self.shard_keys), self._hash
        still: list[Found] = []
        worst = 0.0
        for part in chunks(members, chunk, sizer):
            named = [(m, h(m) % n, s) for m, s in part]
            keys, args, shards = member_keys(self.source_key, self.shard_keys, named)
            # One script a round trip, not a pipeline of them: the server runs a client's
            # buffered commands back to back, which would hold it for several budgets at once.
            check_fence(self.fence)  # it removes delete marks: a write
            elapsed, diffs = self.scripts.hash_check(keys, args, client=self.client)
            if sizer is not None:
                sizer.observe(float(elapsed), len(part))
            worst = max(worst, float(elapsed))
            still += [(m, kind, shards[k]) for m, kind, k in _triples(diffs)]
        return still, worst


class _Walk(CommandStream):
    """One verify pass over one key, streamed (``stream.py``): an HSCAN at a time, and the check
    scripts of what earlier ones found. ``check(members)`` builds one script command for members
    a scan found, with the function turning its reply into (server time, differences). The
    cursor a step returns is the end of the last scan whose members were all checked: what a
    checkpoint may hold."""

    def __init__(
        self,
        verifier: HashVerifier,
        key: str,
        script: str,
        check: Callable[[list[bytes]], tuple[list[Any], Finish]],
        sink: Callable[[list[Found]], None],
        sizer: BatchSizer | None,
    ) -> None:
        super().__init__(verifier.client, verifier.scripts, sizer=sizer, fence=verifier.fence)
        self.key = key
        self.script = script
        self.check = check
        self.sink = sink
        self.novalues = verifier._supports_novalues(key)
        self._safe: str | None = None
        self._cursor = "0"
        self._scan_done = False
        # Members scanned, not yet sent to a check: [members, the cursor after them or None].
        self._queue: deque[list[Any]] = deque()

    def _reset(self, cursor: str) -> None:
        self._safe = self._cursor = cursor
        self._scan_done = False
        self._queue.clear()

    def _next_command(self, count: int, more: bool) -> tuple[list[Any], Sent] | None:
        if self._queue:
            members, end = self._queue.popleft()
            script, finish = self.check(members)
            return script, ("script", [members, end, finish])
        if not more and self._safe != "0":
            return None  # past the step's limits: no new scan
        if self._scan_done or any(kind == "scan" for kind, _ in self._inflight):
            return None
        cmd: list[Any] = ["HSCAN", self.key, self._cursor, "COUNT", max(1, 2 * count)]
        if self.novalues:
            cmd.append("NOVALUES")
        return cmd, ("scan", count)

    def _received(self, sent: Sent, reply: Any) -> tuple[int, float, int]:
        kind, payload = sent
        if kind == "scan":
            nxt, found = reply
            members = list(found) if self.novalues else list(found[0::2])
            self._cursor = _cursor(nxt)
            self._scan_done = self._cursor == "0"
            size = max(1, payload)
            chunks = [members[i : i + size] for i in range(0, len(members), size)]
            for chunk in chunks:
                self._queue.append([chunk, None])
            self._ends_at(self._cursor)
            return 0, 0.0, 0
        members, end, finish = payload
        elapsed, diffs = finish(reply)
        if diffs:
            self.sink(diffs)
        if end is not None:
            self._safe = end
        return len(members), elapsed, len(members)

    def _ends_at(self, cursor: str) -> None:
        """Everything scanned so far is checked once the last of it is: that member list (or
        the last check in flight) carries the cursor; with nothing left at all, it is safe now."""
        if self._queue:
            self._queue[-1][1] = cursor
            return
        scripts = [payload for kind, payload in self._inflight if kind == "script"]
        if scripts:
            scripts[-1][1] = cursor
        else:
            self._safe = cursor

    def _lost(self, sent: Sent) -> None:
        kind, payload = sent
        if kind == "script":
            self._queue.appendleft(payload[:2])
        # A lost HSCAN left the cursor where it was: it is sent again.

    def _must_go_on(self) -> bool:
        # A step ends where a scan's members are all checked, so that its cursor and its count
        # agree (a resume re-checks nothing it counted); a fresh pass's first step goes on until
        # such a checkpoint, since "0" would mean the pass is done.
        return self._safe == "0" or bool(self._queue)

    def _finished(self) -> bool:
        return self._scan_done and not self._queue

    def step(self, cursor: str, count: int) -> Step:
        if cursor != self._safe:
            self._reset(cursor)
        checked, worst, members = self._stream_with_reload(count, self.script)
        return Step(self._safe or "0", checked, worst, members, observed=self.sizer is not None)
