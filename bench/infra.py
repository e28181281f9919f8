"""The servers the benchmark uses: Redis db 12 and its own dbw_bench_* databases."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import config
import migrations

# The machine's servers by default; the smoke test points these at the tests' servers.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
GROUP = b"db_writer"
TABLES = "sensor_readings, db_writer_progress, db_writer_streams, db_writer_dead_letters, db_writer_sensors"


def redis_port() -> int:
    return urlsplit(REDIS_URL).port or 6379


def postgres_port() -> int:
    return urlsplit(ADMIN_URL).port or 5432


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, decode_responses=False)


@contextmanager
def database() -> Iterator[str]:
    """A new database at the migration head, dropped afterwards."""
    name = f"dbw_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    try:
        migrations.upgrade(config.load_settings(database_url=url))
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def reset_database(url: str) -> None:
    """Empty tables, then a CHECKPOINT so that no checkpoint of the last run lands in the next."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES}")
        conn.execute("CHECKPOINT")


def count_rows(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM sensor_readings").fetchone()[0]


def reset_groups(client: redis.Redis, names: list[bytes]) -> None:
    """Replay the backlog: the consumer group again at id 0 with nothing pending."""
    pipe = client.pipeline(transaction=False)
    for stream in names:
        pipe.xgroup_destroy(stream, GROUP)
        pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
    pipe.delete(b"mqtt_stream:failed")
    pipe.execute()


def empty_streams(client: redis.Redis, names: list[bytes]) -> None:
    """Streams with a group but no entries, so a worker finds them when it starts."""
    client.flushdb()
    pipe = client.pipeline(transaction=False)
    for stream in names:
        pipe.xgroup_create(stream, GROUP, id="$", mkstream=True)
    pipe.execute()


def pending(client: redis.Redis, names: list[bytes]) -> int:
    pipe = client.pipeline(transaction=False)
    for stream in names:
        pipe.xpending(stream, GROUP)
    return sum(reply["pending"] for reply in pipe.execute())


def server_versions() -> dict:
    with redis_client() as client:
        info = client.info("server")
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
        durability = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
            for name in ("fsync", "synchronous_commit", "shared_buffers")
        }
    return {"redis": info.get("redis_version"), "postgresql": pg, **durability}
