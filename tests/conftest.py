"""Shared fixtures: free ports and real servers on loopback, started per test session or per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from examwatch.gateway import store
from examwatch.simulators import postgres as pgserver
from examwatch.simulators.broker import Mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker per test (persistent sessions survive stop/start within the test)."""
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def procs() -> Iterator[list]:
    """Processes a test started (anything with ``stop()``); stopped in reverse order at its end."""
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A test that runs the CLI configures structlog (e.g. ``check`` logs errors only); the next test starts clean."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def postgres() -> Iterator[pgserver.Postgres]:
    """One PostgreSQL server for the session (Debian's package, in a temporary directory, loopback)."""
    why = pgserver.unavailable()
    if why:
        pytest.skip(f"no PostgreSQL for the store tests: {why}")
    server = pgserver.Postgres()
    server.init()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[store.Where]:
    """Where a test's gateway store is: a SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield tmp_path / "gw.db"
        return
    server = request.getfixturevalue("postgres")
    yield store.Postgres(server.new_database())
    from examwatch.gateway import pg

    pg.close_pools()
