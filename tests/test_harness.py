"""The test harness itself: real servers, one clean Redis db and one new database per test."""

from __future__ import annotations

import psycopg
import pytest
import redis
from alembic.config import Config
from alembic.script import ScriptDirectory

import servers

_databases_seen: set[str] = set()


@pytest.mark.parametrize("run", [1, 2])
def test_redis_db_is_empty_and_streams_round_trip(redis_client: redis.Redis, run: int) -> None:
    # Whichever run goes second proves the first one's stream was flushed.
    assert redis_client.dbsize() == 0
    entry_id = redis_client.xadd("readings", {"sensor": "s1", "value": b"\x00\xff"})
    assert redis_client.xrange("readings") == [(entry_id, {b"sensor": b"s1", b"value": b"\x00\xff"})]


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_new_empty_database(database_url: str, run: int) -> None:
    with psycopg.connect(database_url) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
        conn.execute("CREATE TABLE leftover (id int)")
    assert database_url.startswith("postgresql://") and name.startswith("dbw_test_")
    assert tables == 0
    assert name not in _databases_seen
    _databases_seen.add(name)


def test_temp_database_is_dropped_even_while_connected(pg_admin_url: str) -> None:
    with servers.temp_database(pg_admin_url) as url:
        conn = psycopg.connect(url)
        name = conn.execute("SELECT current_database()").fetchone()[0]
    with psycopg.connect(pg_admin_url) as admin:
        assert admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [name]).fetchone()[0] == 0
    with conn, pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")  # WITH (FORCE) cut it


def test_migrated_database_is_at_head(migrated_database_url: str, migrated_template: str) -> None:
    cfg = Config(str(servers.ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(servers.ROOT / "alembic"))
    with psycopg.connect(migrated_database_url) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        version = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert name != migrated_template
    assert version == ScriptDirectory.from_config(cfg).get_current_head()


def test_database_url_keeps_credentials_host_and_options() -> None:
    assert (
        servers.database_url("postgresql://u:p%40ss@db.example:6543/postgres?sslmode=disable", "x")
        == "postgresql://u:p%40ss@db.example:6543/x?sslmode=disable"
    )
    assert servers.database_url("host=/run/pg port=5433 user=me dbname=postgres", "x") == (
        "postgresql://me@/x?host=%2Frun%2Fpg&port=5433"
    )


def test_embedded_servers_start_restart_and_stop_cleanly() -> None:
    """The fallback used on machines without local servers, run privately so it is proven everywhere."""
    with servers.embedded_valkey() as valkey, servers.embedded_postgres() as pg:
        assert valkey.kind == pg.kind == "embedded" and valkey.can_restart and pg.can_restart
        assert valkey.version().startswith("valkey ") and pg.version().startswith("PostgreSQL ")
        for server in (valkey, pg):
            server.stop()
            assert not server.answers()
            server.start()
            assert server.answers()
        processes = [valkey.control.proc, pg.control.proc]
    assert not valkey.answers() and not pg.answers()
    assert [p.returncode for p in processes] == [0, 0]  # exited cleanly and reaped
