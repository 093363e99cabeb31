"""initial state schema: jobs, checkpoints, events, diffs

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("spec_hash", sa.String(32), nullable=False),
        sa.Column("phase", sa.String(20), nullable=False),
        sa.Column("ratio", sa.Integer, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("salt", sa.String(32), nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("rate_override", sa.Float, nullable=True),
        sa.Column("allow_no_instances", sa.Boolean, nullable=False),
        sa.Column("total_members", sa.BigInteger, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("phase_changed_at", TS, nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("stage", sa.String(20), primary_key=True),
        sa.Column("cursor", sa.String(64), nullable=False),
        sa.Column("members_done", sa.BigInteger, nullable=False),
        sa.Column("finished", sa.Boolean, nullable=False),
        sa.Column("extra", sa.JSON, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("from_value", sa.String(64), nullable=True),
        sa.Column("to_value", sa.String(64), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_events_job", "events", ["job_id", "id"])
    op.create_table(
        "diffs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("run", sa.Integer, nullable=False),
        sa.Column("member", sa.LargeBinary, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("shard", sa.Integer, nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("found_at", TS, nullable=False),
    )
    op.create_index("ix_diffs_job_run", "diffs", ["job_id", "run", "id"])


def downgrade() -> None:
    op.drop_table("diffs")
    op.drop_table("events")
    op.drop_table("checkpoints")
    op.drop_table("jobs")
