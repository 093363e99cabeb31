"""Keeps one process's view of the control record fresh, and tells the runner what it applied.

Lifecycle (one :class:`ControlWatcher` per attached router):

* **join** (at attach, and again in a forked child): heartbeat epoch 0, *then* read the record,
  then heartbeat the applied epoch. Announcing ourselves before reading closes a race: if the
  runner published epoch E after our read, it already sees us as live and waits for our ack;
  if it published before our read, we read E.
* **refresh thread** (daemon): every ``refresh_interval`` (≤ 1 s) reads the record, installs it
  when it changed, heartbeats the *applied* epoch (see :mod:`migrator.shim.inflight`), and every
  ``flush_interval`` flushes the counters. Any error is logged and the last record kept; the
  thread never dies of one.
* **stale fence**: a call finding that no refresh fully succeeded (read *and* heartbeat) for
  ``STALE_AFTER_S`` refreshes synchronously before using the record, and raises if it cannot.
  The runner stops counting an instance as live ``LIVE_WINDOW_S`` after its last heartbeat and
  then proceeds without its ack; a call must never route with a record that old.
* **close**: stops the thread, flushes counters once more.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from migrator import control
from migrator.control import ControlRecord
from migrator.shim.counters import Counters
from migrator.shim.errors import ShimClosed
from migrator.shim.inflight import EpochTracker

log = logging.getLogger("migrator.shim")

#: Half the runner's live window: a record confirmed more recently than this is one the runner
#: still waits on us for, with margin for clock rate differences and a slow heartbeat.
STALE_AFTER_S = control.LIVE_WINDOW_S / 2
MAX_REFRESH_INTERVAL_S = 1.0


def default_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ControlWatcher:
    """The cached control record of one job, refreshed in the background; see module docs."""

    def __init__(
        self,
        client: redis.Redis,
        job: str,
        *,
        refresh_interval: float = 0.5,
        flush_interval: float = 5.0,
        instance_id: str | None = None,
    ) -> None:
        if not 0 < refresh_interval <= MAX_REFRESH_INTERVAL_S:
            raise ValueError(
                f"refresh_interval must be in (0, {MAX_REFRESH_INTERVAL_S}] seconds: the runner "
                f"expects every instance to re-read the control record at least every second"
            )
        if flush_interval <= 0:
            raise ValueError("flush_interval must be > 0 seconds")
        if instance_id is not None and "|" in instance_id:
            raise ValueError("instance_id must not contain '|' (the counter field separator)")
        self.client = client
        self.job = job
        self.refresh_interval = refresh_interval
        self.flush_interval = flush_interval
        self._given_id = instance_id
        self._closed = False
        self._reset_process_state(record=None, forked=False)
        if hasattr(os, "register_at_fork"):
            # A router attached before a pre-forking server (gunicorn --preload) forks has, in
            # each child, neither the refresh thread nor a heartbeat of its own: rebuild both.
            ref = weakref.WeakMethod(self._after_fork_in_child)
            os.register_at_fork(after_in_child=lambda: _call_weak(ref))

    # -- state per process ------------------------------------------------------------------

    def _reset_process_state(self, record: ControlRecord | None, *, forked: bool) -> None:
        self.pid = os.getpid()
        if self._given_id is None:
            self.instance_id = default_instance_id()
        else:
            # Two processes must never heartbeat under one id: a child would mask its parent.
            self.instance_id = f"{self._given_id}:{self.pid}" if forked else self._given_id
        self.started = time.time()
        self.counters = Counters()
        self.tracker = EpochTracker(record)
        self._sync_lock = threading.Lock()
        # Refreshes run side by side (the thread's, an inline one, a write's retry), none
        # waiting on another's I/O; a read whose reply came late must not be installed after
        # one that began later (it would route by an older record than this process acked).
        self._install_lock = threading.Lock()
        self._reads = itertools.count(1)
        self._installed_read = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._joined = False
        self._confirmed_at = -math.inf  # monotonic start of the last fully successful refresh
        self._failing = False
        self._vanished_logged = False

    def _after_fork_in_child(self) -> None:
        # Runs single-threaded right after fork(): locks may have been held by parent threads,
        # so everything is rebuilt. The parent flushes its own pending counters.
        if not self._closed:
            self._reset_process_state(self.tracker.record, forked=True)

    # -- public -----------------------------------------------------------------------------

    @property
    def record(self) -> ControlRecord | None:
        return self.tracker.record

    def start(self) -> None:
        """Join synchronously (raises on Redis errors) and start the refresh thread."""
        self._sync()

    @contextmanager
    def call(self) -> Iterator[ControlRecord | None]:
        """Run one call's Redis work under the current record, counted as in flight.

        The yielded record must be used for the whole call, so one call never mixes routings.
        Keep app code (e.g. the loader) outside: it does not touch Redis and would only delay
        the epoch acknowledgement.
        """
        if self._closed:
            raise ShimClosed(f"the shim for job {self.job!r} was closed")
        if not self._joined or time.monotonic() - self._confirmed_at > STALE_AFTER_S:
            self._sync()
        gen, record = self.tracker.enter()
        try:
            yield record
        finally:
            self.tracker.exit(gen)

    def close(self) -> None:
        """Stop refreshing and flush counters. Idempotent; later calls raise ShimClosed."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.refresh_interval))
        try:
            self.flush()
        except Exception:
            log.warning("migrator shim %s: final counter flush failed", self.job, exc_info=True)

    def flush(self) -> None:
        self.counters.flush(self.client, self.job, self.instance_id)

    def refresh(self) -> None:
        """One refresh: read + install the record, then heartbeat. Raises on Redis errors."""
        t0 = time.monotonic()
        self._read_and_install()
        self._heartbeat(self.tracker.applied_epoch())
        self._confirmed_at = max(self._confirmed_at, t0)

    # -- internals --------------------------------------------------------------------------

    def _sync(self) -> None:
        with self._sync_lock:
            if not self._joined:
                t0 = time.monotonic()
                self._heartbeat(0)
                self._read_and_install()
                self._heartbeat(self.tracker.applied_epoch())
                self._confirmed_at = t0
                self._joined = True
                self._start_thread()
            elif time.monotonic() - self._confirmed_at > STALE_AFTER_S:
                log.warning("migrator shim %s: control record stale, refreshing inline", self.job)
                self.refresh()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"migrator-shim-{self.job}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_interval
        while not self._stop.wait(self.refresh_interval):
            self._tick()
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + self.flush_interval
                try:
                    self.flush()
                except Exception:
                    log.debug("migrator shim %s: counter flush failed", self.job, exc_info=True)

    def _tick(self) -> None:
        t0 = time.monotonic()
        ok = True
        # Read and heartbeat are tried independently: a heartbeat of a stale-but-applied epoch
        # is still true, and keeps the runner waiting for us rather than dropping us.
        for step in (self._read_and_install, lambda: self._heartbeat(self.tracker.applied_epoch())):
            try:
                step()
            except Exception as exc:  # the thread must survive anything
                ok = False
                self._report_failure(exc)
        if ok:
            self._confirmed_at = max(self._confirmed_at, t0)
            if self._failing:
                self._failing = False
                log.warning("migrator shim %s: control refresh recovered", self.job)

    def _report_failure(self, exc: Exception) -> None:
        # Warn once per outage, not twice a second.
        if not self._failing:
            self._failing = True
            log.warning(
                "migrator shim %s: control refresh failed, keeping the last record: %r",
                self.job,
                exc,
                exc_info=exc,
            )
        else:
            log.debug("migrator shim %s: control refresh still failing: %r", self.job, exc)

    def _read_and_install(self) -> None:
        with self._install_lock:
            read = next(self._reads)
        record = control.read(self.client, self.job)
        if record is None:
            # A record that was seen and then vanished is most likely a purge or a mistake;
            # the last phase (done → shards, rolled_back → old) stays the safer routing than
            # falling back to "no job".
            if self.tracker.record is not None and not self._vanished_logged:
                self._vanished_logged = True
                log.warning(
                    "migrator shim %s: control record vanished; keeping the last one", self.job
                )
            return
        with self._install_lock:
            if read < self._installed_read:
                return  # a read begun later was installed meanwhile: this reply is older
            self._installed_read = read
            previous = self.tracker.record
            changed = self.tracker.install(record)
        if changed:
            self._vanished_logged = False
            if previous is None or (previous.phase, previous.ratio) != (record.phase, record.ratio):
                log.info(
                    "migrator shim %s: phase %s ratio %d (epoch %d)",
                    self.job,
                    record.phase,
                    record.ratio,
                    record.epoch,
                )

    def _heartbeat(self, epoch: int) -> None:
        control.heartbeat(
            self.client,
            self.job,
            self.instance_id,
            {
                "host": socket.gethostname(),
                "pid": self.pid,
                "epoch": epoch,
                "started": self.started,
                "protocol": control.PROTOCOL,
            },
        )


def _call_weak(ref: weakref.WeakMethod) -> None:  # type: ignore[type-arg]
    method = ref()
    if method is not None:
        method()
