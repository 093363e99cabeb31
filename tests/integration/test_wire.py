"""The stream's own socket reads and writes (redisio/wire.py) against real servers: replies
and error replies read as redis-py reads them, failures surface as redis-py's connection and
timeout errors (which the runner retries), and the connection goes back to its pool usable."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from redis.exceptions import NoScriptError

from migrator.redisio.wire import PlainWire, Spin, Wire, wire_for

SPIN_S = 0.0003


def _held(client: redis.Redis) -> Any:
    return client.connection_pool.get_connection()


def test_replies_read_as_redis_py_reads_them(r: redis.Redis) -> None:
    r.hset("h", mapping={"a": "1", "b": "2"})
    conn = _held(r)
    wire = wire_for(conn, Spin(SPIN_S))
    assert isinstance(wire, Wire)
    try:
        # Two in flight, as the stream sends them; replies come back in order.
        wire.send(["HGET", "h", "a"])
        wire.send(["HMGET", "h", "a", "nope", "b"])
        assert wire.read() == b"1"
        assert wire.read() == [b"1", None, b"2"]
        wire.send(["EVAL", "return {1, redis.pcall('INCR', KEYS[1]), 'x'}", 1, "h"])
        reply = wire.read()
        assert reply[0] == 1 and reply[2] == b"x"
        assert isinstance(reply[1], redis.ResponseError)  # nested errors are left in place
    finally:
        wire.close()
        r.connection_pool.release(conn)
    assert conn._sock.gettimeout() == conn.socket_timeout  # handed back as redis-py set it
    assert r.hget("h", "b") == b"2"  # and the pooled connection still works


def test_an_error_reply_raises_redis_py_s_exception_class(r: redis.Redis) -> None:
    conn = _held(r)
    wire = wire_for(conn, Spin(SPIN_S))
    try:
        wire.send(["EVALSHA", "0" * 40, 0])
        with pytest.raises(NoScriptError):
            wire.read()
        wire.send(["HSET", "h"])
        with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
            wire.read()
        wire.send(["PING"])
        assert wire.read() == b"PONG"  # an error reply leaves the connection in step
    finally:
        wire.close()
        r.connection_pool.release(conn)


@pytest.mark.parametrize("spin_s", [SPIN_S, 0.0], ids=["polling", "redis-py"])
def test_a_packet_s_replies_are_read_together(r: redis.Redis, spin_s: float) -> None:
    conn = _held(r)
    wire = wire_for(conn, Spin(spin_s))
    assert isinstance(wire, Wire if spin_s else PlainWire)
    # Large enough for its replies to span several socket reads.
    value = b"v" * 300
    packet = b"".join(
        b"*4\r\n$4\r\nHSET\r\n$1\r\nh\r\n$%d\r\n%d\r\n$300\r\n%b\r\n" % (len(str(i)), i, value)
        for i in range(500)
    )
    try:
        wire.send_packed(packet)
        assert wire.read_many(500) == [1] * 500
        wire.send_packed(packet + b"*2\r\n$4\r\nHGET\r\n$1\r\nh\r\n")  # a wrong arity
        with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
            wire.read_many(501)  # the replies before it were read and dropped
        wire.send(["HLEN", "h"])
        assert wire.read() == 500  # the connection is in step
    finally:
        wire.close()
        r.connection_pool.release(conn)


def test_a_slow_reply_sleeps_past_the_spin_and_still_arrives(r: redis.Redis) -> None:
    conn = _held(r)
    spin = Spin(SPIN_S)
    wire = wire_for(conn, spin)
    try:
        pusher = threading.Timer(0.2, lambda: redis.Redis(**_kw(r)).rpush("q", "x"))
        pusher.start()
        t = time.monotonic()
        wire.send(["BLPOP", "q", 5])
        assert wire.read() == [b"q", b"x"]
        assert time.monotonic() - t >= 0.15
        # The poll ended in sleep: the next waits sleep at once, then a poll is tried again.
        assert spin.backoffs == 1
        assert [spin.next() for _ in range(Spin.BACKOFF)] == [0.0] * Spin.BACKOFF
        assert spin.next() == SPIN_S
    finally:
        wire.close()
        r.connection_pool.release(conn)


def test_no_reply_within_the_socket_timeout_is_a_timeout_error(r: redis.Redis) -> None:
    client = redis.Redis(**_kw(r), socket_timeout=0.3)
    conn = _held(client)
    wire = wire_for(conn, Spin(SPIN_S))
    try:
        wire.send(["BLPOP", "never", 5])
        with pytest.raises(redis.TimeoutError):
            wire.read()
    finally:
        wire.close()
        conn.disconnect()  # a reply may still come: the connection is not reused
        client.connection_pool.release(conn)


def test_a_killed_connection_is_a_connection_error(r: redis.Redis) -> None:
    client = redis.Redis(**_kw(r))
    conn = _held(client)
    wire = wire_for(conn, Spin(SPIN_S))
    try:
        wire.send(["CLIENT", "SETNAME", "wire-victim"])
        assert wire.read() == b"OK"
        for c in r.client_list():
            if c.get("name") == "wire-victim":
                r.client_kill_filter(_id=c["id"])
        with pytest.raises(redis.ConnectionError):
            wire.send(["PING"])
            wire.read()
    finally:
        conn.disconnect()
        wire.close()  # after a disconnect: nothing to hand back, and no error
        client.connection_pool.release(conn)


def test_without_a_spin_redis_py_reads_and_writes(r: redis.Redis) -> None:
    conn = _held(r)
    wire = wire_for(conn, Spin(0.0))
    assert isinstance(wire, PlainWire)
    try:
        wire.send(["PING"])
        assert wire.read() == b"PONG"
    finally:
        wire.close()
        r.connection_pool.release(conn)


def _kw(r: redis.Redis) -> dict[str, Any]:
    kw = r.connection_pool.connection_kwargs
    return {"host": kw["host"], "port": kw["port"]}


def test_error_replies_redis_py_raises_as_connection_errors_are_raised(r: redis.Redis) -> None:
    """WRONGPASS (like LOADING after a restart, or NOAUTH) is an AuthenticationError, a
    ConnectionError in redis-py: the runner retries those, so it must be raised, not returned."""
    conn = _held(r)
    wire = wire_for(conn, Spin(SPIN_S))
    r.config_set("requirepass", "secret")  # connections already authenticated stay so
    try:
        wire.send(["AUTH", "wrong"])
        with pytest.raises(redis.AuthenticationError):
            wire.read()
    finally:
        wire.close()
        conn.disconnect()
        r.connection_pool.release(conn)
        redis.Redis(**_kw(r), password="secret").config_set("requirepass", "")


def test_connections_with_reads_of_their_own_keep_them(r: redis.Redis) -> None:
    """Sentinel's connection turns READONLY from a demoted master into a ConnectionError in
    its own read_response; a wire would bypass it, so such connections keep redis-py's."""

    class OwnReads(redis.Connection):
        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            return super().read_response(*args, **kwargs)

    pool = redis.ConnectionPool(connection_class=OwnReads, **_kw(r))
    conn = pool.get_connection()
    try:
        assert isinstance(wire_for(conn, Spin(SPIN_S)), PlainWire)
    finally:
        pool.release(conn)
        pool.disconnect()
