"""The verbs. Plain functions, each a few lines wiring the layers below (alembic's command.py
is the model): the CLI, the scheduler and the tests all call these, so they cannot drift.

Order inside ``apply`` matters for "bad input writes nothing": the plan is validated, the job
looked up read-only, Redis preflighted, and only then is the store opened and written.
"""

from __future__ import annotations

import difflib
import json
import math
import threading
from collections.abc import Callable
from typing import Any, cast

from migrator import control, keys, lease
from migrator.errors import (
    IllegalTransition,
    InputError,
    JobNotFound,
    MigratorError,
    PlanConflict,
)
from migrator.phases import ACTIVE, TERMINAL, Phase
from migrator.plan import Plan, load_plan
from migrator.preflight import preflight
from migrator.redisio import connect
from migrator.runner import Runner, VerifyReport
from migrator.scanloop import Progress
from migrator.store import (
    Event,
    Job,
    Store,
    open_existing_store,
    open_store,
    peek_job,
    state_exists,
)
from migrator.store import state_url as resolve_state_url
from migrator.store.repository import iter_all
from migrator.throttle import check_stop

ProgressFn = Callable[[Progress], None]

#: Phases in which `migrator verify` may run: the copy is complete and the old key still whole.
VERIFIABLE = (Phase.VERIFYING, Phase.VERIFIED, Phase.GRAY, Phase.CUTOVER)


def validate(path: str) -> Plan:
    return load_plan(path)


def _spec_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    a = json.dumps(old, indent=2, sort_keys=True).splitlines()
    b = json.dumps(new, indent=2, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "registered", "this plan", lineterm="", n=1))


def registered(path: str, state_url: str | None) -> bool:
    """Whether the plan at ``path`` names a job the store holds (read-only; False when either
    cannot be read): what a failed plan apply has left to resume."""
    try:
        return peek_job(state_url, load_plan(path).name) is not None
    except MigratorError:
        return False


def apply(
    path: str,
    *,
    state_url: str | None = None,
    allow_no_instances: bool = False,
    stop: threading.Event | None = None,
    on_progress: ProgressFn | None = None,
    barrier_timeout: float = 60.0,
    force: bool = False,
) -> Job:
    """Register the plan's job (idempotent) and run it forward to ``verified``.

    ``force`` copies even when the memory preflight finds too little headroom (audited)."""
    plan = load_plan(path)
    existing = peek_job(state_url, plan.name)
    if existing and existing.phase not in TERMINAL and _moved_server(existing, plan):
        existing = _follow_server(existing, plan, state_url)
    if existing and existing.spec_hash != plan.spec_hash() and existing.phase not in TERMINAL:
        raise PlanConflict(
            f"job {plan.name!r} is active (phase {existing.phase}) with a different plan; "
            "a running job's plan cannot change:\n"
            + _spec_diff(Plan.from_spec(existing.spec).masked(), plan.masked()),
            hint="roll it back first, or give the new plan another name",
        )
    if existing and existing.phase in (Phase.ROLLING_BACK, Phase.CLEANING):
        verb = "rollback" if existing.phase == Phase.ROLLING_BACK else "cleanup"
        raise IllegalTransition(
            f"job {plan.name!r} is in phase {existing.phase}: plan apply runs a job forward to "
            f"verified, and this one's {verb} was interrupted",
            hint=f"`migrator {verb} {plan.name}` (or `migrator run`) resumes it",
        )
    if existing and existing.phase == Phase.DONE:
        if existing.spec_hash != plan.spec_hash():
            raise PlanConflict(
                f"job {plan.name!r} is done (its old key was removed) under another plan; a "
                "finished job's name cannot take a new plan:\n"
                + _spec_diff(Plan.from_spec(existing.spec).masked(), plan.masked()),
                hint="give the new plan another name",
            )
        return existing
    client = connect(plan.redis.url, name=f"migrator:{plan.name}:preflight")
    try:
        # A job left in planned (its first run failed before dual_write) has written nothing
        # yet: a shard key that appeared meanwhile is someone else's, as for a new job.
        fresh = existing is None or existing.phase in (Phase.ROLLED_BACK, Phase.PLANNED)
        report = (
            preflight(
                client,
                plan,
                # A job left in planned is resumed: the first apply's flag stands.
                allow_no_instances=allow_no_instances
                or bool(
                    existing and existing.phase == Phase.PLANNED and existing.allow_no_instances
                ),
                force=force,
                own=(existing.epoch, existing.salt) if existing else None,
            )
            if fresh
            else None
        )
    finally:
        client.close()
    if stop is not None:
        check_stop(stop)  # stopped during the preflight: nothing registered
    store = open_store(state_url)
    try:
        floor = report.published_epoch if report is not None else 0
        if existing is None:
            store.create_job(plan, allow_no_instances=allow_no_instances, epoch_floor=floor)
        elif existing.phase == Phase.ROLLED_BACK:
            store.reset_for_reapply(
                plan.name, plan, epoch_floor=floor, allow_no_instances=allow_no_instances
            )
        if force and report is not None and report.headroom is not None:
            room = report.headroom
            store.add_event(
                plan.name,
                "flag",
                to_value="force",
                detail="apply --force: memory preflight "
                + ("overridden: " if not room.fits else "passed: ")
                + room.describe(),
            )
        runner = Runner(
            store, plan.name, stop=stop, on_progress=on_progress, barrier_timeout=barrier_timeout
        )
        return runner.apply()
    finally:
        store.close()


def _moved_server(job: Job, plan: Plan) -> bool:
    """The plan differs from the job's only in ``redis.url``: the server moved (a failover to
    a new address, a rotated password), not the plan."""
    stored = dict(job.spec)
    return stored["redis"] != plan.spec()["redis"] and {**stored, "redis": None} == {
        **plan.spec(),
        "redis": None,
    }


def _follow_server(job: Job, plan: Plan, state_url: str | None) -> Job:
    """Point an active job at its server's new URL (audited), once that server proves to be the
    job's own: it holds the job's control record at the job's epoch (a job not yet published
    has nothing there to check and nothing to lose by moving). Without this, a job whose
    server moved could neither go on nor be rolled back."""
    client = connect(plan.redis.url, name=f"migrator:{plan.name}:preflight")
    try:
        record = control.read(client, plan.name)
    finally:
        client.close()
    if job.phase != Phase.PLANNED and (record is None or record.epoch != job.epoch):
        seen = "none" if record is None else f"epoch {record.epoch}"
        raise PlanConflict(
            f"job {plan.name!r} (phase {job.phase}, epoch {job.epoch}) runs on "
            f"{Plan.from_spec(job.spec).masked()['redis']['url']}; the Redis at "
            f"{plan.masked()['redis']['url']} does not hold its control record at that epoch "
            f"({seen}), so it is not that server",
            hint="a job's redis.url may change only to the same server under another address",
        )
    store = open_store(state_url)
    try:
        old = Plan.from_spec(job.spec).masked()["redis"]["url"]
        store.update_job(plan.name, spec=plan.spec(), spec_hash=plan.spec_hash())
        store.add_event(
            plan.name, "redis_url", to_value=plan.masked()["redis"]["url"], detail=f"was {old}"
        )
        return store.get_job(plan.name)
    finally:
        store.close()


def _store_for(state_url: str | None, name: str | None) -> Store:
    """The store of the verbs that act on registered jobs (``name``, or the one active job):
    refusing an unknown job creates no store."""
    return open_existing_store(state_url, job=name)


def resolve_name(store: Store, name: str | None) -> str:
    if name:
        store.get_job(name)
        return name
    active = [j for j in store.list_jobs() if j.phase not in TERMINAL]
    if len(active) == 1:
        return active[0].name
    if not active:
        raise JobNotFound("no active job in the state store; name one")
    raise InputError(
        "several jobs are active (" + ", ".join(j.name for j in active) + "); name the one you mean"
    )


def status(state_url: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """Everything `migrator status` shows, as plain data with stable field names (README)."""
    if not name and not state_exists(resolve_state_url(state_url)):
        return []  # no store yet: no jobs, and none is created to say so
    store = _store_for(state_url, name)
    try:
        jobs = [store.get_job(name)] if name else store.list_jobs()
        return [_status_of(store, j) for j in jobs]
    finally:
        store.close()


def _status_of(store: Store, job: Job) -> dict[str, Any]:
    plan = job.plan
    cps = {s: store.get_checkpoint(job, s) for s in ("cleanup", "rollback", "verify", "copy")}
    stage = next((s for s, c in cps.items() if c is not None and not c.finished), None)
    cp = cps[stage] if stage else None
    copy_cp = cps["copy"]
    total = job.total_members
    copied = (
        min(copy_cp.members_done, total)
        if copy_cp and total is not None
        else (copy_cp.members_done if copy_cp else 0)
    )
    if copy_cp and copy_cp.finished and total is not None:
        copied = total
    rate = float(cp.extra.get("rate", 0.0)) if cp else 0.0
    # `migrator verify NAME` also runs in verified, gray and cutover (not after a rollback,
    # which can leave the verify it interrupted unfinished).
    working = cp is not None and (
        job.phase in ACTIVE or (stage == "verify" and job.phase in VERIFIABLE)
    )
    eta = None
    if stage == "copy" and working and rate > 0 and total is not None:
        eta = round(max(total - copied, 0) / rate, 1)
    out: dict[str, Any] = {
        "name": job.name,
        "phase": job.phase.value,
        "ratio": job.ratio,
        "epoch": job.epoch,
        "paused": job.paused,
        "rate_override": job.rate_override,
        "source_key": plan.source.key,
        "target_key": plan.target.key,
        "shards": plan.target.shards,
        "copied": copied,
        "total": total,
        "progress": round(copied / total, 4)
        if total
        else (1.0 if copy_cp and copy_cp.finished else 0.0),
        "copy_insert": copy_cp.extra.get("insert") if copy_cp else None,
        "stage": stage if working else None,
        "stage_done": cp.members_done if cp and working else None,
        "rate": rate if working else 0.0,
        "eta_seconds": eta,
        "throttle": cp.extra.get("throttle") if cp and working else None,
        "last_error": job.last_error,
        "updated_at": job.updated_at.isoformat(),
        "phase_changed_at": job.phase_changed_at.isoformat(),
        "instances": [],
        "counters": {},
        "redis": "unknown",
        "runner": None,
        "interrupted": False,
        "verify": None,
    }
    # This attempt's last run: a re-apply drops the checkpoints, and the runs of the attempt
    # it rolled back are no news about this one's shards.
    v = cps["verify"]
    run = (int(v.extra["run"]) if "run" in v.extra else store.last_verify_run(job)) if v else 0
    if run:
        out["verify"] = {
            "run": run,
            "confirmed": store.count_diffs(job, run, status="confirmed"),
            "repaired": store.count_diffs(job, run, status="repaired"),
        }
    try:
        client = connect(plan.redis.url, name=f"migrator:{job.name}:status")
    except Exception as e:  # status must still show the store's view when Redis is down
        # One line (the message without its hint): the human status shows it in one.
        out["redis"] = f"unreachable: {getattr(e, 'message', e)}"
        return out
    try:
        out["redis"] = "ok"
        holder = cast(bytes | None, client.get(keys.lock(job.name)))
        out["runner"] = lease.describe(holder) if lease.held(holder) else None
        if working and not lease.held(holder):
            # Unfinished work nobody runs: stopped (Ctrl-C, a crash, a runtime failure).
            out["interrupted"] = True
            out["rate"], out["eta_seconds"], out["throttle"] = 0.0, None, None
        out["instances"] = [
            {
                "id": i.id,
                "host": i.host,
                "pid": i.pid,
                "epoch": i.epoch,
                "age_s": round(i.age_s, 1),
                "live": i.live,
                "lagging": i.live and i.epoch < job.epoch,
                "protocol": i.protocol,
            }
            for i in control.instances(client, job.name)
        ]
        totals: dict[str, int] = {}
        for field, value in cast(dict, client.hgetall(keys.counters(job.name))).items():
            counter = field.decode().split("|", 1)[-1]
            totals[counter] = totals.get(counter, 0) + int(value)
        out["counters"] = totals
    finally:
        client.close()
    return out


def set_ratio(
    percent: int, *, name: str | None = None, state_url: str | None = None, force: bool = False
) -> Job:
    store = _store_for(state_url, name)
    try:
        runner = Runner(store, resolve_name(store, name))
        return runner.set_ratio(percent, force=force)
    finally:
        store.close()


def _control(name: str, state_url: str | None, verb: str, **change: Any) -> Job:
    """pause, resume and set-rate: a change to the work of a job not finished yet."""
    store = _store_for(state_url, name)
    try:
        job = store.get_job(name)
        if job.phase in TERMINAL:
            raise IllegalTransition(
                f"job {name} is {job.phase}: it has no work left for {verb} to act on",
                hint="a rolled-back job applied again starts unpaused at the plan's rate"
                if job.phase == Phase.ROLLED_BACK
                else None,
            )
        return store.update_job(name, **change, audit=verb)
    finally:
        store.close()


def pause(name: str, *, state_url: str | None = None) -> Job:
    return _control(name, state_url, "pause", paused=True)


def resume(name: str, *, state_url: str | None = None) -> Job:
    return _control(name, state_url, "resume", paused=False)


def set_rate(name: str, rate: float, *, state_url: str | None = None) -> Job:
    if not math.isfinite(rate) or rate < 0:
        raise InputError(f"rate must be >= 0 members/s (0 = unlimited), got {rate:g}")
    return _control(name, state_url, "set-rate", rate_override=rate)


def verify(
    name: str,
    *,
    state_url: str | None = None,
    repair: bool = False,
    rounds: int = 3,
    delay: float = 0.5,
    stop: threading.Event | None = None,
    on_progress: ProgressFn | None = None,
) -> VerifyReport:
    store = _store_for(state_url, name)
    try:
        job = store.get_job(name)
        if job.phase not in VERIFIABLE:
            raise InputError(
                f"job {name} is in phase {job.phase}; verify runs once the copy has "
                "finished and before cleanup"
            )
        runner = Runner(store, name, stop=stop, on_progress=on_progress)
        # An interrupted run resumes from its checkpoint; a finished one starts a new run.
        with runner.working(*VERIFIABLE):
            report = runner._guard(
                lambda: runner.verify(rounds=rounds, delay=delay, repair=repair), "verify"
            )
        job = store.get_job(name)
        if job.phase == Phase.VERIFIED and not report.clean:
            runner.move(
                Phase.VERIFYING,
                detail=f"verify run {report.run} found differences",
                expect=Phase.VERIFIED,
            )
        elif job.phase == Phase.VERIFYING and report.clean:
            runner.move(
                Phase.VERIFIED, detail=f"verify run {report.run} clean", expect=Phase.VERIFYING
            )
        return report
    finally:
        store.close()


def diffs(
    name: str,
    *,
    state_url: str | None = None,
    run: int | None = None,
    status: str | None = "confirmed",
) -> list[dict[str, Any]]:
    store = _store_for(state_url, name)
    try:
        job = store.get_job(name)
        run = run or store.last_verify_run(job)
        return [
            {
                "member": d.member.decode("utf-8", "backslashreplace"),
                "kind": d.kind,
                "shard": d.shard,
                "status": d.status,
            }
            for d in iter_all(store, job, run, status=status)
        ]
    finally:
        store.close()


def rollback(
    name: str,
    *,
    state_url: str | None = None,
    stop: threading.Event | None = None,
    barrier_timeout: float = 60.0,
    on_progress: ProgressFn | None = None,
) -> Job:
    store = _store_for(state_url, name)
    try:
        return Runner(
            store, name, stop=stop, barrier_timeout=barrier_timeout, on_progress=on_progress
        ).rollback()
    finally:
        store.close()


def cleanup(
    name: str,
    *,
    state_url: str | None = None,
    stop: threading.Event | None = None,
    barrier_timeout: float = 60.0,
    on_progress: ProgressFn | None = None,
    force: bool = False,
) -> Job:
    store = _store_for(state_url, name)
    try:
        return Runner(
            store, name, stop=stop, barrier_timeout=barrier_timeout, on_progress=on_progress
        ).cleanup(force=force)
    finally:
        store.close()


def history(name: str, *, state_url: str | None = None) -> list[Event]:
    store = _store_for(state_url, name)
    try:
        return store.history(name)
    finally:
        store.close()
