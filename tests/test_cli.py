"""Operator commands against real servers: health, status, trace, dlq list / replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

import cli
from main import DatabaseWriterService, build_parser
from test_pipeline import T0, settings_for, start_worker, wait_for, worker_env

ROOT = Path(__file__).resolve().parents[1]
GROUP = "db_writer"


def run_cli(settings, *argv: str, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop the worker's log lines
    code = cli.dispatch(build_parser().parse_args(list(argv)), settings)
    return code, capsys.readouterr().out


def run_main(redis_url: str, database_url: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DB_", "DATABASE_"))}
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url)
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_status_shows_length_lag_pending_and_dead_letters(redis_client, redis_url, migrated_database_url, capsys):
    for i in range(3):
        redis_client.xadd("mqtt_stream:a:t", {"value": str(i), "timestamp": f"2024-01-01T00:00:0{i}Z"})
    redis_client.xadd("mqtt_stream:b:t", {"value": "bad"})
    settings = settings_for(redis_url, migrated_database_url)
    DatabaseWriterService(settings).run(until_idle=True)  # 3 written, 1 dead letter
    redis_client.xadd("mqtt_stream:a:t", {"value": "9"})
    redis_client.xadd("mqtt_stream:a:t", {"value": "10"})
    redis_client.xreadgroup(GROUP, "crashed", {"mqtt_stream:a:t": ">"}, count=1)  # read, never acked

    code, out = run_cli(settings, "status", "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0
    a = next(s for s in report["streams"] if s["stream"] == "mqtt_stream:a:t")
    assert (a["length"], a["lag"], a["pending"]) == (5, 1, {"crashed": 1})
    assert a["oldest_pending_age_s"] >= 0
    assert report["dead_letter_stream"]["length"] == 1 and report["dead_letter_table"] == 1
    assert report["totals"]["pending"] == 1

    code, out = run_cli(settings, "status", capsys=capsys)
    assert code == 0 and "mqtt_stream:a:t" in out and "crashed=1" in out and "1 in db_writer_dead_letters" in out


def test_status_lists_silent_sensors_by_arrival_time(redis_client, redis_url, migrated_database_url, capsys):
    redis_client.xadd("mqtt_stream:late:t", {"value": "1", "timestamp": "2020-01-01T00:00:00Z"})  # old clock, now
    redis_client.xadd("mqtt_stream:quiet:t", {"value": "1"})
    settings = settings_for(redis_url, migrated_database_url)
    DatabaseWriterService(settings).run(until_idle=True)
    with psycopg.connect(migrated_database_url) as conn:  # quiet's last reading arrived two hours ago
        conn.execute(
            "UPDATE db_writer_sensors SET last_written_at = now() - interval '2 hours' WHERE device_id = 'quiet'"
        )
    _code, out = run_cli(settings, "status", "--json", "--sensors", "--silent-for", "3600", capsys=capsys)
    silent = json.loads(out)["silent_sensors"]
    assert [(s["device_id"], s["sensor_type"], s["readings"]) for s in silent] == [("quiet", "t", 1)]
    _code, out = run_cli(settings, "status", "--json", "--sensors", "--silent-for", "0", capsys=capsys)
    late = next(s for s in json.loads(out)["silent_sensors"] if s["device_id"] == "late")
    assert late["last_reading_at"].startswith("2020-01-01") and late["clock_skew_s"] > 3e7  # its clock is years off


def test_trace_finds_written_dead_lettered_pending_and_unread(redis_client, redis_url, migrated_database_url, capsys):
    written = redis_client.xadd("mqtt_stream:a:t", {"value": "1", "timestamp": "2024-01-01T00:00:00Z"}).decode()
    bad = redis_client.xadd("mqtt_stream:a:t", {"value": "oops"}).decode()
    settings = settings_for(redis_url, migrated_database_url)
    DatabaseWriterService(settings).run(until_idle=True)
    pending = redis_client.xadd("mqtt_stream:a:t", {"value": "2"}).decode()
    redis_client.xreadgroup(GROUP, "w9", {"mqtt_stream:a:t": ">"})
    unread = redis_client.xadd("mqtt_stream:a:t", {"value": "3"}).decode()

    def state(entry_id: str) -> dict:
        code, out = run_cli(settings, "trace", "mqtt_stream:a:t", entry_id, "--json", capsys=capsys)
        assert code == 0
        return json.loads(out)

    assert state(written) | {"written_at": None} == {
        "stream": "mqtt_stream:a:t",
        "entry_id": written,
        "state": "written",
        "device_id": "a",
        "sensor_type": "t",
        "timestamp": "2024-01-01 00:00:00+00:00",
        "written_at": None,
    }
    letter = state(bad)
    assert letter["state"] == "dead-lettered" and letter["step"] == "parse" and "oops" in letter["error"]
    assert state(pending) | {"idle_ms": 0} == {
        "stream": "mqtt_stream:a:t",
        "entry_id": pending,
        "state": "pending",
        "consumer": "w9",
        "deliveries": 1,
        "idle_ms": 0,
    }
    assert state(unread)["state"] == "not yet read"
    assert state("1-0")["state"] == "no such entry"  # never existed: the stream was never trimmed


def test_dlq_replay_reinjects_once(redis_client, redis_url, migrated_database_url, capsys):
    """A reading refused by a database constraint, replayed after the constraint was fixed."""
    with psycopg.connect(migrated_database_url) as conn:
        conn.execute("ALTER TABLE sensor_readings ADD CONSTRAINT plausible CHECK (value < 100)")
    redis_client.xadd("mqtt_stream:a:t", {"value": "150", "timestamp": T0.isoformat(), "unit": "C"})
    redis_client.xadd("mqtt_stream:a:t", {"value": "abc"})  # stays dead: --match leaves it alone
    settings = settings_for(redis_url, migrated_database_url)
    DatabaseWriterService(settings).run(until_idle=True)

    code, out = run_cli(settings, "dlq", "list", "--json", capsys=capsys)
    assert code == 0 and {letter["step"] for letter in json.loads(out)} == {"write", "parse"}
    with psycopg.connect(migrated_database_url) as conn:
        conn.execute("ALTER TABLE sensor_readings DROP CONSTRAINT plausible")  # the fix

    assert run_cli(settings, "dlq", "replay", "--match", "plausible", capsys=capsys) == (0, "replayed 1 dead letters\n")
    assert run_cli(settings, "dlq", "replay", "--match", "plausible", capsys=capsys) == (0, "replayed 0 dead letters\n")
    DatabaseWriterService(settings).run(until_idle=True)
    with psycopg.connect(migrated_database_url) as conn:
        assert conn.execute("SELECT value, metadata FROM sensor_readings").fetchall() == [(150.0, {"unit": "C"})]
        assert conn.execute("SELECT step FROM db_writer_dead_letters WHERE replayed_at IS NOT NULL").fetchall() == [
            ("write",)
        ]


def test_health_needs_a_live_worker_and_both_servers(redis_url, migrated_database_url):
    down = run_main(redis_url, migrated_database_url, "health")
    assert down.returncode == 1 and json.loads(down.stdout)["running"] is False
    worker = start_worker(worker_env(redis_url, migrated_database_url, "worker-01"))
    try:
        assert wait_for(lambda: run_main(redis_url, migrated_database_url, "health").returncode == 0, 20, 0.5)
        report = json.loads(run_main(redis_url, migrated_database_url, "health").stdout)
        assert report["running"] and report["redis"] and report["database"]
    finally:
        worker.terminate()
        worker.wait(30)


def test_unreachable_servers_are_one_line(redis_url, migrated_database_url):
    for argv, url_r, url_d, what in (
        (("status",), "redis://127.0.0.1:1/0", migrated_database_url, "cannot reach Redis"),
        (("dlq", "list"), redis_url, "postgresql://u:secret@127.0.0.1:1/x", "cannot reach PostgreSQL"),
        (
            ("trace", "mqtt_stream:a:t", "1-0"),
            redis_url,
            "postgresql://u:secret@127.0.0.1:1/x",
            "cannot reach PostgreSQL",
        ),
    ):
        done = run_main(url_r, url_d, *argv)
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and what in done.stderr and "secret" not in done.stderr
    health = run_main("redis://127.0.0.1:1/0", "postgresql://127.0.0.1:1/x", "health")
    assert health.returncode == 1 and json.loads(health.stdout)["redis"] is False
