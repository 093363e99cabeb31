"""Pure pacing logic: batch sizing against the budget, the rate ceiling, live controls and gates.
(Real-server behaviour: tests/integration.)"""

from __future__ import annotations

import threading
import time

import pytest

from migrator.errors import Interrupted
from migrator.scanloop import Progress, Step, drive
from migrator.throttle import BatchSizer, Controls, Gate, Pacer, RateLimiter


def test_sizer_halves_at_least_on_an_overrun() -> None:
    s = BatchSizer(500, 1000.0, start=400)
    s.observe(elapsed_us=1500.0, members=400)
    assert s.batch <= 200 and s.overruns == 1


def test_sizer_ignores_a_time_the_server_clock_ran_backwards_in() -> None:
    """TIME is the server's wall clock: stepped back (NTP) between a packet's two readings, the
    packet seems to take less than nothing, which says nothing of its cost."""
    s = BatchSizer(500, 1000.0, start=100)
    s.observe(-250.0, 100, whole=True)
    assert (s.batch, s.overruns) == (100, 0)


def test_sizer_grows_back_slowly_and_never_past_the_plan_batch() -> None:
    s = BatchSizer(500, 1000.0, start=100)
    s.observe(elapsed_us=100.0, members=100)  # 10% of the budget: room to grow
    assert 100 < s.batch <= 125
    for _ in range(50):
        s.observe(elapsed_us=1.0, members=s.batch)
    assert s.batch == 500


def test_sizer_aims_at_its_slice_of_the_budget() -> None:
    s = BatchSizer(500, 1000.0, start=100, aim=0.08)
    for _ in range(30):
        s.observe(elapsed_us=2.0 * s.batch, members=s.batch)  # 2 µs a member, plus 0.4 outside
    assert 20 <= s.batch <= 40  # ~80 µs of 2.4 µs members, well below the 30% the default aims
    assert s.overruns == 0


def test_sizer_steps_back_near_the_budget() -> None:
    s = BatchSizer(500, 1000.0, start=400)
    s.observe(elapsed_us=800.0, members=400)  # within budget, but close
    assert s.batch < 400 and s.overruns == 0


def test_rate_limiter_unlimited_never_waits() -> None:
    lim = RateLimiter(0)
    assert lim.delay_for(1_000_000) == 0.0


def test_rate_limiter_waits_for_what_was_spent() -> None:
    lim = RateLimiter(1000)
    delay = lim.delay_for(500)
    assert 0.2 < delay <= 0.5


def test_rate_limiter_lowered_rate_owes_at_most_a_second() -> None:
    lim = RateLimiter(10_000)
    lim.delay_for(5_000)
    lim.set_rate(10)  # 5000 members at 10/s would be 500 s
    assert 0.9 < lim.wait_time() <= 1.0


def test_rate_limiter_lifted_rate_waits_no_more() -> None:
    lim = RateLimiter(10)
    assert lim.delay_for(50) > 1
    lim.set_rate(0)
    assert lim.wait_time() == 0.0


class Flag(Gate):
    """A gate under the test's control (not a Redis stand-in: gates are the project's ABC)."""

    interval = 0.0

    def __init__(self) -> None:
        self.reason: str | None = None
        self.checks = 0

    def check(self) -> str | None:
        self.checks += 1
        return self.reason


def test_pacer_set_rate_cuts_a_long_rate_wait_short() -> None:
    controls = {"rate": None}
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        controls["rate"] = 0.0  # the operator lifts the ceiling during the wait
        time.sleep(s)

    pacer = Pacer(
        10,
        controls=lambda: Controls(rate=controls["rate"]),
        controls_interval=0.0,
        sleep=sleep,
    )
    started = time.monotonic()
    pacer.after_batch(100)  # 10 s at the plan's 10/s
    assert time.monotonic() - started < 0.5 and len(sleeps) == 1


def test_pacer_pause_during_a_rate_wait_hands_over_to_before_batch() -> None:
    paused = {"on": False}

    def sleep(s: float) -> None:
        paused["on"] = True

    pacer = Pacer(
        10,
        controls=lambda: Controls(paused=paused["on"]),
        controls_interval=0.0,
        sleep=sleep,
    )
    pacer.after_batch(100)
    assert pacer.paused_by_operator
    waits: list[str | None] = []

    def on_wait(reason: str | None) -> None:
        waits.append(reason)
        if len(waits) == 3:
            paused["on"] = False

    pacer.before_batch(on_wait)
    assert waits == ["paused by operator"] * 3


def test_pacer_holds_while_any_gate_answers_and_reports_every_reason() -> None:
    a, b = Flag(), Flag()
    a.reason, b.reason = "pause file /x", "memory: 95%"
    pacer = Pacer(0, gates=[a, b])
    seen: list[str | None] = []

    def on_wait(reason: str | None) -> None:
        seen.append(reason)
        if len(seen) == 2:
            a.reason = None
        if len(seen) == 3:
            b.reason = None

    pacer.before_batch(on_wait)
    assert seen == ["pause file /x; memory: 95%", "pause file /x; memory: 95%", "memory: 95%"]
    assert pacer.reason is None


def test_pacer_stop_interrupts_a_held_batch() -> None:
    gate = Flag()
    gate.reason = "held"
    stop = threading.Event()
    pacer = Pacer(0, stop=stop, gates=[gate])
    with pytest.raises(Interrupted):
        pacer.before_batch(lambda reason: stop.set())


def test_pacer_stops_before_a_batch_once_its_fence_is_down() -> None:
    may_write = [True]
    pacer = Pacer(0, fence=lambda: may_write[0])
    pacer.before_batch()
    may_write[0] = False
    with pytest.raises(Interrupted, match="lease is no longer surely"):
        pacer.before_batch()


def test_drive_keeps_the_end_it_saved_when_a_later_report_fails() -> None:
    """The last step's save marks the scan finished; a failure after it (a report, the rate
    wait) must not save it again as unfinished, which would start the scan over."""
    saves: list[tuple[str, int, bool]] = []

    def step(cursor: str, count: int) -> Step:
        return Step("0", 7, 1.0)

    def report(p: Progress) -> None:
        raise RuntimeError("the store went away")

    with pytest.raises(RuntimeError):
        drive(
            step,
            stage="copy",
            cursor="0",
            done=0,
            total=None,
            sizer=BatchSizer(100, 1000.0),
            pacer=Pacer(0),
            save=lambda c, d, f: saves.append((c, d, f)),
            report=report,
        )
    assert saves == [("0", 7, True)]


def test_a_save_that_fails_on_the_way_out_leaves_the_stop_as_the_error() -> None:
    """The loop stopped (here Ctrl-C); its save on the way out fails too (the store, or the
    server whose identity each save now checks, is gone): the stop is what is raised, not
    the save's error, which used to replace it (another exit code and message)."""
    stop = threading.Event()

    def step(cursor: str, count: int) -> Step:
        stop.set()  # Ctrl-C during the step
        return Step("41", 7, 1.0)

    def save(cursor: str, done: int, finished: bool) -> None:
        raise RuntimeError("Redis is down: cannot ask the server who it is")

    with pytest.raises(Interrupted, match="stopped on request"):
        drive(
            step,
            stage="copy",
            cursor="0",
            done=0,
            total=None,
            sizer=BatchSizer(100, 1000.0),
            pacer=Pacer(0, stop=stop),
            save=save,
            save_every=3600,
        )
