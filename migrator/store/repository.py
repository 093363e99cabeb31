"""The state store: one transaction per method, nothing else touches the tables.

The schema is created and upgraded by Alembic on first use (:func:`open_store`). SQLite is
the default (``.migrator/state.db``, WAL mode so a running copy and a ``set-ratio`` from
another shell do not block each other); PostgreSQL URLs work the same.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from migrator.errors import (
    IllegalTransition,
    InputError,
    JobBusy,
    JobNotFound,
    StoreUnavailable,
)
from migrator.phases import Phase, check_transition
from migrator.plan import Plan
from migrator.store.tables import checkpoints, diffs, events, jobs
from migrator.urls import mask_url

DEFAULT_STATE_URL = "sqlite:///.migrator/state.db"
_UPGRADE_LOCK = threading.Lock()


def now() -> datetime:
    return datetime.now(timezone.utc)


#: The length of an event's from_value and to_value columns (tables.events).
VALUE_CHARS = 64


def _clip(value: str | None) -> str | None:
    if value is None or len(value) <= VALUE_CHARS:
        return value
    return value[: VALUE_CHARS - 1] + "…"


def _changed_meanwhile(name: str) -> IllegalTransition:
    return IllegalTransition(
        f"job {name} was changed by another command meanwhile; see `migrator status {name}` "
        "and try again"
    )


def actor() -> tuple[str, str]:
    """(user, host) recorded with every audited event."""
    try:
        user = os.environ.get("MIGRATOR_ACTOR") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = f"uid:{os.getuid()}"
    return user, socket.gethostname()


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    spec: dict[str, Any]
    spec_hash: str
    phase: Phase
    ratio: int
    epoch: int
    salt: str
    paused: bool
    rate_override: float | None
    allow_no_instances: bool
    total_members: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    phase_changed_at: datetime

    @property
    def plan(self) -> Plan:
        return Plan.from_spec(self.spec)

    @classmethod
    def from_row(cls, row: Any) -> Job:
        m = dict(row._mapping)
        m["phase"] = Phase(m["phase"])
        for k in ("created_at", "updated_at", "phase_changed_at"):
            if m[k] is not None and m[k].tzinfo is None:  # SQLite drops the zone
                m[k] = m[k].replace(tzinfo=timezone.utc)
        return cls(**m)


@dataclass(frozen=True)
class Checkpoint:
    stage: str
    cursor: str
    members_done: int
    finished: bool
    extra: dict[str, Any]
    updated_at: datetime


@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str
    from_value: str | None
    to_value: str | None
    actor: str
    host: str
    detail: str | None


@dataclass(frozen=True)
class Diff:
    id: int
    run: int
    member: bytes
    kind: str
    shard: int
    status: str


def _make_private(path: Path) -> None:
    """The store holds each job's plan as resolved, a Redis password included: a SQLite store
    migrator creates is its owner's alone (directory 0700, file 0600; SQLite gives the -wal
    and -shm files the database file's mode). One that exists keeps the mode it has."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _engine(url: str) -> Engine:
    path = sqlite_file(url)
    if path is not None:
        _make_private(path)
    engine = sa.create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("migrations_state")))
    cfg.attributes["connection"] = connection
    return cfg


def _head() -> str:
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(None)  # type: ignore[arg-type]
    return ScriptDirectory.from_config(cfg).get_current_head() or ""


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def state_url(url: str | None) -> str:
    """``url``, else ``$MIGRATOR_STATE_URL``, else the default SQLite file."""
    return url or os.environ.get("MIGRATOR_STATE_URL") or DEFAULT_STATE_URL


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite store URL (None for others and for ``:memory:``); ValueError or
    ArgumentError for a URL that does not parse."""
    u = sa.engine.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _unavailable(url: str) -> Callable[[Any], None]:
    """An engine's handle_error hook: the store failing under a running verb (a SQLite file
    locked past the busy timeout, a PostgreSQL server gone) is a runtime failure: exit 1 with
    one message, the job as its last commit left it, and how to go on."""

    def hook(ctx: Any) -> None:
        if ctx.is_disconnect or isinstance(ctx.sqlalchemy_exception, sa.exc.OperationalError):
            raise StoreUnavailable(
                f"the state store {mask_url(url)} failed: {ctx.original_exception}",
                hint="the job is as its last commit left it (checkpoint kept); once the store "
                "answers again, run the same command again (or `migrator run`) to resume",
            ) from None

    return hook


@contextmanager
def opening(url: str) -> Iterator[None]:
    """Turn what goes wrong while opening the store at ``url`` into migrator's errors: a URL
    that is not one, names a database, role or driver that is not there (or credentials the
    server refuses), a file that is not a SQLite database, or an in-memory SQLite database
    (gone, with its jobs, when the command exits) is bad input (exit 2); a store that cannot
    be reached is a runtime failure (exit 1)."""
    where = mask_url(url)
    hint = "pass --state URL or set MIGRATOR_STATE_URL (e.g. sqlite:///.migrator/state.db)"
    try:
        u = sa.engine.make_url(url)
        if u.get_backend_name() == "sqlite" and (
            not u.database or ":memory:" in u.database or u.query.get("mode") == "memory"
        ):
            raise InputError(
                f"state store URL {where!r} is an in-memory SQLite database: the job would be "
                "lost when this command exits",
                hint="name a file, e.g. sqlite:///.migrator/state.db",
            )
        yield
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as e:
        raise InputError(f"state store URL {where!r} is not usable: {e}", hint=hint) from None
    except ImportError as e:
        raise InputError(
            f"state store URL {where!r} needs a database driver that is not installed: {e}",
            hint="install it into migrator's environment",
        ) from None
    except OSError as e:
        raise InputError(f"state store {where}: {e.strerror or e}", hint=hint) from None
    except sa.exc.DBAPIError as e:
        # The server (or the file) answered, and what it refused is the URL: no retry helps.
        fatal = str(e.orig).partition("FATAL:")[2].strip().partition("\n")[0]
        if (
            fatal.endswith("does not exist")  # database or role
            or "authentication failed" in fatal
            or "no pg_hba.conf entry" in fatal
            or getattr(e.orig, "sqlite_errorname", None) in ("SQLITE_NOTADB", "SQLITE_CANTOPEN")
        ):
            raise InputError(f"state store {where}: {fatal or e.orig}", hint=hint) from None
        raise StoreUnavailable(
            f"cannot open the state store {where}: {e.orig or e}",
            hint="check that the database is up and the URL is right; nothing was changed",
        ) from None


def state_exists(url: str) -> bool:
    """True when the store at ``url`` already holds a schema; never creates anything."""
    with opening(url):
        path = sqlite_file(url)
        if path is not None and not path.exists():
            return False  # and connecting would create the file
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                return sa.inspect(conn).has_table("jobs")
        finally:
            engine.dispose()


@contextmanager
def _file_lock(url: str) -> Iterator[None]:
    """For a SQLite store, an flock on ``FILE.lock`` beside it, held by one process at a time;
    taken before the transaction, so released after its commit. Never a descriptor of the
    database file itself: closing one drops every POSIX lock SQLite holds on it in this
    process (SQLite's "how to corrupt" notes, 2.2)."""
    path = sqlite_file(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


#: The advisory lock key of a schema upgrade on PostgreSQL ("migrator" in ASCII).
_PG_LOCK_KEY = 0x6D69677261746F72


def open_store(url: str | None = None) -> Store:
    """Open (and on first use create or upgrade, through Alembic) the store at ``url``."""
    url = state_url(url)
    with opening(url):
        engine = _engine(url)
        # Alembic's command API keeps module-global state: one upgrade at a time per process;
        # and one at a time per store, or two commands started together on a new store both
        # create its tables and the second fails.
        with _UPGRADE_LOCK, _file_lock(url):
            with engine.connect() as conn:  # the usual case: up to date, nothing to lock
                current = _current(conn)
            if current != _head():
                _upgrade(url, engine)
    return Store(engine, url)


def _upgrade(url: str, engine: Engine) -> None:
    """Run Alembic to head in one transaction, holding the store's write lock from its start
    (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE, else a commit by a running runner
    between the version read and the first DDL would fail it at once, SQLITE_BUSY_SNAPSHOT)."""
    upgrader = _upgrade_engine(url, engine)
    try:
        with upgrader.begin() as conn:
            if conn.dialect.name == "postgresql":  # held to the commit
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            if _current(conn) != _head():  # another process may have upgraded meanwhile
                from alembic import command

                command.upgrade(_alembic_config(conn), "head")
    finally:
        if upgrader is not engine:
            upgrader.dispose()


def _upgrade_engine(url: str, engine: Engine) -> Engine:
    """The engine a schema upgrade runs on: one transaction around all of it, so a crash
    midway leaves the store as it was. PostgreSQL's DDL is transactional as it comes; SQLite's
    is too, but Python's sqlite3 driver opens a transaction only before INSERT, UPDATE and
    DELETE, so each CREATE TABLE would commit by itself and a crash leave half a schema that
    no later upgrade could finish. On SQLite the upgrade's engine leaves transactions to
    SQLAlchemy (SQLAlchemy's pysqlite notes, "Serializable isolation / Savepoints /
    Transactional DDL"); the store's own engine keeps the driver's, for every other command."""
    if engine.dialect.name != "sqlite":
        return engine
    upgrader = _engine(url)

    @sa.event.listens_for(upgrader, "connect")
    def _driver_leaves_transactions(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(upgrader, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return upgrader


def open_existing_store(url: str | None = None, *, job: str | None = None) -> Store:
    """The store at ``url`` if it exists; :class:`JobNotFound` (creating nothing) if not: the
    verbs that act on a registered job (``job``, when they name one)."""
    url = state_url(url)
    if not state_exists(url):
        what = f"no job named {job!r}" if job else "no job"
        raise JobNotFound(
            f"{what}: there is no state store at {mask_url(url)}, so no job is registered there",
            hint="run `migrator plan apply FILE` first, or pass --state URL",
        )
    return open_store(url)


def peek_job(url: str | None, name: str) -> Job | None:
    """The job ``name`` if the store exists and holds it; creates and writes nothing."""
    url = state_url(url)
    if not state_exists(url):
        return None
    with opening(url):
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                row = conn.execute(sa.select(jobs).where(jobs.c.name == name)).first()
                return Job.from_row(row) if row else None
        finally:
            engine.dispose()


class Store:
    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        sa.event.listen(engine, "handle_error", _unavailable(url))

    def close(self) -> None:
        self.engine.dispose()

    # -- jobs ---------------------------------------------------------------------------
    def _job(self, conn: Connection, name: str) -> Job:
        row = conn.execute(sa.select(jobs).where(jobs.c.name == name)).first()
        if row is None:
            raise JobNotFound(f"no job named {name!r} in the state store {mask_url(self.url)}")
        return Job.from_row(row)

    def get_job(self, name: str) -> Job:
        with self.engine.connect() as conn:
            return self._job(conn, name)

    def list_jobs(self) -> list[Job]:
        with self.engine.connect() as conn:
            return [Job.from_row(r) for r in conn.execute(sa.select(jobs).order_by(jobs.c.id))]

    def create_job(
        self, plan: Plan, *, allow_no_instances: bool = False, epoch_floor: int = 0
    ) -> Job:
        """Register a job; its epochs start above ``epoch_floor`` (the epoch an earlier run of
        the same name left published in Redis)."""
        t = now()
        try:
            return self._insert_job(plan, t, allow_no_instances, epoch_floor)
        except sa.exc.IntegrityError:
            raise JobBusy(
                f"job {plan.name} was registered by another command at the same moment",
                hint=f"see `migrator status {plan.name}`; apply again once that command is done",
            ) from None

    def _insert_job(
        self, plan: Plan, t: datetime, allow_no_instances: bool, epoch_floor: int
    ) -> Job:
        with self.engine.begin() as conn:
            inserted = conn.execute(
                jobs.insert().values(
                    name=plan.name,
                    spec=plan.spec(),
                    spec_hash=plan.spec_hash(),
                    phase=Phase.PLANNED.value,
                    ratio=0,
                    epoch=epoch_floor + 1,
                    salt=secrets.token_hex(8),
                    paused=False,
                    rate_override=None,
                    allow_no_instances=allow_no_instances,
                    total_members=None,
                    last_error=None,
                    created_at=t,
                    updated_at=t,
                    phase_changed_at=t,
                )
            ).inserted_primary_key
            assert inserted is not None
            job_id = inserted[0]
            self._event(conn, job_id, "created", None, Phase.PLANNED.value, plan.spec_hash())
            if allow_no_instances:
                self._event(
                    conn, job_id, "flag", None, "allow_no_instances", "apply --allow-no-instances"
                )
            return self._job(conn, plan.name)

    def transition(
        self,
        name: str,
        to: Phase,
        *,
        ratio: int | None = None,
        detail: str | None = None,
        expect: Phase | None = None,
    ) -> Job:
        """Move ``name`` to phase ``to`` (checked against the table), bump the epoch, audit it.

        ``expect`` guards against a concurrent change: the update applies only if the phase is
        still the one read (or ``expect``).
        """
        with self.engine.begin() as conn:
            job = self._job(conn, name)
            current = expect or job.phase
            if job.phase != current:
                raise IllegalTransition(f"job {name} is in phase {job.phase}, not {current}")
            check_transition(job.phase, to)
            values: dict[str, Any] = {
                "phase": to.value,
                "updated_at": now(),
                "phase_changed_at": now(),
                "last_error": None,
            }
            if ratio is not None:
                values["ratio"] = ratio
            self._bump(conn, job, **values)
            if to != job.phase:
                self._event(conn, job.id, "phase", job.phase.value, to.value, detail)
            if ratio is not None and ratio != job.ratio:
                self._event(conn, job.id, "ratio", str(job.ratio), str(ratio), detail)
            return self._job(conn, name)

    def reset_for_reapply(
        self, name: str, plan: Plan, epoch_floor: int = 0, *, allow_no_instances: bool = False
    ) -> Job:
        """A rolled-back job applied again: back to planned with fresh checkpoints, no
        operator pause or rate override, its epoch above both its own and ``epoch_floor``."""
        with self.engine.begin() as conn:
            job = self._job(conn, name)
            check_transition(job.phase, Phase.PLANNED)
            conn.execute(checkpoints.delete().where(checkpoints.c.job_id == job.id))
            # A refusal rolls the checkpoint delete back too.
            self._bump(
                conn,
                job,
                epoch=max(job.epoch, epoch_floor) + 1,
                phase=Phase.PLANNED.value,
                ratio=0,
                allow_no_instances=allow_no_instances,
                # The operator's pause and rate belonged to the run rolled back.
                paused=False,
                rate_override=None,
                spec=plan.spec(),
                spec_hash=plan.spec_hash(),
                updated_at=now(),
                phase_changed_at=now(),
                last_error=None,
                total_members=None,
            )
            self._event(
                conn, job.id, "phase", job.phase.value, Phase.PLANNED.value, "applied again"
            )
            if allow_no_instances:
                self._event(
                    conn, job.id, "flag", None, "allow_no_instances", "apply --allow-no-instances"
                )
            return self._job(conn, name)

    def update_job(self, name: str, *, audit: str | None = None, **values: Any) -> Job:
        """Set plain fields (paused, rate_override, total_members, last_error, ...).

        ``audit`` names the change for the audit trail (pause, resume, set-rate, ...).
        """
        with self.engine.begin() as conn:
            job = self._job(conn, name)
            conn.execute(
                jobs.update().where(jobs.c.id == job.id).values(updated_at=now(), **values)
            )
            if audit:
                key = next(iter(values))
                old = getattr(job, key)
                self._event(conn, job.id, audit, _s(old), _s(values[key]), None)
            return self._job(conn, name)

    def set_ratio(self, name: str, ratio: int, *, expect: Phase, detail: str | None = None) -> Job:
        """Change the ratio within phase ``expect`` (gray → gray); bumps the epoch, audited."""
        with self.engine.begin() as conn:
            job = self._job(conn, name)
            if job.phase != expect:
                raise IllegalTransition(f"job {name} is in phase {job.phase}, not {expect}")
            self._bump(conn, job, ratio=ratio, updated_at=now())
            if ratio != job.ratio:
                self._event(conn, job.id, "ratio", str(job.ratio), str(ratio), detail)
            return self._job(conn, name)

    def bump_epoch(self, name: str, *, expect: Phase) -> Job:
        """A new epoch within phase ``expect`` (cleanup retiring the old key)."""
        with self.engine.begin() as conn:
            job = self._job(conn, name)
            if job.phase != expect:
                raise IllegalTransition(f"job {name} is in phase {job.phase}, not {expect}")
            self._bump(conn, job)
            return self._job(conn, name)

    def _bump(
        self, conn: sa.Connection, job: Job, *, epoch: int | None = None, **values: Any
    ) -> None:
        """A new epoch (``epoch``, else the next), only over the epoch and phase read: every
        epoch names one record, which a concurrent command (whose reads ran outside this
        transaction, as SQLite's driver runs them) must not number the same."""
        res = conn.execute(
            jobs.update()
            .where(
                jobs.c.id == job.id,
                jobs.c.phase == job.phase.value,
                jobs.c.epoch == job.epoch,
            )
            .values(epoch=job.epoch + 1 if epoch is None else epoch, **values)
        )
        if res.rowcount != 1:
            raise _changed_meanwhile(job.name)

    # -- checkpoints --------------------------------------------------------------------
    def get_checkpoint(self, job: Job, stage: str) -> Checkpoint | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(checkpoints).where(
                    checkpoints.c.job_id == job.id, checkpoints.c.stage == stage
                )
            ).first()
        if row is None:
            return None
        return Checkpoint(
            row.stage, row.cursor, row.members_done, row.finished, row.extra or {}, row.updated_at
        )

    def save_checkpoint(
        self,
        job: Job,
        stage: str,
        cursor: str,
        members_done: int,
        *,
        finished: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            values = {
                "cursor": cursor,
                "members_done": members_done,
                "finished": finished,
                "extra": extra or {},
                "updated_at": now(),
            }
            res = conn.execute(
                checkpoints.update()
                .where(checkpoints.c.job_id == job.id, checkpoints.c.stage == stage)
                .values(**values)
            )
            if res.rowcount == 0:
                conn.execute(checkpoints.insert().values(job_id=job.id, stage=stage, **values))

    # -- events -------------------------------------------------------------------------
    def _event(
        self,
        conn: Connection,
        job_id: int,
        kind: str,
        from_value: str | None,
        to_value: str | None,
        detail: str | None,
    ) -> None:
        user, host = actor()
        # The value columns hold 64 characters (PostgreSQL refuses more; SQLite would keep
        # them): a longer value (a Sentinel URL) is clipped there and kept whole in detail.
        whole = [v for v in (from_value, to_value) if v is not None and len(v) > VALUE_CHARS]
        if whole:
            detail = "; ".join(([detail] if detail else []) + whole)
        conn.execute(
            events.insert().values(
                job_id=job_id,
                at=now(),
                kind=kind,
                from_value=_clip(from_value),
                to_value=_clip(to_value),
                actor=user,
                host=host,
                detail=detail,
            )
        )

    def add_event(
        self,
        name: str,
        kind: str,
        *,
        from_value: str | None = None,
        to_value: str | None = None,
        detail: str | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            self._event(conn, self._job(conn, name).id, kind, from_value, to_value, detail)

    def history(self, name: str) -> list[Event]:
        with self.engine.connect() as conn:
            job = self._job(conn, name)
            rows = conn.execute(
                sa.select(events).where(events.c.job_id == job.id).order_by(events.c.id)
            )
            return [
                Event(_utc(r.at), r.kind, r.from_value, r.to_value, r.actor, r.host, r.detail)
                for r in rows
            ]

    # -- diffs --------------------------------------------------------------------------
    def add_diffs(
        self,
        job: Job,
        run: int,
        found: Sequence[tuple[bytes, str, int]],
        *,
        status: str = "suspect",
    ) -> None:
        """Record differences of verify run ``run``. Statuses: suspect (seen once), cleared
        (gone on re-check), confirmed (survived every round), repaired."""
        if not found:
            return
        t = now()
        with self.engine.begin() as conn:
            conn.execute(
                diffs.insert(),
                [
                    {
                        "job_id": job.id,
                        "run": run,
                        "member": m,
                        "kind": k,
                        "shard": s,
                        "status": status,
                        "found_at": t,
                    }
                    for m, k, s in found
                ],
            )

    def update_diffs(self, updates: Sequence[tuple[int, str, str]]) -> None:
        """(id, status, kind) for each re-checked difference."""
        if not updates:
            return
        with self.engine.begin() as conn:
            conn.execute(
                diffs.update()
                .where(diffs.c.id == sa.bindparam("b_id"))
                .values(status=sa.bindparam("b_status"), kind=sa.bindparam("b_kind")),
                [{"b_id": i, "b_status": st, "b_kind": k} for i, st, k in updates],
            )

    def set_diff_status(self, job: Job, run: int, old: str, new: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                diffs.update()
                .where(diffs.c.job_id == job.id, diffs.c.run == run, diffs.c.status == old)
                .values(status=new)
            )

    def drop_duplicate_diffs(self, job: Job, run: int, status: str) -> None:
        """Keep one row per (member, shard, kind): a scan may return a member twice (rehash,
        or the batches re-scanned after a resume), but it is one difference."""
        keep = (
            sa.select(sa.func.min(diffs.c.id))
            .where(diffs.c.job_id == job.id, diffs.c.run == run, diffs.c.status == status)
            .group_by(diffs.c.member, diffs.c.shard, diffs.c.kind)
        )
        with self.engine.begin() as conn:
            conn.execute(
                diffs.delete().where(
                    diffs.c.job_id == job.id,
                    diffs.c.run == run,
                    diffs.c.status == status,
                    diffs.c.id.not_in(keep),
                )
            )

    def last_verify_run(self, job: Job) -> int:
        """The latest verify run: a clean run stores no diff, so its number is taken from the
        ``verify`` checkpoint too (else the next run would reuse it)."""
        with self.engine.connect() as conn:
            stored = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(diffs.c.run), 0)).where(
                    diffs.c.job_id == job.id
                )
            ).scalar_one()
        cp = self.get_checkpoint(job, "verify")
        return max(int(stored), int(cp.extra.get("run", 0)) if cp else 0)

    def iter_diffs(
        self, job: Job, run: int, *, status: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[Diff]:
        q = sa.select(diffs).where(
            diffs.c.job_id == job.id, diffs.c.run == run, diffs.c.id > after_id
        )
        if status:
            q = q.where(diffs.c.status == status)
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(diffs.c.id).limit(limit))
            return [Diff(r.id, r.run, bytes(r.member), r.kind, r.shard, r.status) for r in rows]

    def count_diffs(self, job: Job, run: int, *, status: str | None = None) -> dict[str, int]:
        q = (
            sa.select(diffs.c.kind, sa.func.count())
            .where(diffs.c.job_id == job.id, diffs.c.run == run)
            .group_by(diffs.c.kind)
        )
        if status:
            q = q.where(diffs.c.status == status)
        with self.engine.connect() as conn:
            return {k: n for k, n in conn.execute(q)}


def _s(v: Any) -> str | None:
    return None if v is None else str(v)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t


def iter_all(store: Store, job: Job, run: int, status: str | None = None) -> Iterator[Diff]:
    after = 0
    while True:
        page = store.iter_diffs(job, run, status=status, after_id=after)
        if not page:
            return
        yield from page
        after = page[-1].id
