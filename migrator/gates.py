"""The runner's gates: reasons to hold copy, verify and cleanup work (``throttle.Gate``).

Every loop the runner drives asks its gates before each batch (each gate at most every
``interval`` seconds); any gate that answers holds the work, and its answer is the ``throttle``
reason ``migrator status`` shows. Defaults (:func:`default_gates`):

* :class:`PauseFileGate` — a file that exists: ``$MIGRATOR_PAUSE_FILE``, or ``pause`` (every
  job) / ``pause-NAME`` (one job) in the state directory (the SQLite state file's directory,
  ``.migrator/`` by default; ``.migrator/`` in the working directory for other stores).
* :class:`LatencyGate` — a PING, between batches, answered much slower than the idle baseline
  measured at start: another client is suffering.
* :class:`MemoryGate` — ``used_memory`` above 90% of ``maxmemory``.
* :class:`ReplicaLagGate` — a replica behind by more than 16 MiB of replication stream,
  silent for more than 5 s, or in a full resync.

The copy also asks :class:`ShimProtocolGate`, whatever gates the runner was given: a live app
instance whose shim is too old for it (its deletes leave no marks) holds the copy.

Gates hold the work; they never fail it: an error while checking is itself a reason to hold.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from sqlalchemy import exc as sa_exc

from migrator import control, store
from migrator.memory import PAUSE_AT, info, mb, memory_limit
from migrator.throttle import Gate

#: Environment variable naming one more pause file.
PAUSE_FILE_ENV = "MIGRATOR_PAUSE_FILE"


def state_dir(state_url: str | None) -> Path:
    """Where pause files live: next to the SQLite state file, else ``./.migrator``."""
    try:
        path = store.sqlite_file(store.state_url(state_url))
    except (ValueError, sa_exc.ArgumentError):  # a bad URL: the store refuses it itself
        path = None
    return path.parent if path is not None else Path(".migrator")


def pause_files(job: str, state_url: str | None) -> list[Path]:
    """The files whose existence pauses ``job``, in the order they are reported."""
    d = state_dir(state_url)
    files = [d / f"pause-{job}", d / "pause"]
    if os.environ.get(PAUSE_FILE_ENV):
        files.insert(0, Path(os.environ[PAUSE_FILE_ENV]))
    return files


class PauseFileGate(Gate):
    """Holds while any of ``paths`` exists (touch to pause, remove to resume)."""

    interval = 0.25

    def __init__(self, paths: Sequence[Path]) -> None:
        # Absolute, as status shows them: an operator in another directory touches this file.
        self.paths = [p.absolute() for p in paths]

    def check(self) -> str | None:
        for p in self.paths:
            if p.exists():
                return f"pause file {p}"
        return None


def thread_run_delay() -> float | None:
    """Seconds the calling thread has waited for a CPU while runnable, or None where the
    kernel does not say (/proc/thread-self/schedstat: on-CPU ns, run-delay ns, timeslices)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class LatencyGate(Gate):
    """Holds while the median of recent PING round trips is far above the idle baseline.

    The baseline is the median of a few probes at start, lowered whenever the server answers
    faster later (a runner started on a busy server learns the true idle value). Holds when the
    median of the last ``window`` probes exceeds both ``factor`` x baseline and baseline +
    ``floor_ms``; goes on once it is back under half that excess. The probes run between
    batches, so they measure what other clients meet, not the runner's own commands.

    A probe leaves out the time its thread waited for a CPU (``run_delay``: Linux's
    schedstat), or a runner at low priority on a busy host would measure its own wait for the
    CPU, not the server, and hold for nothing.
    """

    interval = 0.2

    def __init__(
        self,
        client: redis.Redis,
        *,
        factor: float = 3.0,
        floor_ms: float = 1.0,
        window: int = 5,
        clock: Callable[[], float] = time.perf_counter,
        run_delay: Callable[[], float | None] = thread_run_delay,
    ) -> None:
        self.client = client
        self.factor = factor
        self.floor_ms = floor_ms
        self._clock = clock
        self._run_delay = run_delay
        self.recent: deque[float] = deque(maxlen=window)
        self.baseline_ms = statistics.median(self._probe() for _ in range(window))
        self.holding = False

    def _probe(self) -> float:
        waited = self._run_delay()
        t = self._clock()
        self.client.ping()
        took = self._clock() - t
        after = self._run_delay()
        if waited is not None and after is not None:
            took -= after - waited
        return max(took, 0.0) * 1000.0

    def threshold_ms(self) -> float:
        return max(self.baseline_ms * self.factor, self.baseline_ms + self.floor_ms)

    def check(self) -> str | None:
        try:
            self.recent.append(self._probe())
        except redis.RedisError as e:
            return f"latency probe failed: {e}"
        median = statistics.median(self.recent)
        if len(self.recent) == self.recent.maxlen:
            self.baseline_ms = min(self.baseline_ms, median)
        limit = self.threshold_ms()
        resume_below = self.baseline_ms + (limit - self.baseline_ms) / 2
        self.holding = median > (resume_below if self.holding else limit)
        if self.holding:
            return (
                f"server latency: PING median {median:.2f} ms, idle {self.baseline_ms:.2f} ms "
                f"(holding above {limit:.2f} ms; if the path to the server changed for good, a "
                "failover to a farther host say, restart the runner: it learns the idle anew)"
            )
        return None


class MemoryGate(Gate):
    """Holds while ``used_memory`` is above ``pause_at`` of ``maxmemory`` (none set: of the
    host's memory, as the preflight plans).

    Checked often (INFO memory is cheap): a fast copy adds megabytes per second."""

    interval = 0.1

    def __init__(self, client: redis.Redis, *, pause_at: float = PAUSE_AT) -> None:
        self.client = client
        self.pause_at = pause_at

    def check(self) -> str | None:
        try:
            mem = info(self.client, "memory")
        except redis.RedisError as e:
            return f"memory check failed: {e}"
        used, limit = int(mem.get("used_memory", 0)), memory_limit(mem)
        if limit and used > self.pause_at * limit:
            of = "maxmemory" if int(mem.get("maxmemory", 0)) else "the host's memory"
            return (
                f"memory: used_memory {mb(used)} is {used / limit:.0%} of {of} {mb(limit)} "
                f"(holding above {self.pause_at:.0%})"
            )
        return None


_SLAVE = re.compile(r"^slave\d+$")


class ReplicaLagGate(Gate):
    """Holds while a replica is more than ``max_bytes`` of replication stream behind the
    primary, has not acknowledged for more than ``max_silence_s`` seconds, or is in a full
    resync. Replicas acknowledge once a second, so the byte lag includes up to a second of
    stream.

    A replica the primary dropped (silent past ``repl-timeout``) is no longer listed, but it
    is still behind: the gate holds for up to ``max_absent_s`` after it last saw it, so that
    a replica back from a restart or a partition can catch up from the backlog instead of a
    full resync; one gone longer is taken for removed and no longer waited for."""

    interval = 0.5

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_bytes: int = 16 * 1_048_576,
        max_silence_s: int = 5,
        max_absent_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.max_silence_s = max_silence_s
        self.max_absent_s = max_absent_s
        self._clock = clock
        self.seen: dict[str, float] = {}  # ip:port -> when it was last listed
        self._replid: str | None = None  # whose replicas ``seen`` holds

    def check(self) -> str | None:
        try:
            repl = info(self.client, "replication")
        except redis.RedisError as e:
            return f"replica check failed: {e}"
        if repl.get("role") != "master":
            return None
        offset = int(repl.get("master_repl_offset", 0))
        worst: list[str] = []
        now = self._clock()
        if repl.get("master_replid") != self._replid:
            # Another primary (a failover: the promoted replica never lists itself) or a new
            # replication history: the replicas remembered were another's.
            self._replid = repl.get("master_replid")
            self.seen.clear()
        listed = {
            f"{replica.get('ip')}:{replica.get('port')}": replica
            for name, replica in repl.items()
            if _SLAVE.match(name) and isinstance(replica, dict)
        }
        for where, last in list(self.seen.items()):
            if where in listed:
                continue
            if now - last > self.max_absent_s:
                del self.seen[where]  # removed for good, it seems: no longer waited for
            else:
                worst.append(
                    f"{where} disconnected {now - last:.0f}s ago (waited for up to "
                    f"{self.max_absent_s:.0f}s)"
                )
        for where, replica in listed.items():
            self.seen[where] = now
            if replica.get("state") != "online":
                # A full resync buffers every write for the replica: a copy now could overflow
                # that buffer and restart the sync.
                worst.append(f"{where} is syncing ({replica.get('state')})")
                continue
            behind = offset - int(replica.get("offset", 0))
            silent = int(replica.get("lag", 0))
            if behind > self.max_bytes or silent > self.max_silence_s:
                worst.append(f"{where} {mb(max(behind, 0))} behind, last ack {silent}s ago")
        if worst:
            return "replica lag: " + "; ".join(worst)
        return None


class ShimProtocolGate(Gate):
    """Holds while a live app instance runs a shim older than ``need`` (``control.MARKS_PROTOCOL``).

    The copy inserts only where a shard lacks a member, which is safe because every delete a
    shim makes meanwhile leaves a mark (copier.py); a shim from before the marks deletes
    plainly, and the copy could put back a member it deleted. Such an instance is found at
    the next check (every second); anything it deleted before that and the copy put back,
    verify reports (and ``verify --repair`` removes).

    ``held`` is set whenever the gate holds: what the copy scanned before may have been
    deleted meanwhile without a mark, so the copy drops it and scans again from its
    checkpoint (``Runner.copy``, ``HashCopier.rescan``) before it inserts anything more.
    """

    interval = 1.0

    def __init__(self, client: redis.Redis, job: str, *, need: int = control.MARKS_PROTOCOL):
        self.client = client
        self.job = job
        self.need = need
        self.held = False

    def check(self) -> str | None:
        reason = self._reason()
        self.held = self.held or reason is not None
        return reason

    def _reason(self) -> str | None:
        try:
            old = control.outdated(control.live_instances(self.client, self.job), self.need)
        except Exception as e:  # noqa: BLE001 - a heartbeat's payload is the app's writing
            return f"app instance check failed: {e}"
        if not old:
            return None
        names = ", ".join(f"{i.id} ({i.host} pid {i.pid}, protocol {i.protocol})" for i in old)
        return (
            f"app instances with a shim too old for the copy: {names}; it needs protocol "
            f"{self.need} (deletes leave marks), or it could bring deleted members back: "
            "upgrade or stop them"
        )


def default_gates(client: redis.Redis, job: str, state_url: str | None) -> list[Gate]:
    """The gates every runner loop uses unless told otherwise (``Runner(gates=...)``)."""
    return [
        PauseFileGate(pause_files(job, state_url)),
        MemoryGate(client),
        ReplicaLagGate(client),
        LatencyGate(client),
    ]
