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
    #: The job's control record and the epoch the call was routed by: the script runs only
    #: while that epoch is current, else refuses (:func:`stale`) having written nothing.
    fence: tuple[str, int] | None = None

    def keys(self) -> list[str]:
        return [self.source_key, self.shard_key, *([self.fence[0]] if self.fence else [])]

    def argv(self) -> list[Any]:
        return [*self.args, *([self.fence[1]] if self.fence else [])]


def stale(result: Any) -> bool:
    """A fenced call refused because the control record moved past its epoch."""
    return isinstance(result, redis.ResponseError) and str(result).startswith("MIGRATORSTALE")


class FencedOldWriter:
    """Old-key-only writes under a control record, fenced by its epoch (hash_old.lua)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(source("hash_old"))

    def run(self, source_key: str, args: Sequence[Any], fence: tuple[str, int]) -> Any:
        """The op's reply, or the refusal (:func:`stale`) when the record moved past the
        epoch: then nothing was written."""
        try:
            return self._script(keys=[source_key, fence[0]], args=[*args, fence[1]])
        except redis.ResponseError as e:
            if stale(e):
                return e
            raise


class DualWriter:
    """Runs :class:`DualCall` batches against one client."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._script = client.register_script(source("hash_dual"))

    def run(self, calls: Sequence[DualCall]) -> list[Any]:
        """Results in call order; raises the first error after every call was attempted,
        except a fenced call's refusal (:func:`stale`), which is its result.

        Each call is atomic on its own (source + one shard); a batch is not atomic across
        shards, exactly like the non-transactional multi-key writes it replaces.
        """
        if len(calls) == 1:
            c = calls[0]
            try:
                return [self._script(keys=c.keys(), args=c.argv())]
            except redis.ResponseError as e:
                if stale(e):
                    return [e]
                raise
        results = self._pipeline(calls)
        retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if retry:
            self._client.script_load(self._script.script)
            for i, r in zip(retry, self._pipeline([calls[i] for i in retry]), strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, Exception) and not stale(r):
                raise r
        return results

    def _pipeline(self, calls: Sequence[DualCall]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for c in calls:
            keys = c.keys()
            pipe.evalsha(self._script.sha, len(keys), *keys, *c.argv())
        return list(pipe.execute(raise_on_error=False))
