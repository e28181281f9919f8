"""The TimescaleDB branch of the schema and the writer, against a real TimescaleDB 2.23
(../shared/tools/timescale: PGlite/WASM, PostgreSQL 17.5). Skipped where node is missing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from alembic import command

import config
import dead_letters
import migrations
from db_writer import DatabaseWriter
from schema import Layout, Reading

pytestmark = pytest.mark.timescale
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def timescale(tsdb_url):
    """Settings for the one TimescaleDB database; it is left at base, whatever the test did."""
    made = []

    def settings(**overrides):
        made.append(config.load_settings(database_url=tsdb_url, enable_timescale=True, **overrides))
        return made[-1]

    yield settings
    for s in reversed(made):
        if migrations.current_revision(s):
            command.downgrade(migrations.alembic_config(s), "base")


def hypertable(url: str, table: str) -> tuple | None:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT d.time_interval FROM timescaledb_information.hypertables h"
            " JOIN timescaledb_information.dimensions d USING (hypertable_schema, hypertable_name)"
            " WHERE h.hypertable_name = %s",
            [table],
        ).fetchone()


def test_upgrade_downgrade_upgrade_with_a_hypertable(tsdb_url, timescale):
    settings = timescale(timescale_chunk_interval="6 hours")
    migrations.upgrade(settings)
    assert hypertable(tsdb_url, "sensor_readings") == (timedelta(hours=6),)
    assert "up to date" in migrations.check(settings)  # models.py and the hypertable agree

    command.downgrade(migrations.alembic_config(settings), "base")
    assert hypertable(tsdb_url, "sensor_readings") is None
    migrations.upgrade(settings)
    assert hypertable(tsdb_url, "sensor_readings") == (timedelta(hours=6),)


def test_table_name_and_default_chunk_interval(tsdb_url, timescale):
    migrations.upgrade(timescale(table_name="readings_ts"))
    assert hypertable(tsdb_url, "readings_ts") == (timedelta(days=1),)


def test_the_writer_on_a_hypertable(tsdb_url, timescale):
    settings = timescale()
    migrations.upgrade(settings)
    writer = DatabaseWriter(settings)
    writer.open()
    try:
        rows = [
            Reading(T0 + timedelta(hours=h), "esp32", "temp", float(h), '{"unit":"C"}' if h % 2 else None)
            for h in range(48)
        ]  # two days: several chunks
        first = writer.write(rows, [], on_reject=lambda i, reason: pytest.fail(reason))
        assert (first.inserted, first.duplicates) == (48, 0)

        # Redelivered (the careful path: staging table ON COMMIT DROP + ON CONFLICT DO NOTHING),
        # plus one reading whose key is stored with another value.
        clash = Reading(T0, "esp32", "temp", 99.0, None)
        rejected = []

        def reject(index: int, reason: str) -> dead_letters.DeadLetter:
            rejected.append((index, reason))
            return dead_letters.make(
                Layout(prefix="mqtt_stream:"), b"mqtt_stream:esp32:temp", b"49-0", {b"value": b"99"}, "write", reason, 1
            )

        second = writer.write([*rows, clash], [], on_reject=reject)
        assert (second.inserted, second.duplicates) == (0, 48)
        assert [i for i, _ in rejected] == [48] and "already stored with value 0.0" in rejected[0][1]
    finally:
        writer.close()
    with psycopg.connect(tsdb_url) as conn:
        assert conn.execute("SELECT count(*), sum(value) FROM sensor_readings").fetchone() == (48, sum(range(48)))
        assert conn.execute("SELECT count(*) FROM show_chunks('sensor_readings')").fetchone()[0] >= 2
        assert conn.execute("SELECT readings FROM db_writer_sensors").fetchone() == (48,)
        assert conn.execute("SELECT step, original_id FROM db_writer_dead_letters").fetchall() == [("write", "49-0")]


def test_without_the_extension_the_migration_says_so(database_url):
    """Plain PostgreSQL (the usual test server) has no timescaledb."""
    with psycopg.connect(database_url) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
            pytest.skip("this PostgreSQL has timescaledb installed")
    settings = config.load_settings(database_url=database_url, enable_timescale=True)
    with pytest.raises(RuntimeError, match="timescaledb extension is not installed"):
        migrations.upgrade(settings)
    assert migrations.current_revision(settings) is None  # the failed migration left nothing behind
