"""migrator: split one big Redis key into N shard keys while the application keeps serving.

Kept import-light on purpose: ``import migrator.shim`` in an application must not load
SQLAlchemy, Alembic or APScheduler, so the public names below are resolved lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["MigratorError", "Phase", "Plan", "ShardRouter", "__version__", "load_plan"]

_LAZY = {
    "MigratorError": ("migrator.errors", "MigratorError"),
    "Phase": ("migrator.phases", "Phase"),
    "Plan": ("migrator.plan", "Plan"),
    "load_plan": ("migrator.plan", "load_plan"),
    "ShardRouter": ("migrator.shim", "ShardRouter"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'migrator' has no attribute {name!r}")
