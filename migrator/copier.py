"""Copy of a Hash source into its shard keys: budgeted, race-safe, streamed in small packets.

The runner scans the source (HSCAN, with values) and routes each member itself
(``routing.py``, the contract the shim uses), then **inserts** it into its shard with HSETNX:
a member the shard already holds is left alone. That is all the copy writes, and it is safe
under live writes because of what the shim does from ``dual_write`` until the copy is over
(``hash_dual.lua``, one atomic script per call):

* every write (HSET, HINCRBY, HSETNX, ...) updates the source and sets the shard to the source's
  resulting value; every delete removes the member from the source and leaves a mark
  (``phases.TOMBSTONE``) in its shard.

So every member a shim touched since the copy began is in its shard, as a value or a mark, and
an insert of it is a no-op. The copy thus

* never overwrites a newer value: a write after the scan put the member in the shard first;
* never resurrects a deleted member: the delete left a mark where the stale value would go;
* never applies an increment twice: it writes absolute values, and only into gaps.

A member nobody touched since the scan read it is inserted with the value the scan read, which
is still its value. Verify's shard pass removes the marks, after a barrier that makes every shim
stop leaving them (``Runner.verify``). This is gh-ost's row copy (INSERT IGNORE beside the
replayed binlog) with the delete kept as a mark; unlike a script that re-reads each value
before it writes it, the server spends on a member what a plain HSET costs
(docs/decisions.md).

The copy is a :class:`~migrator.stream.CommandStream`: a packet is TIME, up to a batch of
HSETNX, the next HSCAN when the queue runs low, and TIME again, packed by hand and sent in one
write, so the server runs it back to back and measures it (the two TIMEs); two packets are in
flight and the application's requests get in between them. A step streams a few dozen packets,
then inserts what it scanned and reads every reply; the cursor it returns is the end of the last
scan page whose members were all acknowledged: what a checkpoint may hold.
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
from migrator.stream import BURST_S, DEPTH, STEP_SCRIPTS, CommandStream, Packed, Sent
from migrator.throttle import BatchSizer

_TIME = b"*1\r\n$4\r\nTIME\r\n"
#: Shards given the source's deadline by one script (each costs a PTTL, under a µs).
_TTL_CHUNK = 64


def _cursor(raw: bytes | str | int) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _bytes(values: list[Any]) -> list[bytes]:
    return [v if isinstance(v, bytes) else str(v).encode() for v in values]


def _server_us(t0: Any, t1: Any) -> float:
    """Server time between two TIME replies, in µs."""
    return (int(t1[0]) - int(t0[0])) * 1e6 + int(t1[1]) - int(t0[1])


class HashCopier(CommandStream):
    """Copies ``source_key`` into ``shard_keys`` one :meth:`step` at a time.

    ``sizer`` sizes each packet (members inserted; its HSCAN asks for twice that) and is told
    what every packet measured; without one, every packet carries the ``count`` passed to
    :meth:`step`. ``scan`` caps an HSCAN's COUNT (the plan's ``copy.batch``).
    """

    measures_whole = True

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
        # zlib.crc32 straight (already unsigned) spares a Python call per member.
        self._hash: Callable[[bytes], int] = (
            zlib.crc32 if hash_name == "crc32" else HASH_FUNCTIONS[hash_name]
        )
        # Each shard's HSETNX up to its member: the packet's bytes are joined, not formatted.
        self._heads = [b"*4\r\n$6\r\nHSETNX\r\n" + _bulk(k.encode()) for k in self.shard_keys]
        self._scan_head = b"*5\r\n$5\r\nHSCAN\r\n" + _bulk(source_key.encode())
        self._reset("0")
        self.inserted = 0  # members the copy put into a shard
        self.present = 0  # members a shard already held (a dual write's value, or a mark)
        self.packets = 0
        self._ttl_done: set[int] = set()  # shards offered the source's deadline this run

    # -- the queue -----------------------------------------------------------------------------
    def _reset(self, cursor: str) -> None:
        """Start over from a checkpoint (a fresh copy, or a resume)."""
        self._safe: str | None = cursor
        self._scan_cursor = cursor  # where the next HSCAN starts
        self._scan_done = False
        self._queue: list[bytes] = []  # scanned, not yet sent: member, value, member, value...
        # Scan pages not yet all acknowledged, oldest first: [members unacknowledged, the
        # cursor after the page]. Packets take members in page order and are acknowledged in
        # order, so acknowledgements always count off the oldest page.
        self._pages: deque[list[Any]] = deque()
        self._done = False
        self._touched: set[int] = set()  # shards this step inserted into
        self._scanned = 0

    def _acknowledge(self, members: int) -> None:
        pages = self._pages
        while pages and (members or not pages[0][0]):
            take = min(members, pages[0][0])
            pages[0][0] -= take
            members -= take
            if pages[0][0]:
                break
            self._safe = pages.popleft()[1]
            self._done = self._safe == "0"

    def _step_limit(self) -> int | None:
        return self.sizer.step_limit if self.sizer else None

    def _scan_command(self, count: int) -> bytes:
        cur = self._scan_cursor.encode()
        n = min(2 * count, self.scan)
        limit = self._step_limit()
        if limit is not None:
            n = min(n, limit)
        n_ = str(max(1, n)).encode()
        return self._scan_head + _bulk(cur) + b"$5\r\nCOUNT\r\n" + _bulk(n_)

    # -- the stream's hooks --------------------------------------------------------------------
    def _scanning(self) -> bool:
        return any(scans for _kind, (_items, scans) in self._inflight)

    def _next_command(self, count: int, more: bool) -> tuple[Packed, Sent] | None:
        take = min(count, len(self._queue) // 2)
        items = self._queue[: 2 * take]
        del self._queue[: 2 * take]
        limit = self._step_limit()  # under a rate ceiling, a step scans about its burst
        scans = (
            # (a fresh copy's first step scans until it has a page: "0" is no checkpoint)
            (
                (self._safe == "0" and not self._pages)
                or (more and (limit is None or self._scanned < limit))
            )
            and not self._scan_done
            and len(self._queue) < 4 * count  # fewer than two packets' worth left
            and not self._scanning()
        )
        if not take and not scans:
            return None
        parts = [_TIME]
        n, h, heads, touched = len(self.shard_keys), self._hash, self._heads, self._touched
        for i in range(0, len(items), 2):
            m, v = items[i], items[i + 1]
            s = h(m) % n
            touched.add(s)
            parts += (heads[s], b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(m), m, len(v), v))
        if scans:
            parts.append(self._scan_command(count))
        parts.append(_TIME)
        return Packed(b"".join(parts), take + scans + 2), ("packet", (items, scans))

    def _received(self, sent: Sent, reply: Any) -> tuple[int, float, int]:
        items, scans = sent[1]
        members = len(items) // 2
        self.packets += 1
        inserted = sum(reply[1 : 1 + members])
        self.inserted += inserted
        self.present += members - inserted
        if scans:
            nxt, found = reply[-2]
            found = _bytes(found) if found and not isinstance(found[0], bytes) else found
            self._queue += found
            self._scanned += len(found) // 2
            self._scan_cursor = _cursor(nxt)
            self._scan_done = self._scan_cursor == "0"
            self._pages.append([len(found) // 2, self._scan_cursor])
        self._acknowledge(members)
        return members, _server_us(reply[0], reply[-1]), members

    def _lost(self, sent: Sent) -> None:
        # Called newest first: each packet's members go back in front, in their order. A lost
        # HSCAN left the cursor where it was: it is sent again.
        self._queue[0:0] = sent[1][0]

    def _must_go_on(self) -> bool:
        # A step ends once what it scanned is inserted, so that its cursor and its count agree
        # (a resume inserts nothing again that was counted); a fresh copy's first step goes on
        # until its first page is done, since "0" would mean the copy is finished.
        return not self._done and (self._safe == "0" or bool(self._queue))

    def _finished(self) -> bool:
        return self._done

    def step(self, cursor: str, count: int) -> Step:
        """Stream up to ``step_scripts`` packets; return once all are acknowledged.

        ``cursor`` is the checkpoint the previous step returned (or the one to resume from).
        Idempotent: re-running a step after a connection error inserts the same members again,
        which is a no-op for those already in.
        """
        if cursor != self._safe or self._done:
            self._reset(cursor)
        self._scanned = 0  # members this step's scans found
        copied, worst, members = self._stream(count)
        self._follow_ttl(range(len(self.shard_keys)) if self._done else self._touched)
        self._touched = set()
        return Step(self._safe or "0", copied, worst, members, observed=self.sizer is not None)

    def _follow_ttl(self, shards: Any) -> None:
        """Give shards the source's deadline where it has one: each shard once, when the copy
        first inserts into it, and all of them at the end (the source may have got a deadline
        meanwhile)."""
        todo = [s for s in shards if self._done or s not in self._ttl_done]
        self._ttl_done.update(todo)
        for i in range(0, len(todo), _TTL_CHUNK):
            keys = [self.source_key, *(self.shard_keys[s] for s in todo[i : i + _TTL_CHUNK])]
            self.scripts.hash_follow_ttl(keys, [])

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
