"""The state store behaves the same on SQLite and PostgreSQL (APScheduler's jobstore-test
pattern: one fixture parametrised over every backend). PostgreSQL runs when
MIGRATOR_TEST_POSTGRES_URL is set (scripts/test sets it when a server answers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from migrator.errors import IllegalTransition, JobBusy, JobNotFound
from migrator.phases import Phase
from migrator.plan import parse_plan
from migrator.store import open_existing_store, open_store, peek_job, state_exists

PG = os.environ.get("MIGRATOR_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/state.db"
        return
    if not PG:
        pytest.skip("PostgreSQL: set MIGRATOR_TEST_POSTGRES_URL to run the store on it")
    schema = f"t_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG else "?"
    yield f"{PG}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


PLAN = parse_plan("name: s-job\nsource: {key: k}\ntarget: {key: 'x:{shard}', shards: 4}\n", env={})


def test_peek_writes_nothing_then_open_migrates(backend_url: str) -> None:
    assert peek_job(backend_url, "s-job") is None
    store = open_store(backend_url)
    try:
        job = store.create_job(PLAN)
        assert peek_job(backend_url, "s-job") == job
        assert open_store(backend_url).get_job("s-job") == job  # second open: no re-migration
    finally:
        store.close()


def test_a_registered_job_is_found_through_any_form_of_the_url(tmp_path: Path) -> None:
    """The verbs ask whether a store exists before opening it (so as to create none to refuse
    an unknown job): a SQLite URL with a query string or a driver name is the same file."""
    path = tmp_path / "s" / "state.db"
    store = open_store(f"sqlite:///{path}?timeout=30")
    try:
        job = store.create_job(PLAN)
    finally:
        store.close()
    for url in (f"sqlite:///{path}?timeout=30", f"sqlite+pysqlite:///{path}"):
        assert state_exists(url)
        assert peek_job(url, "s-job") == job
        store = open_existing_store(url)
        try:
            assert store.get_job("s-job") == job
        finally:
            store.close()
    elsewhere = tmp_path / "none" / "state.db"
    assert not state_exists(f"sqlite+pysqlite:///{elsewhere}")
    with pytest.raises(JobNotFound, match="no job named 's-job': there is no state store"):
        open_existing_store(f"sqlite:///{elsewhere}?timeout=30", job="s-job")
    assert not elsewhere.parent.exists()  # asking created nothing


def test_transitions_checkpoints_events_diffs(backend_url: str) -> None:
    store = open_store(backend_url)
    try:
        job = store.create_job(PLAN, allow_no_instances=True)
        job = store.transition("s-job", Phase.DUAL_WRITE)
        assert job.epoch == 2
        with pytest.raises(IllegalTransition):
            store.transition("s-job", Phase.VERIFIED)
        with pytest.raises(JobNotFound):
            store.get_job("other")
        store.save_checkpoint(job, "copy", "1234", 500, extra={"rate": 10.0})
        store.save_checkpoint(job, "copy", "99", 900)
        cp = store.get_checkpoint(job, "copy")
        assert cp is not None and (cp.cursor, cp.members_done, cp.finished) == ("99", 900, False)
        store.add_diffs(job, 1, [(b"m\xff1", "value_differs", 3), (b"m2", "missing_in_shard", 1)])
        assert store.count_diffs(job, 1) == {"value_differs": 1, "missing_in_shard": 1}
        store.set_diff_status(job, 1, "suspect", "confirmed")
        assert store.count_diffs(job, 1, status="confirmed") == {
            "value_differs": 1,
            "missing_in_shard": 1,
        }
        assert {d.member for d in store.iter_diffs(job, 1)} == {b"m\xff1", b"m2"}
        kinds = [(e.kind, e.from_value, e.to_value) for e in store.history("s-job")]
        assert kinds[:3] == [
            ("created", None, "planned"),
            ("flag", None, "allow_no_instances"),
            ("phase", "planned", "dual_write"),
        ]
        assert all(e.actor and e.host for e in store.history("s-job"))
    finally:
        store.close()


def test_an_event_value_longer_than_its_column_is_clipped_and_kept_in_detail(
    backend_url: str,
) -> None:
    url = "redis+sentinel://" + ",".join(f"sentinel-{i}.example.internal:26379" for i in range(4))
    store = open_store(backend_url)
    try:
        store.create_job(PLAN)
        store.add_event("s-job", "redis_url", to_value=url + "/mymaster/0", detail="was x")
        [event] = [e for e in store.history("s-job") if e.kind == "redis_url"]
        assert event.to_value is not None and len(event.to_value) == 64
        assert event.to_value.endswith("…") and url.startswith(event.to_value[:-1])
        assert event.detail == f"was x; {url}/mymaster/0"
    finally:
        store.close()


def test_a_ratio_change_racing_a_rollback_is_refused_not_numbered_alike(
    backend_url: str,
) -> None:
    """`set-ratio 30` read the job in gray; a rollback moved it on meanwhile (epoch N+1). The
    ratio change, from another process's store, must not land on the rolling-back job as epoch
    N+1 again (two control records alike numbered: a shim's ack of one passes the other's
    barrier) nor set ratio 30 on it."""
    one, two = open_store(backend_url), open_store(backend_url)
    try:
        one.create_job(PLAN, allow_no_instances=True)
        for to in (Phase.DUAL_WRITE, Phase.COPYING, Phase.VERIFYING, Phase.VERIFIED, Phase.GRAY):
            one.transition("s-job", to)
        gray = two.get_job("s-job")
        rolling = one.transition("s-job", Phase.ROLLING_BACK, ratio=0, expect=Phase.GRAY)
        assert rolling.epoch == gray.epoch + 1
        with pytest.raises(IllegalTransition, match="rolling_back, not gray"):
            two.set_ratio("s-job", 30, expect=gray.phase)
        with pytest.raises(IllegalTransition):
            two.bump_epoch("s-job", expect=Phase.CLEANING)
        after = one.get_job("s-job")
        assert (after.phase, after.ratio, after.epoch) == (Phase.ROLLING_BACK, 0, rolling.epoch)
    finally:
        one.close()
        two.close()


def test_commands_started_together_on_a_new_store_all_open_it(backend_url: str) -> None:
    """`migrator run` and `plan apply` started at once on a new store: one creates its
    tables, the others wait for it and find them, instead of failing to create them again."""
    code = (
        "import sys, time\n"
        "from migrator.store import open_store\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "open_store(sys.argv[1]).close()\n"
    )
    start = f"{time.time() + 1.5:.3f}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, backend_url, start],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert state_exists(backend_url)


def test_a_job_registered_twice_at_once_is_busy_not_a_traceback(backend_url: str) -> None:
    one, two = open_store(backend_url), open_store(backend_url)
    try:
        one.create_job(PLAN)
        with pytest.raises(JobBusy, match="registered by another command at the same moment"):
            two.create_job(PLAN)  # it read no job a moment ago: the insert is what collides
    finally:
        one.close()
        two.close()


_DIES_MID_UPGRADE = """
import os, sys
import sqlalchemy as sa
from migrator.store import open_store

made = []

@sa.event.listens_for(sa.engine.Engine, "after_cursor_execute")
def die(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("CREATE TABLE"):
        made.append(statement)
        if len(made) == 3:  # alembic_version and two of the store's tables are made
            os._exit(9)

open_store(sys.argv[1])
"""


def test_a_process_killed_mid_upgrade_leaves_the_store_as_it_was(backend_url: str) -> None:
    """A crash while the schema is being made (the first `plan apply` interrupted) must not
    leave half of it, which no later upgrade could finish ("table already exists")."""
    died = subprocess.run([sys.executable, "-c", _DIES_MID_UPGRADE, backend_url], check=False)
    assert died.returncode == 9
    assert not state_exists(backend_url)  # nothing was made
    store = open_store(backend_url)
    try:
        assert store.create_job(PLAN, allow_no_instances=True).name == "s-job"
    finally:
        store.close()


def test_a_new_sqlite_store_is_its_owners_alone(tmp_path: Path) -> None:
    """The store keeps each plan as resolved, its Redis password included: the directory and
    files migrator creates are not readable by others (they were 0755 and 0644)."""
    import stat

    url = f"sqlite:///{tmp_path}/.migrator/state.db"
    store = open_store(url)
    try:
        store.create_job(PLAN)
        made = [tmp_path / ".migrator" / n for n in ("state.db", "state.db-wal", "state.db-shm")]
        assert all(p.exists() for p in made), list((tmp_path / ".migrator").iterdir())
        assert stat.S_IMODE((tmp_path / ".migrator").stat().st_mode) == 0o700
        for p in made:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    finally:
        store.close()
