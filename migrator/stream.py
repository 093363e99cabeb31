"""A budgeted scan run as a stream of small commands: the engine under the copy and verify.

The server runs one command at a time, so what an application request waits for behind the
runner is the command running when it arrives and, at most, the ones queued behind it. A
:class:`CommandStream` therefore sends small commands, or small :class:`Packed` runs of
commands (each sized by the batch sizer to ``throttle.SLICE`` of the budget), and keeps
:data:`DEPTH` of them in flight on its own connection: the next one is on its way while the
server runs the current one, so the server does not wait for the runner, yet they are not one
pipelined batch that the server would run back to back, and the application's requests get in
between them (docs/decisions.md).

A step streams up to ``step_scripts`` scripts or packets (for at most ``burst_s``, and under a
rate ceiling for at most the ceiling's burst of members, but at least one), finishes what it
must (up to a checkpoint) and reads every reply, so the loop around it
(``scanloop.drive``: pacing, the rate ceiling, gates, checkpoints) always sees an acknowledged
state. Subclasses say what to send next and what a reply means; on any error the connection is
dropped and whatever was in flight is handed back to the subclass to send again (every command
of a scan is idempotent).

A stream polls the socket for a reply for up to ``$MIGRATOR_SPIN_US`` (300 µs by default)
before it sleeps (``redisio/wire.py``): a reply is due within tens of µs, and on a virtual
machine a thread woken from ``recv`` takes longer than that to run again. ``0`` sleeps at once
(redis-py's own reads).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import redis
from redis.exceptions import NoScriptError

from migrator.env import int_from_env
from migrator.redisio.scripts import Scripts
from migrator.redisio.wire import Spin, StreamWire, wire_for
from migrator.throttle import BatchSizer, Fence, check_fence

#: Commands in flight at once. Two keep the server busy while the runner reads a reply and
#: sends the next; more would queue up at the server, and the application would wait for them.
DEPTH = 2
#: A step streams at most this many scripts, or for at most BURST_S, then waits for all of
#: them; the wait costs about one round trip per step.
STEP_SCRIPTS = 32
BURST_S = 0.02

#: How long a stream polls for a reply before it sleeps (``redisio/wire.py``),
#: ``$MIGRATOR_SPIN_US``; 0 sleeps at once. Measured under the bench's load, in interleaved
#: rounds: 1.4-1.9x the sleeping copy's rate, at the same p99 of the application's requests
#: (docs/decisions.md).
SPIN_ENV, SPIN_DEFAULT_US = "MIGRATOR_SPIN_US", 300


def spin_seconds() -> float:
    """``$MIGRATOR_SPIN_US`` in seconds; a bad value is bad input (exit 2, nothing written)."""
    return int_from_env(SPIN_ENV, SPIN_DEFAULT_US, 0, 10_000, " µs") / 1e6


#: What was sent, as the subclass tagged it: ("scan", payload) for a scan that only feeds the
#: stream, anything else (("script", ...), ("packet", ...)) for work the step counts.
Sent = tuple[str, Any]


class Packed:
    """Several commands, packed (RESP) by the subclass and sent in one write: the server reads
    them together and runs them back to back, so a packet is one slice of the budget. Its
    replies reach ``_received`` as one list."""

    __slots__ = ("data", "replies")

    def __init__(self, data: bytes, replies: int) -> None:
        self.data = data
        self.replies = replies


class CommandStream:
    """The streaming loop; subclasses implement the hooks below."""

    #: The server time ``_received`` reports covers all the server did for the command (TIME
    #: around a packet), not only what a script saw of itself.
    measures_whole = False

    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        *,
        sizer: BatchSizer | None = None,
        depth: int = DEPTH,
        burst_s: float = BURST_S,
        step_scripts: int = STEP_SCRIPTS,
        spin_s: float | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.client = client
        self.fence = fence  # asked before each command is sent
        self.spin = Spin(spin_seconds() if spin_s is None else spin_s)
        self.scripts = scripts
        self.sizer = sizer
        self.depth = max(1, depth)
        self.burst_s = burst_s
        self.step_scripts = max(1, step_scripts)
        self._inflight: deque[Sent] = deque()
        self._replies: deque[int] = deque()  # replies due for each command in flight (0: one)
        self.most_inflight = 0  # the most commands ever in flight at once (at most ``depth``)
        self.worst_us = 0.0

    # -- hooks ---------------------------------------------------------------------------------
    def _next_command(self, count: int, more: bool) -> tuple[list[Any] | Packed, Sent] | None:
        """The next command (or :class:`Packed` commands) and its tag, or None when nothing can
        be sent before a reply.
        ``more``: the step is within its limits; past them, only finish what was begun."""
        raise NotImplementedError

    def _received(self, sent: Sent, reply: Any) -> tuple[int, float, int]:
        """Account for a reply: (members done, the script's own server time, members it
        carried); (0, 0.0, 0) for a scan."""
        raise NotImplementedError

    def _lost(self, sent: Sent) -> None:
        """A command's reply was lost: make sure it is sent again."""
        raise NotImplementedError

    def _must_go_on(self) -> bool:
        """Whether the step must stream past its limits: until a checkpoint whose count agrees
        with its cursor (a resume then redoes nothing that was counted)."""
        return False

    def _finished(self) -> bool:
        return False

    # -- the loop ------------------------------------------------------------------------------
    def _count(self, count: int) -> int:
        if self.sizer is None:
            return count
        limit = self.sizer.step_limit  # under a rate ceiling, no command carries more
        return self.sizer.batch if limit is None else max(1, min(self.sizer.batch, limit))

    def _stream_with_reload(self, count: int, script: str) -> tuple[int, float, int]:
        for attempt in (1, 2):
            try:
                return self._stream(count)
            except NoScriptError:
                # The server lost its script cache (restart, failover): load and go on.
                if attempt == 2:
                    raise
                self.scripts.load(script)
        raise AssertionError("unreachable")

    def _stream(self, count: int) -> tuple[int, float, int]:
        """One step: (members done, the longest script's server time, its members)."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        wire: StreamWire | None = None
        done, worst, worst_members, scripts = 0, 0.0, 0, 0
        ends = time.monotonic() + self.burst_s
        limit = self.sizer.step_limit if self.sizer else None  # the rate ceiling's burst
        try:
            wire = wire_for(conn, self.spin)
            while True:
                more = not scripts or (
                    scripts < self.step_scripts
                    and time.monotonic() < ends
                    and (limit is None or done < limit)
                )
                if not self._finished() and (more or self._must_go_on()):
                    while len(self._inflight) < self.depth:
                        # A process paused mid-step (SIGSTOP, a VM stall) must not send the
                        # rest of it once its lease may be another's.
                        check_fence(self.fence)
                        nxt = self._next_command(self._count(count), more)
                        if nxt is None:
                            break
                        cmd, sent = nxt
                        # In flight before it is sent: a send that fails hands it back below
                        # (``_lost``) with the rest, or what it carries would be lost.
                        self._inflight.append(sent)
                        if isinstance(cmd, Packed):
                            self._replies.append(cmd.replies)
                            wire.send_packed(cmd.data)
                        else:
                            self._replies.append(0)
                            wire.send(cmd)
                        scripts += sent[0] != "scan"
                        self.most_inflight = max(self.most_inflight, len(self._inflight))
                if not self._inflight:
                    break  # all acknowledged, and the step is over or the scan is done
                due = self._replies[0]
                reply = wire.read_many(due) if due else wire.read()
                n, elapsed, members = self._received(self._inflight[0], reply)
                self._inflight.popleft()
                self._replies.popleft()
                done += n
                if self.sizer and members:
                    self.sizer.observe(elapsed, members, whole=self.measures_whole)
                if elapsed >= worst:
                    worst, worst_members = elapsed, members
        except BaseException:
            # The connection may hold replies of commands no longer waited for, or half a
            # command: it is closed rather than reused. What was not acknowledged is sent
            # again next time.
            conn.disconnect()
            for sent in reversed(self._inflight):
                self._lost(sent)
            self._inflight.clear()
            self._replies.clear()
            raise
        finally:
            try:
                if wire is not None:
                    wire.close()
            finally:
                pool.release(conn)
        self.worst_us = max(self.worst_us, worst)
        return done, worst, worst_members
