"""Drives one job through its phases: the only place that joins state-store and Redis work.

Every phase change goes store first (checked against the transition table, audited, epoch
bumped), then the control record is published to Redis, then, where app behaviour must change
before the runner may go on, the barrier waits for every live shim to acknowledge the epoch. A
crash between two of these steps is repaired on resume: the runner republishes the control
record for the stored phase before doing anything else.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar, cast

import redis
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from migrator import control, keys, memory
from migrator.cleaner import KeyRemover
from migrator.control import ControlRecord
from migrator.copier import HashCopier, follow_deadline, hash_copier
from migrator.errors import (
    BarrierTimeout,
    IllegalTransition,
    Interrupted,
    LeaseLost,
    MigratorError,
    PreflightError,
    RedisUnavailable,
    ServerRestarted,
    SourceVanished,
    VerificationFailed,
)
from migrator.gates import MemoryGate, PauseFileGate, ShimProtocolGate, default_gates
from migrator.lease import Lease
from migrator.phases import BEFORE_CLEANING, RATIO_PHASES, Phase, phase_for_ratio
from migrator.preflight import check_shards_free
from migrator.redisio import Scripts, connect, keys_exist, supports_unlink
from migrator.scanloop import Progress, Step, drive
from migrator.shim import counters as shim_counters
from migrator.store import Job, Store
from migrator.throttle import (
    SLICE,
    BatchSizer,
    Controls,
    Gate,
    Pacer,
    check_fence,
    check_stop,
)
from migrator.verifier import Found, HashVerifier

T = TypeVar("T")
log = logging.getLogger("migrator.runner")
P = Phase

#: How long a batch is retried through connection errors before the job stops (resumable).
BATCH_RETRY_S = 30.0


def _moved_on_hint(job: Job) -> str:
    """What to do once another command moved the job away from the work this run was doing.
    Running this run's command again would not help: the job is another verb's now."""
    if job.phase in (P.ROLLING_BACK, P.ROLLED_BACK):
        return (
            f"a rollback took job {job.name} over; `migrator status {job.name}` shows it "
            "(apply the plan again to start over once it is rolled back)"
        )
    return f"`migrator status {job.name}` shows where the job stands now"


def clean_verify_run(store: Store, job: Job) -> int | None:
    """The job's last verify run if it finished and confirmed no difference left unrepaired:
    a job in ``verifying`` with one only missed its move to ``verified``."""
    cp = store.get_checkpoint(job, "verify")
    if cp is None or not cp.finished or "run" not in cp.extra:
        return None
    run = int(cp.extra["run"])
    if run != store.last_verify_run(job) or any(
        store.count_diffs(job, run, status="confirmed").values()
    ):
        return None
    return run


@dataclass
class VerifyReport:
    run: int
    source_checked: int = 0
    shard_checked: int = 0
    suspects: int = 0
    confirmed: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    marks_removed: int = 0  # delete marks left for the copy, removed by the shard passes
    deadlines_followed: int = 0  # shards given the source's deadline (or none) at the end

    @property
    def clean(self) -> bool:
        return not any(self.confirmed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "source_checked": self.source_checked,
            "shard_checked": self.shard_checked,
            "suspects": self.suspects,
            "confirmed": dict(self.confirmed),
            "repaired": self.repaired,
            "marks_removed": self.marks_removed,
            "deadlines_followed": self.deadlines_followed,
            "clean": self.clean,
        }


def _retry_batch(fn: Callable[[str, int], Step]) -> Callable[[str, int], Step]:
    """tenacity around one batch: re-run the same step (idempotent) through connection drops."""

    def wrapped(cursor: str, count: int) -> Step:
        for attempt in Retrying(
            retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
            stop=stop_after_delay(BATCH_RETRY_S),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            reraise=True,
        ):
            with attempt:
                return fn(cursor, count)
        raise AssertionError("unreachable")

    return wrapped


class Runner:
    def __init__(
        self,
        store: Store,
        name: str,
        *,
        stop: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        barrier_timeout: float = 60.0,
        gates: Callable[[Runner], Sequence[Gate]] | None = None,
        client: redis.Redis | None = None,
        lease_wait: float = 10.0,
    ) -> None:
        self.store = store
        self.name = name
        self.job = store.get_job(name)
        self.plan = self.job.plan
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.barrier_timeout = barrier_timeout
        self.client = client or connect(self.plan.redis.url, name=f"migrator:{name}")
        self.scripts = Scripts(self.client)
        self.shard_keys = self.plan.target.shard_keys()
        self.budget_us = self.plan.copy_.max_command_ms * 1000.0
        self._gates = gates
        self._gate_list: list[Gate] | None = None
        self.lease_wait = lease_wait
        self._lease: Lease | None = None
        # The phases the work in progress belongs to; leaving them (a rollback or cleanup
        # from another shell) stops the work after the batch in flight.
        self._phases: frozenset[Phase] | None = None

    def close(self) -> None:
        self.client.close()

    @contextmanager
    def leased(self, purpose: str, *, preempting: bool = False) -> Iterator[Lease]:
        """Hold the job's lease (lease.py) for the block; re-entrant within this runner.

        ``preempting``: the caller has just moved the phase away from the holder's work, so it
        waits (up to ``lease_wait``) for the holder to stop and let go.
        """
        if self._lease is not None:
            yield self._lease
            return
        lease = Lease(self.client, self.name, purpose=purpose, on_lost=self.stop.set)
        self._guard(
            lambda: lease.acquire(self.lease_wait, preempting=preempting), f"{purpose}: lease"
        )
        self._lease = lease
        try:
            # What another holder did while this one waited for the lease counts from here:
            # the job as read before would publish a stale record, and move from a stale phase.
            self.refresh()
            yield lease
        except Interrupted as e:
            if lease.lost and not isinstance(e, LeaseLost):
                raise self._lease_lost(purpose, lease.lost_reason) from None
            raise
        finally:
            self._lease = None
            lease.release()

    def _fresh(self) -> bool:
        """The fence of the runner's writes (throttle.Fence): outside a leased block there is
        no lease to lose; inside, it must surely still be this process's (Lease.fresh)."""
        lease = self._lease
        return lease is None or lease.fresh()

    def _lease_lost(self, purpose: str, why: str) -> LeaseLost:
        """The stop a lost lease caused, named as such (not as a stop on request), with who
        holds the lease now. Audited as a ``lease_lost`` event, not as ``last_error``: the job
        may be another holder's by now, and its status is that holder's to write."""
        msg = (
            f"{purpose} lost the lease of job {self.name}: {why}; it stopped after its last "
            "acknowledged batch"
        )
        try:
            self.store.add_event(self.name, "lease_lost", to_value=purpose, detail=msg)
        except MigratorError as e:  # the store failing too: the lease is still the news
            log.warning("job %s: could not record the lost lease: %s", self.name, e)
        return LeaseLost(
            msg,
            hint="the checkpoint is kept; one process works a job at a time: once the other "
            "holder is done (or Redis answers), run the same command again (or `migrator run`)",
        )

    @contextmanager
    def working(self, *phases: Phase) -> Iterator[None]:
        """The block's batches stop (Interrupted) once the job leaves ``phases``."""
        previous, self._phases = self._phases, frozenset(phases)
        try:
            yield
        finally:
            self._phases = previous

    def _still_working(self) -> Job:
        """The job as stored; Interrupted once it left the phases of the work in progress."""
        j = self.store.get_job(self.name)
        if self._phases is not None and j.phase not in self._phases:
            raise Interrupted(
                f"job {self.name} moved to phase {j.phase} meanwhile (another command); "
                "this run stops here",
                hint=_moved_on_hint(j),
            )
        return j

    # -- plumbing ---------------------------------------------------------------------------
    def refresh(self) -> Job:
        self.job = self.store.get_job(self.name)
        return self.job

    def record(self) -> ControlRecord:
        j, p = self.job, self.plan
        return ControlRecord(
            job=j.name,
            phase=j.phase,
            ratio=j.ratio,
            epoch=j.epoch,
            source_key=p.source.key,
            source_type=p.source.type or "hash",
            template=p.target.key,
            shards=p.target.shards,
            hash=p.target.hash,
            salt=j.salt,
            bucketing=p.gray.bucketing,
            shadow_sample=p.gray.shadow_sample,
            retire_old=int(j.phase == P.CLEANING and self._old_retired()),
        )

    def publish(self) -> None:
        check_fence(self._fresh)
        record = self.record()
        self._guard(lambda: control.publish(self.client, record), "publishing the control record")

    def move(
        self,
        to: Phase,
        *,
        ratio: int | None = None,
        detail: str | None = None,
        expect: Phase | None = None,
    ) -> Job:
        """Store first (``expect``: only from that phase), then the control record."""
        check_fence(self._fresh)
        self.job = self.store.transition(self.name, to, ratio=ratio, detail=detail, expect=expect)
        self.publish()
        return self.job

    def barrier(self, purpose: str) -> None:
        """Wait until every live shim has applied the current epoch (SPEC §5).

        Raises Interrupted if the job's epoch moves on meanwhile (a rollback from another
        shell): this barrier is then moot, and the phase it guarded is not to be entered.
        """
        self._guard(lambda: self._barrier(purpose), f"the {purpose} barrier")

    def _barrier(self, purpose: str) -> None:
        epoch = self.job.epoch
        # Entries of instances gone for an hour are dropped, so the instance list stays small.
        control.forget_stale(self.client, self.name, counters=shim_counters.NAMES)
        deadline = time.monotonic() + self.barrier_timeout
        while True:
            try:
                live = control.wait_for_ack(
                    self.client,
                    self.name,
                    epoch,
                    timeout=max(0.0, min(1.0, deadline - time.monotonic())),
                    stop=self.stop,
                )
                break
            except TimeoutError as e:
                if time.monotonic() >= deadline:
                    self._barrier_timeout(purpose, epoch, e.args[0])
                now = self.store.get_job(self.name)
                if now.epoch != epoch:
                    raise Interrupted(
                        f"job {self.name} moved to phase {now.phase} (epoch {now.epoch}) while "
                        f"waiting for the {purpose} barrier; this run stops here",
                        hint=_moved_on_hint(now),
                    ) from None
        detail = f"{purpose}: epoch {epoch} acknowledged by {len(live)} live instance(s)"
        self.store.add_event(self.name, "barrier", to_value=str(epoch), detail=detail)

    def _barrier_timeout(self, purpose: str, epoch: int, behind: list[Any]) -> NoReturn:
        names = ", ".join(f"{i.id} ({i.host} pid {i.pid}, epoch {i.epoch})" for i in behind)
        msg = (
            f"barrier for {purpose}: {len(behind)} live app instance(s) did not acknowledge "
            f"epoch {epoch} within {self.barrier_timeout:g}s: {names}"
        )
        self.store.update_job(self.name, last_error=msg)
        raise BarrierTimeout(msg, hint="check those instances; the step is resumable")

    def pacer(self, *, also: Sequence[Gate] = (), frees: str | None = None) -> Pacer:
        """The pacer of the runner's loops: the plan's rate ceiling, the operator's controls,
        the runner's gates, and ``also`` (gates of this loop alone).

        ``frees``: the loop adds no memory (``verify``'s passes and re-checks, which remove
        marks at most) or removes keys (``rollback``, ``cleanup``): memory near ``maxmemory``
        does not hold it, since it is not what fills memory, and a job held at verifying
        could never reach the cleanup that brings memory down. A rollback, the way out, also
        goes on past a pause file as it goes on past ``migrator pause``."""

        def controls() -> Controls:
            j = self._still_working()
            # Pause acts on copy, verify and cleanup (SPEC §4): a rollback, the way out, goes on
            # (at the rate set, through the gates) even if the job was paused before it.
            return Controls(paused=j.paused and j.phase != P.ROLLING_BACK, rate=j.rate_override)

        if self._gate_list is None:
            # One set per runner, shared by its loops: the latency gate keeps its baseline.
            self._gate_list = (
                list(self._gates(self))
                if self._gates
                else default_gates(self.client, self.name, self.store.url)
            )
        skip: tuple[type[Gate], ...] = ()
        if frees:
            skip = (MemoryGate, PauseFileGate) if frees == "rollback" else (MemoryGate,)
        gates = [*(g for g in self._gate_list if not isinstance(g, skip)), *also]
        return Pacer(
            self.plan.copy_.rate, stop=self.stop, controls=controls, gates=gates, fence=self._fresh
        )

    def sizer(self, aim: float = 0.3) -> BatchSizer:
        return BatchSizer(self.plan.copy_.batch, self.budget_us, aim=aim)

    def _saver(
        self,
        stage: str,
        extra: Callable[[], dict[str, Any]] | None = None,
        *,
        server: str | None = None,
    ) -> Callable[[str, int, bool], None]:
        """``server``: the scan's cursors are the server process ``server``'s (its run_id),
        and no checkpoint is saved once another answers (:meth:`_scan_server`)."""

        def save(cursor: str, done: int, finished: bool) -> None:
            # The lease may be another holder's, whose checkpoint this would set back: stop
            # (a silent skip would let the loop end as if its last save had been made).
            check_fence(self._fresh)
            if server is not None:
                self._same_server(stage, server)
            self.store.save_checkpoint(
                self.job, stage, cursor, done, finished=finished, extra=extra() if extra else None
            )

        return save

    def _run_id(self) -> str:
        return str(memory.info(self.client, "server").get("run_id", ""))

    def _scan_server(self, stage: str, saved: str | None) -> tuple[str, bool]:
        """The server's run_id, and whether a scan checkpointed on ``saved`` (a run_id, None
        before this release recorded one) must start over: an HSCAN cursor is a position in
        one process's hash table, which a restarted or failed-over server seeds afresh, so
        resumed there it would skip members (a quarter of them, measured) and still end."""
        run_id = self._guard(self._run_id, stage)
        if saved is not None and saved != run_id:
            self.store.add_event(
                self.name,
                "rescan",
                to_value="0",
                detail=f"{stage} scans again from the start: the server restarted or failed "
                f"over since its checkpoint (run_id {saved[:8]} then, {run_id[:8]} now)",
            )
            return run_id, True
        return run_id, False

    def _same_server(self, stage: str, run_id: str) -> None:
        """Raise ServerRestarted when the server is no longer the process ``run_id``: redis-py
        reconnects by itself, and the scan's cursor would go on in a table it does not index."""
        now = self._guard(self._run_id, stage)
        if now != run_id:
            msg = (
                f"{stage} stopped: the server restarted or failed over (run_id {run_id[:8]} "
                f"then, {now[:8]} now), and a scan cursor does not carry over"
            )
            self.store.update_job(self.name, last_error=msg)
            raise ServerRestarted(
                msg,
                hint="run the same command again (or `migrator run`): the scan starts over "
                "from the beginning, which redoes nothing harmful",
            )

    def _report(self, stage: str) -> Callable[[Progress], None]:
        def report(p: Progress) -> None:
            check_fence(self._fresh)
            cp = self.store.get_checkpoint(self.job, stage)
            self.store.save_checkpoint(
                self.job,
                stage,
                *((cp.cursor, cp.members_done) if cp else ("0", 0)),
                # The report follows the loop's last save: keep its ``finished``.
                finished=cp.finished if cp else False,
                extra={**(cp.extra if cp else {}), "rate": round(p.rate, 1), "throttle": p.reason},
            )
            if self.on_progress:
                self.on_progress(p)

        return report

    def _waiting(self, stage: str) -> Callable[[str | None], None]:
        """The ``on_wait`` of a loop outside scanloop.drive: held (a pause, a gate, the rate
        ceiling), `status` says why, as it does for the scan passes."""
        report, shown = self._report(stage), [""]

        def waiting(reason: str | None) -> None:
            if (reason or "") != shown[0]:
                shown[0] = reason or ""
                cp = self.store.get_checkpoint(self.job, stage)
                report(Progress(stage, cp.members_done if cp else 0, None, 0.0, reason))

        return waiting

    def _guard(self, work: Callable[[], T], what: str) -> T:
        """Run ``work``; a Redis failure (or a vanished source) stops the job with the checkpoint
        kept and says why in `status`."""
        try:
            return work()
        except Interrupted:
            raise
        except SourceVanished as e:
            self.store.update_job(self.name, last_error=f"{what} stopped: {e.message}")
            raise
        except redis.RedisError as e:
            msg = f"{what} stopped: Redis error: {e}"
            self.store.update_job(self.name, last_error=msg)
            raise RedisUnavailable(
                msg,
                hint="the checkpoint is kept; fix the cause and run the "
                "same command again (or `migrator run`) to resume",
            ) from None

    # -- forward: plan apply ------------------------------------------------------------------
    def apply(self) -> Job:
        """Run the job forward from wherever it is to ``verified`` (resumable at every step).

        Holds the job's lease throughout; every move names the phase it starts from, so a
        rollback made meanwhile from another shell is never overwritten.
        """
        with self.leased("apply"):
            self.publish()
            while True:
                phase = self.refresh().phase
                if phase not in (P.PLANNED, P.DUAL_WRITE, P.COPYING, P.VERIFYING):
                    return self.job  # verified (or past it): a late Ctrl-C changes nothing
                check_stop(self.stop)  # a Ctrl-C before the copy began moves nothing on
                if phase == P.PLANNED:
                    self._refuse_taken_shards()
                    self.move(P.DUAL_WRITE, detail="plan apply", expect=phase)
                elif phase == P.DUAL_WRITE:
                    self.barrier("dual_write")
                    self.move(P.COPYING, expect=phase)
                elif phase == P.COPYING:
                    with self.working(P.COPYING):
                        self._guard(self.copy, "copy")
                    self.move(P.VERIFYING, expect=phase)
                elif phase == P.VERIFYING and (run := clean_verify_run(self.store, self.job)):
                    # Its move was lost (a crash between the two): no second run of hours.
                    self.move(P.VERIFIED, detail=f"verify run {run} clean", expect=phase)
                elif phase == P.VERIFYING:
                    with self.working(P.VERIFYING):
                        report = self._guard(lambda: self.verify(), "verify")
                    if not report.clean:
                        raise VerificationFailed(
                            _diff_message(self.name, report),
                            hint=f"migrator verify {self.name} --show / --repair",
                        )
                    self.move(P.VERIFIED, detail=f"verify run {report.run} clean", expect=phase)

    def _refuse_taken_shards(self) -> None:
        """In planned the job has written no shard key yet. plan apply's preflight refuses
        one that exists before anything is written; this is the check for `migrator run`,
        which resumes a job left in planned without a preflight, and for a key made since."""
        try:
            self._guard(lambda: check_shards_free(self.client, self.plan), "preflight")
        except PreflightError as e:
            self.store.update_job(self.name, last_error=f"stays in planned: {e.message}")
            raise

    def copy(self) -> int:
        cp = self.store.get_checkpoint(self.job, "copy")
        if cp and cp.finished:
            return cp.members_done
        total = cast(int, self.client.hlen(self.plan.source.key))
        self.job = self.store.update_job(self.name, total_members=total)
        sizer = self.sizer(aim=SLICE)
        copier = hash_copier(
            self.client,
            self.scripts,
            self.plan.source.key,
            self.shard_keys,
            self.budget_us,
            probe_key=keys.probe(self.name, "hsetex"),
            hash_name=self.plan.target.hash,
            scan=self.plan.copy_.batch,
            sizer=sizer,
            fence=self._fresh,
        )
        shims = ShimProtocolGate(self.client, self.name)

        def step(cursor: str, count: int) -> Step:
            if shims.held:
                # An old shim was live meanwhile: what the copy scanned before may have been
                # deleted without a mark, and inserting it would bring it back.
                shims.held = False
                copier.rescan()
                self.store.add_event(
                    self.name,
                    "rescan",
                    to_value=cursor,
                    detail=f"copy scans again from cursor {cursor}: a shim without delete "
                    "marks was live, or its absence could not be checked",
                )
            return copier.step(cursor, count)

        server, again = self._scan_server("copy", cp.extra.get("server") if cp else None)
        cursor, done = (cp.cursor, cp.members_done) if cp and not again else ("0", 0)
        if cp and not again:
            self.store.add_event(
                self.name,
                "resume",
                to_value=cursor,
                detail=f"copy resumed at cursor {cursor} after {done} members",
            )
        return drive(
            _retry_batch(step),
            stage="copy",
            cursor=cursor,
            done=done,
            total=total,
            sizer=sizer,
            pacer=self.pacer(also=[shims]),
            save=self._saver(
                "copy", lambda: {"insert": copier.insert, "server": server}, server=server
            ),
            report=self._report("copy"),
        )

    # -- verify -----------------------------------------------------------------------------
    def verify(
        self, *, rounds: int = 3, delay: float = 0.5, repair: bool = False, fresh: bool = False
    ) -> VerifyReport:
        """Diff source and shards both ways; re-check suspects in later rounds; store them all.

        Resumable: the pass position lives in checkpoint ``verify``; suspects live in the
        ``diffs`` table as they are found. Runs under the job's lease.
        """
        with self.leased("verify"):
            # Shims leave a mark for each delete until they apply a phase past copying (the
            # copy needed them); the shard passes remove the marks, so none may still be
            # coming. Any epoch after copying will do, and in a settled job this returns at once.
            self.refresh()
            self.barrier("verify: shims stop marking deletes")
            return self._verify(rounds=rounds, delay=delay, repair=repair, fresh=fresh)

    def _verify(self, *, rounds: int, delay: float, repair: bool, fresh: bool) -> VerifyReport:
        verifier = HashVerifier(
            self.client, self.scripts, self.plan.source.key, self.shard_keys, fence=self._fresh
        )
        cp = self.store.get_checkpoint(self.job, "verify")
        new_run = cp is None or cp.finished or fresh or "run" not in cp.extra
        if new_run:
            run = self.store.last_verify_run(self.job) + 1
            state: dict[str, Any] = {"run": run, "pass": 0, "source_checked": 0}
            cursor, done = "0", 0
            self.store.add_event(self.name, "verify", to_value=str(run), detail="started")
        else:
            assert cp is not None
            state = dict(cp.extra)
            run, cursor, done = int(state["run"]), cp.cursor, cp.members_done
        server, again = self._scan_server("verify", None if new_run else state.get("server"))
        if again:  # the pass under way starts over; the passes before it stand
            p = int(state["pass"])
            cursor, done = "0", (0 if p == 0 else int(state.get("shard_checked", 0)))
        state["server"] = server
        report = VerifyReport(run)

        def sink(found: list[Found]) -> None:
            self.store.add_diffs(self.job, run, found, status="suspect")

        marks_before = int(state.get("marks_removed", 0))  # by an earlier process of this run

        def extra() -> dict[str, Any]:
            state["marks_removed"] = marks_before + verifier.marks_removed
            return dict(state)

        save = self._saver("verify", extra, server=server)
        if new_run:
            # Saved before the first batch: until then status would show the last run's
            # finished checkpoint, and no hold (a pause, a gate) that keeps this one waiting.
            save("0", 0, False)
        # Pass 0 is the source → shards direction; pass i+1 is shard i → source.
        total_passes = 1 + len(self.shard_keys)
        # The shard passes cost alike per member: one sizer carries over from shard to shard.
        # Verify scans as long as the copy: its commands aim at the same small slice.
        forward_sizer, backward_sizer = self.sizer(aim=SLICE), self.sizer(aim=SLICE)

        def end_pass(p: int, done: int) -> None:
            # Saved as the next pass's start in one write: were the end saved as this pass's
            # cursor 0, a resume could not tell it from the pass's start, and would walk the
            # pass again, counting its members twice.
            before = dict(state)
            if p == 0:
                state["source_checked"] = done
            state["pass"] = p + 1
            state["shard_checked"] = done if p > 0 else 0
            try:
                save("0", state["shard_checked"], False)
            except BaseException:
                state.clear()
                state.update(before)  # not saved: what drive saves on its way out is this pass's
                raise

        def pass_start(p: int) -> int:
            """The count pass ``p`` starts from: 0 for the source's, the shard passes' running
            total for a shard's."""
            return 0 if p == 0 else int(state.get("shard_checked", 0))

        def save_in_pass(p: int, cursor: str, done: int, end: bool) -> None:
            # Cursor 0 past the pass's start is its end, however it comes: drive's end, or
            # drive's save on its way out of a failure.
            if end or (cursor == "0" and done != pass_start(p)):
                end_pass(p, done)
            else:
                save(cursor, done, False)

        while state["pass"] < total_passes:
            p = state["pass"]
            if cursor == "0" and done != pass_start(p):
                # A pass's end as an earlier release saved it: (that pass, cursor 0, its
                # members). Go on from the next pass rather than walk this one again.
                end_pass(p, done)
                cursor, done = "0", int(state["shard_checked"])
                continue
            sizer = forward_sizer if p == 0 else backward_sizer
            step = (
                verifier.forward(sink, sizer) if p == 0 else verifier.backward(p - 1, sink, sizer)
            )
            done = drive(
                _retry_batch(step),
                stage="verify",
                cursor=cursor,
                done=done,
                total=self.job.total_members,
                sizer=sizer,
                pacer=self.pacer(frees="verify"),
                # The end of a pass is not the end of the run: only the last save below marks
                # the run finished (cleanup and `migrator run` go by that mark).
                save=functools.partial(save_in_pass, p),
                report=self._report("verify"),
            )
            if state["pass"] == p:  # drive ends with its end saved; this is belt and braces
                end_pass(p, done)
            cursor, done = "0", int(state["shard_checked"])
        report.source_checked = int(state["source_checked"])
        report.shard_checked = int(state.get("shard_checked", 0))
        report.marks_removed = marks_before + verifier.marks_removed
        report.suspects = sum(self.store.count_diffs(self.job, run, status="suspect").values())

        for _ in range(max(0, rounds - 1)):
            if not self.store.count_diffs(self.job, run, status="suspect"):
                break
            self._still_working()  # a rollback meanwhile: no round more
            pacer = self.pacer(frees="verify")
            pacer.check_stop()
            self.stop.wait(delay)  # a stop request ends the wait
            self._recheck(verifier, run, "suspect", pacer)
        # A rollback meanwhile stopped the dual writes: what the rounds saw since is no
        # difference to confirm, and the run stops as its scan would have.
        self._still_working()
        # What survived every round is confirmed.
        self.store.set_diff_status(self.job, run, "suspect", "confirmed")
        self.store.drop_duplicate_diffs(self.job, run, "confirmed")
        if repair:
            report.repaired = self._repair(verifier, run)
        report.confirmed = self.store.count_diffs(self.job, run, status="confirmed")
        report.deadlines_followed = self._follow_deadline("verify")
        # Which shard keys hold nothing now, deadlines followed: cleanup refuses if another
        # has gone since (expired or deleted), while the old key still holds its members.
        state["missing_shards"] = self._missing_shards("verify")
        save("0", done, True)
        self.store.add_event(
            self.name,
            "verify",
            to_value=str(run),
            # JSON, as `history --json` passes the detail on as it is.
            detail=f"{'clean' if report.clean else 'differences'}: "
            + json.dumps(report.as_dict(), sort_keys=True),
        )
        return report

    def _recheck(self, verifier: HashVerifier, run: int, status: str, pacer: Pacer) -> None:
        """One round of re-checks, paced as the passes are: pause, set-rate, the gates, a stop
        and a rollback act between its batches, not after the round."""
        from migrator.store import iter_all

        batch: list[Any] = []
        # A re-check costs more per member than a scan step (two or three lookups): small start.
        sizer = BatchSizer(self.plan.copy_.batch, self.budget_us)
        waiting = self._waiting("verify")

        def flush() -> None:
            pacer.before_batch(waiting)
            still, _ = verifier.recheck([(d.member, d.shard) for d in batch], sizer=sizer)
            alive = {(m, s): k for m, k, s in still}
            self.store.update_diffs(
                [
                    (
                        d.id,
                        status if (d.member, d.shard) in alive or _moved(d, alive) else "cleared",
                        alive.get((d.member, d.shard), d.kind),
                    )
                    for d in batch
                ]
            )
            pacer.after_batch(len(batch), waiting)
            waiting(None)  # no longer held (said only if it was)
            batch.clear()

        for d in iter_all(self.store, self.job, run, status=status):
            batch.append(d)
            if len(batch) >= 500:
                flush()
        if batch:
            flush()

    def _repair(self, verifier: HashVerifier, run: int) -> int:
        from migrator.store import iter_all

        copier = HashCopier(
            self.client,
            self.scripts,
            self.plan.source.key,
            self.shard_keys,
            self.budget_us,
            fence=self._fresh,
        )
        pacer, waiting = self.pacer(), self._waiting("verify")
        repaired = 0
        page: list[Any] = []
        # Each script is sized to the budget by the time it reports, as the re-checks are: a
        # repair moves whole values, which may be large.
        sync_sizer = BatchSizer(self.plan.copy_.batch, self.budget_us)
        check_sizer = BatchSizer(self.plan.copy_.batch, self.budget_us)

        def flush() -> int:
            pacer.before_batch(waiting)
            for found in {d.shard for d in page}:
                members = [d.member for d in page if d.shard == found]
                copier.sync(members, found=found, sizer=sync_sizer)
            still, _ = verifier.recheck([(d.member, d.shard) for d in page], sizer=check_sizer)
            alive = {(m, s) for m, _k, s in still}
            fixed = [d for d in page if (d.member, d.shard) not in alive]
            self.store.update_diffs([(d.id, "repaired", d.kind) for d in fixed])
            pacer.after_batch(len(page), waiting)
            waiting(None)
            n = len(fixed)
            page.clear()
            return n

        # Lazily: iter_all pages by id, which the status changes below do not disturb.
        for d in iter_all(self.store, self.job, run, status="confirmed"):
            page.append(d)
            if len(page) >= 200:
                repaired += flush()
        if page:
            repaired += flush()
        self.store.add_event(
            self.name, "repair", to_value=str(repaired), detail=f"verify run {run}"
        )
        return repaired

    # -- gray / cutover ------------------------------------------------------------------------
    def set_ratio(self, ratio: int, *, force: bool = False) -> Job:
        if not 0 <= ratio <= 100:
            raise IllegalTransition(f"ratio must be 0..100, got {ratio}")
        job = self.refresh()
        allowed = RATIO_PHASES | ({P.VERIFYING} if force else frozenset())
        if job.phase not in allowed:
            hint = (
                " (--force skips an unfinished or failed verification)"
                if job.phase == P.VERIFYING
                else ""
            )
            if job.phase in (P.CLEANING, P.DONE):
                why = "reads go to the shards only once cleanup has begun"
            elif job.phase in (P.ROLLING_BACK, P.ROLLED_BACK):
                why = "a rolled-back job reads the old key only (apply its plan again to retry)"
            else:
                why = f"the read ratio can move only once the job is verified{hint}"
            raise IllegalTransition(f"job {self.name} is in phase {job.phase}; {why}")
        target = phase_for_ratio(ratio) if ratio > 0 or job.phase != P.VERIFIED else P.VERIFIED
        detail = "set-ratio --force" if force and job.phase == P.VERIFYING else "set-ratio"
        if target == job.phase:
            self.job = self.store.set_ratio(self.name, ratio, expect=job.phase, detail=detail)
            self.publish()
            return self.job
        return self.move(target, ratio=ratio, detail=detail, expect=job.phase)

    # -- rollback ---------------------------------------------------------------------------
    def rollback(self) -> Job:
        """Back to old-only: ratio 0, shims stop writing shards (barrier), shards removed.

        The phase moves first, so a copy or verify running elsewhere stops after its batch
        and gives up the lease this then waits for.
        """
        job = self.refresh()
        if job.phase == P.ROLLED_BACK:
            return self._republish_finished("rollback")
        if job.phase in BEFORE_CLEANING:
            self.move(P.ROLLING_BACK, ratio=0, detail="rollback")
        elif job.phase != P.ROLLING_BACK:
            raise IllegalTransition(
                f"job {self.name} is in phase {job.phase}; rollback is possible only before "
                "cleanup starts"
            )
        with self.leased("rollback", preempting=True):
            self.publish()
            self.barrier("rollback")
            if self._rolling_back_from(P.PLANNED):
                # The job wrote no shard key (shims write the old key alone in planned): any
                # that exists is someone else's, which its preflight refused to mix with.
                return self.move(
                    P.ROLLED_BACK,
                    detail="no shard key removed: rolled back from planned, none was written",
                    expect=P.ROLLING_BACK,
                )
            self._guard(lambda: self._remove_keys("rollback", self.shard_keys), "rollback")
            return self.move(P.ROLLED_BACK, detail="shard keys removed", expect=P.ROLLING_BACK)

    def _rolling_back_from(self, phase: Phase) -> bool:
        """Whether the move to rolling_back under way came from ``phase`` (its audited move,
        written with it, says so: also for a rollback resumed by another process)."""
        moves = [
            e
            for e in self.store.history(self.name)
            if e.kind == "phase" and e.to_value == P.ROLLING_BACK.value
        ]
        return bool(moves) and moves[-1].from_value == phase.value

    def _republish_finished(self, purpose: str) -> Job:
        """The job is finished (rolled_back, done): running its last verb again publishes its
        record once more and succeeds. The move's store write may have landed and its publish
        not (a Redis error, a crash between the two), which left shims on the last phase but
        one and a re-apply refused; "the same command again" is the way on, as for any
        interrupted step."""
        with self.leased(purpose):
            current = self._guard(lambda: control.read(self.client, self.name), purpose)
            if current is not None and current.salt != self.job.salt:
                # Removed once finished, the name was taken by a job another store drives.
                raise IllegalTransition(
                    f"job {self.name} is {self.job.phase}; the control record in Redis now "
                    "belongs to another job of this name (another state store's), left as it is"
                )
            self.publish()
        return self.job

    # -- cleanup ----------------------------------------------------------------------------
    def cleanup(self, *, detail: str = "cleanup", force: bool = False) -> Job:
        """From cutover: shims stop writing the old key (barrier), then the old key goes.

        Refuses a job whose last verify run is unfinished, or confirmed differences nobody
        repaired (``force`` removes the old key anyway, audited): after cleanup the shards
        are all there is."""
        job = self.refresh()
        if job.phase == P.DONE:
            return self._republish_finished("cleanup")
        if job.phase == P.CUTOVER:
            swept = self.store.get_checkpoint(self.job, "verify")
            if swept is None or not swept.finished:
                # Reached with set-ratio --force: the shards may still hold the delete marks the
                # copy needed, which the shards-only phases would treat as values.
                raise IllegalTransition(
                    f"job {self.name} has no finished verify run; cleanup needs one, since "
                    f"verify removes the delete marks the copy left in the shards "
                    f"(migrator verify {self.name} first)"
                )
            run = self.store.last_verify_run(self.job)
            confirmed = self.store.count_diffs(self.job, run, status="confirmed")
            if confirmed:
                found = ", ".join(f"{kind} {n}" for kind, n in sorted(confirmed.items()))
                if not force:
                    msg = (
                        f"job {self.name}: verify run {run} confirmed differences nobody "
                        f"repaired ({found}); removing the old key would lose them"
                    )
                    self.store.update_job(self.name, last_error=f"cleanup refused: {msg}")
                    raise VerificationFailed(
                        msg,
                        hint=f"migrator verify {self.name} --show, then --repair (a clean run "
                        "lets cleanup go on); cleanup --force removes the old key anyway",
                    )
                self.store.add_event(
                    self.name,
                    "flag",
                    to_value="force",
                    detail=f"cleanup --force past verify run {run}'s differences: {found}",
                )
            # The source is the truth for the last time: from cleaning on, the shards are, and
            # the old key follows their deadline.
            self._follow_deadline("cleanup")
            self._check_no_shard_lost(swept, run, force=force)
            self.move(P.CLEANING, detail=detail, expect=P.CUTOVER)
        elif job.phase != P.CLEANING:
            raise IllegalTransition(
                f"job {self.name} is in phase {job.phase}; cleanup starts only from cutover "
                "(migrator set-ratio 100 first)"
            )
        with self.leased("cleanup", preempting=True):
            # Two barriers. First every shim writes the shards first and mirrors into the old
            # key: mixed with instances still in cutover (old first, then shard) every member
            # stays equal on both sides, so no update is lost. Then the old key is retired:
            # shims write the shards only, mixed only with mirroring ones, for which the shard
            # is the truth too. Only then can nobody write the old key, and it goes.
            self.publish()
            retired = self._old_retired()  # a resumed cleanup: this barrier is the second one
            self.barrier(
                "cleanup: old key retired" if retired else "cleanup: shims write shards first"
            )
            if not retired:
                # The new epoch first: were the checkpoint saved first and the runner stopped
                # before the bump, a resumed cleanup would publish retire_old under the epoch
                # shims acknowledged without it, and the barrier below would pass at once.
                self.job = self.store.bump_epoch(self.name, expect=P.CLEANING)
                self.store.save_checkpoint(self.job, "retire", "0", 0, finished=True)
                self.store.add_event(
                    self.name,
                    "retire",
                    to_value=str(self.job.epoch),
                    detail="old key retired: shims write the shards only",
                )
                self.publish()
            self.barrier("cleanup: old key retired")
            self._guard(lambda: self._remove_keys("cleanup", [self.plan.source.key]), "cleanup")
            return self.move(P.DONE, detail="old key removed", expect=P.CLEANING)

    def _missing_shards(self, what: str) -> list[int]:
        """Indices of the shard keys that do not exist."""

        def read() -> list[int]:
            return [i for i, n in enumerate(keys_exist(self.client, self.shard_keys)) if not n]

        return self._guard(read, what)

    def _check_no_shard_lost(self, swept: Any, run: int, *, force: bool) -> None:
        """Refuse cleanup when a shard key the last verify run saw is gone: it expired (the
        application moved the old key's deadline with its plain client after that run, and
        no write reached the shard) or was deleted, and the old key is the only copy of its
        members. ``force`` goes on (audited)."""
        if "missing_shards" not in swept.extra:
            return  # a run from before verify recorded them: nothing to compare with
        seen_missing = set(swept.extra["missing_shards"])
        lost = [i for i in self._missing_shards("cleanup") if i not in seen_missing]
        if not lost:
            return
        names = ", ".join(self.shard_keys[i] for i in lost[:5]) + (
            f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        )
        msg = (
            f"job {self.name}: shard key(s) {names} held members at the end of verify run "
            f"{run} and are gone: expired (the old key's deadline moved after that run, and no "
            "write reached them) or deleted; removing the old key would lose their members"
        )
        if force:
            self.store.add_event(
                self.name, "flag", to_value="force", detail=f"cleanup --force: {msg}"
            )
            return
        self.store.update_job(self.name, last_error=f"cleanup refused: {msg}")
        raise VerificationFailed(
            msg,
            hint=f"migrator verify {self.name} --repair restores them from the old key, then "
            "cleanup again (expiring through the shim, ShardRouter.expire, keeps every key on "
            "one deadline); cleanup --force removes the old key anyway",
        )

    def _follow_deadline(self, what: str) -> int:
        """Every shard's deadline made the source's (copier.follow_deadline)."""
        source = self.plan.source.key
        check_fence(self._fresh)
        return self._guard(
            lambda: follow_deadline(self.scripts, source, self.shard_keys, self.budget_us), what
        )

    def _old_retired(self) -> bool:
        cp = self.store.get_checkpoint(self.job, "retire")
        return cp is not None and cp.finished

    def removal_mode(self) -> str:
        """``hdel`` as the plan says; else UNLINK where the server has it. A plan's ``unlink``
        was checked at apply; a server that lost UNLINK since (a failover to one with renamed
        commands, an ACL change) falls back to HSCAN+HDEL, audited, rather than leave the job
        stuck in rolling_back or cleaning, whose plan cannot change."""
        mode = self.plan.cleanup.mode
        if mode == "hdel":
            return mode
        if supports_unlink(self.client, keys.probe(self.name, "unlink")):
            return "unlink"
        if mode == "unlink":
            self.store.add_event(
                self.name,
                "flag",
                to_value="hdel",
                detail="cleanup.mode unlink, but the server has no UNLINK for this user now: "
                "removing by HSCAN+HDEL",
            )
        return "hdel"

    def _remove_keys(self, stage: str, targets: list[str]) -> None:
        remover = KeyRemover(self.client, self.scripts)
        mode = self.removal_mode()
        cp = self.store.get_checkpoint(self.job, stage)
        start = int(cp.extra.get("key", 0)) if cp else 0
        for index in range(start, len(targets)):
            key = targets[index]
            state = {"key": index, "mode": mode}
            check_fence(self._fresh)  # a holder paused since the barrier removes nothing more
            if mode == "unlink":
                # One command, freed off the main thread; still held by a pause (cleanup), a
                # pause file (cleanup), the latency and replica gates and Ctrl-C, as HDEL is.
                self.pacer(frees=stage).before_batch(self._waiting(stage))
                remover.unlink(key)
            else:
                cursor, done = (cp.cursor, cp.members_done) if cp and index == start else ("0", 0)
                if cursor != "0":
                    self.store.add_event(
                        self.name,
                        "resume",
                        to_value=cursor,
                        detail=f"{stage} of {key} resumed at cursor {cursor} ({done} done)",
                    )
                # A scan pass can miss members added behind the cursor; repeat until gone.
                while remover.exists(key):
                    done = drive(
                        _retry_batch(remover.delete_steps(key)),
                        stage=stage,
                        cursor=cursor,
                        done=done,
                        total=None,
                        sizer=self.sizer(),
                        pacer=self.pacer(frees=stage),
                        save=self._saver(stage, functools.partial(dict, state)),
                        report=self._report(stage),
                    )
                    cursor = "0"
            check_fence(self._fresh)
            self.store.save_checkpoint(
                self.job,
                stage,
                "0",
                0,
                finished=index + 1 == len(targets),
                extra={"key": index + 1, "mode": mode},
            )
        self.store.add_event(
            self.name, stage, to_value=mode, detail=f"{len(targets)} key(s) removed by {mode}"
        )


def _moved(d: Any, alive: dict[tuple[bytes, int], str]) -> bool:
    return any(m == d.member for m, _s in alive)


def _diff_message(name: str, report: VerifyReport) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.confirmed.items()) if n)
    return f"verification of {name} (run {report.run}) confirmed differences: {kinds}"


__all__ = ["Runner", "VerifyReport"]
