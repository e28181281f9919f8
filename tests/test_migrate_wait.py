"""`./migrate.sh upgrade --wait SECONDS`: wait for a database that does not answer yet, bounded;
fail at once on a refusal that waiting will not fix. Real processes, real sockets."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

import migrations
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


def migrate(database_url: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_", "TABLE_", "ENABLE_", "MIGRATE_"))
    }
    environ.update(DATABASE_URL=database_url, **env)
    started = time.monotonic()
    done = subprocess.run(
        [str(ROOT / "migrate.sh"), *args], cwd="/", env=environ, capture_output=True, text=True, timeout=120
    )
    return done, time.monotonic() - started


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=(auth + "@" if auth else "") + f"127.0.0.1:{port}"))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _error_response(sqlstate: str, message: str) -> bytes:
    fields = b"".join(
        code + value.encode() + b"\0"
        for code, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!I", len(body) + 4) + body


@contextmanager
def starting_up_server(upstream_url: str, refusals: int) -> Iterator[tuple[int, list[int]]]:
    """A port where PostgreSQL is "starting up": its first `refusals` connections are answered
    as the real server answers then (FATAL 57P03, the database system is starting up), the
    next ones are passed through to the real server behind `upstream_url`."""
    upstream = urlsplit(upstream_url)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    refused = [0]
    stop = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def serve(client: socket.socket) -> None:
        with suppress(OSError, ConnectionError):
            if refused[0] < refusals:
                while True:  # SSL and GSS encryption requests first: "N", then the startup packet
                    length = struct.unpack("!I", _read_exactly(client, 4))[0]
                    body = _read_exactly(client, length - 4)
                    if struct.unpack("!I", body[:4])[0] in (SSL_REQUEST, GSSENC_REQUEST):
                        client.sendall(b"N")
                        continue
                    refused[0] += 1
                    client.sendall(_error_response("57P03", "the database system is starting up"))
                    client.close()
                    return
            server = socket.create_connection((upstream.hostname, upstream.port or 5432))
            threading.Thread(target=pipe, args=(server, client), daemon=True).start()
            pipe(client, server)

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield port, refused
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_nothing_listening_retries_then_fails_in_one_line_within_the_bound():
    url = f"postgresql://u:secret@127.0.0.1:{free_port()}/x"
    done, elapsed = migrate(url, "upgrade", "--wait", "3")
    assert done.returncode == 1, done
    assert done.stderr.count("\n") == 1, done.stderr
    line = done.stderr.strip()
    assert "cannot reach PostgreSQL" in line and "Connection refused" in line and "secret" not in line
    attempts = int(line.rsplit(", ", 1)[1].split()[0])
    assert attempts >= 3, line  # retried about once a second
    assert "retrying for up to 3 s" in done.stdout
    assert 3 <= elapsed < 3 + 8, elapsed  # the bound, plus uv's and Python's start-up


def test_wait_from_the_environment():
    done, elapsed = migrate(f"postgresql://u@127.0.0.1:{free_port()}/x", "upgrade", MIGRATE_WAIT_SEC="1.5")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "attempts" in done.stderr
    assert 1.5 <= elapsed < 1.5 + 8


def test_without_wait_it_fails_at_once():
    done, _ = migrate(f"postgresql://u@127.0.0.1:{free_port()}/x", "upgrade")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "attempts" not in done.stderr
    assert "cannot reach PostgreSQL" in done.stderr and not done.stdout


def test_a_server_starting_up_is_waited_for(database_url):
    with starting_up_server(database_url, refusals=3) as (port, refused):
        done, _ = migrate(with_port(database_url, port), "upgrade", "--wait", "30")
    assert done.returncode == 0, done.stderr
    assert refused[0] == 3
    assert "the database system is starting up" in done.stdout and "answered after" in done.stdout
    assert "database at revision" in done.stdout
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()


def test_a_missing_database_fails_at_once(pg_admin_url):
    url = urlunsplit(urlsplit(pg_admin_url)._replace(path=f"/dbw_missing_{secrets.token_hex(4)}"))
    done, elapsed = migrate(url, "upgrade", "--wait", "30")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done
    assert "does not exist" in done.stderr and "cannot connect to PostgreSQL" in done.stderr
    assert elapsed < 15 and "attempts" not in done.stderr and not done.stdout


@pytest.mark.parametrize(
    ("text", "waits"),
    [
        ('connection failed: connection to server at "10.0.0.1", port 5432 failed: Connection refused', True),
        (
            'connection failed: connection to server at "db", port 5432 failed: FATAL:  the database system is '
            "starting up",
            True,
        ),
        ('connection failed: connection to server at "db", port 5432 failed: timeout expired', True),
        ("failed to resolve host 'timescaledb': [Errno -3] Temporary failure in name resolution", True),
        ('connection failed: ... failed: FATAL:  password authentication failed for user "postgres"', False),
        ("connection failed: ... failed: fe_sendauth: no password supplied", False),
        ('connection failed: ... failed: FATAL:  database "iot" does not exist', False),
        ('connection failed: ... failed: FATAL:  role "writer" does not exist', False),
        ('connection failed: ... failed: FATAL:  no pg_hba.conf entry for host "10.0.0.2"', False),
        ("connection failed: ... failed: SSL error: certificate verify failed", False),
    ],
)
def test_which_refusals_are_waited_for(text, waits):
    assert migrations.not_ready(psycopg.OperationalError(text)) is waits
    assert migrations.not_ready(psycopg.ProgrammingError("invalid dsn")) is False


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"], ["upgrade", "--help"], ["downgrade", "-h"]])
def test_help_prints_the_usage(args):
    done = subprocess.run([str(ROOT / "migrate.sh"), *args], cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: ./migrate.sh") and "--wait" in done.stdout
    assert "revision" not in done.stderr


def test_a_bad_wait_is_one_line():
    done, _ = migrate("postgresql://u@127.0.0.1:1/x", "upgrade", "--wait", "soon")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--wait" in done.stderr
