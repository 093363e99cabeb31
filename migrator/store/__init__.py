"""The state store (SQLAlchemy 2 + Alembic): jobs, checkpoints, audit events, diffs."""

from migrator.store.repository import (
    DEFAULT_STATE_URL,
    Checkpoint,
    Diff,
    Event,
    Job,
    Store,
    iter_all,
    open_existing_store,
    open_store,
    peek_job,
    sqlite_file,
    state_exists,
    state_url,
)

__all__ = [
    "DEFAULT_STATE_URL",
    "Checkpoint",
    "Diff",
    "Event",
    "Job",
    "Store",
    "iter_all",
    "open_existing_store",
    "open_store",
    "peek_job",
    "sqlite_file",
    "state_exists",
    "state_url",
]
