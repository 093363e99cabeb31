"""The ``migrator`` command line: a thin layer over :mod:`migrator.commands`.

Errors become exit codes here and nowhere else: MigratorError subclasses carry their code
(0 ok, 1 runtime error — the job is stopped and resumable, 2 bad input, 3 differences).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timezone
from typing import Any

import click
import redis

from migrator import commands, control
from migrator.env import int_from_env
from migrator.errors import MigratorError
from migrator.scanloop import Progress
from migrator.stream import spin_seconds


class Number(click.ParamType):
    """A finite number from ``low`` up (to ``high``): click's FloatRange lets nan and inf
    through, which would make a wait endless or a ceiling meaningless."""

    name = "number"

    def __init__(self, low: float = 0.0, high: float | None = None) -> None:
        self.low, self.high = low, high

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or v < self.low or (self.high is not None and v > self.high):
            top = f" and at most {self.high:g}" if self.high is not None else ""
            self.fail(f"{value!r} is not a number of at least {self.low:g}{top}", param, ctx)
        return v


#: Seconds an option may wait: at most a day.
SECONDS = Number(0.0, 86400.0)

#: Seconds app instances get to acknowledge a phase change: 0 would time out at once, after
#: cleanup had already moved to `cleaning`, the phase there is no way back from.
BARRIER_SECONDS = Number(1.0, 86400.0)

STATE_HELP = "state store URL (default: $MIGRATOR_STATE_URL, else sqlite:///.migrator/state.db)"


def state_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--state",
        "state_url",
        envvar="MIGRATOR_STATE_URL",
        default=None,
        metavar="URL",
        help=STATE_HELP,
    )(f)


#: CPU niceness of the verbs that run long work (apply, verify, rollback, cleanup, run).
NICE_ENV, NICE_DEFAULT = "MIGRATOR_NICE", 10


def lower_priority() -> None:
    """The runner is background work: on a host it shares with Redis or the application, the
    CPU belongs to them first (docs/decisions.md; docs/benchmarks.md measures the difference).
    ``$MIGRATOR_NICE`` sets the niceness added (0 keeps the shell's)."""
    nice = int_from_env(NICE_ENV, NICE_DEFAULT, 0, 19)
    if nice and hasattr(os, "nice"):
        os.nice(nice)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Long work starts here: at a lower CPU priority (:func:`lower_priority`), and with
    SIGINT/SIGTERM asking it to stop after the current batch (checkpoint committed)."""
    lower_priority()
    spin_seconds()  # $MIGRATOR_SPIN_US: a bad value stops here, before anything is written
    stop = threading.Event()
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: give up at once
            raise GaveUp
        click.echo(f"\n{signal.Signals(signum).name}: finishing the current batch...", err=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for signum, h in previous.items():
            signal.signal(signum, h)


class GaveUp(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during a work verb: stop now, not after the batch in flight."""


@contextmanager
def progress_bar() -> Iterator[Callable[[Progress], None]]:
    """A rich progress bar on a terminal; quiet otherwise (logs and CI stay readable)."""
    if not sys.stderr.isatty():
        yield lambda p: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    bar = Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[reason]}"),
        transient=False,
        # On stderr, as asked above: stdout carries the verb's result (`--json` included).
        console=Console(stderr=True),
    )
    tasks: dict[str, Any] = {}
    with bar:

        def update(p: Progress) -> None:
            if p.stage not in tasks:
                tasks[p.stage] = bar.add_task(p.stage, total=p.total, rate="", reason="")
            bar.update(
                tasks[p.stage],
                completed=min(p.done, p.total or p.done),
                total=p.total,
                rate=f"{p.rate:,.0f}/s",
                reason=p.reason or "",
            )

        yield update


@click.group()
@click.version_option(package_name="migrator")
def cli() -> None:
    """Split one big Redis key into N shard keys while the application keeps serving."""


@cli.group()
def plan() -> None:
    """Validate and apply plan files."""


@plan.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def plan_validate(file: str) -> None:
    """Check FILE and print the resolved plan (secrets masked)."""
    import yaml

    p = commands.validate(file)
    click.echo(yaml.safe_dump(p.masked(), sort_keys=False).rstrip())
    click.echo(f"# plan {p.name} is valid (spec {p.spec_hash()})", err=True)


@plan.command("apply")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--allow-no-instances",
    is_flag=True,
    help="proceed when no app instance reports (no application writes the key); audited",
)
@click.option(
    "--barrier-timeout",
    type=BARRIER_SECONDS,
    default=60.0,
    show_default=True,
    help="seconds to wait for live app instances to acknowledge a phase change",
)
@click.option(
    "--force",
    is_flag=True,
    help="copy even when the memory preflight finds too little headroom; audited",
)
@state_option
def plan_apply(
    file: str, allow_no_instances: bool, barrier_timeout: float, force: bool, state_url: str | None
) -> None:
    """Register FILE's job and run it to `verified`; running it again resumes."""
    with stop_on_signals() as stop, progress_bar() as bar:
        try:
            job = commands.apply(
                file,
                state_url=state_url,
                allow_no_instances=allow_no_instances,
                force=force,
                stop=stop,
                on_progress=bar,
                barrier_timeout=barrier_timeout,
            )
        except MigratorError as e:
            # Nothing registered (Redis refused the first connection): nothing to resume.
            if e.exit_code == 1 and not e.hint and commands.registered(file, state_url):
                e.hint = (
                    f"the job keeps its checkpoint; run `migrator plan apply {file}` again "
                    "to resume"
                )
            raise
    click.echo(f"job {job.name}: phase {job.phase}")


def _fmt_status(s: dict[str, Any]) -> str:
    lines = [
        f"job {s['name']}: phase {s['phase']}, ratio {s['ratio']}%, epoch {s['epoch']}"
        + (" [PAUSED]" if s["paused"] else "")
    ]
    lines.append(f"  {s['source_key']} -> {s['target_key']} x {s['shards']}")
    total = s["total"] if s["total"] is not None else "?"
    lines.append(f"  copied {s['copied']}/{total} ({s['progress']:.1%})")
    if s["copy_insert"]:
        lines.append(f"  copy inserts: {s['copy_insert']}")
    if s["stage"] and s.get("interrupted"):
        # `migrator run` resumes plan apply's work, rollbacks and cleanups; a verify started
        # once the job was verified is the operator's own to run again.
        again = (
            f"`migrator verify {s['name']}` again"
            if s["stage"] == "verify" and s["phase"] != "verifying"
            else "the same command again, or `migrator run`,"
        )
        lines.append(
            f"  interrupted: {s['stage']} stopped at {s['stage_done']:,} members and no runner "
            f"holds the job (run {again} to go on)"
        )
    elif s["stage"]:
        eta = f", ETA {s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else ""
        by = f" ({s['runner']})" if s.get("runner") else ""
        lines.append(f"  working: {s['stage']} at {s['rate']:,.0f} members/s{eta}{by}")
    if s["throttle"]:
        lines.append(f"  throttled: {s['throttle']}")
    if s.get("verify"):
        v = s["verify"]
        lines.append(f"  last verify run {v['run']}: confirmed {v['confirmed'] or 'none'}")
    live = [i for i in s["instances"] if i["live"]]
    lines.append(
        f"  app instances: {len(live)} live"
        + (f" (redis {s['redis']})" if s["redis"] != "ok" else "")
    )
    for i in live:
        flag = "  LAGGING" if i["lagging"] else ""
        if i["protocol"] < control.MARKS_PROTOCOL:
            flag += (
                f"  OLD SHIM (protocol {i['protocol']}; the copy needs {control.MARKS_PROTOCOL})"
            )
        lines.append(
            f"    {i['id']} {i['host']} pid {i['pid']} epoch {i['epoch']} "
            f"seen {i['age_s']}s ago{flag}"
        )
    if s["counters"]:
        lines.append("  shim: " + ", ".join(f"{k} {v}" for k, v in sorted(s["counters"].items())))
    if s["last_error"]:
        lines.append(f"  last error: {s['last_error']}")
    return "\n".join(lines)


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--watch",
    is_flag=True,
    help="refresh every second until interrupted (with --json: one document a line)",
)
@state_option
def status(name: str | None, as_json: bool, watch: bool, state_url: str | None) -> None:
    """Phase, ratio, progress, rate, ETA, throttle reason, app instances, shim counters."""
    import time

    while True:
        jobs = commands.status(state_url, name)
        if as_json:
            # Watched, one compact document a line (JSON Lines): a stream a reader can split.
            click.echo(json.dumps(jobs[0] if name else jobs, indent=None if watch else 2))
        elif not jobs:
            click.echo("no jobs")
        else:
            if watch:
                click.clear()
            click.echo("\n".join(_fmt_status(s) for s in jobs))
        if not watch:
            return
        time.sleep(1)


@cli.command("set-ratio")
@click.argument("args", nargs=-1, required=True, metavar="[NAME] PERCENT")
@click.option("--force", is_flag=True, help="allow it while verification is unfinished or failed")
@state_option
def set_ratio(args: tuple[str, ...], force: bool, state_url: str | None) -> None:
    """Move the gray read ratio (0..100); 100 is cutover."""
    if len(args) > 2:
        raise click.UsageError("expected [NAME] PERCENT")
    name = args[0] if len(args) == 2 else None
    # Digits only: int() also takes "+10", "1_0" and other scripts' digits.
    if not re.fullmatch(r"[0-9]{1,3}", args[-1]):
        raise click.BadParameter(f"{args[-1]!r} is not a whole percentage", param_hint="PERCENT")
    percent = int(args[-1])
    if not 0 <= percent <= 100:
        raise click.BadParameter(f"{percent} is outside 0..100", param_hint="PERCENT")
    job = commands.set_ratio(percent, name=name, state_url=state_url, force=force)
    click.echo(f"job {job.name}: phase {job.phase}, ratio {job.ratio}% (epoch {job.epoch})")


@cli.command()
@click.argument("name")
@state_option
def pause(name: str, state_url: str | None) -> None:
    """Pause the running copy, verify or cleanup of NAME (within a second).

    A rollback goes on regardless: it is the way out. Applying a rolled-back job again starts
    it unpaused, at the plan's rate."""
    job = commands.pause(name, state_url=state_url)
    click.echo(f"job {job.name}: paused")


@cli.command()
@click.argument("name")
@state_option
def resume(name: str, state_url: str | None) -> None:
    """Resume work paused with `migrator pause`."""
    job = commands.resume(name, state_url=state_url)
    click.echo(f"job {job.name}: resumed")


@cli.command("set-rate")
@click.argument("name")
@click.argument("rate", type=Number(0.0))
@state_option
def set_rate(name: str, rate: float, state_url: str | None) -> None:
    """Set the members/s ceiling of NAME's running work (0 = unlimited)."""
    job = commands.set_rate(name, rate, state_url=state_url)
    click.echo(f"job {job.name}: rate {job.rate_override:g}/s")


@cli.command()
@click.argument("name")
@click.option("--repair", is_flag=True, help="fix confirmed differences from the source")
@click.option("--rounds", type=click.IntRange(1, 10), default=3, show_default=True)
@click.option(
    "--delay", type=SECONDS, default=0.5, show_default=True, help="seconds between rounds"
)
@click.option("--show", is_flag=True, help="list every confirmed difference")
@click.option("--json", "as_json", is_flag=True)
@state_option
def verify(
    name: str,
    repair: bool,
    rounds: int,
    delay: float,
    show: bool,
    as_json: bool,
    state_url: str | None,
) -> None:
    """Diff old key and shards both ways; exit 3 while confirmed differences remain."""
    with stop_on_signals() as stop, progress_bar() as bar:
        report = commands.verify(
            name,
            state_url=state_url,
            repair=repair,
            rounds=rounds,
            delay=delay,
            stop=stop,
            on_progress=bar,
        )
    listed: list[dict[str, Any]] = []
    if show:
        # Every confirmed difference (and, after --repair, the ones it fixed), not a sample.
        for status in ("confirmed", "repaired") if repair else ("confirmed",):
            listed += commands.diffs(name, state_url=state_url, run=report.run, status=status)
    if as_json:
        # Listed only with --show: without it, null (not [], which reads as "none found").
        shown = listed if show else None
        click.echo(json.dumps({**report.as_dict(), "differences": shown}, indent=2))
    else:
        click.echo(
            f"verify run {report.run}: {report.source_checked} source and "
            f"{report.shard_checked} shard members checked; suspects {report.suspects}, "
            f"confirmed {sum(report.confirmed.values())}"
            + (f", repaired {report.repaired}" if repair else "")
            + (
                f"; {report.deadlines_followed} shard(s) given the source's expiry"
                if report.deadlines_followed
                else ""
            )
        )
        lines = (
            f"  {d['kind']:<17} shard {d['shard']:<5} {d['member']}"
            + ("  (repaired)" if d["status"] == "repaired" else "")
            + "\n"
            for d in listed
        )
        if sys.stdout.isatty() and len(listed) > 40:
            click.echo_via_pager(lines)
        else:
            for line in lines:
                click.echo(line, nl=False)
    if not report.clean:
        sys.exit(3)


@cli.command()
@click.argument("name")
@click.option("--barrier-timeout", type=BARRIER_SECONDS, default=60.0, show_default=True)
@state_option
def rollback(name: str, barrier_timeout: float, state_url: str | None) -> None:
    """Back to old-only: ratio 0, shard keys removed. Possible until cleanup starts."""
    with stop_on_signals() as stop, progress_bar() as bar:
        job = commands.rollback(
            name, state_url=state_url, stop=stop, barrier_timeout=barrier_timeout, on_progress=bar
        )
    click.echo(f"job {job.name}: phase {job.phase}")


@cli.command()
@click.argument("name")
@click.option("--barrier-timeout", type=BARRIER_SECONDS, default=60.0, show_default=True)
@click.option(
    "--force",
    is_flag=True,
    help="remove the old key although the last verify run confirmed differences; audited",
)
@state_option
def cleanup(name: str, barrier_timeout: float, force: bool, state_url: str | None) -> None:
    """Stop writes to the old key (barrier), then remove it without blocking."""
    with stop_on_signals() as stop, progress_bar() as bar:
        job = commands.cleanup(
            name,
            state_url=state_url,
            stop=stop,
            barrier_timeout=barrier_timeout,
            on_progress=bar,
            force=force,
        )
    click.echo(f"job {job.name}: phase {job.phase}")


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@state_option
def history(name: str, as_json: bool, state_url: str | None) -> None:
    """The audit trail of NAME: every phase and ratio change, when, by whom."""
    events = commands.history(name, state_url=state_url)
    if as_json:
        click.echo(json.dumps([{**e.__dict__, "at": e.at.isoformat()} for e in events], indent=2))
        return
    for e in events:
        change = f"{e.from_value or ''} -> {e.to_value or ''}" if e.from_value else e.to_value or ""
        at = e.at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{at}  {e.kind:<9} {change:<28} {e.actor}@{e.host}"
            + (f"  {e.detail}" if e.detail else "")
        )


@cli.command()
@click.option(
    "--interval",
    type=Number(0.1, 86400.0),
    default=1.0,
    show_default=True,
    help="seconds between scans of the state store",
)
@click.option("--once", is_flag=True, help="do what is due now, wait for it, then exit")
@click.option("--barrier-timeout", type=BARRIER_SECONDS, default=60.0, show_default=True)
@state_option
def run(interval: float, once: bool, barrier_timeout: float, state_url: str | None) -> None:
    """Long-running runner: resumes interrupted jobs, runs cleanups scheduled by cleanup.after.

    SIGTERM or SIGINT stops it cleanly: each job finishes its batch and keeps its checkpoint.
    """
    import logging

    from migrator import scheduler

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its "Context impl" lines each start
    with stop_on_signals() as stop:
        failed = scheduler.run(
            state_url, stop=stop, interval=interval, once=once, barrier_timeout=barrier_timeout
        )
    if failed:
        raise MigratorError(
            f"{len(failed)} job(s) stopped on an error: {', '.join(failed)} (the log above "
            "says why)",
            hint="each keeps its checkpoint; fix the cause and run `migrator run` again",
        )


_GAVE_UP = (
    "interrupted: gave up without waiting for the batch in flight\n  hint: the checkpoint "
    "saved last stands; run the same command again (or `migrator run`) to resume there"
)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:
        # Click turns a KeyboardInterrupt into Abort; a work verb's second signal is GaveUp.
        gave_up = isinstance(e, GaveUp) or isinstance(e.__cause__, GaveUp)
        click.echo(_GAVE_UP if gave_up else "interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except MigratorError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except redis.RedisError as e:
        # The runner turns Redis failures into RedisUnavailable where it works; this is the net
        # under the rest: one message, exit 1, never a traceback.
        click.echo(
            f"error: Redis error: {e}\n  hint: the job keeps its checkpoint; once Redis "
            "answers again, run the same command again (or `migrator run`) to resume",
            err=True,
        )
        sys.exit(1)
