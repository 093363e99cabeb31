"""Pacing of runner work: the members/s ceiling, the server-time budget, and pauses.

Every loop the runner drives (copy, verify, cleanup, rollback) calls
``pacer.before_batch()`` and ``pacer.after_batch(members, elapsed_us)`` around each command.

* :class:`BatchSizer` keeps each command inside the server-time budget: the scripts report
  their own server time (TIME inside the script), an overrun shrinks the next batch at once,
  a comfortable margin grows it back slowly, never above the plan's ``copy.batch``.
* :class:`RateLimiter` is a token bucket for ``copy.rate`` (or a live ``set-rate``).
* :class:`Pacer` asks its :class:`Gate` objects whether to pause (operator pause, pause file,
  memory, latency, replica lag) and reports the active reason for ``status``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from migrator.errors import Interrupted

T = TypeVar("T")

#: The share of the budget each command of a scan (copy, verify) aims at: 40 µs of the default
#: 1 ms. Measured on a shared 2-vCPU host (docs/benchmarks.md), this keeps the application's
#: p99 near idle; a larger ``copy.max_command_ms`` buys speed with the application's latency.
SLICE = 0.04

#: Server time per member a script cannot see itself spend (its arguments and reply are
#: converted before it starts and after it ends): measured at 0.2-0.35 µs on Redis 7 and
#: Valkey 9 for HMGET-sized work per member.
OUTSIDE_US_PER_MEMBER = 0.4

#: Whether this process may still write for its job: the job's lease is surely its own
#: (``Lease.fresh``). Asked before every batch and every streamed command.
Fence = Callable[[], bool]


def check_fence(fence: Fence | None) -> None:
    """Raise Interrupted when ``fence`` says the process may not write any more."""
    if fence is not None and not fence():
        raise Interrupted(
            "stopped before writing more: the job's lease is no longer surely this process's",
            hint="the job keeps its checkpoint; run the same command again (or `migrator run`)",
        )


def check_stop(stop: threading.Event) -> None:
    """Raise Interrupted when a stop was requested (Ctrl-C, SIGTERM, a lost lease)."""
    if stop.is_set():
        raise Interrupted(
            "stopped on request after the last acknowledged batch",
            hint="the job keeps its checkpoint; run the same command again (or "
            "`migrator run`) to go on from there",
        )


#: Members in a sizer's first command. Nothing is known of the values yet, and two commands
#: go out before the first measure comes back: 4 of 50 KB values is about 0.2 ms of HSCAN on
#: Redis 7 (64, the first start, was 2.7 ms). At most +25% a command, the batch reaches the
#: default slice's ~25 members of 100 bytes within ten commands.
START = 4


class BatchSizer:
    """Members per command, adapted so that each command stays within ``budget_us``."""

    def __init__(
        self, max_batch: int, budget_us: float, start: int | None = None, *, aim: float = 0.3
    ) -> None:
        self.max_batch = max(1, max_batch)
        self.budget_us = budget_us
        self.aim = aim  # the share of the budget each command aims at
        self.batch = max(1, min(self.max_batch, start or START))
        self.overruns = 0
        # Members one step may do before it starts nothing new: the rate ceiling's burst, set
        # by the loop before each step (scanloop.drive); None without a ceiling.
        self.step_limit: int | None = None

    def observe(self, elapsed_us: float, members: int, *, whole: bool = False) -> None:
        """Size the next command from one that carried ``members`` in ``elapsed_us`` of server
        time; ``whole``: the time covers all the server did for it (TIME around a packet)."""
        if members <= 0 or elapsed_us < 0:
            # Nothing carried, or the server's wall clock (TIME) stepped back between the two
            # readings: no measure of the command, so no change.
            return
        # A script times itself, but the server's own time for the command (SLOWLOG) also
        # counts what happens around the script: argument and reply conversion, Lua garbage
        # collection, freeing what it deleted. Part of it grows with the members the command
        # carries (OUTSIDE_US_PER_MEMBER); the rest, and a busy host stretching all of it, is
        # why the aim is at most 30% of the budget. The per-member cost varies too (value sizes).
        if not whole:
            elapsed_us += OUTSIDE_US_PER_MEMBER * members
        per_member = max(elapsed_us / members, 0.05)
        aim_us = self.aim * self.budget_us
        target = int(aim_us / per_member)
        if elapsed_us > 0.8 * self.budget_us:
            if elapsed_us > self.budget_us:
                self.overruns += 1
            self.batch = max(1, min(target, self.batch // 2))
        elif elapsed_us > 1.5 * aim_us:
            # Well past the aim: step back before an overrun rather than after one.
            self.batch = max(1, min(target, self.batch - max(1, self.batch // 8)))
        elif elapsed_us < 0.67 * aim_us:
            self.batch = min(
                self.max_batch, max(self.batch + 1, min(target, int(self.batch * 1.25)))
            )


def chunks(items: Sequence[T], chunk: int, sizer: BatchSizer | None) -> Iterator[Sequence[T]]:
    """``items`` in slices of ``chunk``, or of the sizer's batch as it stands at each slice
    (the caller shows it each slice's time)."""
    i = 0
    while i < len(items):
        n = sizer.batch if sizer is not None else chunk
        yield items[i : i + n]
        i += n


class RateLimiter:
    """Token bucket: at most ``rate`` members per second on average (0 = unlimited)."""

    #: The largest burst allowed: a quarter second's worth of members.
    BURST_S = 0.25

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._allowance = 0.0
        self._last = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        if self.rate > 0:
            self._allowance = min(
                self.rate * self.BURST_S, self._allowance + (now - self._last) * self.rate
            )
        else:
            self._allowance = 0.0
        self._last = now

    def set_rate(self, rate: float) -> None:
        if rate == self.rate:
            return
        self._refill()  # what was earned so far, at the old rate
        self.rate = rate
        # A new rate applies from now: owe at most a second of it for the past.
        self._allowance = max(self._allowance, -rate) if rate > 0 else 0.0

    def burst(self) -> int | None:
        """The most members one batch should carry under the ceiling; None without one."""
        return max(1, int(self.rate * self.BURST_S)) if self.rate > 0 else None

    def wait_time(self) -> float:
        """Seconds to wait before the next batch may start (0 when it may start now)."""
        self._refill()
        return 0.0 if self.rate <= 0 or self._allowance >= 0 else -self._allowance / self.rate

    def delay_for(self, members: int) -> float:
        """Account for ``members`` just done; return how long to sleep to respect the rate."""
        self._refill()
        if self.rate > 0:
            self._allowance -= members
        return self.wait_time()


@dataclass(frozen=True)
class Controls:
    """The operator's live controls for one job, read from the state store."""

    paused: bool = False
    rate: float | None = None  # set-rate override; None = the plan's copy.rate


class Gate:
    """One reason to hold the work. ``check()`` returns a reason to pause, or None to go on.

    Contract: cheap (called at most every ``interval`` seconds), never raises for a transient
    condition (return a reason instead).
    """

    interval = 0.5

    def check(self) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


class Pacer:
    """Paces one loop of batches: rate ceiling, gates, live controls and the stop signal."""

    def __init__(
        self,
        rate: float,
        *,
        stop: threading.Event | None = None,
        controls: Callable[[], Controls] | None = None,
        gates: Sequence[Gate] = (),
        controls_interval: float = 0.25,
        sleep: Callable[[float], None] = time.sleep,
        fence: Fence | None = None,
    ) -> None:
        self.plan_rate = rate
        self.fence = fence
        self.limiter = RateLimiter(rate)
        self.stop = stop or threading.Event()
        self._controls = controls
        self._gates = list(gates)
        self._controls_interval = controls_interval
        self._sleep = sleep
        self._next_controls = 0.0
        self._next_gate: dict[int, float] = {}
        self._gate_reason: dict[int, str | None] = {}
        self.paused_by_operator = False
        self.reason: str | None = None
        self.rate_reason: str | None = None

    def _refresh_controls(self) -> None:
        if self._controls is None:
            return
        now = time.monotonic()
        if now < self._next_controls:
            return
        self._next_controls = now + self._controls_interval
        c = self._controls()
        self.paused_by_operator = c.paused
        self.limiter.set_rate(self.plan_rate if c.rate is None else c.rate)

    def _gate_reasons(self) -> list[str]:
        now = time.monotonic()
        for i, g in enumerate(self._gates):
            if now >= self._next_gate.get(i, 0.0):
                self._next_gate[i] = now + g.interval
                self._gate_reason[i] = g.check()
        return [r for r in self._gate_reason.values() if r]

    def check_stop(self) -> None:
        check_fence(self.fence)
        check_stop(self.stop)

    def before_batch(self, on_wait: Callable[[str | None], None] | None = None) -> None:
        """Return when the next batch may run; raise Interrupted when a stop was requested or
        the fence is down."""
        while True:
            self.check_stop()
            self._refresh_controls()
            reasons = ["paused by operator"] if self.paused_by_operator else []
            reasons += self._gate_reasons()
            if not reasons:
                self.reason = self.rate_reason
                return
            self.reason = "; ".join(reasons)
            if on_wait:
                on_wait(self.reason)
            self.stop.wait(0.1)

    def after_batch(
        self, members: int, on_wait: Callable[[str | None], None] | None = None
    ) -> None:
        delay = self.limiter.delay_for(members)
        self.rate_reason = f"rate ceiling {self.limiter.rate:g}/s" if delay > 0 else None
        # Sleep in short slices, re-reading the controls, so that stop, pause and set-rate act
        # within a second even while a low rate makes the wait long.
        while delay > 0 and not self.stop.is_set():
            self.reason = self.rate_reason = f"rate ceiling {self.limiter.rate:g}/s"
            if on_wait:
                on_wait(self.reason)
            self._sleep(min(delay, 0.1))
            self._refresh_controls()
            if self.paused_by_operator:
                return
            delay = self.limiter.wait_time()
