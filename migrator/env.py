"""Runner settings read from the environment ($MIGRATOR_NICE, $MIGRATOR_SPIN_US): a bad value
is bad input, refused with one clear message (exit 2) before anything is written."""

from __future__ import annotations

import os

from migrator.errors import InputError


def int_from_env(name: str, default: int, low: int, high: int, unit: str = "") -> int:
    """``$name`` as a whole number in ``low..high`` (``default`` when unset)."""
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise InputError(
            f"${name} must be a whole number ({low}-{high}{unit}), not {raw!r}"
        ) from None
    if not low <= value <= high:
        raise InputError(f"${name} must be between {low} and {high}{unit}, not {value}")
    return value
