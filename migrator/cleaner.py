"""Removing a key without blocking: UNLINK where the server has it, else budgeted
SCAN+delete steps (``delete_step.lua``) until the key is gone. Never DEL on a big key."""

from __future__ import annotations

from typing import cast

import redis

from migrator.redisio.scripts import Scripts
from migrator.scanloop import Step


def _cursor(raw: bytes | str | int) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class KeyRemover:
    def __init__(self, client: redis.Redis, scripts: Scripts) -> None:
        self.client = client
        self.scripts = scripts

    def unlink(self, key: str) -> int:
        """O(1) in the command thread; the memory is freed by a background thread."""
        return cast(int, self.client.unlink(key))

    def delete_steps(self, key: str):  # type: ignore[no-untyped-def]
        def step(cursor: str, count: int) -> Step:
            nxt, removed, elapsed = self.scripts.delete_step([key], [cursor, count])
            return Step(_cursor(nxt), int(removed), float(elapsed))

        return step

    def exists(self, key: str) -> bool:
        return bool(self.client.exists(key))
