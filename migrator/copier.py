"""Copy of a Hash source into its shard keys: budgeted, race-safe, streamed in small commands.

The runner scans the source (HSCAN) and routes each member itself (``routing.py``, the
contract the shim uses); copy scripts (``hash_copy_members.lua``) re-read every value they
write, so a concurrent dual write is never undone (the argument is in the script). Members are
gathered in windows of up to 20 per shard, so that a script writes a shard several members at
once with one HSET.

The copy is a :class:`~migrator.stream.CommandStream`: small commands (a slice of the budget
each), two in flight, so the application's requests get in between them. A step streams a few
dozen scripts and waits for them; the cursor it returns is the end of the last window copied
completely: what a checkpoint may hold. A script that runs past the budget stops between
shards; the rest goes out again first.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

from migrator.redisio.scripts import Scripts
from migrator.routing import HASH_FUNCTIONS
from migrator.scanloop import Step
from migrator.stream import BURST_S, DEPTH, STEP_SCRIPTS, CommandStream, Sent
from migrator.throttle import BatchSizer

COPY_SCRIPT = "hash_copy_members"

#: One shard's part of a script: (shard key, members routed to it).
Group = tuple[str, list[bytes]]


def _cursor(raw: bytes | str | int) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class HashCopier(CommandStream):
    """Copies ``source_key`` into ``shard_keys`` one :meth:`step` at a time.

    ``sizer`` sizes each command (members per copy script; an HSCAN asks for twice that)
    and is told what every script measured; without one, every command carries the
    ``count`` passed to :meth:`step`. ``scan`` caps an HSCAN's COUNT (the plan's
    ``copy.batch``); ``window`` is how many scanned members are routed together.
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
        sizer: BatchSizer | None = None,
        depth: int = DEPTH,
        burst_s: float = BURST_S,
        step_scripts: int = STEP_SCRIPTS,
    ) -> None:
        super().__init__(
            client,
            scripts,
            sizer=sizer,
            depth=depth,
            burst_s=burst_s,
            step_scripts=step_scripts,
        )
        self.source_key = source_key
        self.shard_keys = list(shard_keys)
        self.keys = [source_key, *shard_keys]
        self.budget_us = budget_us
        self.scan = max(1, scan)
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
        self._pending: deque[Group] = deque()  # the window being flushed, not yet sent
        self._pending_end = "0"  # the cursor its last HSCAN returned
        self._open = False  # a window is being flushed (some of it may be in flight)
        self._done = False
        self.leftover_batches = 0

    # -- the window ----------------------------------------------------------------------------
    def _reset(self, cursor: str) -> None:
        """Start over from a checkpoint (a fresh copy, or a resume)."""
        self._safe, self._scan_cursor, self._scan_done = cursor, cursor, False
        self._filling, self._pending, self._open, self._done = [], deque(), False, False

    def _window_size(self) -> int:
        """Members routed together: ``window``, or under a rate ceiling at most its burst (a
        step finishes the window it opened, so the window bounds the step)."""
        limit = self.sizer.step_limit if self.sizer else None
        return self.window if limit is None else max(1, min(self.window, limit))

    def _close_window(self) -> None:
        """The members scanned so far become the window to flush, routed to their shards."""
        n, h, keys = len(self.shard_keys), self._hash, self.shard_keys
        by_shard: dict[int, list[bytes]] = {}
        for m in self._filling:
            by_shard.setdefault(h(m) % n, []).append(m)
        self._pending = deque((keys[s], ms) for s, ms in by_shard.items())
        self._pending_end = self._scan_cursor
        self._filling = []
        self._open = True

    def _window_flushed(self) -> None:
        self._open = False
        self._safe = self._pending_end
        self._done = self._pending_end == "0"

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
                script.append(self._pending.popleft())
                size += len(members)
        return script

    # -- the stream's hooks --------------------------------------------------------------------
    def _scanning(self) -> bool:
        return any(kind == "scan" for kind, _ in self._inflight)

    def _copying(self) -> bool:
        return any(kind == "script" for kind, _ in self._inflight)

    def _next_command(self, count: int, more: bool) -> tuple[list[Any], Sent] | None:
        if self._pending:
            script = self._take(count)
            keys: list[Any] = [self.source_key]
            args: list[Any] = [int(self.budget_us * 0.8)]
            members: list[Any] = []
            for key, part in script:
                keys.append(key)
                args.append(len(part))
                members += part
            sha = self.scripts.script(COPY_SCRIPT).sha
            return ["EVALSHA", sha, len(keys), *keys, *args, *members], ("script", script)
        if self._open and not self._copying():
            self._window_flushed()  # every script of the window acknowledged
        if not self._open and self._scan_done and not self._filling:
            # The last HSCAN found nothing more: all that was scanned is copied.
            self._safe, self._done = self._scan_cursor, True
            return None
        if not more and self._safe != "0":
            return None  # past the step's limits: no new window, no scan for one
        if (
            not self._open
            and self._filling
            and (self._scan_done or len(self._filling) >= self._window_size())
        ):
            # A scan in flight belongs to the next window: this one ends where it started.
            self._close_window()
            return self._next_command(count, more)
        if self._scan_done or self._scanning() or len(self._filling) >= self._window_size():
            return None
        if self._novalues is None:
            self._novalues = self._probe_novalues()
        n = max(1, min(2 * count, self.scan))
        cmd: list[Any] = ["HSCAN", self.source_key, self._scan_cursor, "COUNT", n]
        if self._novalues:
            cmd.append("NOVALUES")
        return cmd, ("scan", None)

    def _probe_novalues(self) -> bool | None:
        """HSCAN ... NOVALUES (Redis 7.4+, Valkey 8+) spares the server sending values the
        script re-reads anyway. None: not known yet (a server without NOVALUES answers an HSCAN
        of an empty key before parsing the option, so only a reply with members proves it)."""
        try:
            reply: Any = self.client.hscan(self.source_key, 0, count=1, no_values=True)
        except redis.ResponseError:
            return False
        return True if reply[1] else None

    def _received(self, sent: Sent, reply: Any) -> tuple[int, float, int]:
        kind, script = sent
        if kind == "scan":
            nxt, found = reply
            # NOVALUES: members only; otherwise member, value, member, value...
            self._filling += found if self._novalues else found[0::2]
            self._scan_cursor = _cursor(nxt)
            self._scan_done = self._scan_cursor == "0"
            return 0, 0.0, 0
        done, elapsed = int(reply[0]), float(reply[1])
        if done < len(script):
            # Past the budget between two shards: the rest goes first in the next script.
            self.leftover_batches += 1
            self._pending.extendleft(reversed(script[done:]))
        return sum(len(p) for _k, p in script[:done]), elapsed, sum(len(p) for _k, p in script)

    def _lost(self, sent: Sent) -> None:
        kind, script = sent
        if kind == "script":
            self._pending.extendleft(reversed(script))
        # A lost HSCAN left the cursor where it was: it is sent again.

    def _must_go_on(self) -> bool:
        # A step ends where a window is flushed, so that its cursor and its count agree (a
        # resume copies nothing again that was counted); a fresh copy's first step goes on
        # until its first window is flushed, since "0" would mean the copy is finished.
        return self._safe == "0" or self._open

    def _finished(self) -> bool:
        return self._done

    def _settled(self) -> None:
        if self._open and not self._pending:
            self._window_flushed()

    def step(self, cursor: str, count: int) -> Step:
        """Stream up to ``step_scripts`` copy scripts; return once all are acknowledged.

        ``cursor`` is the checkpoint the previous step returned (or the one to resume from).
        Idempotent: re-running a step after a connection error copies the same members again
        from their current source values.
        """
        if cursor != self._safe:
            self._reset(cursor)
        copied, worst, members = self._stream_with_reload(count, COPY_SCRIPT)
        return Step(self._safe or "0", copied, worst, members, observed=self.sizer is not None)

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
