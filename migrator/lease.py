"""One runner process works a job at a time: a lease in Redis, renewed while held.

``SET migrator:{NAME}:lock <holder> NX PX <ttl>`` takes it; a background thread renews it
every ``ttl / 4`` with a compare-and-set, so a holder that dies (SIGKILL, lost host) lets it
expire within ``ttl``. A holder on *this* host whose process is gone is taken over at once
(no need to wait for the expiry after a ``kill -9``). If renewal fails for ``ttl`` (the key
was taken over, or Redis stayed unreachable), ``on_lost`` is called: the runner sets its stop
event, so the batch in flight finishes, its checkpoint is kept, and the work stops.

A paused process (SIGSTOP, a VM or GC stall) pauses its renewal thread too, and when it wakes
its next write could land after the lease expired and another holder took over (a rollback
that removed the shard keys, say). So the holder also fences its own writes: :meth:`Lease.fresh`
tells, by this process's monotonic clock (which runs on while the process is paused), whether
the last renewal the server acknowledged is younger than the TTL less :data:`MARGIN`; the
runner asks before every batch and every streamed packet, and stops when it is not.

Contract: while :meth:`Lease.held` is true no other holder has the key; release only deletes
the key when it still names this holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from migrator import keys
from migrator.errors import JobBusy

#: Lease lifetime without renewal; a crashed holder on another host blocks the job this long.
TTL_S = 5.0
#: The share of the TTL a holder does not use (:meth:`Lease.fresh`): a write sent just before
#: must still reach the server, through a busy network or server, before the lease can expire.
MARGIN = 0.2

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux: ``pid:[4026531836]``), else None. Containers on
    one host can share its host name (host networking) but not their pids: a pid is only
    this host's to look up within the same namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_PIDNS = _pid_namespace()


def _local_pid(raw: bytes | str, *, alive: bool = True) -> int | None:
    """The holder's pid if it runs on this host, in this PID namespace (a holder from before
    namespaces were recorded: on this host), and is (``alive``) or is not alive."""
    try:
        h = json.loads(raw)
        pid = int(h["pid"])
        if h["host"] != socket.gethostname() or h.get("pidns", _PIDNS) != _PIDNS:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return pid if _alive(pid) == alive else None


def held(raw: bytes | str | None) -> bool:
    """Whether a lease value names a holder that may be at work: any holder, but one on this
    host whose process is gone (``kill -9``: its lease outlives it until the TTL)."""
    return raw is not None and _local_pid(raw, alive=False) is None


def describe(raw: bytes | str | None) -> str:
    """Who holds a lease, for messages: ``apply by user@host pid 123``."""
    if raw is None:
        return "nobody"
    try:
        h = json.loads(raw)
        return f"{h['purpose']} on {h['host']} pid {h['pid']}"
    except (ValueError, KeyError, TypeError):
        return repr(raw)


class Lease:
    def __init__(
        self,
        client: redis.Redis,
        job: str,
        *,
        purpose: str,
        ttl: float = TTL_S,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.job = job
        self.key = keys.lock(job)
        self.ttl_ms = int(ttl * 1000)
        self.on_lost = on_lost
        self.value = json.dumps(
            {
                "purpose": purpose,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pidns": _PIDNS,
                "token": secrets.token_hex(8),
                "since": round(time.time(), 3),
            },
            sort_keys=True,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_lock = threading.Lock()
        self.lost = False
        self.lost_reason = ""
        # When the last renewal the server acknowledged was sent (monotonic): the lease lives
        # on the server at least until then + TTL.
        self._renewed_at = 0.0
        self._renew_error: redis.RedisError | None = None  # the last renewal's, if it failed
        self._renew_sent = 0.0  # when the last renewal was sent, answered or not

    # -- taking and giving back ------------------------------------------------------------
    def try_acquire(self) -> bool:
        sent = time.monotonic()
        if self.client.set(self.key, self.value, nx=True, px=self.ttl_ms):
            self._renewed_at = sent
            return True
        current: Any = self.client.get(self.key)
        if current is not None and self._stale(current):
            sent = time.monotonic()
            taken = self.client.eval(_TAKE_OVER, 1, self.key, current, self.value, str(self.ttl_ms))
            if taken:
                self._renewed_at = sent
            return bool(taken)
        return False

    def acquire(self, wait: float = 0.0, *, preempting: bool = False) -> Lease:
        """Take the lease, waiting up to ``wait`` seconds for it; raise JobBusy if it is kept.

        Only a ``preempting`` caller (rollback, cleanup: it has just moved the phase, which makes
        the holder stop after its batch) waits for a holder alive on this host; any other caller
        waits only for a holder that may be dead elsewhere (its lease expires).
        """
        deadline = time.monotonic() + wait
        while not self.try_acquire():
            holder: Any = self.client.get(self.key)
            here = holder is not None and _local_pid(holder) is not None
            if time.monotonic() >= deadline or (here and not preempting):
                raise JobBusy(
                    f"job {self.job} is being worked by another runner ({describe(holder)})",
                    hint="wait for it to finish, or stop that process; its lease expires "
                    f"{self.ttl_ms / 1000:g}s after it dies",
                )
            time.sleep(0.05)
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease:{self.job}", daemon=True
        )
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A lost lease's renewal may be stuck retrying into an outage: not waited for.
            self._thread.join(timeout=0.5 if self.lost else None)
            self._thread = None
        if self.lost and self._silent():
            return  # Redis is not answering: retrying the release would hold up the exit
        # Also when lost: one the fence gave up may still be ours. Compare-and-delete; on a
        # Redis error it expires by itself within the TTL.
        with contextlib.suppress(redis.RedisError):
            self.client.eval(_RELEASE, 1, self.key, self.value)

    @property
    def held(self) -> bool:
        return self._thread is not None and not self.lost

    def fresh(self) -> bool:
        """Whether a write sent now surely reaches the server while the lease is ours: the
        last acknowledged renewal was sent less than the TTL less :data:`MARGIN` ago. When it
        was not (this process was paused or starved: its renewal thread did not run), the
        lease is given up as lost (``on_lost``) even if the server still has it: it may have
        expired, and another holder may be at work."""
        if self.lost:
            return False
        age = time.monotonic() - self._renewed_at
        if age < (1.0 - MARGIN) * self.ttl_ms / 1000.0:
            return True
        error = self._renew_error
        self._mark_lost(
            f"Redis did not answer its renewals for {age:.1f} s"
            + (f" ({error})" if error is not None else "")
            + ", so it may have expired and be another holder's"
            if self._silent()
            else f"this process did not renew it for {age:.1f} s (it was paused or starved), "
            "so it may have expired and be another holder's"
        )
        return False

    def _silent(self) -> bool:
        """Redis failed the last renewal, or has not answered one sent since the last success."""
        return self._renew_error is not None or self._renew_sent > self._renewed_at

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------
    def _stale(self, raw: bytes) -> bool:
        """A holder on this host whose process no longer exists."""
        pid = _local_pid(raw, alive=False)
        return pid is not None

    def _mark_lost(self, reason: str) -> None:
        """Lost, once (the renewal thread and the fence may both find it), and say why."""
        with self._lost_lock:
            if self.lost:
                return
            self.lost_reason = reason
            self.lost = True
        if self.on_lost:
            self.on_lost()

    def _renew_loop(self) -> None:
        interval = self.ttl_ms / 4000.0
        while not self._stop.wait(interval) and not self.lost:
            error: redis.RedisError | None = None
            sent = self._renew_sent = time.monotonic()
            try:
                ok = bool(self.client.eval(_RENEW, 1, self.key, self.value, str(self.ttl_ms)))
                if ok:
                    self._renewed_at, self._renew_error = sent, None
            except redis.RedisError as e:
                ok, error = False, e
                self._renew_error = e
                if time.monotonic() - self._renewed_at < self.ttl_ms / 1000.0:
                    continue  # a blip: keep trying while the lease is still ours
            if not ok:
                self._mark_lost(self._why_lost(error))
                return

    def _why_lost(self, error: redis.RedisError | None) -> str:
        """Why renewal failed, for messages: Redis silent for the TTL (``error``, its last
        failure), or a takeover (the key names another holder, or none: it expired first),
        read once while the work stops."""
        if error is None:
            try:
                raw: Any = self.client.get(self.key)
            except redis.RedisError as e:
                error = e
            else:
                if raw is None:
                    return "it expired before it was renewed, and nobody holds it now"
                return f"it is held by {describe(raw)} now"
        return f"Redis did not answer for the lease's TTL ({self.ttl_ms / 1000:g} s: {error})"
