"""How long a stream polls for a reply before it sleeps (redisio/wire.py's Spin): polls that
pay keep going; a poll that ended in sleep, or that got little of the CPU, backs off."""

from __future__ import annotations

from migrator.redisio.wire import Spin

SPIN_S = 0.0003


def test_polls_that_catch_their_reply_keep_polling() -> None:
    spin = Spin(SPIN_S)
    for _ in range(100):
        assert spin.next() == SPIN_S
        spin.outcome(True, wall_s=50e-6, cpu_s=45e-6)
    assert spin.caught == spin.polls == 100 and spin.backoffs == 0


def test_a_poll_that_got_little_cpu_backs_off() -> None:
    """Other tasks had the CPU while it polled (each yield handed it over): the host is busy,
    and sleeping gets the reply sooner than yielding does."""
    spin = Spin(SPIN_S)
    spin.outcome(True, wall_s=200e-6, cpu_s=40e-6)
    assert spin.backoffs == 1 and spin.next() == 0.0


def test_a_poll_that_ended_in_sleep_backs_off_then_polls_again() -> None:
    spin = Spin(SPIN_S)
    spin.outcome(False, wall_s=SPIN_S, cpu_s=SPIN_S)
    assert [spin.next() for _ in range(Spin.BACKOFF)] == [0.0] * Spin.BACKOFF
    assert spin.next() == SPIN_S
