"""What applications import: a drop-in router for the big key being split (SPEC §5).

::

    import redis
    from migrator.shim import ShardRouter

    client = redis.Redis.from_url(url)
    users = ShardRouter.attach(client, "user-info-split", loader=load_user_from_db,
                               source_key="user:info:all")  # source_key: pass-through before
    users.hset(member, value); users.hget(member); users.hmget([m1, m2]); users.hdel(m1, m2)
    users.hincrby(member, 5); users.hexists(member); users.hlen(); users.hscan_iter()
    users.expire(86400); users.ttl(); users.persist()   # the whole hash: old key and/or shards
    users.close()                                              # on shutdown

Depends only on redis-py and migrator's control, keys, routing, phases, errors and
redisio.scripts: importing it never loads SQLAlchemy, Alembic, APScheduler, pydantic or YAML.

Modules: :mod:`~migrator.shim.routes` (phase → keys, pure), :mod:`~migrator.shim.inflight`
(applied epoch), :mod:`~migrator.shim.watcher` (refresh thread, heartbeat),
:mod:`~migrator.shim.counters`, :mod:`~migrator.shim.dual` (dual-write script calls),
:mod:`~migrator.shim.hash_router` (the Hash commands).
"""

from migrator.shim.errors import (
    ShimClosed,
    ShimError,
    ShimNotConfigured,
    ShimReservedValue,
    ShimWrongType,
)
from migrator.shim.hash_router import Loader, ShardRouter
from migrator.shim.routes import ReadPath, WriteMode

__all__ = [
    "Loader",
    "ReadPath",
    "ShardRouter",
    "ShimClosed",
    "ShimError",
    "ShimNotConfigured",
    "ShimReservedValue",
    "ShimWrongType",
    "WriteMode",
]
