"""Every Redis key name migrator writes besides the source and shard keys (SPEC §6).

All share the hash tag ``{NAME}`` so that, in a cluster, they live in one slot and one
MULTI or script can touch them together.
"""

from __future__ import annotations


def _prefix(job: str) -> str:
    return f"migrator:{{{job}}}"


def control(job: str) -> str:
    """Hash: phase, ratio, epoch, routing (template, shards, hash, salt), gray settings."""
    return f"{_prefix(job)}:control"


def instances(job: str) -> str:
    """Hash: instance id → JSON {host, pid, epoch, started, protocol}; one field per live app
    process."""
    return f"{_prefix(job)}:instances"


def heartbeats(job: str) -> str:
    """Hash: instance id → server time (ms) of that instance's last heartbeat."""
    return f"{_prefix(job)}:heartbeats"


def counters(job: str) -> str:
    """Hash: ``<instance>|<counter>`` → count; shim counters flushed periodically."""
    return f"{_prefix(job)}:counters"


def lock(job: str) -> str:
    """String with a TTL: the runner lease (one process works a job at a time; lease.py)."""
    return f"{_prefix(job)}:lock"


def probe(job: str, what: str) -> str:
    """A key that never exists, named in commands that ask the server what it supports
    (``HSETEX ... FXX`` for ``hsetex``, ``UNLINK`` for ``unlink``): they write nothing."""
    return f"{_prefix(job)}:{what}-probe"


def all_keys(job: str) -> list[str]:
    return [control(job), instances(job), heartbeats(job), counters(job), lock(job)]
