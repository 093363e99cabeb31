"""The budget check of the whole-life test and of scripts/bench on made-up SLOWLOG entries
(tests/slowlog.py)."""

from __future__ import annotations

from tests.slowlog import Sent, over_budget

BUDGET_US = 1000


def test_over_budget_tells_a_stall_from_an_overrun() -> None:
    """The check above on made-up logs: a routine command slowed by the host is a stall; one
    doing more work than the budget allows at its peers' rate, a whole-key command, or a
    one-off, is an overrun."""
    scan = [Sent(60, b"HSCAN big:hash %d COUNT 100" % i) for i in range(10)]
    stalled = Sent(3500, b"HSCAN big:hash 7 COUNT 100")
    too_big = Sent(1400, b"HSCAN big:hash 9 COUNT 5000")  # 5000 x 0.6 µs: 3 ms of work
    near = Sent(1100, b"HSCAN big:hash 9 COUNT 1300")  # 780 µs of work: not a stall
    whole = [Sent(1200, b"HGETALL big:hash")] + [Sent(5, b"HGETALL small") for _ in range(9)]
    text = [Sent(1500, b"EVAL return 1 0")] + [Sent(5, b"EVAL return 1 0") for _ in range(9)]
    lone = Sent(1300, b"EVALSHA abc 1 big:hash m1 m2")
    logged = [*scan, stalled, too_big, near, *whole, *text, lone]
    overruns, stalls = over_budget(logged, BUDGET_US)
    assert stalls == [stalled]
    assert overruns == [too_big, near, whole[0], text[0], lone]
    # SLOWLOG keeps 31 arguments and says how many more there were: 101 in all, 2 of them
    # keys, so 96 script arguments.
    cut = Sent(10, b"EVALSHA abc 2 k1 k2 " + b"m " * 26 + b"... (70 more arguments)")
    assert cut.work == 96 and cut.kind == (b"EVALSHA", b"abc")


def test_over_budget_takes_the_peers_of_another_run_when_given() -> None:
    """The bench logs only commands over a quarter of the budget while it measures, and takes
    the peers from a run logged at threshold 0: a command is judged by those, never by the
    other slow ones it was logged with."""
    slow = [Sent(3500, b"HSETNX big:0 m%d v" % i) for i in range(6)]
    # Judged by each other, six slow HSETNXs vouch for one another's slowness: overruns.
    assert over_budget(slow, BUDGET_US) == (slow, [])
    fast = [Sent(4, b"HSETNX big:1 m%d v" % i) for i in range(20)]
    assert over_budget(slow, BUDGET_US, peers=fast) == ([], slow)
    # A kind the peers never sent has no one to vouch for it.
    other = Sent(2500, b"EVALSHA abc 1 big:0 m1")
    assert over_budget([other], BUDGET_US, peers=fast) == ([other], [])


def test_a_sample_is_judged_by_its_count() -> None:
    """Preflight samples fields with HRANDFIELD, 100 a command: bounded by its count."""
    peers = [Sent(90, b"HRANDFIELD big:hash 100") for _ in range(9)]
    stalled = Sent(1006, b"HRANDFIELD big:hash 100")
    huge = Sent(1500, b"HRANDFIELD big:hash -5000")  # 5000 at its peers' rate: 4.5 ms of work
    assert stalled.work == 100 and huge.work == 5000
    assert over_budget([*peers, stalled, huge], BUDGET_US) == ([huge], [stalled])


def test_an_unlink_of_one_key_is_judged_by_its_witnesses() -> None:
    """Cleanup's UNLINK is a one-off: the whole-life test unlinks copies of the key to vouch
    for it (tests/slowlog.py: calibrate). UNLINK of several keys stays unbounded."""
    witnesses = [Sent(40, b"UNLINK big:hash:calibration:%d" % i) for i in range(7)]
    stalled = Sent(2271, b"UNLINK big:hash")
    assert over_budget([stalled], BUDGET_US) == ([stalled], [])  # no one to vouch for it
    assert over_budget([stalled], BUDGET_US, peers=witnesses) == ([], [stalled])
    slow_witnesses = [Sent(1500, b"UNLINK big:hash:calibration:%d" % i) for i in range(7)]
    assert over_budget([stalled], BUDGET_US, peers=slow_witnesses) == ([stalled], [])
    many = Sent(2271, b"UNLINK a b c")
    assert many.kind is None
    assert over_budget([many], BUDGET_US, peers=witnesses) == ([many], [])
