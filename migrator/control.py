"""The control record and app-instance heartbeats: how the runner steers live shims (SPEC §5-6).

The runner publishes a :class:`ControlRecord` (one HSET, so shims never see half of one) and
bumps ``epoch`` on every change of phase or ratio. Each shim re-reads it at least every second
and heartbeats the epoch it has *applied* (no call of an older epoch still in flight). The runner
moves on only when every live instance has acknowledged: :func:`wait_for_ack`.

Depends only on redis-py, keys and phases: the shim imports it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import redis

from migrator import keys
from migrator.errors import Interrupted
from migrator.phases import Phase

#: An instance whose last heartbeat is older than this is no longer live.
LIVE_WINDOW_S = 5.0
#: Heartbeat entries older than this are removed by the runner.
FORGET_AFTER_S = 3600.0

#: What this release's shim does that a runner relies on, sent in every heartbeat. 1: dual
#: writes and the barrier (shims from before the field existed report none, and count as 1).
#: 2: from dual_write until the copy is over, a delete leaves a mark in its shard
#: (``phases.TOMBSTONE``), which the copy's inserts need (copier.py).
PROTOCOL = 2
#: The protocol the copy needs of every live shim: deletes that leave marks.
MARKS_PROTOCOL = 2


@dataclass(frozen=True)
class ControlRecord:
    job: str
    phase: Phase
    ratio: int
    epoch: int
    source_key: str
    source_type: str
    template: str
    shards: int
    hash: str
    salt: str
    bucketing: str = "sticky"
    shadow_sample: float = 0.0
    #: In cleaning: 0 while shims still mirror writes into the old key (shard first, then old),
    #: 1 once the runner retired the old key (shards only). See Runner.cleanup.
    retire_old: int = 0

    def shard_key(self, shard: int) -> str:
        return self.template.replace("{shard}", str(shard))

    def to_hash(self) -> dict[str, str]:
        return {k: str(v.value if isinstance(v, Phase) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, h: Mapping[bytes | str, bytes | str]) -> ControlRecord:
        d = {_s(k): _s(v) for k, v in h.items()}
        ints = {"ratio", "epoch", "shards", "retire_old"}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            raw = d[f.name]
            if f.name == "phase":
                values[f.name] = Phase(raw)
            elif f.name in ints:
                values[f.name] = int(raw)
            elif f.name == "shadow_sample":
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)


@dataclass(frozen=True)
class Instance:
    id: str
    host: str
    pid: int
    epoch: int
    started: float
    last_seen_ms: int
    age_s: float
    protocol: int = 1

    @property
    def live(self) -> bool:
        return self.age_s <= LIVE_WINDOW_S


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


#: HSET the record unless the one published holds a later epoch: two commands racing (a
#: set-ratio and a rollback, a runner that read the job before waiting for its lease) can
#: publish out of order, and shims install whatever record differs from theirs.
_PUBLISH = """
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


def publish(client: redis.Redis, record: ControlRecord) -> bool:
    """Publish ``record``; False (nothing written) when a later epoch is published already:
    whoever moved the job on has published, or will publish, its own record."""
    flat = [x for kv in record.to_hash().items() for x in kv]
    return bool(client.eval(_PUBLISH, 1, keys.control(record.job), str(record.epoch), *flat))


def read(client: redis.Redis, job: str) -> ControlRecord | None:
    h = cast(dict, client.hgetall(keys.control(job)))
    return ControlRecord.from_hash(h) if h else None


def instances(client: redis.Redis, job: str) -> list[Instance]:
    """Every instance that ever heartbeated (and was not forgotten), live or not."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.instances(job))
    pipe.hgetall(keys.heartbeats(job))
    pipe.time()
    info, beats, (sec, usec) = pipe.execute()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    out = []
    for raw_id, raw in info.items():
        iid = _s(raw_id)
        seen = int(beats.get(raw_id, 0) or 0)
        d = json.loads(raw)
        out.append(
            Instance(
                iid,
                d.get("host", "?"),
                int(d.get("pid", 0)),
                int(d.get("epoch", 0)),
                float(d.get("started", 0)),
                seen,
                (now_ms - seen) / 1000.0,
                int(d.get("protocol", 1)),
            )
        )
    return sorted(out, key=lambda i: i.id)


def live_instances(client: redis.Redis, job: str) -> list[Instance]:
    return [i for i in instances(client, job) if i.live]


#: Where the counters of forgotten instances go (``<FOLDED>|<counter>``): a name no instance
#: id can clash with by accident, and none is folded into itself.
FOLDED = "(forgotten)"
#: Instances folded per script: about 16 µs of server time each, so 20 stay far inside the
#: runner's 1 ms budget.
FOLD_PER_CALL = 20
#: Folds the counter fields (``<instance>|<counter>``) of forgotten instances into
#: ``(forgotten)|<counter>``, which ``migrator status`` sums with the rest, then drops their
#: instance and heartbeat entries: one step, so a failure loses no count and orphans no field.
#: KEYS: counters, instances, heartbeats; ARGV[1] how many counter names follow, the names,
#: then the instance ids.
_FOLD = """
local n = tonumber(ARGV[1])
for i = n + 2, #ARGV do
  local id = ARGV[i]
  if id ~= '{FOLDED}' then
    for j = 2, n + 1 do
      local field = id .. '|' .. ARGV[j]
      local v = redis.call('HGET', KEYS[1], field)
      if v then
        redis.call('HINCRBY', KEYS[1], '{FOLDED}|' .. ARGV[j], v)
        redis.call('HDEL', KEYS[1], field)
      end
    end
  end
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
return 1
""".replace("{FOLDED}", FOLDED)


def forget_stale(client: redis.Redis, job: str, counters: Sequence[str] = ()) -> list[str]:
    """Drop the entries of instances silent for :data:`FORGET_AFTER_S`, so what ``status``
    and the barriers read whole stays the size of the fleet; their ``counters`` (names) are
    folded into totals, not lost. An autoscaled fleet would otherwise add entries forever.
    (Counter fields of instances forgotten by a release before this fold stay as they are.)"""
    stale = [i.id for i in instances(client, job) if i.age_s > FORGET_AFTER_S]
    fold = client.register_script(_FOLD)
    keys_ = [keys.counters(job), keys.instances(job), keys.heartbeats(job)]
    for i in range(0, len(stale), FOLD_PER_CALL):
        fold(keys=keys_, args=[len(counters), *counters, *stale[i : i + FOLD_PER_CALL]])
    return stale


def heartbeat(client: redis.Redis, job: str, instance_id: str, payload: dict[str, Any]) -> None:
    """Record an instance's applied epoch, stamped with the *server's* clock (no skew)."""
    client.eval(
        "local t = redis.call('TIME');"
        "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]);"
        "redis.call('HSET', KEYS[2], ARGV[1], t[1] * 1000 + math.floor(t[2] / 1000));"
        "return 1",
        2,
        keys.instances(job),
        keys.heartbeats(job),
        instance_id,
        json.dumps(payload),
    )


def laggards(live: list[Instance], epoch: int) -> list[Instance]:
    return [i for i in live if i.epoch < epoch]


def outdated(live: list[Instance], protocol: int) -> list[Instance]:
    """Live instances whose shim is older than ``protocol`` (a rolling deploy half done, or a
    process nobody restarted)."""
    return [i for i in live if i.protocol < protocol]


def wait_for_ack(
    client: redis.Redis,
    job: str,
    epoch: int,
    *,
    timeout: float,
    poll: float = 0.2,
    stop: threading.Event | None = None,
) -> list[Instance]:
    """Block until every live instance acknowledged ``epoch``; return them.

    Returns the (possibly empty) list of live instances once none lags; raises TimeoutError
    with the laggards after ``timeout`` seconds. An instance that stops heartbeating drops out
    of the live set after LIVE_WINDOW_S, so a crashed app process cannot hold the barrier.
    A set ``stop`` event ends the wait early with :class:`~migrator.errors.Interrupted`.
    """
    deadline = time.monotonic() + timeout
    while True:
        live = live_instances(client, job)
        behind = laggards(live, epoch)
        if not behind:
            return live
        if time.monotonic() >= deadline:
            raise TimeoutError(behind)
        if stop is None:
            time.sleep(poll)
        elif stop.wait(poll):
            raise Interrupted(
                f"stopped on request while waiting for epoch {epoch}",
                hint="run the same command again (or `migrator run`) to go on from there",
            )
