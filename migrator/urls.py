"""URL helpers shared by the plan, the client factory and the shim (no heavy imports)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from redis.connection import parse_url

_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")


def mask_url(url: str) -> str:
    """``redis://user:secret@h:6379/0`` → ``redis://user:***@h:6379/0``, and a ``password=``
    in the query. Done on the text, not by a URL parser: a URL that does not parse (a password
    with an unencoded ``/``, ``?`` or ``#``, a port that is not a number) is masked too, and
    one with nothing to mask comes back as it was."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _secret = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}{sep}{rest}")


@dataclass(frozen=True)
class SentinelURL:
    hosts: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[user:pass@]h1:26379,h2:26379/service[/db][?tls=1]``; raises
    ValueError saying what is wrong."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    auth, hostlist = (netloc[0], netloc[1]) if len(netloc) == 2 else ("", netloc[0])
    username = password = None
    if auth:
        user, _, pw = auth.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    hosts = []
    for h in hostlist.split(","):
        host, _, port = h.rpartition(":")
        if host and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"sentinel {h!r}: the port is not a number from 1 to 65535")
        if not (host or port):
            raise ValueError("a sentinel URL names its sentinels: h1:26379,h2:26379")
        hosts.append((host or port, int(port) if host else 26379))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a sentinel URL names the service: .../service/db")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{parts.path!r}: after the service comes at most a db number")
    db = int(path[1]) if len(path) > 1 else 0
    return SentinelURL(hosts, path[0], db, username, password, "tls=1" in parts.query)


def check_redis_url(url: str) -> str | None:
    """What is wrong with ``url`` as the client would parse it, or None."""
    try:
        if url.startswith("redis+sentinel://"):
            parse_sentinel_url(url)
        else:
            parse_url(url)
            db = urlsplit(url).path.strip("/")
            if not url.startswith("unix://") and db and not db.isdigit():
                raise ValueError(f"the path names the db, a number, not {db!r}")
    except ValueError as e:
        return str(e)
    return None
