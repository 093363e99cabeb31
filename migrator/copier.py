"""Copy of a Hash source into its shard keys: budgeted, race-safe, one round trip per step.

A copy step is one round trip carrying a few commands: scripts that copy about ``count``
scanned members each (``hash_copy_members.lua``, which re-reads every value it writes, so a
concurrent dual write is never undone) and the HSCAN that gathers more. The runner routes the
members itself (``routing.py``, the contract the shim uses) and copies them a window at a time
(up to 20 members per shard), which leaves one HMGET and a few well-filled HSETs per script.
``count`` is the :class:`~migrator.throttle.BatchSizer`'s answer to the server-time budget, and
:data:`FANOUT` scripts go per round trip, so the server spends about one budget on each round
trip and serves other clients in between. A script that still runs past the budget stops
between shards; the rest goes first in the next step. Checkpoints only ever name the end of a
window copied in full.

The copy never touches the state store; the runner drives it through :func:`scanloop.drive`.
Why it is safe under concurrent dual writes is argued in ``redisio/lua/hash_copy_members.lua``.
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

COPY_SCRIPT = "hash_copy_members"
#: Copy scripts per round trip. The batch sizer aims each at a third of the budget, so two and
#: the HSCAN that rides along hold the server about one budget per round trip: other clients
#: wait at most about that, and the copy runs ~1.7x faster than with one (docs/benchmarks.md).
FANOUT = 2

#: One shard's part of a script: (shard key, members routed to it).
Group = tuple[str, list[bytes]]


def _cursor(raw: bytes | str | int) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def pack(groups: Sequence[Group], limit: int) -> list[list[Group]]:
    """Split ``groups`` into scripts of at most ``limit`` members each (a group may be split)."""
    limit = max(1, limit)
    scripts: list[list[Group]] = []
    current: list[Group] = []
    size = 0
    for key, members in groups:
        for i in range(0, len(members), limit):
            part = members[i : i + limit]
            if size and size + len(part) > limit:
                scripts.append(current)
                current, size = [], 0
            current.append((key, part))
            size += len(part)
    if current:
        scripts.append(current)
    return scripts


class HashCopier:
    """Copies ``source_key`` into ``shard_keys`` one :meth:`step` at a time.

    Members are gathered in windows of up to ``window`` members (20 per shard by default), so
    that a script writes each shard several members at once (one HSET per shard is most of
    a script's cost). A step is one round trip: ``fanout`` scripts copying about ``count``
    members each of the window being flushed, and an HSCAN filling the next window; the
    cursor a step returns is the end of the last window flushed completely, which is what a
    checkpoint may hold.
    ``scan`` caps an HSCAN's COUNT (the plan's ``copy.batch``).
    """

    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        source_key: str,
        shard_keys: Sequence[str],
        budget_us: float,
        *,
        hash_name: str = "crc32",
        scan: int = 500,
        window: int | None = None,
        fanout: int = FANOUT,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.source_key = source_key
        self.shard_keys = list(shard_keys)
        self.keys = [source_key, *shard_keys]
        self.budget_us = budget_us
        self.scan = max(1, scan)
        self.fanout = max(1, fanout)
        self.window = window or max(self.scan, min(20 * len(self.shard_keys), 20_000))
        # zlib.crc32 straight (already unsigned) spares a Python call per member.
        self._hash: Callable[[bytes], int] = (
            zlib.crc32 if hash_name == "crc32" else HASH_FUNCTIONS[hash_name]
        )
        self._novalues: bool | None = None
        self._safe: str | None = None  # end of the last window flushed: a checkpoint
        self._scan_cursor = "0"  # where the next HSCAN starts
        self._scan_done = False
        self._filling: list[bytes] = []  # the next window, being scanned
        self._pending: list[Group] = []  # the window being flushed
        self._pending_end = "0"  # the cursor its last HSCAN returned
        self._finished = False
        self.leftover_batches = 0
        self.worst_us = 0.0

    # -- scanning ----------------------------------------------------------------------------
    def _queue_scan(self, pipe: redis.client.Pipeline, count: int) -> None:
        if self._novalues is None:
            self._novalues = self._probe_novalues()
        count = max(1, min(count, self.scan))
        cursor = int(self._scan_cursor)
        if self._novalues:
            pipe.hscan(self.source_key, cursor, count=count, no_values=True)
        else:
            pipe.hscan(self.source_key, cursor, count=count)

    def _probe_novalues(self) -> bool | None:
        """HSCAN ... NOVALUES (Redis 7.4+, Valkey 8+) spares the server sending values the
        script re-reads anyway. None: not known yet (a server without NOVALUES answers an HSCAN
        of an empty key before parsing the option, so only a reply with members proves it)."""
        try:
            reply: Any = self.client.hscan(self.source_key, 0, count=1, no_values=True)
        except redis.ResponseError:
            return False
        return True if reply[1] else None

    def _scanned(self, reply: Any) -> None:
        nxt, found = reply
        self._filling += found  # a list (NOVALUES) or a dict of member → value
        self._scan_cursor = _cursor(nxt)
        self._scan_done = self._scan_cursor == "0"

    def _close_window(self) -> None:
        """The members scanned so far become the window to flush, routed to their shards."""
        n, h, keys = len(self.shard_keys), self._hash, self.shard_keys
        by_shard: dict[int, list[bytes]] = {}
        for m in self._filling:
            by_shard.setdefault(h(m) % n, []).append(m)
        self._pending = [(keys[s], ms) for s, ms in by_shard.items()]
        self._pending_end = self._scan_cursor
        self._filling = []

    def _take(self, count: int) -> list[Group]:
        """Up to ``count`` members of the window, whole shards where they fit."""
        script: list[Group] = []
        size = 0
        while self._pending and size < count:
            key, members = self._pending[0]
            room = count - size
            if len(members) > room:
                script.append((key, members[:room]))
                self._pending[0] = (key, members[room:])
                size = count
            else:
                script.append(self._pending.pop(0))
                size += len(members)
        return script

    # -- copying -----------------------------------------------------------------------------
    def _queue_copy(self, pipe: redis.client.Pipeline, script: Sequence[Group]) -> None:
        keys: list[Any] = [self.source_key]
        args: list[Any] = [int(self.budget_us * 0.8)]
        members: list[Any] = []
        for key, part in script:
            keys.append(key)
            args.append(len(part))
            members += part
        # EVALSHA straight on the pipeline: redis-py's Script would add a SCRIPT EXISTS round
        # trip to every execute.
        pipe.evalsha(self.scripts.script(COPY_SCRIPT).sha, len(keys), *keys, *args, *members)

    def step(self, cursor: str, count: int) -> Step:
        """Copy about ``count`` members (one round trip), scan more; return the checkpoint.

        ``cursor`` is the checkpoint the previous step returned (or the one to resume from).
        A fresh copy's first step goes on until its first window is flushed, since "0" as a
        checkpoint would mean the copy is finished. Idempotent: re-running a step after a
        connection error copies the same members again from their current source values.
        """
        if cursor != self._safe:  # a fresh start, or a resume from a stored checkpoint
            self._safe, self._scan_cursor, self._scan_done = cursor, cursor, False
            self._filling, self._pending, self._finished = [], [], False
        copied, worst, worst_members = 0, 0.0, 0
        while True:
            n, elapsed, members = self._round_trip(count)
            copied += n
            if elapsed >= worst:
                worst, worst_members = elapsed, members
            if self._safe != "0" or self._finished:
                break
        self.worst_us = max(self.worst_us, worst)
        return Step(self._safe, copied, worst, worst_members)

    def _round_trip(self, count: int) -> tuple[int, float, int]:
        """(members copied, the longest script's server time, members that script was given)."""
        if not self._pending:
            if not self._filling and not self._scan_done:
                pipe = self.client.pipeline(transaction=False)
                self._queue_scan(pipe, count)
                self._scanned(pipe.execute()[0])
            self._close_window()
            if not self._pending:  # nothing left to copy in the scan
                self._window_flushed()
                return 0, 0.0, 0
        scripts: list[list[Group]] = []
        while self._pending and len(scripts) < self.fanout:
            scripts.append(self._take(count))
        scan = not self._scan_done and len(self._filling) < self.window
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for script in scripts:
                self._queue_copy(pipe, script)
            if scan:
                # Scan a little faster than windows are flushed, so that they fill up.
                self._queue_scan(pipe, 2 * count * len(scripts))
            try:
                replies = pipe.execute()
                break
            except NoScriptError:
                # The server lost its script cache (restart, failover): load and re-run.
                if attempt == 2:
                    self._pending[:0] = [g for script in scripts for g in script]
                    raise
                self.scripts.load(COPY_SCRIPT)
            except BaseException:
                # Not acknowledged: copied again next time.
                self._pending[:0] = [g for script in scripts for g in script]
                raise
        if scan:
            self._scanned(replies.pop())
        copied, worst, worst_members = 0, 0.0, 0
        leftovers: list[Group] = []
        for script, (done, elapsed) in zip(scripts, replies, strict=True):
            done, elapsed = int(done), float(elapsed)
            if elapsed >= worst:
                worst, worst_members = elapsed, sum(len(p) for _k, p in script)
            copied += sum(len(p) for _k, p in script[:done])
            # Past the budget between two shards: the rest goes first in the next round trip.
            leftovers += script[done:]
        if leftovers:
            self.leftover_batches += 1
            self._pending[:0] = leftovers
        if not self._pending:
            self._window_flushed()
        return copied, worst, worst_members

    def _window_flushed(self) -> None:
        self._safe = self._pending_end
        self._finished = self._pending_end == "0"

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
