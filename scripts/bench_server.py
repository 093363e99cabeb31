"""What the server spends per member, for each way a copy could read or write: the bench's
"server cost" table.

Usage: bench_server.py URL SOURCE [MEMBERS]

For each way below it writes MEMBERS members of SOURCE (read once, up front) into 100 fresh
shard keys, with ten commands in flight per write so that the server never waits for this
client, and reports the server's CPU time per member (``INFO cpu``: the server process's user
and system time, so parsing, replies and the event loop count, not only the command) and its
command time per member (``INFO commandstats``). Run it on a server nothing else is using.

* ``HSCAN`` with COUNT 30 (about the copy's page) and 1000 (the recipe's): the reads.
* ``HSETNX``, one member a command: the copy's insert (race-safe beside the shim's marks).
* ``HSET``, one field a command: the recipe's write (not race-safe).
* ``HSET``, 30 fields of one shard a command: the cheapest write there is (not race-safe: it
  overwrites).
* A script that inserts 30 fields of one shard where they are missing (HMGET, then HSET of the
  gaps): the race-safe way to write several fields in one command on servers without
  ``HSETEX FNX``.
* ``HSETEX ... FNX``, 30 fields of one shard a command, where the server has it (Valkey 9,
  Redis 8): all of them are set only if none exists, so it is race-safe as one HSETNX per field
  is when it succeeds.

Prints one JSON object: ``{"rows": [{"way", "cpu_us", "cmd_us", "race_safe"}, ...]}``.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any, cast

import redis

SHARDS = 100
GROUP = 30
#: Members sent per write (ten commands of GROUP, or 300 of one): the server always has the
#: next command, and every way pays the same round trips per member.
WINDOW = 10 * GROUP
TEMPLATE = "bench:cost:{shard}"

INSERT_MISSING = """
local n = #ARGV / 2
local fields = {}
for i = 1, n do fields[i] = ARGV[2 * i - 1] end
local got = redis.call('HMGET', KEYS[1], unpack(fields))
local set, k = {}, 0
for i = 1, n do
  if not got[i] then set[k + 1] = ARGV[2 * i - 1]; set[k + 2] = ARGV[2 * i]; k = k + 2 end
end
if k > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
return k / 2
"""


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def server_cpu(client: redis.Redis) -> float:
    """The server process's CPU seconds so far (user + system): parsing, replies and the event
    loop count, not only the commands (which INFO commandstats times)."""
    info = cast(dict[str, float], client.info("cpu"))
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _command_usec(client: redis.Redis) -> int:
    stats = cast(dict[str, dict[str, int]], client.info("commandstats"))
    return sum(int(s.get("usec", 0)) for s in stats.values())


class Cost:
    def __init__(self, client: redis.Redis, members: list[tuple[bytes, bytes]]) -> None:
        self.client = client
        self.members = members
        self.keys = [TEMPLATE.replace("{shard}", str(i)).encode() for i in range(SHARDS)]
        self.conn = client.connection_pool.get_connection()

    def close(self) -> None:
        self.client.connection_pool.release(self.conn)

    def _send(self, commands: list[bytes], per_command: int) -> None:
        """Send ``commands`` (of ``per_command`` members each) WINDOW members at a time,
        reading every reply."""
        step = max(1, WINDOW // per_command)
        for i in range(0, len(commands), step):
            chunk = commands[i : i + step]
            self.conn.send_packed_command([b"".join(chunk)], check_health=False)
            for _ in chunk:
                self.conn.read_response()

    def measure(
        self, way: str, commands: list[bytes], members: int, safe: bool, per_command: int = 1
    ) -> dict[str, Any]:
        self.client.unlink(*self.keys)
        time.sleep(0.2)  # a lazy free of the last round's keys
        cpu, usec = server_cpu(self.client), _command_usec(self.client)
        self._send(commands, per_command)
        cpu = server_cpu(self.client) - cpu
        # The two INFO calls are commands too: a few µs against seconds.
        usec = _command_usec(self.client) - usec
        self.client.unlink(*self.keys)
        return {
            "way": way,
            "cpu_us": cpu * 1e6 / members,
            "cmd_us": usec / members,
            "race_safe": safe,
        }

    def _shard(self, field: bytes) -> bytes:
        return self.keys[zlib.crc32(field) % SHARDS]

    def per_member(self, name: bytes) -> list[bytes]:
        return [_command(name, self._shard(f), f, v) for f, v in self.members]

    def grouped(self, build: Callable[[bytes, list[bytes]], bytes]) -> list[bytes]:
        by_shard: dict[bytes, list[bytes]] = {}
        for f, v in self.members:
            by_shard.setdefault(self._shard(f), []).extend((f, v))
        out = []
        for key, flat in by_shard.items():
            for i in range(0, len(flat), 2 * GROUP):
                out.append(build(key, flat[i : i + 2 * GROUP]))
        return out


def scan_cost(client: redis.Redis, source: str, count: int, members: int) -> dict[str, Any]:
    conn = client.connection_pool.get_connection()
    try:
        cpu, usec = server_cpu(client), _command_usec(client)
        cursor, seen = b"0", 0
        # Scans go one at a time (each starts at the last one's cursor); the round trips cost
        # the server a wake-up each, which the copy's scans, sent among its inserts, do not.
        while seen < members:
            conn.send_command("HSCAN", source, cursor, "COUNT", count)
            cursor, found = conn.read_response()
            seen += len(found) // 2
            if cursor in (b"0", 0):
                break
        cpu = server_cpu(client) - cpu
        usec = _command_usec(client) - usec
    finally:
        client.connection_pool.release(conn)
    return {
        "way": f"HSCAN COUNT {count} (read)",
        "cpu_us": cpu * 1e6 / seen,
        "cmd_us": usec / seen,
        "race_safe": None,
    }


def has_hsetex(client: redis.Redis) -> bool:
    probe = TEMPLATE.replace("{shard}", "probe")
    try:
        client.execute_command("HSETEX", probe, "FNX", "FIELDS", 1, "f", "v")
    except redis.ResponseError:  # unknown command (or syntax): servers before it
        return False
    finally:
        client.unlink(probe)
    return True


def measure(client: redis.Redis, source: str, members: int) -> list[dict[str, Any]]:
    rows = [scan_cost(client, source, 30, members), scan_cost(client, source, 1000, members)]
    found: list[tuple[bytes, bytes]] = []
    for f, v in cast(Iterable[tuple[bytes, bytes]], client.hscan_iter(source, count=1000)):
        found.append((f, v))
        if len(found) >= members:
            break
    cost = Cost(client, found)
    n = len(found)
    sha = cast(str, client.script_load(INSERT_MISSING)).encode()
    try:
        nx, one = cost.per_member(b"HSETNX"), cost.per_member(b"HSET")
        rows.append(cost.measure("HSETNX, one member a command", nx, n, True))
        rows.append(cost.measure("HSET, one field a command", one, n, False))
        rows.append(
            cost.measure(
                f"HSET, {GROUP} fields of a shard a command",
                cost.grouped(lambda k, flat: _command(b"HSET", k, *flat)),
                n,
                False,
                GROUP,
            )
        )
        rows.append(
            cost.measure(
                f"script: HMGET then HSET of the missing, {GROUP} fields of a shard a call",
                cost.grouped(lambda k, flat: _command(b"EVALSHA", sha, b"1", k, *flat)),
                n,
                True,
                GROUP,
            )
        )
        if has_hsetex(client):
            rows.append(
                cost.measure(
                    f"HSETEX FNX, {GROUP} fields of a shard a command",
                    cost.grouped(
                        lambda k, flat: _command(
                            b"HSETEX", k, b"FNX", b"FIELDS", b"%d" % (len(flat) // 2), *flat
                        )
                    ),
                    n,
                    True,
                    GROUP,
                )
            )
    finally:
        cost.close()
    return rows


def main() -> int:
    url, source = sys.argv[1], sys.argv[2]
    members = int(sys.argv[3]) if len(sys.argv) > 3 else 200_000
    client = redis.Redis.from_url(url, client_name="bench:cost")
    print(json.dumps({"rows": measure(client, source, members)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
