"""State-store tables (SQLAlchemy Core). Created and upgraded only by Alembic
(``migrations_state/``); this module is the shape the code reads and writes."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("spec_hash", sa.String(32), nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("ratio", sa.Integer, nullable=False, default=0),
    sa.Column("epoch", sa.Integer, nullable=False, default=0),
    sa.Column("salt", sa.String(32), nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("rate_override", sa.Float, nullable=True),
    sa.Column("allow_no_instances", sa.Boolean, nullable=False, default=False),
    sa.Column("total_members", sa.BigInteger, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("phase_changed_at", sa.DateTime(timezone=True), nullable=False),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("stage", sa.String(20), primary_key=True),
    sa.Column("cursor", sa.String(64), nullable=False),
    sa.Column("members_done", sa.BigInteger, nullable=False, default=0),
    sa.Column("finished", sa.Boolean, nullable=False, default=False),
    sa.Column("extra", sa.JSON, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("from_value", sa.String(64), nullable=True),
    sa.Column("to_value", sa.String(64), nullable=True),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Index("ix_events_job", "job_id", "id"),
)

diffs = sa.Table(
    "diffs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("run", sa.Integer, nullable=False),
    sa.Column("member", sa.LargeBinary, nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("status", sa.String(12), nullable=False),
    sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_diffs_job_run", "job_id", "run", "id"),
)
