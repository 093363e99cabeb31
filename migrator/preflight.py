"""Checks made before a job is registered: nothing here writes to Redis or the state store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis

from migrator import control, keys, memory
from migrator.errors import PreflightError
from migrator.phases import TERMINAL
from migrator.plan import Plan
from migrator.redisio import keys_exist, supports_unlink


@dataclass(frozen=True)
class PreflightReport:
    source_type: str
    members: int
    live_instances: int
    headroom: memory.Headroom | None = None
    #: The epoch of a control record an earlier run of this job name left in Redis (0: none).
    #: The job's epochs continue above it, so that no shim still holding it counts as having
    #: acknowledged an epoch the new run publishes.
    published_epoch: int = 0


def check_published(client: redis.Redis, plan: Plan, *, own: tuple[int, str] | None = None) -> int:
    """The epoch of this job name's control record in Redis, if a finished run left one; a
    record of a job still under way refuses the plan: another state store drives that job.
    ``own``: this store holds the job, finished, as (epoch, salt); a record of that very job
    (its salt, random per job, and no later epoch) whose last publish did not land is no other
    store's."""
    record = control.read(client, plan.name)
    if record is None:
        return 0
    if own is not None and record.salt == own[1] and record.epoch <= own[0]:
        return record.epoch
    if record.phase not in TERMINAL:
        raise PreflightError(
            f"job {plan.name!r} is already under way on this Redis (phase {record.phase.value}, "
            f"epoch {record.epoch}) but this state store has no such job: another state store "
            "drives it",
            hint="run migrator with the state store that applied it (--state URL or "
            "$MIGRATOR_STATE_URL), or give this plan another name",
        )
    return record.epoch


def check_memory(client: redis.Redis, plan: Plan, *, force: bool) -> memory.Headroom:
    """Refuse a copy whose estimated size does not fit below the memory limit (memory.py),
    unless ``force``; the numbers go in the message either way."""
    room = memory.headroom(client, plan.source.key, plan.target.shards)
    if not room.fits and not force:
        raise PreflightError(
            f"not enough memory for the copy of {plan.source.key!r}: {room.describe()}",
            hint="raise maxmemory or free memory first; --force copies anyway (audited), "
            "and the memory gate then pauses the copy near the limit",
        )
    return room


def detect_type(client: redis.Redis, plan: Plan) -> str:
    kind = client.type(plan.source.key)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind == "none":
        raise PreflightError(f"source key {plan.source.key!r} does not exist")
    if plan.source.type and plan.source.type != kind:
        raise PreflightError(
            f"source key {plan.source.key!r} is a {kind}, but the plan says source.type: "
            f"{plan.source.type}"
        )
    if kind != "hash":
        raise PreflightError(
            f"source key {plan.source.key!r} is a {kind}; this release migrates hash keys only"
        )
    return kind


#: Fields sampled for field expiry.
FIELD_TTL_SAMPLE = 1000


def check_field_ttls(client: redis.Redis, plan: Plan) -> None:
    """Refuse a source whose fields carry their own expiry (HEXPIRE: Redis 7.4+, Valkey 9).
    The copy and the shim's writes carry values, not field deadlines, so such a field would
    outlive its expiry in the shards. Asks a sample of the key's fields (HRANDFIELD, then
    HPEXPIRETIME, in small rounds); a server without field expiry has none to find."""
    key = plan.source.key
    asked = expiring = 0
    try:
        for fields in memory.sample_fields(client, key, FIELD_TTL_SAMPLE):
            deadlines = cast(
                list[int],
                client.execute_command("HPEXPIRETIME", key, "FIELDS", len(fields), *fields),
            )
            asked += len(fields)
            expiring += sum(1 for d in deadlines if int(d) > 0)
    except redis.ResponseError:  # no HRANDFIELD (before 6.2) or HPEXPIRETIME: no field
        return  # expiry on this server
    if expiring:
        raise PreflightError(
            f"source key {key!r} has fields with their own expiry (HEXPIRE): {expiring} of "
            f"{asked} sampled; this release copies values, not field deadlines, so they "
            "would outlive their expiry in the shards",
            hint="remove the field deadlines (HPERSIST) first, or leave this key as it is",
        )


def taken_shard_keys(client: redis.Redis, plan: Plan) -> list[str]:
    shard_keys = plan.target.shard_keys()
    return [k for k, n in zip(shard_keys, keys_exist(client, shard_keys), strict=True) if n]


def check_shards_free(client: redis.Redis, plan: Plan) -> None:
    """Refuse shard keys that exist before the job wrote any: someone else's, which the copy
    would mix with and a rollback would remove."""
    taken = taken_shard_keys(client, plan)
    if taken:
        shown = ", ".join(repr(k) for k in taken[:3]) + (" ..." if len(taken) > 3 else "")
        raise PreflightError(
            f"{len(taken)} shard key(s) of target.key {plan.target.key!r} already exist: {shown}",
            hint="choose another target.key, or remove those keys if they are leftovers (a job "
            "refused in planned may be rolled back: it removes no key it never wrote)",
        )


def preflight(
    client: redis.Redis,
    plan: Plan,
    *,
    allow_no_instances: bool,
    force: bool = False,
    own: tuple[int, str] | None = None,
) -> PreflightReport:
    """Refuse (PreflightError, exit 2) a plan the target cannot take; else report what it saw.

    ``force`` overrides the memory check only (the caller audits it); ``own``: this
    store's finished job of the plan's name, re-applied (:func:`check_published`)."""
    published = check_published(client, plan, own=own)
    kind = detect_type(client, plan)
    check_field_ttls(client, plan)
    check_shards_free(client, plan)
    live = control.live_instances(client, plan.name)
    if not live and not allow_no_instances:
        raise PreflightError(
            f"no live application instance reports for job {plan.name!r}: writes made by an "
            "application without the shim would be lost",
            hint="deploy the app with ShardRouter.attach(client, "
            f"{plan.name!r}) first, or pass --allow-no-instances if no application writes "
            f"{plan.source.key!r} meanwhile",
        )
    if plan.cleanup.mode == "unlink" and not supports_unlink(
        client, keys.probe(plan.name, "unlink")
    ):
        raise PreflightError(
            "cleanup.mode is unlink, but this server has no UNLINK for this user (renamed "
            "away, or denied by its ACL)",
            hint="use cleanup.mode: hdel (HSCAN+HDEL in budgeted batches) or auto",
        )
    room = check_memory(client, plan, force=force)
    members = cast(int, client.hlen(plan.source.key))
    return PreflightReport(kind, members, len(live), room, published_epoch=published)
