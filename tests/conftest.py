"""Fixtures giving each test its own Redis database and PostgreSQL database on real servers.

Which servers (env, local or embedded) is decided once per session: see servers.py.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import servers

_servers_used: dict[str, str] = {}


def _record(what: str, info: servers.ServerInfo, started: float) -> None:
    _servers_used[what] = f"{info.describe()} ({time.monotonic() - started:.1f} s to set up)"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which servers the session used: the same tests mean different things on each."""
    if _servers_used:
        used = "; ".join(f"{what}: {how}" for what, how in _servers_used.items())
        terminalreporter.write_line(f"test servers: {used}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[servers.RedisServerInfo]:
    started = time.monotonic()
    with servers.redis_server() as info:
        _record("redis", info, started)
        yield info


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[servers.PostgresServerInfo]:
    started = time.monotonic()
    with servers.postgres_server() as info:
        _record("postgres", info, started)
        yield info


@pytest.fixture(scope="session")
def pg_admin_url(postgres_server: servers.PostgresServerInfo) -> str:
    """Connection URL with the right to CREATE DATABASE; tests should not write in its database."""
    return postgres_server.url


@pytest.fixture
def redis_url(redis_server: servers.RedisServerInfo) -> str:
    """URL of the test-reserved Redis database, emptied before the test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushdb()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    client.close()


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    """URL of a new empty database, dropped after the test."""
    with servers.temp_database(pg_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def migrated_template(pg_admin_url: str) -> Iterator[str]:
    """Name of a database migrated to the Alembic head once, to copy per test (faster than migrating)."""
    name = f"dbw_template_{secrets.token_hex(6)}"
    with servers.temp_database(pg_admin_url, name) as url:
        servers.migrate(url)
        servers.seal_template(pg_admin_url, name)
        yield name


@pytest.fixture
def migrated_database_url(pg_admin_url: str, migrated_template: str) -> Iterator[str]:
    """URL of a new database at the Alembic head, dropped after the test."""
    with servers.temp_database(pg_admin_url, template=migrated_template) as url:
        yield url


@pytest.fixture(scope="session")
def tsdb_url() -> Iterator[str]:
    """A real TimescaleDB (2.23, PGlite/WASM) from ../shared/tools/timescale (or
    TIMESCALE_TEST_SERVER), in shared mode.

    Its jobs never run by themselves (CALL run_job), and it has one backend: see its README."""
    import shutil
    import sys

    default = Path(__file__).resolve().parents[2] / "shared" / "tools" / "timescale"
    tools = Path(os.environ.get("TIMESCALE_TEST_SERVER") or default)
    if not (tools / "tsdb_fixture.py").exists() or not shutil.which("node") or not shutil.which("npm"):
        pytest.skip(f"needs node, npm and the TimescaleDB test server in {tools} (TIMESCALE_TEST_SERVER)")
    sys.path.insert(0, str(tools))
    from tsdb_fixture import timescale_server

    with timescale_server(mode="shared") as srv:
        yield srv.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://")
