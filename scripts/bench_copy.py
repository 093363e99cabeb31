"""The runner's copy loop alone, for the benchmark's tradeoff table.

Usage: bench_copy.py URL SOURCE TEMPLATE SHARDS BUDGET_MS RATE SECONDS

Runs exactly what ``Runner.copy`` runs (the server's copier driven by scanloop.drive with the batch
sizer, the pacer and the default gates, at the CPU priority of ``migrator plan apply``:
``$MIGRATOR_NICE``), minus the state store, for at most SECONDS, with the given server-time
budget and rate ceiling. Prints ``members started ended worst_us server_us``: wall clock times,
the longest server time a copy packet measured (TIME before and after it), and the server's
time per member copied for the copy's own commands made meanwhile (INFO commandstats; the
bench's load sends none of them).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migrator.cli import lower_priority  # noqa: E402
from migrator.copier import hash_copier  # noqa: E402
from migrator.gates import default_gates  # noqa: E402
from migrator.redisio import Scripts, connect  # noqa: E402
from migrator.scanloop import Step, drive  # noqa: E402
from migrator.throttle import SLICE, BatchSizer, Pacer  # noqa: E402


class TimeUp(Exception):
    pass


#: The commands the copy sends (HSETNX or HSETEX, EXISTS and HSCAN in packets between two TIMEs;
#: EVALSHA to give shards the source's deadline): what INFO commandstats counts as the copy's.
COPY_COMMANDS = ("hscan", "hsetnx", "hsetex", "time", "exists", "evalsha")


def command_stat(client: Any, stat: str, *names: str) -> int:
    """INFO commandstats: ``stat`` ("calls" or "usec") summed over commands ``names``."""
    stats = cast(dict[str, dict[str, int]], client.info("commandstats"))
    return sum(int(stats.get(f"cmdstat_{n}", {}).get(stat, 0)) for n in names)


def main() -> int:
    url, source, template = sys.argv[1], sys.argv[2], sys.argv[3]
    shards, budget_ms = int(sys.argv[4]), float(sys.argv[5])
    rate, seconds = float(sys.argv[6]), float(sys.argv[7])
    lower_priority()
    client = connect(url, name="migrator:bench-sweep")
    keys = [template.replace("{shard}", str(i)) for i in range(shards)]
    sizer = BatchSizer(500, budget_ms * 1000.0, aim=SLICE)
    copier = hash_copier(
        client,
        Scripts(client),
        source,
        keys,
        budget_ms * 1000.0,
        sizer=sizer,
        probe_key="migrator:{bench-sweep}:hsetex-probe",
    )
    done = 0
    usec = command_stat(client, "usec", *COPY_COMMANDS)
    started = time.time()

    def step(cursor: str, count: int) -> Step:
        nonlocal done
        if time.time() - started > seconds:
            raise TimeUp
        result = copier.step(cursor, count)
        done += result.members
        return result

    with contextlib.suppress(TimeUp):  # the point's time is up
        drive(
            step,
            stage="copy",
            cursor="0",
            done=0,
            total=None,
            sizer=sizer,
            pacer=Pacer(rate, gates=default_gates(client, "bench-sweep", None)),
            save=lambda cursor, done, finished: None,
        )
    ended = time.time()
    per_member = (command_stat(client, "usec", *COPY_COMMANDS) - usec) / max(done, 1)
    print(done, started, ended, copier.worst_us, per_member)
    return 0


if __name__ == "__main__":
    sys.exit(main())
