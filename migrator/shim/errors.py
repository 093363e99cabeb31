"""Errors the shim raises on purpose; all are :class:`migrator.errors.MigratorError`.

::

    MigratorError
    └── ShimError                  the shim cannot serve this call
        ├── ShimNotConfigured      no control record yet and no ``source_key=`` given to attach
        ├── ShimWrongType          the control record describes a source of another type
        ├── ShimClosed             the router was closed
        └── ShimReservedValue      the value written is migrator's delete mark

Redis errors (``redis.RedisError``) pass through unchanged, as they would from redis-py.
"""

from __future__ import annotations

from migrator.errors import MigratorError


class ShimError(MigratorError):
    """The shim cannot serve this call."""


class ShimNotConfigured(ShimError):
    """The source key is unknown: no control record is published and attach got no source_key."""


class ShimWrongType(ShimError):
    """The job migrates a Set or ZSet, but this router serves Hash commands."""


class ShimClosed(ShimError):
    """close() was called; the router no longer refreshes its routing and refuses calls."""


class ShimReservedValue(ShimError):
    """A write of ``phases.TOMBSTONE``, the value that marks a delete in a shard while the copy
    runs: reads through the shim would take it for an absent member."""
