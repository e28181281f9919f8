"""TIMESCALE_COMPRESS_AFTER / TIMESCALE_RETENTION against a real TimescaleDB (the PGlite test
server: its job scheduler never runs, so the policies are run with CALL run_job)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from alembic import command

import config
import migrations

pytestmark = pytest.mark.timescale


def test_policies_follow_the_settings(tsdb_url):
    settings = config.load_settings(
        database_url=tsdb_url, enable_timescale=True, timescale_compress_after="7 days", timescale_retention="365 days"
    )
    assert migrations.upgrade(settings) == [
        "compression policy: chunks older than 7 days",
        "retention policy: chunks older than 365 days are dropped",
    ]
    migrations.upgrade(settings)  # again: still one job each
    now = datetime.now(UTC)
    with psycopg.connect(tsdb_url, autocommit=True) as conn:
        for age in (0, 30, 400):
            conn.execute(
                "INSERT INTO sensor_readings (timestamp, device_id, sensor_type, value) VALUES (%s, 'd', 's', 1)",
                [now - timedelta(days=age)],
            )
        jobs = dict(
            conn.execute(
                "SELECT proc_name, job_id FROM timescaledb_information.jobs WHERE hypertable_name = 'sensor_readings'"
            ).fetchall()
        )
        assert set(jobs) == {"policy_compression", "policy_retention"}
        for job in jobs.values():
            conn.execute(f"CALL run_job({job})")
        chunks = conn.execute(
            "SELECT range_end, is_compressed FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'sensor_readings' ORDER BY range_start"
        ).fetchall()
        assert [compressed for _, compressed in chunks] == [True, False]  # 30 days old: compressed; today: not
        assert conn.execute("SELECT count(*) FROM sensor_readings").fetchone()[0] == 2  # 400 days old: dropped
        # A late reading into a compressed chunk still works (slowly): an upsert is a no-op.
        conn.execute(
            "INSERT INTO sensor_readings (timestamp, device_id, sensor_type, value)"
            " VALUES (%s, 'd', 's', 1) ON CONFLICT DO NOTHING",
            [now - timedelta(days=30)],
        )
        settings_row = conn.execute(
            "SELECT segmentby, orderby FROM timescaledb_information.hypertable_compression_settings"
            " WHERE hypertable = 'sensor_readings'::regclass"
        ).fetchone()
        assert settings_row[0] == "device_id,sensor_type" and settings_row[1].replace('"', "").startswith(
            "timestamp DESC"
        )

    assert migrations.upgrade(config.load_settings(database_url=tsdb_url, enable_timescale=True)) == []
    with psycopg.connect(tsdb_url, autocommit=True) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM timescaledb_information.jobs WHERE hypertable_name = 'sensor_readings'"
            ).fetchone()[0]
            == 0
        )
    assert "up to date" in migrations.check(settings)
    command.downgrade(migrations.alembic_config(settings), "base")  # the server is shared by the session
