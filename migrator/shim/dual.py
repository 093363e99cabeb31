"""Dual writes: the ``hash_dual`` script (migrator/redisio/lua/hash_dual.lua), one call per shard.

The script writes the source first, then sets the shard field to the source's resulting value,
atomically; so ``shard[f] == source[f]`` holds after every call and neither a concurrent copy
nor a retried increment can leave a shard value the source does not have.

Several calls (a multi-member write touching several shards) go in one non-transactional
pipeline of EVALSHA: one round trip. redis-py's pipeline + Script pair would add a SCRIPT
EXISTS round trip to every execute, so NOSCRIPT (after a restart, failover or SCRIPT FLUSH)
is handled here instead: a call refused with NOSCRIPT did not run, so it is safe to load the
script and send exactly those calls again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError

from migrator.redisio.scripts import source


@dataclass(frozen=True)
class DualCall:
    source_key: str
    shard_key: str
    args: Sequence[Any]  # op, then the op's arguments (see hash_dual.lua)


class DualWriter:
    """Runs :class:`DualCall` batches against one client."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._script = client.register_script(source("hash_dual"))

    def run(self, calls: Sequence[DualCall]) -> list[Any]:
        """Results in call order; raises the first error after every call was attempted.

        Each call is atomic on its own (source + one shard); a batch is not atomic across
        shards, exactly like the non-transactional multi-key writes it replaces.
        """
        if len(calls) == 1:
            c = calls[0]
            return [self._script(keys=[c.source_key, c.shard_key], args=list(c.args))]
        results = self._pipeline(calls)
        retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if retry:
            self._client.script_load(self._script.script)
            for i, r in zip(retry, self._pipeline([calls[i] for i in retry]), strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def _pipeline(self, calls: Sequence[DualCall]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for c in calls:
            pipe.evalsha(self._script.sha, 2, c.source_key, c.shard_key, *c.args)
        return list(pipe.execute(raise_on_error=False))
