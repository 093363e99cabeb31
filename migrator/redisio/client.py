"""The one place Redis clients are made: URL → client, topology detected, retry policy set.

Retry policy (one layer per concern): redis-py's own ``Retry`` re-sends a single command after
a connection error or timeout (3 tries, exponential backoff capped at 1 s); batches and phases
are retried by the runner with tenacity. Supported URLs: ``redis://``, ``rediss://`` (TLS),
``unix://`` and ``redis+sentinel://h1:26379,h2:26379/service/db``; ACL user and password come
from the URL, and the query options :data:`migrator.urls.QUERY_OPTIONS` lists (README, "Redis
URL") override the settings below.
"""

from __future__ import annotations

from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from migrator.errors import InputError, PreflightError, RedisUnavailable
from migrator.urls import SentinelURL, check_redis_url, mask_url, parse_sentinel_url

__all__ = ["SentinelURL", "connect", "parse_sentinel_url"]

_RETRY_ON = [redis.ConnectionError, redis.TimeoutError]


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)


def _options(name: str | None) -> dict[str, Any]:
    return {
        "retry": _retry(),
        "retry_on_error": _RETRY_ON,
        "socket_timeout": 10.0,
        "socket_connect_timeout": 5.0,
        "client_name": name,
        "health_check_interval": 30,
    }


def connect(url: str, *, name: str | None = None, check: bool = True) -> redis.Redis:
    """A client for ``url``, named ``name`` in CLIENT LIST; raises RedisUnavailable if down.

    Redis Cluster is detected and refused for now with a clear message: the cluster path needs
    non-atomic dual writes, which this release does not implement yet.
    """
    problem = check_redis_url(url)  # the plan's own check: nothing unknown reaches redis-py
    if problem:
        raise InputError(f"{mask_url(url)} is not a usable Redis URL: {problem}")
    try:
        if url.startswith("redis+sentinel://"):
            s = parse_sentinel_url(url)
            sentinel = Sentinel(s.hosts, socket_timeout=5.0, ssl=s.tls)
            client: redis.Redis = sentinel.master_for(
                s.service,
                db=s.db,
                username=s.username,
                password=s.password,
                ssl=s.tls,
                **_options(name),
            )
        else:
            client = redis.Redis.from_url(url, **_options(name))
        if check:
            client.ping()
            if name:
                # client_name is applied on connect; set it explicitly on this first connection
                # too, so that it shows in CLIENT LIST even where a proxy dropped the handshake.
                client.client_setname(name)
            if str(cast(dict, client.info("cluster")).get("cluster_enabled", 0)) == "1":
                raise PreflightError(
                    f"{mask_url(url)} is a Redis Cluster node; cluster topologies are not "
                    "supported by this release (standalone and sentinel are)"
                )
    except redis.AuthenticationError as e:
        raise RedisUnavailable(f"Redis at {mask_url(url)} refused the credentials: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise RedisUnavailable(
            f"cannot reach Redis at {mask_url(url)}: {e}",
            hint="check that the server is up and redis.url in the plan (or REDIS_URL); a "
            "registered job keeps the URL it was applied with: if its server moved, "
            "`migrator plan apply` of the same plan with the new redis.url points it there",
        ) from None
    except redis.ResponseError as e:
        raise RedisUnavailable(f"Redis at {mask_url(url)} refused a command: {e}") from None
    except ValueError as e:  # a port, db or option the URL parsers refuse
        raise InputError(f"{mask_url(url)} is not a usable Redis URL: {e}") from None
    return client
