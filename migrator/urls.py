"""URL helpers shared by the plan, the client factory and the shim (no heavy imports).

:func:`check_redis_url` is the one judge of a Redis URL: the plan validates ``redis.url`` with
it and :func:`migrator.redisio.connect` refuses what it refuses, so a URL that passes
``plan validate`` is one the client can use. Its messages never quote the URL's
user:password part or its hosts (a password with an unencoded ``/``, ``?`` or ``#`` spills
into them); callers name the URL with :func:`mask_url`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.connection import parse_url

_QUERY_OPTION = re.compile(r"([?&])([^=&#]*)=([^&#]*)")
_SENTINEL_HOST = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]/@\s]+))(?::(?P<port>.*))?"
)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no")


def mask_url(url: str) -> str:
    """``redis://user:secret@h:6379/0`` → ``redis://user:***@h:6379/0``, and the value of every
    query option but those known to hold no secret (``?password=***``, and ``?PASSWORD=***``,
    ``?ssl_password=***`` or a misspelt ``?passwd=***`` too: the URL may be quoted to refuse
    just such an option). Done on the text, not by a URL parser: a URL that does not parse (a
    password with an unencoded ``/``, ``?`` or ``#``, a port that is not a number) is masked
    too, and one with nothing to mask comes back as it was."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    userinfo, after = (rest[:at], rest[at:]) if at >= 0 else ("", rest)
    user, colon, _secret = userinfo.partition(":")
    if colon:
        userinfo = f"{user}:***"
    head, q, query = after.partition("?")
    if q:
        after = head + _QUERY_OPTION.sub(_mask_option, q + query)
    return f"{scheme}{sep}{userinfo}{after}"


def _mask_option(m: re.Match[str]) -> str:
    shown = m[2] in _NOT_SECRET or not m[3]
    return f"{m[1]}{m[2]}={m[3] if shown else '***'}"


# -- query options ---------------------------------------------------------------------------
# Each check raises ValueError saying what the value should be.


def _flag(v: str) -> None:
    # Only spellings redis-py's to_bool reads the same way ("off" would be true there).
    if v.lower() not in _TRUE + _FALSE:
        raise ValueError("1, 0, true, false, yes, no or on")


def _seconds(v: str) -> None:
    try:
        ok = math.isfinite(float(v)) and float(v) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("a number of seconds above 0")


def _whole(v: str) -> None:
    if not v.isdigit():
        raise ValueError("a whole number")


def _text(v: str) -> None:
    pass


def _cert_reqs(v: str) -> None:
    if v not in ("none", "optional", "required"):
        raise ValueError("none, optional or required")


_COMMON: dict[str, Callable[[str], None]] = {
    "db": _whole,
    "username": _text,
    "password": _text,
    "socket_timeout": _seconds,
    "socket_connect_timeout": _seconds,
    "health_check_interval": _whole,
}


def _resp2(v: str) -> None:
    if v != "2":
        raise ValueError("2 (migrator reads RESP2 replies)")


# Options redis-py took before this check existed, and that jobs applied then may still carry:
# refusing them now would strand those jobs (every verb re-reads the stored plan).
_COMMON.update(
    {
        "client_name": _text,
        "max_connections": _whole,
        "retry_on_timeout": _flag,
        "protocol": _resp2,
    }
)
_TCP = {**_COMMON, "socket_keepalive": _flag}

#: The query options each scheme takes (README, "Redis URL"). redis-py hands any other option
#: to the connection class as a keyword it does not know (``ssl``, ``timeout``, a typo), or
#: would change what migrator relies on (``protocol``, ``client_name``, the retry policy).
QUERY_OPTIONS: dict[str, dict[str, Callable[[str], None]]] = {
    "redis": _TCP,
    "rediss": {
        **_TCP,
        "ssl_cert_reqs": _cert_reqs,
        "ssl_check_hostname": _flag,
        "ssl_ca_certs": _text,
        "ssl_ca_path": _text,
        "ssl_certfile": _text,
        "ssl_keyfile": _text,
    },
    "unix": _COMMON,
    "redis+sentinel": {"tls": _flag},
}

#: The options whose values mask_url shows.
_NOT_SECRET = frozenset(o for opts in QUERY_OPTIONS.values() for o in opts) - {"password"}

#: What to write instead of a tempting option a scheme does not take.
_INSTEAD = {
    "redis": {"ssl": "for TLS use rediss://", "tls": "for TLS use rediss://"},
    "rediss": {"ssl": "rediss:// is TLS already", "tls": "rediss:// is TLS already"},
    "unix": {},
    "redis+sentinel": {"ssl": "for TLS (sentinels and master) use ?tls=1"},
}


def _query(query: str, scheme: str) -> dict[str, str]:
    """The URL's query options, each known to ``scheme`` and well-typed; ValueError if not."""
    known = QUERY_OPTIONS[scheme]
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in known:
            instead = _INSTEAD[scheme].get(name)
            raise ValueError(
                f"unknown option {name!r}; "
                + (instead or f"{scheme}:// URLs take {', '.join(sorted(known))}")
            )
        if name in options:
            raise ValueError(f"option {name!r} is given twice")
        if not value:
            raise ValueError(f"option {name!r} has no value")
        try:
            known[name](value)
        except ValueError as e:
            raise ValueError(f"option {name!r} is {e}, not {value!r}") from None
        options[name] = value
    return options


# -- sentinel --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SentinelURL:
    hosts: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[user:pass@]h1[:26379],h2[:26379]/service[/db][?tls=1]`` (26379 when
    a sentinel gives no port); raises ValueError saying what is wrong."""
    parts = urlsplit(url)
    auth, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if auth:
        user, _, pw = auth.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    hosts = []
    entries = hostlist.split(",")
    for i, entry in enumerate(entries, 1):
        which = f"sentinel {i} of {len(entries)}" if len(entries) > 1 else "the sentinel"
        m = _SENTINEL_HOST.fullmatch(entry)
        if m is None:
            raise ValueError(
                f"{which} is not host[:port]: a sentinel URL names its sentinels, h1:26379,h2:26379"
            )
        port = m["port"]
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"the port of {which} is not a number from 1 to 65535")
        hosts.append((m["v6"] or m["host"], int(port) if port is not None else 26379))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a sentinel URL names the service: .../service/db")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("after the service name comes at most a db number: .../service/db")
    db = int(path[1]) if len(path) > 1 else 0
    tls = _query(parts.query, "redis+sentinel").get("tls", "0").lower() in _TRUE
    return SentinelURL(hosts, path[0], db, username, password, tls)


# -- the judge -------------------------------------------------------------------------------
def check_redis_url(url: str) -> str | None:
    """What is wrong with ``url`` as the client would use it, or None."""
    try:
        _check(url)
    except ValueError as e:
        rest = url.partition("://")[2]
        authority_end = min([rest.find(c) for c in "/?#" if c in rest] or [len(rest)])
        tail = rest[authority_end:].partition("@")
        if tail[1] and not any(c in tail[0] for c in "=&"):
            # The user:password part ends early: what follows is a password's tail.
            return (
                "it does not parse; a password holding '/', '?', '#' or '@' must be "
                "percent-encoded (%2F, %3F, %23, %40)"
            )
        return str(e)
    return None


def _check(url: str) -> None:
    if url.startswith("redis+sentinel://"):
        parse_sentinel_url(url)
        return
    parts = urlsplit(url)
    if parts.scheme not in QUERY_OPTIONS or not url.startswith(f"{parts.scheme}://"):
        raise ValueError("the scheme is one of redis://, rediss://, unix://, redis+sentinel://")
    options = _query(parts.query, parts.scheme)
    if parts.scheme == "unix":
        if parts.netloc.rpartition("@")[2]:
            raise ValueError(
                "a unix:// URL names no host, only the socket: unix:///path/to/redis.sock"
            )
        if not parts.path.strip("/"):
            raise ValueError("a unix:// URL names the socket: unix:///path/to/redis.sock")
    else:
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("the port is not a number from 1 to 65535")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"the path names the db, a number, not {db!r}")
        if db and "db" in options:
            raise ValueError("the db is given twice: in the path and as ?db=")
    parse_url(url)  # and whatever else redis-py would refuse
