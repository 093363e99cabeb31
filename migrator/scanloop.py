"""The one loop every budgeted scan runs through: copy, verify passes, cleanup, rollback.

``drive`` calls ``step(cursor, batch)`` until the cursor returns to 0, pacing each command,
adapting the batch to the server-time budget, and handing a checkpoint ``(cursor, done)`` to
``save`` at most every ``save_every`` seconds and at the end. A checkpoint is only ever a
cursor whose batch Redis has acknowledged, so resuming from any saved one loses nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from migrator.throttle import BatchSizer, Pacer

log = logging.getLogger("migrator.scanloop")


@dataclass(frozen=True)
class Step:
    cursor: str
    members: int
    elapsed_us: float  # server time of the longest command of the step
    command_members: int = 0  # members that command handled (0: all of ``members``)
    observed: bool = False  # the step told the sizer about each command itself


@dataclass
class Progress:
    stage: str
    done: int
    total: int | None
    rate: float
    reason: str | None


def drive(
    step: Callable[[str, int], Step],
    *,
    stage: str,
    cursor: str,
    done: int,
    total: int | None,
    sizer: BatchSizer,
    pacer: Pacer,
    save: Callable[[str, int, bool], None],
    report: Callable[[Progress], None] | None = None,
    save_every: float = 0.25,
) -> int:
    """Run ``step`` from ``cursor`` to the end of the scan; return members done."""
    started, start_done = time.monotonic(), done
    last_save = last_report = time.monotonic()
    first = True
    ended = False  # the end is saved: a later failure (in pacing, a report) must not undo it

    def progress(reason: str | None) -> None:
        if report:
            elapsed = max(time.monotonic() - started, 1e-6)
            report(Progress(stage, done, total, (done - start_done) / elapsed, reason))

    def waiting(reason: str | None) -> None:
        # Held by a gate, the operator or the rate ceiling: keep `status` showing why.
        nonlocal last_report
        now = time.monotonic()
        if now - last_report >= save_every:
            last_report = now
            progress(reason)

    try:
        while first or cursor != "0":
            first = False
            pacer.before_batch(waiting)
            # Under a rate ceiling a step carries at most its burst, so that a low ceiling
            # (set-rate 100) paces small steps instead of sleeping off a large one.
            sizer.step_limit = limit = pacer.limiter.burst()
            result = step(cursor, sizer.batch if limit is None else min(sizer.batch, limit))
            if not result.observed:
                sizer.observe(result.elapsed_us, result.command_members or result.members)
            cursor, done = result.cursor, done + result.members
            now = time.monotonic()
            if cursor == "0" or now - last_save >= save_every:
                save(cursor, done, cursor == "0")
                ended = cursor == "0"
                last_save = last_report = now
                progress(pacer.reason)
            pacer.after_batch(result.members, waiting)
    except BaseException:
        # Whatever stopped us (a stop request, a Redis error that outlived its retries), the
        # last acknowledged cursor is kept so the work resumes there. A save that fails too
        # (the store down, the server it checks gone) leaves the last periodic one, and the
        # error that stopped the loop is the one raised.
        if not ended:
            try:
                save(cursor, done, False)
            except Exception as e:  # noqa: BLE001 - the first error is the news
                log.warning("%s: the checkpoint could not be saved on the way out: %s", stage, e)
        raise
    return done
