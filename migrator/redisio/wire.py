"""The streamed copy's and verify's reads and writes, done on a redis-py connection's socket.

A :class:`~migrator.stream.CommandStream` keeps two small commands in flight and waits for
each reply for about the time the server takes to run one command (tens of µs). Sleeping in
``recv`` for so short a wait costs more than the wait: on a virtual machine the woken thread
takes ~70 µs to run again (measured: a PING round trip of ~105 µs blocking, ~35 µs polling),
and those wake-ups, not the server, set the copy's pace. So :class:`Wire` polls the socket
for up to ``spin_s`` before it sleeps in ``poll()``, yielding the CPU between two polls
(``sched_yield``): it spends CPU no other task wants, at the niceness the work verbs run at,
to spare the wake-ups. Without the yield, the poll competed with the server and the
application for the CPU and the application's p99 suffered; with it, measured under the
bench's load in interleaved rounds, the copy ran ~1.6x faster at the same p99. Where the
host is saturated polling is a loss, and :class:`Spin` backs off. ``$MIGRATOR_SPIN_US=0``
turns polling off (docs/decisions.md).

The connection stays redis-py's: connected, authenticated and named by its pool. While a
stream holds it, :class:`Wire` owns its socket (non-blocking) with its own hiredis reader;
:meth:`Wire.close` hands it back blocking, every reply read (a stream that fails disconnects
the connection instead). Left to redis-py's own reads (:class:`PlainWire`): TLS sockets (a TLS
socket can hold decrypted bytes that ``poll()`` does not see), connection classes with reads
of their own (sentinel's), RESP3 connections, and connections without a plain socket.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any, Protocol

import hiredis
import redis
from redis._parsers.base import BaseParser
from redis.connection import AbstractConnection
from redis.exceptions import InvalidResponse


class StreamWire(Protocol):
    def send(self, command: list[Any]) -> None: ...

    def send_packed(self, data: bytes) -> None: ...

    def read(self) -> Any: ...

    def read_many(self, n: int) -> list[Any]: ...

    def close(self) -> None: ...


class PlainWire:
    """redis-py's own writes and blocking reads."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def send(self, command: list[Any]) -> None:
        self.conn.send_packed_command(self.conn.pack_command(*command), check_health=False)

    def send_packed(self, data: bytes) -> None:
        self.conn.send_packed_command([data], check_health=False)

    def read(self) -> Any:
        return self.conn.read_response()

    def read_many(self, n: int) -> list[Any]:
        return [self.conn.read_response() for _ in range(n)]

    def close(self) -> None:
        pass


class Spin:
    """How long the next wait polls before it sleeps, learnt from how the last polls went.

    A poll pays where the reply comes while the runner polls, on a CPU nothing else wants.
    Where other tasks keep the CPUs busy (the host is saturated), each ``sched_yield`` hands the
    CPU over, the poll gets little of it, and a yielding task waits longer for the CPU once its
    reply is there than a sleeping task woken by it would: measured, a copy among six
    tight-loop writers ran ~1.6x slower polling than sleeping. So a poll that ended in sleep,
    or that got less than half of its wall time on the CPU, makes the next ``BACKOFF`` waits
    sleep at once; then a poll is tried again. One per stream: it outlives a step's wire.
    """

    BACKOFF = 32

    def __init__(self, spin_s: float) -> None:
        self.spin_s = spin_s
        self._skip = 0
        self.polls = 0  # waits that polled
        self.caught = 0  # ... and got their reply while polling, on a CPU of their own
        self.backoffs = 0

    def next(self) -> float:
        """How long the next wait polls (0: it sleeps at once)."""
        if self._skip:
            self._skip -= 1
            return 0.0
        return self.spin_s

    def outcome(self, caught: bool, wall_s: float, cpu_s: float) -> None:
        """A poll ended: with its reply (``caught``) or in sleep, after ``wall_s`` of which
        the thread ran ``cpu_s``."""
        self.polls += 1
        if caught and cpu_s >= 0.5 * wall_s:
            self.caught += 1
            return
        self.backoffs += 1
        self._skip = self.BACKOFF


class Wire:
    """Non-blocking writes, and reads that poll for a while (:class:`Spin`) before they
    sleep."""

    def __init__(self, conn: Any, spin: Spin) -> None:
        self.conn = conn
        self.sock: socket.socket = conn._sock
        self.timeout: float | None = conn.socket_timeout
        self.spin = spin
        encoder = conn.encoder
        options: dict[str, Any] = {}
        if encoder.decode_responses:
            options = {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
        # As redis-py's hiredis parser: error replies become its exception classes
        # (NOSCRIPT → NoScriptError, ...), raised at the top level, left in place when nested.
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error, **options
        )
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)
        self.writable = select.poll()
        self.writable.register(self.sock, select.POLLOUT)
        self.sock.setblocking(False)

    @staticmethod
    def usable(conn: Any) -> bool:
        sock = getattr(conn, "_sock", None)
        return (
            type(sock) is socket.socket
            # A connection class with reads of its own (sentinel's turns READONLY from a
            # demoted master into a ConnectionError) keeps them.
            and type(conn).read_response is AbstractConnection.read_response
            and getattr(conn, "protocol", 2) in (2, "2", None)  # RESP2: no "#f" reply
            and hasattr(conn, "encoder")
            and hasattr(select, "poll")
            and hasattr(os, "sched_yield")
        )

    def _wait_ms(self) -> int:
        """The socket timeout for poll(): -1 waits for ever, as a blocking socket does."""
        return -1 if self.timeout is None else max(1, int(self.timeout * 1000))

    def close(self) -> None:
        if self.conn._sock is self.sock:  # still connected: hand it back as redis-py set it
            self.sock.settimeout(self.timeout)

    def send(self, command: list[Any]) -> None:
        self.send_packed(b"".join(self.conn.pack_command(*command)))

    def send_packed(self, packed: bytes) -> None:
        data = memoryview(packed)
        try:
            while data:
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    # The send buffer is full (the server is not reading): wait for room.
                    if not self.writable.poll(self._wait_ms()):
                        raise redis.TimeoutError("Timeout writing to socket") from None
                    continue
                data = data[sent:]
        except OSError as e:
            raise redis.ConnectionError(f"Error while writing to socket: {e}") from e

    def _polled(self, *, caught: bool, started: float, cpu: float) -> None:
        self.spin.outcome(caught, time.perf_counter() - started, time.thread_time() - cpu)

    def read(self) -> Any:
        while True:
            reply = self.reader.gets()
            if reply is not False:
                # As redis-py raises them: ResponseError and its kin, and the error replies it
                # maps to ConnectionError (LOADING after a restart, NOAUTH, max clients), which
                # the runner's retries cover.
                if isinstance(reply, redis.RedisError):
                    raise reply
                return reply
            self._fill()

    def read_many(self, n: int) -> list[Any]:
        """A packet's ``n`` replies, as :meth:`read` would give them one by one (an error
        reply raises at once), in one loop: a packet's replies mostly arrive in one read."""
        out: list[Any] = []
        gets, append = self.reader.gets, out.append
        while len(out) < n:
            reply = gets()
            if reply is False:
                self._fill()
            elif isinstance(reply, redis.RedisError):
                raise reply
            else:
                append(reply)
        return out

    def _fill(self) -> None:
        """Read what the server sent: polling for a while (:class:`Spin`), then sleeping in
        poll()."""
        spin_s = self.spin.next()
        polling = spin_s > 0
        started = time.perf_counter()
        cpu = time.thread_time() if polling else 0.0
        spin_until = started + spin_s
        wait_ms = self._wait_ms()
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    if polling:
                        if time.perf_counter() < spin_until:
                            # Any other task waiting for this CPU (the server, the application)
                            # runs first: the poll only uses a CPU nothing else wants.
                            os.sched_yield()
                            continue
                        polling = False
                        self._polled(caught=False, started=started, cpu=cpu)
                    if not self.poller.poll(wait_ms):
                        raise redis.TimeoutError("Timeout reading from socket") from None
                    continue
                if not data:
                    raise redis.ConnectionError("Connection closed by server.")
                if polling:
                    self._polled(caught=True, started=started, cpu=cpu)
                self.reader.feed(data)
                return
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except OSError as e:
            raise redis.ConnectionError(f"Error while reading from socket: {e}") from e


def wire_for(conn: Any, spin: Spin | None) -> StreamWire:
    """The polling :class:`Wire` where the connection has a plain socket and there is a
    ``spin``; redis-py's own reads and writes otherwise."""
    if spin is not None and spin.spin_s > 0 and Wire.usable(conn):
        return Wire(conn, spin)
    return PlainWire(conn)
