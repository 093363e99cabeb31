"""The control record each call runs under, and the epoch this process has *applied*.

The runner moves on (e.g. starts copying after publishing dual_write) once every live
instance has acknowledged the new epoch. Acknowledging as soon as the new record is read would
be too early: a write that started under the old record (old key only) may still be on the
wire, and the copy could pass its member before it lands, losing it in the shard. So each call
*enters* under the current record generation and *exits* when its Redis work is done, and the
applied epoch is the oldest epoch any in-flight call still runs under.

Contract of :meth:`EpochTracker.applied_epoch`: when it returns E, every call in flight started
under a record of epoch >= E (or the current record's epoch when none is in flight), and every
call started later uses the current record.
"""

from __future__ import annotations

import threading

from migrator.control import ControlRecord


def epoch_of(record: ControlRecord | None) -> int:
    return record.epoch if record is not None else 0


class EpochTracker:
    """Thread-safe: the current record, a generation number, and in-flight calls per generation.

    A generation is one installed record; generations (not epochs) key the in-flight counts so
    that re-publishing a record with an unchanged or reset epoch is still tracked correctly.
    """

    def __init__(self, record: ControlRecord | None = None) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._record = record
        self._inflight: dict[int, int] = {}  # generation → calls in flight
        self._epochs: dict[int, int] = {}  # generation → its record's epoch, while in flight

    @property
    def record(self) -> ControlRecord | None:
        return self._record

    def install(self, record: ControlRecord) -> bool:
        """Make ``record`` current for calls entered from now on; False if it is unchanged."""
        with self._lock:
            if record == self._record:
                return False
            self._generation += 1
            self._record = record
            return True

    def enter(self) -> tuple[int, ControlRecord | None]:
        """Start a call: returns (generation token, the record the call must use throughout)."""
        with self._lock:
            gen = self._generation
            self._inflight[gen] = self._inflight.get(gen, 0) + 1
            self._epochs[gen] = epoch_of(self._record)
            return gen, self._record

    def exit(self, generation: int) -> None:
        with self._lock:
            left = self._inflight[generation] - 1
            if left:
                self._inflight[generation] = left
            else:
                del self._inflight[generation]
                del self._epochs[generation]

    def applied_epoch(self) -> int:
        with self._lock:
            current = epoch_of(self._record)
            older = [e for g, e in self._epochs.items() if g != self._generation]
            # min, not "the oldest generation's": conservative if an epoch ever went backwards.
            return min([current, *older])

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._inflight.values())
