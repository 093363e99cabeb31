"""What the shim tests share: one job's names, control records to publish, polling."""

from __future__ import annotations

import dataclasses
from typing import Any

from migrator.control import ControlRecord
from migrator.phases import Phase
from migrator.routing import shard_of
from tests.integration.helpers import eventually

__all__ = ["JOB", "SALT", "SHARDS", "SOURCE", "TEMPLATE", "eventually", "record", "shard_key"]

JOB = "user-info-split"
SOURCE = "user:info:all"
TEMPLATE = "user:info:{shard}"
SHARDS = 8
SALT = "salt-1"


def record(phase: Phase, *, epoch: int = 1, ratio: int = 0, **kw: Any) -> ControlRecord:
    """A control record of JOB in ``phase``, as the runner would publish it."""
    base = ControlRecord(
        job=JOB,
        phase=phase,
        ratio=ratio,
        epoch=epoch,
        source_key=SOURCE,
        source_type="hash",
        template=TEMPLATE,
        shards=SHARDS,
        hash="crc32",
        salt=SALT,
    )
    return dataclasses.replace(base, **kw)


def shard_key(member: str) -> str:
    return TEMPLATE.replace("{shard}", str(shard_of(member, SHARDS)))
