"""What migrator's own connections sent, as the server's SLOWLOG logged it, and which of those
commands ran past the server-time budget because of their work (overruns) rather than because
the host stalled the server mid-command (stalls). Used by the whole-life test and by
``scripts/bench`` (docs/decisions.md, "Server time: what the budget measures")."""

from __future__ import annotations

import hashlib
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from migrator.redisio.scripts import source

#: SLOWLOG cuts a command past 32 arguments, the last one saying how many it left out.
_MORE_ARGS = re.compile(rb" ?\.\.\. \((\d+) more arguments\)$")
_DELETE_STEP = hashlib.sha1(source("delete_step").encode()).hexdigest().encode()
#: Commands whose cost is bounded by their arguments (Valkey also logs those a script runs).
_BOUNDED = {
    b"HMGET", b"HSET", b"HDEL", b"HGET", b"HEXISTS", b"HSETNX", b"HSETEX", b"HINCRBY",
    b"HINCRBYFLOAT",
    b"EXISTS", b"TYPE", b"TIME", b"PTTL", b"PEXPIRETIME", b"PEXPIREAT",
    b"INFO", b"PING",  # the gates' probes: nothing to do with the key's size
}  # fmt: skip


@dataclass(frozen=True)
class Sent:
    """One command migrator's own connections sent (CLIENT SETNAME migrator:<job>), as a
    SLOWLOG at threshold 0 logged it: its server time, what it was and how much work it did."""

    duration_us: int
    command: bytes

    def _words(self) -> tuple[list[bytes], int]:
        more = _MORE_ARGS.search(self.command)
        text = self.command[: more.start()] if more else self.command
        return text.split(b" "), int(more.group(1)) if more else 0

    @property
    def kind(self) -> tuple[bytes, ...] | None:
        """What its peers share; None for a command whose cost its arguments do not bound
        (a whole-key read or delete, EVAL of a script given as text, ...): never excused."""
        words, _ = self._words()
        name = words[0].upper()
        if name.endswith(b"SCAN") or name == b"HRANDFIELD":
            return (name,)
        if name == b"UNLINK" and len(words) == 2:
            # One key: the command thread unlinks it and hands a big value (over lazyfree's
            # 64 elements) to a background thread to free, so its cost does not grow with
            # the key; peers unlinking keys of the same size vouch for it.
            return (name,)
        if name == b"EVALSHA":
            return (name, words[1])  # a script by its sha
        return (name,) if name in _BOUNDED else None

    @property
    def work(self) -> int:
        """Members the command touches, near enough: a scan's COUNT, a delete step's count,
        a script's number of arguments, another command's arguments after its key."""
        words, more = self._words()
        name = words[0].upper()
        if name.endswith(b"SCAN"):
            upper = [w.upper() for w in words]
            return int(words[upper.index(b"COUNT") + 1]) if b"COUNT" in upper else 10
        if name == b"HRANDFIELD":  # HRANDFIELD key [count [WITHVALUES]]
            return abs(int(words[2])) if len(words) > 2 else 1
        if name == b"EVALSHA":
            if words[1] == _DELETE_STEP:
                return max(1, int(words[-1]))
            return max(1, len(words) + more - 3 - int(words[2]))
        return max(1, len(words) + more - 2)


def runner_sent(client: redis.Redis, max_len: int, name: bytes = b"migrator:") -> list[Sent]:
    """Every command of migrator's connections (client names starting with ``name``) in a
    SLOWLOG kept at threshold 0."""
    assert client.slowlog_len() < max_len, "the slow log filled up: entries were lost"
    return [
        Sent(e["duration"], e["command"])
        for e in client.slowlog_get(max_len)
        if (e.get("client_name") or b"").startswith(name)
    ]


def calibrate(url: str, key: str, name: str = "migrator-calibration") -> None:
    """Give the runner's one-off commands on ``key`` peers to be judged by (``over_budget``):
    from a connection named ``name``, send the preflight's field sample nine times, and
    unlink seven copies of ``key`` (COPY, Redis 6.2+), as cleanup unlinks the key itself.
    Read them back with ``runner_sent(client, max_len, name)``."""
    client = redis.Redis.from_url(url)
    try:
        client.client_setname(name)
        for _ in range(9):
            client.hrandfield(key, 100)
            client.hrandfield(key, 100, withvalues=True)
        for i in range(7):
            copy = f"{key}:calibration:{i}"
            assert client.copy(key, copy), f"{copy} already exists"
            client.unlink(copy)
    finally:
        client.close()


def over_budget(
    sent: Sequence[Sent], budget_us: float, peers: Sequence[Sent] | None = None
) -> tuple[list[Sent], list[Sent]]:
    """The runner's commands that took over ``budget_us`` of wall time: (overruns, stalls).

    SLOWLOG counts wall time, so a host stall (the hypervisor taking the server's vCPU, ~1 to
    4 ms a few times a minute on the test VMs, whatever the server runs) lands on a random
    command. A stall is a command whose work, at the median rate of its peers (at least five
    commands of its kind), should have taken well within the budget (at most 80% of it, where
    the batch sizer halves), and which took over twice that. Anything else over the budget
    is an overrun: more work than the budget allows, a kind whose cost its arguments do not
    bound (a whole-key command), or a one-off with no peers to vouch for it.

    The peers are ``sent`` itself unless ``peers`` is given: the commands of another run logged
    at threshold 0, where ``sent`` holds only what a higher threshold kept.
    """
    by_kind: dict[tuple[bytes, ...], list[Sent]] = defaultdict(list)
    for s in sent if peers is None else peers:
        if (kind := s.kind) is not None:
            by_kind[kind].append(s)
    overruns, stalls = [], []
    for s in sent:
        if s.duration_us <= budget_us:
            continue
        kind = s.kind
        peers = [p for p in by_kind[kind] if p is not s] if kind is not None else []
        if len(peers) >= 5:
            predicted = statistics.median(p.duration_us / p.work for p in peers) * s.work
            if predicted <= 0.8 * budget_us and s.duration_us >= 2 * predicted:
                stalls.append(s)
                continue
        overruns.append(s)
    return overruns, stalls
