"""A database failover to an asynchronous standby that lags: acknowledged entries whose
commits the standby never got are written again, by the worker itself.

A real primary and a real streaming standby (tests/pg_replication.py), a real worker
process with libpq's multi-host DATABASE_URL (target_session_attrs=read-write). The
standby stops receiving WAL while the worker writes and acknowledges on the primary;
then the primary dies (immediate stop) and the standby is promoted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis

import servers
from pg_replication import primary_with_standby
from test_pipeline import ROOT, start_worker, wait_for, worker_env

pytestmark = pytest.mark.timeout(240)
T0 = datetime(2024, 6, 1, tzinfo=UTC)


def publish(client: redis.Redis, start: int, count: int, streams: int = 40) -> dict:
    """`count` readings with unique keys, round-robin over `streams` streams."""
    expected = {}
    pipe = client.pipeline(transaction=False)
    for n in range(start, start + count):
        device, ts = f"dev{n % streams:02d}", T0 + timedelta(seconds=n)
        pipe.xadd(f"mqtt_stream:{device}:t", {"value": str(n), "timestamp": ts.isoformat()})
        expected[(device, "t", ts)] = float(n)
    pipe.execute()
    return expected


def stored(url: str) -> dict:
    with psycopg.connect(url, connect_timeout=3) as conn:
        return {
            (d, s, t): v
            for d, s, t, v in conn.execute("SELECT device_id, sensor_type, timestamp, value FROM sensor_readings")
        }


def settled(client: redis.Redis) -> bool:
    """Everything published was delivered and acknowledged."""
    for stream in client.scan_iter(match="mqtt_stream:*", _type="STREAM"):
        group = next((g for g in client.xinfo_groups(stream) if g["name"] == b"db_writer"), None)
        if group is None or group["pending"] or group["lag"]:
            return False
    return True


def test_acknowledged_entries_lost_in_a_failover_are_written_again(redis_client, redis_url):
    with primary_with_standby() as pair:
        pair.primary.query("CREATE DATABASE dbw")
        servers.migrate(pair.primary.url("dbw"))
        pair.wait_replayed()
        url = pair.multi_host_url("dbw")
        env = worker_env(
            redis_url, url, "w1", STREAM_RESCAN_SEC=1, MAX_OUTAGE_SEC=120, DB_CONNECT_TIMEOUT_S=2, LOG_LEVEL="INFO"
        )
        worker = start_worker(env)
        try:
            expected = publish(redis_client, 0, 2000)
            assert wait_for(lambda: len(stored(pair.primary.url("dbw"))) == 2000, 60)
            pair.pause_replication()  # the standby lags from here on
            expected |= publish(redis_client, 2000, 3000)
            assert wait_for(lambda: len(stored(pair.primary.url("dbw"))) == 5000 and settled(redis_client), 60)
            lacking = 5000 - len(stored(pair.standby.url("dbw")))
            assert lacking >= 3000  # acknowledged in Redis, committed only on the primary

            pair.stop_primary("immediate")
            pair.promote_standby()
            expected |= publish(redis_client, 5000, 1000)  # life goes on after the failover
            new_primary = pair.standby.url("dbw")
            assert wait_for(lambda: stored(new_primary) == expected and settled(redis_client), 90), (
                len(stored(new_primary)),
                len(expected),
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err[-3000:]
        logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        changed = [line for line in logs if line.get("event", "").startswith("the database is another server")]
        repaired = sum(line.get("repaired", 0) for line in logs if line.get("event") == "reconciled with the database")
        assert changed and repaired >= lacking  # noticed by the worker itself, and written again

        check = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "reconcile"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0 and " 0 missing" in check.stdout, check.stdout + check.stderr
        assert "Traceback" not in check.stderr
