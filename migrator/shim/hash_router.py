"""ShardRouter: the Hash commands of one big key, routed by the live phase of its migration job.

What each call does, by phase (from the control record, cached and refreshed in the
background; see :mod:`migrator.shim.watcher`):

============================  ===========================  ====================================
phase                         writes                       reads (then the loader on a miss)
============================  ===========================  ====================================
no record, planned,           source key                   source key
rolling_back, rolled_back
dual_write … verified         source, then shard (script)  source key
gray (ratio r)                source, then shard (script)  members with bucket < r: shard, then
                                                           source; the others: source key
cutover                       source, then shard (script)  shard, then source
cleaning, done                shard                        shard
============================  ===========================  ====================================

Loader results are **never written back** to Redis. A loader reads the database at some moment
and returns later; a write-back racing a concurrent ``hdel`` (or a newer ``hset``) through
another instance would resurrect the deleted member or revert the newer value, in the source
*and* in the shards, which is exactly what SPEC §1 forbids. Whether and how to cache a database
value is the application's policy; it can ``hset`` through the router itself, under its own
locking or versioning.

Return types follow the client (bytes, or str with ``decode_responses=True``) as with redis-py;
values from the loader are returned as the loader returned them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import redis

from migrator import keys
from migrator.control import ControlRecord
from migrator.phases import TOMBSTONE, marks_deletes
from migrator.redisio.scripts import source as script_source
from migrator.routing import shard_of
from migrator.shim import counters as c
from migrator.shim.dual import DualCall, DualWriter, FencedOldWriter, stale
from migrator.shim.errors import ShimError, ShimNotConfigured, ShimReservedValue, ShimWrongType
from migrator.shim.routes import (
    ReadPath,
    WriteMode,
    read_path,
    scans_shards,
    shadow_read,
    write_mode,
)
from migrator.shim.watcher import ControlWatcher

log = logging.getLogger("migrator.shim")

#: ``loader(member)`` → the member's value from the system of record, or None when it has none.
Loader = Callable[[Any], Any]

#: Attempts at a dual write whose record keeps moving on under it (each refresh reads the
#: record afresh; a phase change takes one).
_STALE_RETRIES = 5


# How each write op is sent as a plain command (old-only and shards-only phases); ``target`` is
# a client or a pipeline, ``args`` the op's arguments exactly as hash_dual.lua takes them.
_PLAIN: dict[str, Callable[[Any, str, list[Any]], Any]] = {
    "hset": lambda t, key, args: t.hset(key, items=args),
    "hdel": lambda t, key, args: t.hdel(key, *args),
    "hsetnx": lambda t, key, args: t.hsetnx(key, *args),
    "hincrby": lambda t, key, args: t.hincrby(key, *args),
    "hincrbyfloat": lambda t, key, args: t.hincrbyfloat(key, *args),
}


class ShardRouter:
    """A big Hash as the application sees it, before, during and after its split.

    Create with :meth:`attach`. Thread-safe (share one per process and job); call
    :meth:`close` on shutdown. Never sends an O(N) command: there is no ``hgetall``, and
    :meth:`hscan_iter` / :meth:`hlen` are cursor-based or O(1) per key.
    """

    def __init__(
        self,
        client: redis.Redis,
        watcher: ControlWatcher,
        *,
        loader: Loader | None = None,
        source_key: str | None = None,
    ) -> None:
        # Any: redis-py annotates its commands as "result | Awaitable[result]" (sync and async
        # share the stubs); this client is always the synchronous one.
        self._client: Any = client
        self._watcher = watcher
        self._loader = loader
        self._source_key = source_key
        self._dual = DualWriter(client)
        self._old = FencedOldWriter(client)
        self._expire_script = client.register_script(script_source("hash_expire"))

    @classmethod
    def attach(
        cls,
        client: redis.Redis,
        name: str,
        loader: Loader | None = None,
        *,
        source_key: str | None = None,
        refresh_interval: float = 0.5,
        instance_id: str | None = None,
        flush_interval: float = 5.0,
    ) -> ShardRouter:
        """Attach to job ``name``: read its control record now, then keep it fresh.

        Attaching before the job exists (no control record yet) is normal: the router then
        passes every call through to ``source_key``, and follows the job as soon as the runner
        publishes it. The source key name is only known from the record, so without a record
        *and* without ``source_key``, data calls raise :class:`ShimNotConfigured`. Once a record
        exists its ``source_key`` wins (a different ``source_key=`` is logged and ignored).

        Registers this process as a live instance (heartbeat) before returning; raises the
        ``redis.RedisError`` when the server cannot be reached, since routing blind could lose
        writes. ``refresh_interval`` (≤ 1 s) is how often the record is re-read and the
        heartbeat sent; ``flush_interval`` how often counters are written to Redis.
        """
        watcher = ControlWatcher(
            client,
            name,
            refresh_interval=refresh_interval,
            flush_interval=flush_interval,
            instance_id=instance_id,
        )
        watcher.start()
        record = watcher.record
        if record is not None and source_key is not None and record.source_key != source_key:
            log.warning(
                "migrator shim %s: source_key=%r differs from the control record's %r; "
                "using the record's",
                name,
                source_key,
                record.source_key,
            )
        return cls(client, watcher, loader=loader, source_key=source_key)

    # -- observability ----------------------------------------------------------------------

    @property
    def job(self) -> str:
        return self._watcher.job

    @property
    def instance_id(self) -> str:
        """This process's id in the heartbeats and counters (``<host>:<pid>:<random>``)."""
        return self._watcher.instance_id

    @property
    def record(self) -> ControlRecord | None:
        """The control record calls use now (None before the job is published)."""
        return self._watcher.record

    @property
    def applied_epoch(self) -> int:
        """The epoch acknowledged in the heartbeat: no call of an older record is in flight."""
        return self._watcher.tracker.applied_epoch()

    @property
    def in_flight(self) -> int:
        """Calls of this router whose Redis work is under way right now (all threads)."""
        return self._watcher.tracker.in_flight()

    def counters(self) -> dict[str, int]:
        """This process's counters since attach (what is flushed to Redis, cumulatively)."""
        return self._watcher.counters.totals()

    def read_path(self, member: Any) -> ReadPath:
        """The path a read of ``member`` takes now (drawn afresh with random bucketing)."""
        return read_path(self._watcher.record, member)

    # -- writes -----------------------------------------------------------------------------

    def hset(
        self, member: Any = None, value: Any = None, mapping: Mapping[Any, Any] | None = None
    ) -> int:
        """Set ``member`` to ``value`` and/or every pair of ``mapping``; returns new fields.

        Raises :class:`ShimReservedValue`, writing nothing, for a value equal to the delete
        mark (``phases.TOMBSTONE``)."""
        items: list[tuple[Any, ...]] = []
        if member is not None:
            items.append((member, value))
        if mapping:
            items.extend(mapping.items())
        if not items:
            raise redis.DataError("'hset' with no key value pairs")
        for m, v in items:
            _refuse_mark(m, v)
        return sum(int(r) for r in self._write("hset", items))

    def hsetnx(self, member: Any, value: Any) -> int:
        """Set ``member`` only if absent; 1 when it was set, like redis-py. Refuses the delete
        mark as :meth:`hset` does."""
        _refuse_mark(member, value)
        return int(self._write("hsetnx", [(member, value)])[0])

    def hdel(self, *members: Any) -> int:
        """Delete members; returns how many existed."""
        if not members:
            return 0
        return sum(int(r) for r in self._write("hdel", [(m,) for m in members]))

    def hincrby(self, member: Any, amount: int = 1) -> int:
        return int(self._write("hincrby", [(member, amount)])[0])

    def hincrbyfloat(self, member: Any, amount: float = 1.0) -> float:
        return float(self._write("hincrbyfloat", [(member, amount)])[0])

    def _write(self, op: str, items: list[tuple[Any, ...]]) -> list[Any]:
        """Apply ``op`` to ``items`` (each: member, then its arguments); raw results per command.

        Multi-member calls send one command or script per shard touched, in one round trip.
        A dual write refused as stale (the record moved on while it was under way) wrote
        nothing: its members are routed again by the record read afresh.
        """
        results: list[Any] = []
        for _ in range(_STALE_RETRIES):
            done, again = self._write_once(op, items)
            results += done
            if not again:
                return results
            self._watcher.counters.add(c.STALE_RETRIES, len(again))
            self._watcher.refresh()
            items = again
        raise ShimError(
            f"the control record of job {self.job!r} kept moving on while writing "
            f"{len(items)} member(s); nothing of those was written"
        )

    def _write_once(
        self, op: str, items: list[tuple[Any, ...]]
    ) -> tuple[list[Any], list[tuple[Any, ...]]]:
        """One attempt: (results, items to route again)."""
        with self._watcher.call() as record:
            source = self._source(record)
            mode = write_mode(record)
            if mode is WriteMode.OLD and record is None:
                return [_PLAIN[op](self._client, source, _flat(items))], []
            assert record is not None  # DUAL and SHARDS need a record
            fence = (keys.control(record.job), record.epoch)
            if mode is WriteMode.OLD:
                # planned, rolled_back: fenced as dual writes are, so a call held up past the
                # move to dual_write cannot land on the old key alone beside the copy.
                out = self._old.run(source, [op, *_flat(items)], fence)
                return ([], items) if stale(out) else ([out], [])
            groups = _by_shard(record, items)
            if mode is WriteMode.DUAL or mode is WriteMode.MIRROR:
                script_op = op
                if op == "hdel" and mode is WriteMode.DUAL and marks_deletes(record.phase):
                    script_op = "hdel_mark"  # the copy may run: leave a mark (phases.TOMBSTONE)
                # DualCall's first key is the one written first, whose result the other takes.
                calls = [
                    DualCall(source, key, [script_op, *_flat(g)], fence)
                    if mode is WriteMode.DUAL
                    else DualCall(key, source, [script_op, *_flat(g)], fence)
                    for key, g in groups.items()
                ]
                try:
                    out = self._dual.run(calls)
                except Exception:
                    self._watcher.counters.add(c.DUAL_WRITE_ERRORS)
                    raise
                again = [
                    item
                    for r, g in zip(out, groups.values(), strict=True)
                    if stale(r)
                    for item in g
                ]
                return [r for r in out if not stale(r)], again
            pipe = self._client.pipeline(transaction=False)
            for key, group in groups.items():
                _PLAIN[op](pipe, key, _flat(group))
            return list(pipe.execute()), []

    # -- expiry -----------------------------------------------------------------------------
    # The logical hash's deadline, on the keys the phase writes: the source before the split,
    # the source and every shard while both are kept equal, the shards from the old key's
    # retirement on (where a plain EXPIRE on the old key would reach nothing). All keys get the
    # same absolute deadline, by the server's clock. No NX/XX/GT/LT options. Once only shards
    # are written, a shard created after the call (one that was empty: rare in a big key)
    # starts without the deadline, as a new key does; the next call gives it one.

    def expire(self, time: int | timedelta) -> bool:
        """Expire the hash in ``time`` seconds; False when it does not exist (as EXPIRE)."""
        seconds = time.total_seconds() if isinstance(time, timedelta) else time
        return self._set_expiry("in", int(seconds * 1000))

    def pexpire(self, time: int | timedelta) -> bool:
        """Expire the hash in ``time`` milliseconds."""
        ms = time.total_seconds() * 1000 if isinstance(time, timedelta) else time
        return self._set_expiry("in", int(ms))

    def expireat(self, when: int | datetime) -> bool:
        """Expire the hash at ``when`` (unix seconds, or a datetime)."""
        seconds = when.timestamp() if isinstance(when, datetime) else when
        return self._set_expiry("at", int(seconds * 1000))

    def pexpireat(self, when: int | datetime) -> bool:
        """Expire the hash at ``when`` (unix milliseconds, or a datetime)."""
        ms = when.timestamp() * 1000 if isinstance(when, datetime) else when
        return self._set_expiry("at", int(ms))

    def persist(self) -> bool:
        """Remove the hash's deadline; True when it had one (as PERSIST)."""
        return self._set_expiry("persist", 0, persisted=True)

    def pttl(self) -> int:
        """Milliseconds the hash has left: -1 without a deadline, -2 when it does not exist.
        While the old key is kept, its PTTL; after, the longest-lived shard's (a shard the
        application expired with its own client may differ)."""
        with self._watcher.call() as record:
            if write_mode(record) is not WriteMode.SHARDS:
                return int(self._client.pttl(self._source(record)))
            assert record is not None
            pipe = self._client.pipeline(transaction=False)
            for shard in range(record.shards):
                pipe.pttl(record.shard_key(shard))
            left = [int(t) for t in pipe.execute() if int(t) != -2]
        if not left:
            return -2
        return -1 if -1 in left else max(left)

    def ttl(self) -> int:
        """Seconds the hash has left, rounded as TTL rounds; -1 / -2 as :meth:`pttl`."""
        ms = self.pttl()
        return ms if ms < 0 else (ms + 500) // 1000

    def _set_expiry(self, mode: str, value: int, *, persisted: bool = False) -> bool:
        """One hash_expire call over every key the phase writes: concurrent calls each set
        all of them, so the keys never end with two deadlines. O(keys) in one script (about
        2 µs a key on the test host: 0.2 ms at 100 shards, 2 ms at 1,000), an occasional call
        next to the application's reads and writes.
        While the old key is kept it is the hash (the gate): without it nothing is touched,
        and its result is the call's."""
        with self._watcher.call() as record:
            source = self._source(record)
            wm = write_mode(record)
            shards = (
                [record.shard_key(i) for i in range(record.shards)]
                if record is not None and wm is not WriteMode.OLD
                else []
            )
            gate = wm is not WriteMode.SHARDS
            keys_ = [source, *shards] if gate else shards
            got = self._expire_script(keys=keys_, args=[mode, value, int(gate)])
        return int(got[1]) > 0 if persisted else int(got[0]) > 0

    # -- reads ------------------------------------------------------------------------------

    def hget(self, member: Any) -> Any:
        """The member's value from Redis by its read path, else from the loader, else None."""
        return self.hmget([member])[0]

    def hmget(self, members: Iterable[Any], *more: Any) -> list[Any]:
        """Values in order (None where neither Redis nor the loader has one).

        Members are grouped by read path and shard: one pipelined round trip, plus one HMGET
        on the source for shard-path members the shard did not have.
        """
        wanted = [*([members] if isinstance(members, (str, bytes)) else members), *more]
        if not wanted:
            return []
        with self._watcher.call() as record:
            values = self._get_many(record, wanted)
        return self._load_missing(wanted, values)

    def hexists(self, member: Any) -> bool:
        """Whether Redis has the member on its read path (the loader is not consulted)."""
        with self._watcher.call() as record:
            source = self._source(record)
            path = read_path(record, member)
            if path is ReadPath.OLD:
                self._watcher.counters.add(c.READS_OLD)
                return bool(self._client.hexists(source, member))
            assert record is not None
            self._watcher.counters.add(c.READS_SHARD)
            if self._shard_holds(_shard_key(record, member), member):
                return True
            if path is ReadPath.SHARD_ONLY:
                return False
            self._watcher.counters.add(c.FALLBACKS)
            return bool(self._client.hexists(source, member))

    def _shard_holds(self, key: str, member: Any) -> bool:
        """HEXISTS on a shard, a delete mark (phases.TOMBSTONE) counting as absent: one round
        trip, and a second only for a value as long as a mark."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hexists(key, member)
        pipe.hstrlen(key, member)
        exists, length = pipe.execute()
        if not exists:
            return False
        if length != len(TOMBSTONE):
            return True
        # As long as a mark: read it. It may be gone since (a verify pass sweeping marks), and
        # a member gone from the shard is not held there either.
        value = self._client.hget(key, member)
        return value is not None and not _is_mark(value)

    def hlen(self) -> int:
        """Members in the logical hash: HLEN of the source, or the sum over shards once the
        source is being removed (cleaning, done). O(1) per key, one round trip."""
        with self._watcher.call() as record:
            source = self._source(record)
            if not scans_shards(record):
                return int(self._client.hlen(source))
            assert record is not None
            pipe = self._client.pipeline(transaction=False)
            for shard in range(record.shards):
                pipe.hlen(record.shard_key(shard))
            return sum(int(n) for n in pipe.execute())

    def hscan_iter(self, match: Any = None, count: int | None = None) -> Iterator[tuple[Any, Any]]:
        """(member, value) pairs of the logical hash, one HSCAN page per round trip.

        Before cleaning: HSCAN of the source key (complete until then). In cleaning/done: HSCAN
        of each shard in turn. Each page is routed by the record current when it is fetched,
        so an idle iterator never holds back the epoch acknowledgement; if cleaning starts
        mid-scan, the scan restarts over the shards. As with SCAN, a member present for the
        whole iteration is returned at least once, possibly more than once.
        """
        cursor, shard = 0, 0
        on_shards: bool | None = None
        while True:
            with self._watcher.call() as record:
                source = self._source(record)
                wants_shards = scans_shards(record)
                if on_shards is None or (wants_shards and not on_shards):
                    if on_shards is not None:
                        log.info(
                            "migrator shim %s: cleaning began mid-scan; rescanning shards", self.job
                        )
                    on_shards, cursor, shard = wants_shards, 0, 0
                shards = record.shards if record is not None else 0
                if on_shards:
                    assert record is not None
                    key = record.shard_key(shard)
                else:
                    key = source
                cursor, page = self._client.hscan(key, cursor, match=match, count=count)
            if on_shards:
                yield from ((m, v) for m, v in page.items() if not _is_mark(v))
            else:
                yield from page.items()
            if int(cursor) == 0:
                if not on_shards or shard + 1 >= shards:
                    return
                shard += 1

    def _get_many(self, record: ControlRecord | None, members: list[Any]) -> list[Any]:
        source = self._source(record)
        paths = [read_path(record, m) for m in members]
        # (key, member indexes, is_shadow): one HMGET each, all in one pipeline.
        reads: list[tuple[str, list[int], bool]] = []
        old = [i for i, p in enumerate(paths) if p is ReadPath.OLD]
        if old:
            reads.append((source, old, False))
        if record is not None:
            on_shards = [i for i, p in enumerate(paths) if p is not ReadPath.OLD]
            reads += [(k, idx, False) for k, idx in _index_by_shard(record, members, on_shards)]
            shadowed = [i for i in old if shadow_read(record)]
            reads += [(k, idx, True) for k, idx in _index_by_shard(record, members, shadowed)]
        pipe = self._client.pipeline(transaction=False)
        for key, idx, _ in reads:
            pipe.hmget(key, [members[i] for i in idx])
        values: list[Any] = [None] * len(members)
        shadow: dict[int, Any] = {}
        for (key, idx, is_shadow), got in zip(reads, pipe.execute(), strict=True):
            on_shard = key != source
            for i, v in zip(idx, got, strict=True):
                if on_shard and _is_mark(v):
                    v = None  # a delete made while the copy ran, not yet swept by verify
                if is_shadow:
                    shadow[i] = v
                else:
                    values[i] = v
        fallback = [i for i, p in enumerate(paths) if p is ReadPath.SHARD and values[i] is None]
        if fallback:
            got = self._client.hmget(source, [members[i] for i in fallback])
            for i, v in zip(fallback, got, strict=True):
                values[i] = v
        counters = self._watcher.counters
        counters.add(c.READS_OLD, len(old))
        counters.add(c.READS_SHARD, len(members) - len(old))
        counters.add(c.FALLBACKS, len(fallback))
        counters.add(c.SHADOW_MISMATCHES, sum(1 for i, v in shadow.items() if v != values[i]))
        return values

    def _load_missing(self, members: list[Any], values: list[Any]) -> list[Any]:
        # Outside the in-flight scope on purpose: the loader does not touch Redis, and a slow
        # database must not delay this instance's epoch acknowledgement. No write-back: see
        # the module docstring.
        if self._loader is None:
            return values
        for i, v in enumerate(values):
            if v is None:
                self._watcher.counters.add(c.LOADER_CALLS)
                values[i] = self._loader(members[i])
        return values

    # -- plumbing ---------------------------------------------------------------------------

    def _source(self, record: ControlRecord | None) -> str:
        if record is None:
            if self._source_key is None:
                raise ShimNotConfigured(
                    f"job {self.job!r} has no control record yet, so its source key is unknown",
                    hint="pass source_key= to ShardRouter.attach to pass calls through until "
                    "the job is published",
                )
            return self._source_key
        if record.source_type != "hash":
            raise ShimWrongType(
                f"job {self.job!r} migrates a {record.source_type}, not a hash; "
                f"ShardRouter serves Hash commands"
            )
        return record.source_key

    def close(self) -> None:
        """Stop the refresh thread and flush counters; later calls raise ShimClosed."""
        self._watcher.close()

    def __enter__(self) -> ShardRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_MARKS = (TOMBSTONE, TOMBSTONE.decode())


def _is_mark(value: Any) -> bool:
    """A delete mark (phases.TOMBSTONE), as bytes or as a decoding client returns it."""
    return value in _MARKS


def _refuse_mark(member: Any, value: Any) -> None:
    if isinstance(value, memoryview):  # redis-py sends it as it is
        value = value.tobytes()
    if isinstance(value, (bytes, str)) and _is_mark(value):
        raise ShimReservedValue(
            f"the value written to {member!r} is migrator's delete mark ({TOMBSTONE!r}), which "
            "reads through the shim take for an absent member; store another value"
        )


def _shard_key(record: ControlRecord, member: Any) -> str:
    """The member's shard, computed on the bytes the client sends for it (routing.to_bytes: a
    memoryview's contents, an int's digits, a str's UTF-8, as redis-py with hiredis sends it):
    the bytes the copy reads back and routes by."""
    return record.shard_key(shard_of(member, record.shards, record.hash))


def _by_shard(
    record: ControlRecord, items: list[tuple[Any, ...]]
) -> dict[str, list[tuple[Any, ...]]]:
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for item in items:
        groups.setdefault(_shard_key(record, item[0]), []).append(item)
    return groups


def _index_by_shard(
    record: ControlRecord, members: list[Any], indexes: list[int]
) -> list[tuple[str, list[int]]]:
    groups: dict[str, list[int]] = {}
    for i in indexes:
        groups.setdefault(_shard_key(record, members[i]), []).append(i)
    return list(groups.items())


def _flat(items: list[tuple[Any, ...]]) -> list[Any]:
    return [x for item in items for x in item]
