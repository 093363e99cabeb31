"""The runner's gates against real servers: each holds when its condition is met, says why,
and lets go once the condition is gone."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from migrator import memory
from migrator.gates import (
    LatencyGate,
    MemoryGate,
    PauseFileGate,
    ReplicaLagGate,
    default_gates,
    pause_files,
)
from tests.servers import RedisServer

# A script that keeps the server busy for ~20 ms: what a misbehaving client does.
BUSY = "local t = redis.call('TIME'); local x = 0; for i = 1, 2000000 do x = x + i end; return x"


def _poll(cond: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    return cond()


def test_latency_gate_holds_while_another_client_keeps_the_server_busy(
    redis_server: RedisServer,
) -> None:
    gate = LatencyGate(redis_server.client())
    assert gate.check() is None
    stop = threading.Event()

    def hog() -> None:
        c = redis_server.client()
        while not stop.is_set():
            c.eval(BUSY, 0)

    t = threading.Thread(target=hog, daemon=True)
    t.start()
    try:
        reason = _poll(gate.check, timeout=10.0)  # a few probes stuck behind the scripts
    finally:
        stop.set()
        t.join(10)
    assert isinstance(reason, str) and reason.startswith("server latency: PING median")
    assert "idle" in reason and "holding above" in reason
    assert _poll(lambda: [gate.check() for _ in range(5)][-1] is None)


class _Host:
    """The clocks a probe reads, for a runner that a busy host leaves waiting for a CPU:
    each PING then takes ``took`` s of wall clock, ``waited`` s of it runnable but not
    running (as a nice-10 runner beside the server and the app on two cores)."""

    def __init__(self) -> None:
        self.took = self.waited = 0.0001
        self.wall = self.delay = 0.0
        self._reads = [0, 0]

    def clock(self) -> float:
        self._reads[0] += 1
        if self._reads[0] % 2 == 0:  # the read after the PING
            self.wall += self.took
        return self.wall

    def run_delay(self) -> float:
        self._reads[1] += 1
        if self._reads[1] % 2 == 0:
            self.delay += self.waited
        return self.delay


@pytest.mark.parametrize("kernel_says", [True, False])
def test_latency_gate_leaves_out_the_runners_own_wait_for_a_cpu(
    r: redis.Redis, kernel_says: bool
) -> None:
    """The runner's wait for a CPU is not the server's latency: without schedstat's run
    delay (other systems) the gate can only hold, as it did everywhere before."""
    host = _Host()
    gate = LatencyGate(
        r, clock=host.clock, run_delay=host.run_delay if kernel_says else lambda: None
    )
    host.took, host.waited = 0.020, 0.0199  # 20 ms a PING, all but 0.1 ms waiting for a CPU
    held = [gate.check() for _ in range(5)][-1]
    assert (held is None) == kernel_says, held


def test_memory_gate_holds_near_maxmemory(start_server: Callable[..., RedisServer]) -> None:
    server = start_server(maxmemory="8mb")
    r = server.client()
    gate = MemoryGate(r)
    assert gate.check() is None
    pipe = r.pipeline(transaction=False)
    i = 0
    while int(r.info("memory")["used_memory"]) < 0.92 * 8 * 1_048_576:
        for _ in range(100):
            pipe.set(f"fill:{i}", b"x" * 1000)
            i += 1
        pipe.execute()
    reason = gate.check()
    assert reason and reason.startswith("memory: used_memory")
    assert "of maxmemory 8.0 MiB (holding above 90%)" in reason
    r.execute_command("FLUSHALL", "SYNC")
    assert _poll(lambda: gate.check() is None)


def test_memory_gate_without_maxmemory_holds_against_the_hosts_memory(r: redis.Redis) -> None:
    """No maxmemory: the host's memory stands in for it (it used to be no limit at all, and a
    copy could fill the host)."""
    r.set("k", b"x" * 1_000_000)
    assert MemoryGate(r).check() is None  # a megabyte is far below 90% of the host
    host = int(r.info("memory")["total_system_memory"])
    reason = MemoryGate(r, pause_at=1e-6).check()  # as if the host were nearly full
    assert reason and f"of the host's memory {host / 1_048_576:,.1f} MiB" in reason, reason
    room = memory.headroom(r, "k", 4)
    assert room.maxmemory == 0 and room.limit == int(0.9 * host)
    assert "below 90% of the host's memory (no maxmemory set)" in room.describe()


def test_replica_lag_gate_holds_while_a_replica_falls_behind(
    start_server: Callable[..., RedisServer],
) -> None:
    # The primary waits a second before the full sync: a window the test can see.
    primary = start_server(repl_diskless_sync_delay="1")
    replica = start_server()
    p, rep = primary.client(), replica.client()
    gate = ReplicaLagGate(p, max_bytes=256 * 1024)
    rep.replicaof("127.0.0.1", primary.port)
    reason = _poll(gate.check, timeout=2.0)  # the full sync, seen from the primary
    assert isinstance(reason, str) and reason.startswith("replica lag: 127.0.0.1:")
    assert "is syncing" in reason
    assert _poll(lambda: gate.check() is None)  # online and caught up
    assert replica.proc is not None
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        for i in range(64):
            p.set(f"k{i}", b"x" * 16 * 1024)  # 1 MiB of stream the stopped replica cannot ack
        reason = gate.check()
        assert reason and reason.startswith("replica lag: 127.0.0.1:")
        assert "MiB behind, last ack" in reason
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    assert _poll(lambda: gate.check() is None)


def test_replica_lag_gate_waits_for_a_replica_the_primary_dropped(
    start_server: Callable[..., RedisServer],
) -> None:
    """A replica the primary no longer lists (it died, or repl-timeout dropped it) is still
    behind: the gate used to forget it at once, and the copy raced on past its backlog."""
    primary, replica = start_server(), start_server()
    p = primary.client()
    now = [0.0]
    gate = ReplicaLagGate(p, max_absent_s=60, clock=lambda: now[0])
    replica.client().replicaof("127.0.0.1", primary.port)
    assert _poll(lambda: int(p.info("replication")["connected_slaves"]) == 1)
    assert _poll(lambda: gate.check() is None)  # online and caught up
    replica.stop()
    assert _poll(lambda: int(p.info("replication")["connected_slaves"]) == 0)
    now[0] = 30.0
    reason = gate.check()
    assert reason and "disconnected 30s ago (waited for up to 60s)" in reason, reason
    now[0] = 61.0  # gone for longer: taken for removed
    assert gate.check() is None
    now[0] = 62.0
    assert gate.check() is None


def test_replica_lag_gate_forgets_the_replicas_of_a_primary_failed_over_from(
    start_server: Callable[..., RedisServer],
) -> None:
    """After a failover the promoted replica is the primary and never lists itself: the
    gate, remembering it from the old primary, held the work for its whole wait."""
    primary, a, b = (start_server(repl_diskless_sync_delay="0") for _ in range(3))
    for replica in (a, b):
        replica.client().replicaof("127.0.0.1", primary.port)
    p = primary.client()
    assert _poll(lambda: int(p.info("replication")["connected_slaves"]) == 2)
    gate = ReplicaLagGate(p)
    assert _poll(lambda: gate.check() is None) and len(gate.seen) == 2
    # Fail over to a (as a sentinel would): a is promoted, b follows it, the runner's client
    # now reaches a.
    a.client().replicaof("no", "one")
    b.client().replicaof("127.0.0.1", a.port)
    primary.stop()
    gate.client = a.client()
    assert _poll(lambda: int(a.client().info("replication")["connected_slaves"]) == 1)
    assert _poll(lambda: gate.check() is None), gate.check()
    assert set(gate.seen) == {f"127.0.0.1:{b.port}"}


def test_replica_lag_gate_is_quiet_without_replicas(r: redis.Redis) -> None:
    r.set("k", b"x" * 100_000)
    assert ReplicaLagGate(r, max_bytes=1).check() is None


def test_pause_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_url = f"sqlite:///{tmp_path}/state.db"
    monkeypatch.setenv("MIGRATOR_PAUSE_FILE", str(tmp_path / "ops" / "hold"))
    files = pause_files("a-job", state_url)
    assert files == [tmp_path / "ops" / "hold", tmp_path / "pause-a-job", tmp_path / "pause"]
    gate = PauseFileGate(files)
    assert gate.check() is None
    (tmp_path / "pause").touch()  # every job
    assert gate.check() == f"pause file {tmp_path / 'pause'}"
    (tmp_path / "pause").unlink()
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "hold").touch()
    assert gate.check() == f"pause file {tmp_path / 'ops' / 'hold'}"
    (tmp_path / "ops" / "hold").unlink()
    (tmp_path / "pause-other-job").touch()  # another job's file
    assert gate.check() is None
    # Relative paths (a relative $MIGRATOR_PAUSE_FILE, the default sqlite:///.migrator/...)
    # are the runner's working directory's: shown absolute, as the operator must touch them.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIGRATOR_PAUSE_FILE", "hold")
    gate = PauseFileGate(pause_files("a-job", "sqlite:///.migrator/state.db"))
    monkeypatch.chdir(tmp_path / "ops")  # the runner's own directory is what counts
    (tmp_path / ".migrator").mkdir()
    (tmp_path / ".migrator" / "pause").touch()
    assert gate.check() == f"pause file {tmp_path / '.migrator' / 'pause'}"


def test_default_gates(r: redis.Redis, tmp_path: Path) -> None:
    gates = default_gates(r, "a-job", f"sqlite:///{tmp_path}/state.db")
    kinds = {type(g) for g in gates}
    assert kinds == {PauseFileGate, LatencyGate, MemoryGate, ReplicaLagGate}
    assert all(g.check() is None for g in gates)
