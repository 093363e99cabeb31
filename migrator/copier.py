"""Copy of a Hash source into its shard keys: budgeted, race-safe, streamed in small packets.

The runner scans the source (HSCAN, with values) and routes each member itself
(``routing.py``, the contract the shim uses), then **inserts** it into its shard with HSETNX:
a member the shard already holds is left alone. That is all the copy writes, and it is safe
under live writes because of what the shim does from ``dual_write`` until the copy is over
(``hash_dual.lua``, one atomic script per call):

* every write (HSET, HINCRBY, HSETNX, ...) updates the source and sets the shard to the source's
  resulting value; every delete removes the member from the source and, where the source held
  it, leaves a mark (``phases.TOMBSTONE``) in its shard.

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

Where the server has ``HSETEX ... FNX`` (Valkey 9, Redis 8), :class:`GroupedHashCopier` inserts
up to 32 members of one shard with one command that sets them all if none of them is there,
and falls back to HSETNX for each where one is: the same guarantee member by member, at less
than half the server's CPU per member (:func:`hash_copier` picks the copier by asking the
server; docs/decisions.md).

The copy is a :class:`~migrator.stream.CommandStream` of packets, each packed by hand and sent
in one write, so the server runs it back to back, and timed by the server (TIME first and last):
an insert packet is a batch of HSETNX, a scan packet the next HSCAN (COUNT a batch), after an
EXISTS of the source (the copy stops if it has vanished), sent when fewer than two batches are
in hand. Both cost about the same per member, so every packet is
about one slice of the budget (a scan riding with inserts would make every other packet three
times as long). Two packets are in flight and the application's requests get in between them.
A step streams a few dozen packets and reads every reply; the cursor it returns is the end of
the last scan page whose members were all acknowledged, what a checkpoint may hold, and the
members it counts are those of the pages it completed. What was scanned and not yet sent waits
for the next step.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

from migrator.errors import SourceVanished
from migrator.redisio.scripts import Scripts, member_keys
from migrator.routing import HASH_FUNCTIONS
from migrator.scanloop import Step
from migrator.stream import BURST_S, DEPTH, STEP_SCRIPTS, CommandStream, Packed, Sent
from migrator.throttle import BatchSizer, Fence, check_fence, chunks

_TIME = b"*1\r\n$4\r\nTIME\r\n"
#: A member and its value as bulk strings: what HSETNX and HSETEX take after the key.
_PAIR = b"$%d\r\n%b\r\n$%d\r\n%b\r\n"
#: Shards given the source's deadline by one script at most (each costs a PTTL, under a µs,
#: and where it changes a PEXPIREAT or PERSIST: about 5 µs, 327 µs for 64 shards measured).
_TTL_CHUNK = 64
_TTL_US_PER_SHARD = 5.0


def follow_deadline(
    scripts: Scripts, source_key: str, shard_keys: Sequence[str], budget_us: float = 1000.0
) -> int:
    """Make the shards' absolute deadlines the source's (PEXPIREAT, or PERSIST where the source
    has none), as many shards a script as 30% of ``budget_us`` allows (at most 64); return how
    many changed. The copy does it as it goes, verify at the end of each run and cleanup
    before the old key stops being the truth, so a deadline an application set, moved or
    dropped on the source with a plain client reaches every shard (docs/decisions.md, Expiry)."""
    per = max(1, min(_TTL_CHUNK, int(0.3 * budget_us / _TTL_US_PER_SHARD)))
    changed = 0
    for i in range(0, len(shard_keys), per):
        chunk = shard_keys[i : i + per]
        changed += int(scripts.hash_follow_ttl([source_key, *chunk], []))
    return changed


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

    ``sizer`` sizes each packet (members inserted, or the COUNT of its HSCAN) and is told what
    every packet measured; without one, every packet carries the ``count`` passed to
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
        fence: Fence | None = None,
    ) -> None:
        super().__init__(
            client,
            scripts,
            sizer=sizer,
            depth=depth,
            burst_s=burst_s,
            step_scripts=step_scripts,
            fence=fence,
        )
        self.source_key = source_key
        self.shard_keys = list(shard_keys)
        self.budget_us = budget_us
        self.scan = max(1, scan)
        # zlib.crc32 straight (already unsigned) spares a Python call per member.
        self._hash: Callable[[bytes], int] = (
            zlib.crc32 if hash_name == "crc32" else HASH_FUNCTIONS[hash_name]
        )
        # Each shard's HSETNX up to its member: the packet's bytes are joined, not formatted.
        self._heads = [b"*4\r\n$6\r\nHSETNX\r\n" + _bulk(k.encode()) for k in self.shard_keys]
        self._scan_head = b"*5\r\n$5\r\nHSCAN\r\n" + _bulk(source_key.encode())
        self._exists = b"*2\r\n$6\r\nEXISTS\r\n" + _bulk(source_key.encode())
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
        # cursor after the page, its members]. Packets take members in page order and are
        # acknowledged in order, so acknowledgements always count off the oldest page.
        self._pages: deque[list[Any]] = deque()
        self._done = False
        self._touched: set[int] = set()  # shards this step inserted into
        self._scanned = 0
        self._completed = 0  # members of the pages this step completed

    def _acknowledge(self, members: int) -> None:
        pages = self._pages
        while pages and (members or not pages[0][0]):
            take = min(members, pages[0][0])
            pages[0][0] -= take
            members -= take
            if pages[0][0]:
                break
            _left, self._safe, size = pages.popleft()
            self._completed += size
            self._done = self._safe == "0"

    def _take_page(self, found: list[bytes], scanned: int) -> None:
        """Queue a scan page's members (member, value, member, value...) for insertion."""
        self._queue += found
        self._pages.append([scanned, self._scan_cursor, scanned])
        self._acknowledge(0)  # an empty page after acknowledged ones is done at once

    def _step_limit(self) -> int | None:
        return self.sizer.step_limit if self.sizer else None

    def _scan_packet(self, count: int) -> Packed:
        n = min(count, self.scan)
        limit = self._step_limit()
        if limit is not None:
            n = min(n, limit - self._scanned)  # the step's burst, less what it scanned already
        scan = self._scan_head + _bulk(self._scan_cursor.encode()) + b"$5\r\nCOUNT\r\n"
        scan += _bulk(str(max(1, n)).encode())
        return Packed(_TIME + self._exists + scan + _TIME, 4)

    def _in_hand(self) -> int:
        """Members ready to go out in inserts."""
        return len(self._queue) // 2

    def _open_pages(self) -> int:
        """Scan pages not yet complete."""
        return len(self._pages)

    def _wants_scan(self, count: int, more: bool) -> bool:
        if self._scan_done or self._in_hand() >= 2 * count:  # two packets' worth in hand
            return False
        if any(kind == "scan" for kind, _ in self._inflight):
            return False  # each scan starts where the previous one ended
        if self._safe == "0" and not self._open_pages():
            return True  # a fresh copy's first step scans until it has a page
        limit = self._step_limit()  # under a rate ceiling, a step scans about its burst
        return more and (limit is None or self._scanned < limit)

    # -- the stream's hooks --------------------------------------------------------------------
    def _next_command(self, count: int, more: bool) -> tuple[Packed, Sent] | None:
        if self._wants_scan(count, more):
            return self._scan_packet(count), ("scan", None)
        take = min(count, len(self._queue) // 2)
        if not take:
            return None
        items = self._queue[: 2 * take]
        del self._queue[: 2 * take]
        parts = [_TIME]
        n, h, heads, pair = len(self.shard_keys), self._hash, self._heads, _PAIR
        touched = self._touched if len(self._touched) < n else None
        for i in range(0, len(items), 2):
            m, v = items[i], items[i + 1]
            s = h(m) % n
            if touched is not None:
                touched.add(s)
            parts += (heads[s], pair % (len(m), m, len(v), v))
        parts.append(_TIME)
        return Packed(b"".join(parts), take + 2), ("packet", items)

    def _received(self, sent: Sent, reply: Any) -> tuple[int, float, int]:
        elapsed = _server_us(reply[0], reply[-1])
        if sent[0] == "scan":
            if not reply[1]:
                # Expired (its shards expire with it) or deleted outside the shim: inserts of
                # what was scanned would bring members back, in shards without a deadline.
                raise SourceVanished(
                    f"the source key {self.source_key} disappeared during the copy (it expired, "
                    "or was deleted outside the shim)",
                    hint="the job stops here; `migrator rollback NAME` removes the shards",
                )
            nxt, found = reply[2]
            found = _bytes(found) if found and not isinstance(found[0], bytes) else found
            scanned = len(found) // 2
            self._scanned += scanned
            self._scan_cursor = _cursor(nxt)
            self._scan_done = self._scan_cursor == "0"
            self._take_page(found, scanned)
            return 0, elapsed, scanned
        members = len(sent[1]) // 2
        self.packets += 1
        inserted = sum(reply[1:-1])
        self.inserted += inserted
        self.present += members - inserted
        self._acknowledge(members)
        return members, elapsed, members

    def _lost(self, sent: Sent) -> None:
        # Called newest first: each packet's members go back in front, in their order. A lost
        # scan left the cursor where it was: it is sent again.
        if sent[0] == "packet":
            self._queue[0:0] = sent[1]

    def _must_go_on(self) -> bool:
        # A fresh copy's first step goes on until its first page is done, since "0" would
        # mean the copy is finished. Otherwise a step may end with members scanned and not yet
        # sent: they wait for the next step (a paused copy inserts them when it resumes, which
        # the marks make safe however old the values are), and the step counts only the pages
        # it completed, so a resume from its cursor inserts nothing again that was counted.
        return not self._done and self._safe == "0"

    def _finished(self) -> bool:
        return self._done

    def step(self, cursor: str, count: int) -> Step:
        """Stream up to ``step_scripts`` packets; return once all sent are acknowledged.

        ``cursor`` is the checkpoint the previous step returned (or the one to resume from).
        Idempotent: re-running a step after a connection error inserts the same members again,
        which is a no-op for those already in.
        """
        if cursor != self._safe or self._done:
            self._reset(cursor)
        self._scanned = self._completed = 0  # this step's
        _acked, worst, members = self._stream(count)
        self._follow_ttl(range(len(self.shard_keys)) if self._done else self._touched)
        self._touched = set()
        return Step(
            self._safe or "0", self._completed, worst, members, observed=self.sizer is not None
        )

    def rescan(self) -> None:
        """Drop what was scanned and not yet inserted; the next step scans again from the
        checkpoint (the last complete page's cursor), reading current values."""
        self._reset(self._safe or "0")

    @property
    def insert(self) -> str:
        """How the copy writes, for ``status``."""
        return "HSETNX, one member a command"

    def _follow_ttl(self, shards: Any) -> None:
        """Give shards the source's deadline (or none, as the source has): each shard once,
        when the copy first inserts into it, and all of them at the end (the source may have
        got, moved or lost one meanwhile)."""
        todo = [s for s in shards if self._done or s not in self._ttl_done]
        follow_deadline(
            self.scripts, self.source_key, [self.shard_keys[s] for s in todo], self.budget_us
        )
        self._ttl_done.update(todo)

    def sync(
        self,
        members: Sequence[bytes],
        *,
        chunk: int = 100,
        found: int = -1,
        sizer: BatchSizer | None = None,
    ) -> float:
        """Make ``members`` in the shards equal to the source; return the largest server time.
        ``sizer``: each script carries its batch and is shown to it (``chunk`` otherwise)."""
        worst = 0.0
        n = len(self.shard_keys)
        for part in chunks(members, chunk, sizer):
            named = [(m, self._hash(m) % n, found) for m in part]
            keys, args, _ = member_keys(self.source_key, self.shard_keys, named)
            # One script a round trip (as verifier.recheck): never several budgets in a row.
            check_fence(self.fence)
            _written, _removed, elapsed = self.scripts.hash_sync(keys, args, client=self.client)
            if sizer is not None:
                sizer.observe(float(elapsed), len(part))
            worst = max(worst, float(elapsed))
        return worst


#: Members the grouped copy holds at most while it gathers groups (its memory does not grow
#: with the key): with 100 shards, groups of 32; with over 1024 shards, groups would be too
#: small to be worth it and the copy inserts a member at a time.
HELD_MEMBERS = 4096
MAX_GROUP = 32
MIN_GROUP = 4


def insert_group(client: redis.Redis, shards: int, probe_key: str) -> int:
    """Members of one shard the copy inserts with one ``HSETEX key FNX`` where the server has
    it (Valkey 9, Redis 8), or 0: one HSETNX a member.

    Asks by running ``HSETEX probe_key FXX`` (set only fields that exist) on ``probe_key``, a key
    of ours that does not exist, so nothing is written; an unknown, renamed or forbidden
    command means no."""
    group = min(MAX_GROUP, HELD_MEMBERS // max(1, shards))
    if group < MIN_GROUP:
        return 0
    try:
        client.execute_command("HSETEX", probe_key, "FXX", "FIELDS", 1, "f", "v")
    except redis.ResponseError:
        return 0
    return group


class GroupedHashCopier(HashCopier):
    """The copy for servers with ``HSETEX ... FNX``: the same scan, and inserts of up to
    ``group`` members of one shard per command.

    ``HSETEX shard FNX FIELDS n f1 v1 ...`` sets all its fields if none of them exists, and
    none otherwise, atomically; so where it succeeds it did what n HSETNX would have done, and
    where one of its members is already in the shard (a shim wrote it, or left a mark) it does
    nothing, and its members are inserted one HSETNX each. The safety argument of
    :class:`HashCopier` holds member by member. The server parses one command for ``group``
    members instead of one per member: bench_server.py measured ~0.7 µs of server CPU a member
    against ~1.8 for HSETNX on Valkey 9.

    Scanned members wait in one bucket per shard until it holds a group (at most
    :data:`HELD_MEMBERS` in all), so members leave in another order than they were scanned: each
    carries the number of its scan page, and a page is complete (its cursor a checkpoint) once
    all its members and those of every earlier page are acknowledged. A packet carries groups
    (and members refused as part of a group, one HSETNX each) up to the batch size; a batch
    smaller than a group sends part of one. Where most of the last 64 groups were refused (the
    application rewrote most of the key during the copy), groups go as HSETNX, bar every 16th.
    Buckets that never fill are sent when the scan is over, by a fresh copy's first step, whose
    first page must be completed, and under a rate ceiling, whose steps complete the pages they
    scan.
    """

    def __init__(self, *args: Any, group: int, **kwargs: Any) -> None:
        self.group = max(1, group)
        super().__init__(*args, **kwargs)
        self._group_heads = [_bulk(k.encode()) for k in self.shard_keys]

    def _reset(self, cursor: str) -> None:
        super()._reset(cursor)
        # Per shard: member, value, page, member, value, page, ...
        self._buckets: list[list[Any]] = [[] for _ in self.shard_keys]
        self._ready: deque[int] = deque()  # shards whose bucket held a group when last filled
        self._held = 0  # members in the buckets
        self._retry: list[Any] = []  # member, shard, value, page: refused with their group
        # Scan pages not yet complete, by number, oldest first: [members unacknowledged, the
        # cursor after the page, its members].
        self._open: dict[int, list[Any]] = {}
        self._page_no = 0
        self._groups = 0  # groups taken from buckets
        self._outcomes: deque[bool] = deque(maxlen=64)  # the last HSETEX groups: set, refused

    # -- pages ---------------------------------------------------------------------------------
    def _take_page(self, found: list[bytes], scanned: int) -> None:
        page = self._page_no
        self._page_no += 1
        self._open[page] = [scanned, self._scan_cursor, scanned]
        n, h, buckets, full = len(self.shard_keys), self._hash, self._buckets, 3 * self.group
        ready = self._ready
        for i in range(0, len(found), 2):
            m = found[i]
            s = h(m) % n
            bucket = buckets[s]
            bucket += (m, found[i + 1], page)
            if len(bucket) == full:
                ready.append(s)
        self._held += scanned
        self._settle()  # an empty page after complete ones is complete at once

    def _settle(self) -> None:
        opened = self._open
        while opened:
            page = next(iter(opened))
            left, cursor, size = opened[page]
            if left:
                break
            del opened[page]
            self._safe = cursor
            self._completed += size
            self._done = cursor == "0"

    def _ack(self, pages: list[int]) -> None:
        opened = self._open
        for page in pages:
            opened[page][0] -= 1
        self._settle()

    # -- the stream's hooks --------------------------------------------------------------------
    def _in_hand(self) -> int:
        return len(self._ready) * self.group + len(self._retry) // 4

    def _open_pages(self) -> int:
        return len(self._open)

    def _next_command(self, count: int, more: bool) -> tuple[Packed, Sent] | None:
        if self._wants_scan(count, more):
            return self._scan_packet(count), ("scan", None)
        parts = [_TIME]
        sent: list[tuple[int, list[Any]]] = []  # (shard, member, value, page...) or (-1, retry)
        members = 0
        retry = self._retry
        while retry and members < count:
            item = retry[:4]
            del retry[:4]
            m, s, v = item[0], item[1], item[2]
            parts += (self._heads[s], _PAIR % (len(m), m, len(v), v))
            sent.append((-1, item))
            members += 1
        buckets, ready = self._buckets, self._ready
        while members < count and ready:
            s = ready[0]
            members += self._take_group(s, count - members, parts, sent)
            if len(buckets[s]) < 3 * self.group:
                ready.popleft()
        # Buckets that will not fill: the scan is over, or a fresh copy's first step must
        # complete its first page, or a rate ceiling holds each step to its burst (the step
        # completes the pages it scanned, so the ceiling is charged as it goes).
        if members < count and self._held and self._flush_partial():
            for s, bucket in enumerate(buckets):
                if members >= count:
                    break
                if bucket:
                    members += self._take_group(s, count - members, parts, sent)
        if not members:
            return None
        parts.append(_TIME)
        return Packed(b"".join(parts), len(sent) + 2), ("packet", sent)

    def _flush_partial(self) -> bool:
        return self._scan_done or self._must_go_on() or self._step_limit() is not None

    @property
    def insert(self) -> str:
        outcomes = self._outcomes
        how = f"HSETEX FNX, up to {self.group} members of a shard a command"
        if len(outcomes) >= 16 and outcomes.count(False) * 2 > len(outcomes):
            how += " (most groups lately found a member there: HSETNX, one member a command)"
        return how

    def _grouping(self) -> bool:
        """Whether the next group goes as one HSETEX: unless most of the last groups were
        refused (every member a shim touched is in its shard, so where the application rewrote
        most of the key during the copy, most groups hold one); every 16th goes regardless, to
        notice when that changes."""
        self._groups += 1
        outcomes = self._outcomes
        if len(outcomes) < 16 or self._groups % 16 == 0:
            return True
        return outcomes.count(False) * 2 <= len(outcomes)

    def _take_group(self, s: int, most: int, parts: list[bytes], sent: list[Any]) -> int:
        bucket = self._buckets[s]
        take = min(self.group, most, len(bucket) // 3)
        if not take:
            return 0
        items = bucket[: 3 * take]
        del bucket[: 3 * take]
        self._held -= take
        if len(self._touched) < len(self.shard_keys):
            self._touched.add(s)
        if not self._grouping():
            # Most groups lately found a member there: one HSETNX each, without the HSETEX
            # that would be refused first.
            head = self._heads[s]
            for i in range(0, len(items), 3):
                m, v = items[i], items[i + 1]
                parts += (head, _PAIR % (len(m), m, len(v), v))
                sent.append((-1, [m, s, v, items[i + 2]]))
            return take
        pair = _PAIR
        fields = [
            pair % (len(m), m, len(v), v) for m, v in zip(items[0::3], items[1::3], strict=True)
        ]
        parts.append(
            b"*%d\r\n$6\r\nHSETEX\r\n%b$3\r\nFNX\r\n$6\r\nFIELDS\r\n$%d\r\n%d\r\n"
            % (5 + 2 * take, self._group_heads[s], len(str(take)), take)
        )
        parts += fields
        sent.append((s, items))
        return take

    def _received(self, sent: Sent, reply: Any) -> tuple[int, float, int]:
        if sent[0] == "scan":
            return super()._received(sent, reply)
        elapsed = _server_us(reply[0], reply[-1])
        self.packets += 1
        acked: list[int] = []
        carried = 0
        for (s, items), r in zip(sent[1], reply[1:-1], strict=True):
            if s < 0:  # one member, by HSETNX
                carried += 1
                self.inserted += r
                self.present += 1 - r
                acked.append(items[3])
                continue
            carried += len(items) // 3
            self._outcomes.append(bool(r))
            if r:
                self.inserted += len(items) // 3
                acked += items[2::3]
            else:
                # One of them is in the shard already: each is inserted on its own.
                for i in range(0, len(items), 3):
                    self._retry += (items[i], s, items[i + 1], items[i + 2])
        self._ack(acked)
        return len(acked), elapsed, carried

    def _lost(self, sent: Sent) -> None:
        if sent[0] != "packet":
            return
        for s, items in reversed(sent[1]):
            if s < 0:
                self._retry[0:0] = items
            else:
                bucket = self._buckets[s]
                bucket[0:0] = items
                self._held += len(items) // 3
                if len(bucket) >= 3 * self.group:
                    self._ready.append(s)


def hash_copier(
    client: redis.Redis,
    scripts: Scripts,
    source_key: str,
    shard_keys: Sequence[str],
    budget_us: float,
    *,
    probe_key: str,
    **kwargs: Any,
) -> HashCopier:
    """The copier for this server: grouped inserts where it has ``HSETEX ... FNX``
    (:func:`insert_group`), one HSETNX a member otherwise."""
    group = insert_group(client, len(shard_keys), probe_key)
    if group:
        return GroupedHashCopier(
            client, scripts, source_key, shard_keys, budget_us, group=group, **kwargs
        )
    return HashCopier(client, scripts, source_key, shard_keys, budget_us, **kwargs)
