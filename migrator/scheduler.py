"""``migrator run``: the long-running runner, on APScheduler 3.x.

Every ``interval`` seconds a tick reads the state store and starts, in a thread of its own, the
work each job is due for (:func:`due`); the work is the same :class:`~migrator.runner.Runner`
method the verbs call::

    planned, dual_write, copying        Runner.apply    resumed from the checkpoint, to verified
    verifying (verify interrupted)      Runner.apply    the verify run resumes
    rolling_back                        Runner.rollback
    cleaning                            Runner.cleanup
    cutover, held for cleanup.after     Runner.cleanup  the scheduled cleanup

One thread per job in this process; the job's lease (lease.py) keeps every other process out,
so several ``migrator run`` processes, or one next to an operator's command, never work a job
twice. A job whose phase changed less than ``grace`` seconds ago is left to whoever moved it.
A verify run that finished with differences waits for the operator (``verify --repair``), and
a paused job for ``migrator resume``.
Failures are logged (the runner also stores them as the job's last_error) and retried with
exponential backoff.

Stopping (SIGTERM, via the CLI): :meth:`JobScheduler.shutdown` sets every worker's stop event;
each finishes the batch in flight, keeps its checkpoint and gives its lease back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.background import BackgroundScheduler

from migrator.errors import (
    Interrupted,
    JobBusy,
    LeaseLost,
    MigratorError,
    VerificationFailed,
)
from migrator.phases import Phase
from migrator.runner import Runner, clean_verify_run
from migrator.store import Job, Store, open_existing_store, state_exists
from migrator.store import state_url as resolve_state_url
from migrator.urls import mask_url

log = logging.getLogger("migrator.run")

P = Phase
_RESUME_FORWARD = frozenset({P.PLANNED, P.DUAL_WRITE, P.COPYING})


@dataclass(frozen=True)
class Due:
    work: str  # apply | rollback | cleanup
    reason: str


def due(store: Store, job: Job, now: datetime, *, grace: float) -> Due | None:
    """What ``job`` is due for at ``now``, or None. Pure apart from reading the store."""
    if job.paused and job.phase != P.ROLLING_BACK:
        # The operator's `migrator resume` makes it due again; a rollback, the way out, goes
        # on while paused (Runner.pacer), so an interrupted one is resumed regardless.
        return None
    after = job.plan.cleanup.after
    if job.phase == P.CUTOVER and after > 0:
        at = job.phase_changed_at + timedelta(seconds=after)
        if at <= now:
            return Due("cleanup", f"scheduled cleanup: cleanup.after {after:g}s since cutover")
        return None
    if now - job.phase_changed_at < timedelta(seconds=grace):
        return None
    if job.phase in _RESUME_FORWARD:
        return Due("apply", f"resume interrupted job in phase {job.phase}")
    if job.phase == P.VERIFYING:
        cp = store.get_checkpoint(job, "verify")
        if cp is None or not cp.finished:
            return Due("apply", "resume interrupted verification")
        if clean_verify_run(store, job):
            return Due("apply", "a clean verification missed its move to verified")
        return None  # it found differences: the operator's to look at
    if job.phase == P.ROLLING_BACK:
        return Due("rollback", "resume interrupted rollback")
    if job.phase == P.CLEANING:
        return Due("cleanup", "resume interrupted cleanup")
    return None


@dataclass
class _Worker:
    thread: threading.Thread
    stop: threading.Event


class JobScheduler:
    def __init__(
        self,
        state_url: str | None = None,
        *,
        interval: float = 1.0,
        grace: float = 3.0,
        barrier_timeout: float = 60.0,
        max_backoff: float = 300.0,
    ) -> None:
        # A store that does not exist is a mistyped --state (or no plan applied yet): refused
        # (JobNotFound, exit 2) rather than created empty and watched for nothing (run()).
        self.store = open_existing_store(state_url)
        self.interval = interval
        self.grace = grace
        self.barrier_timeout = barrier_timeout
        self.max_backoff = max_backoff
        self._workers: dict[str, _Worker] = {}
        self._failures: dict[str, int] = {}
        self._not_before: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closing = False
        self._scheduler = BackgroundScheduler(timezone=timezone.utc)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._scheduler.add_job(
            self.tick,
            "interval",
            seconds=self.interval,
            id="tick",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(timezone.utc),
        )
        self._scheduler.start()
        log.info("migrator run: watching %s every %gs", mask_url(self.store.url), self.interval)

    def shutdown(self, timeout: float | None = None) -> None:
        """No new work; every worker stops after its batch (checkpoint kept); then return."""
        self._closing = True
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        with self._lock:
            workers = list(self._workers.items())
        for _name, w in workers:
            w.stop.set()
        for name, w in workers:
            w.thread.join(timeout)
            if w.thread.is_alive():
                log.warning("%s: still stopping after %ss", name, timeout)
        self.store.close()
        log.info("migrator run: stopped")

    def run_until(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.shutdown()

    def run_once(self, stop: threading.Event | None = None) -> list[str]:
        """Start what is due now, wait for all of it, and return the jobs that failed
        (``migrator run --once``)."""
        self.tick()
        stop = stop or threading.Event()
        while self.working and not stop.wait(0.1):
            pass
        self.shutdown()
        with self._lock:
            return sorted(self._failures)

    @property
    def working(self) -> list[str]:
        with self._lock:
            return sorted(self._workers)

    # -- the tick --------------------------------------------------------------------------
    def tick(self) -> None:
        if self._closing:
            return
        now = datetime.now(timezone.utc)
        try:
            jobs = self.store.list_jobs()
        except Exception as e:  # the store may be briefly unavailable; try next tick
            log.warning("cannot read the state store: %s", e)
            return
        for job in jobs:
            with self._lock:
                if self._closing or job.name in self._workers:
                    continue
                if time.monotonic() < self._not_before.get(job.name, 0.0):
                    continue
            try:
                d = due(self.store, job, now, grace=self.grace)
            except Exception as e:
                log.warning("%s: cannot tell what is due: %s", job.name, e)
                continue
            if d is not None:
                self._spawn(job.name, d)

    def _spawn(self, name: str, d: Due) -> None:
        stop = threading.Event()
        thread = threading.Thread(
            target=self._work, args=(name, d, stop), name=f"migrator-run:{name}", daemon=True
        )
        with self._lock:
            self._workers[name] = _Worker(thread, stop)
        thread.start()

    def _work(self, name: str, d: Due, stop: threading.Event) -> None:
        runner: Runner | None = None
        try:
            runner = Runner(
                self.store,
                name,
                stop=stop,
                barrier_timeout=self.barrier_timeout,
                lease_wait=0.0,
            )
            log.info("%s: %s", name, d.reason)
            if d.work == "apply":
                job = runner.apply()
            elif d.work == "rollback":
                job = runner.rollback()
            else:
                job = runner.cleanup(detail=d.reason)
            log.info("%s: phase %s", name, job.phase)
            self._settle(name, failed=False)
        except JobBusy as e:
            log.debug("%s: %s", name, e.message)
            self._settle(name, failed=False, retry_in=self.grace)
        except LeaseLost as e:
            # Another process took the job over: it is busy, asked again after the grace.
            log.warning("%s: %s", name, e.message)
            self._settle(name, failed=False, retry_in=self.grace)
        except Interrupted as e:
            log.info("%s: %s", name, e.message)
            self._settle(name, failed=False)
        except VerificationFailed as e:
            # Waits for the operator; asked again with backoff (a scheduled cleanup stays due).
            log.warning("%s: %s (waiting for `migrator verify %s --repair`)", name, e, name)
            self._settle(name, failed=True)
        except MigratorError as e:
            log.warning("%s: %s", name, e)
            self._settle(name, failed=True)
        except Exception:
            log.exception("%s: unexpected failure", name)
            self._settle(name, failed=True)
        finally:
            if runner is not None:
                runner.close()
            with self._lock:
                self._workers.pop(name, None)

    def _settle(self, name: str, *, failed: bool, retry_in: float = 0.0) -> None:
        with self._lock:
            if failed:
                n = self._failures.get(name, 0) + 1
                self._failures[name] = n
                retry_in = min(self.max_backoff, 2.0**n)
                log.info("%s: retrying in %gs", name, retry_in)
            else:
                self._failures.pop(name, None)
            self._not_before[name] = time.monotonic() + retry_in


def run(
    state_url: str | None = None,
    *,
    stop: threading.Event,
    interval: float = 1.0,
    grace: float = 3.0,
    barrier_timeout: float = 60.0,
    once: bool = False,
) -> list[str]:
    """``migrator run``: until ``stop`` is set (or, with ``once``, until what is due is done).
    Returns the jobs whose work failed in a ``once`` run.

    A store that does not exist is not created: ``once`` refuses it (exit 2: a mistyped
    ``--state``, or nothing applied yet); the daemon says so once and waits for the first
    ``plan apply`` to make it, so a service started before any plan does not exit in a loop."""
    url = resolve_state_url(state_url)
    if not once and not state_exists(url):
        log.warning(
            "migrator run: no state store at %s yet (no plan applied there); waiting for one",
            mask_url(url),
        )
        while not state_exists(url):
            if stop.wait(max(interval, 2.0)):
                return []
    scheduler = JobScheduler(
        state_url, interval=interval, grace=grace, barrier_timeout=barrier_timeout
    )
    if once:
        return scheduler.run_once(stop)
    scheduler.run_until(stop)
    return []
