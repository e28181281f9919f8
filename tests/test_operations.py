"""Operating it: one-line errors everywhere, `config`, a truthful `health`, the workers in
`status`, a replay that converges, and `status --gaps`; against real servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from main import DatabaseWriterService
from test_pipeline import ROOT, settings_for, start_worker, wait_for, worker_env


def run_main(
    redis_url: str, database_url: str, *argv: str, cwd: Path = ROOT, **env: str
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DB_", "DATABASE_", "CONSUMER_"))}
    clean.update(REDIS_URL=redis_url, DATABASE_URL=database_url, **env)
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *argv], cwd=cwd, env=clean, capture_output=True, text=True, timeout=60
    )


def one_line(done: subprocess.CompletedProcess, status: int, *words: str) -> None:
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("db-writer: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("argv", "status", "words"),
    [
        (("dlq", "replay", "--since", "yesterday"), 2, ("'yesterday' is not a time", "24h")),
        (("dlq", "list", "--limit", "-1"), 2, ("--limit", "must be more than 0")),
        (("trace", "mqtt_stream:a:t", "abc"), 2, ("not a Redis entry id",)),
        (("status", "--sensor", "esp32"), 2, ("DEVICE:SENSOR",)),
        (("nonsense",), 2, ("invalid choice",)),
    ],
)
def test_a_wrong_argument_is_one_line(redis_url, migrated_database_url, argv, status, words):
    one_line(run_main(redis_url, migrated_database_url, *argv), status, *words)


def test_commands_on_a_database_that_is_not_migrated_say_so_in_one_line(redis_url, database_url):
    for argv in (("status",), ("dlq", "list"), ("trace", "mqtt_stream:a:t", "1-0")):
        one_line(run_main(redis_url, database_url, *argv), 1, "not migrated", "./migrate.sh upgrade")


def test_a_metrics_port_in_use_stops_start_up_in_one_line(redis_url, migrated_database_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_main(redis_url, migrated_database_url, METRICS_PORT=str(port), METRICS_HOST="127.0.0.1")
    one_line(done, 2, f"METRICS_PORT {port}", "in use")


def test_config_shows_every_setting_its_source_and_every_problem(redis_url, migrated_database_url, tmp_path):
    env_file = tmp_path / "settings.env"
    env_file.write_text("BATCH_SZIE=500\nBATCH_TIMEOUT_SEC=-1\nREDIS_PORT=7000\nLOG_LEVEL=debug\n")
    done = run_main(
        redis_url,
        "postgresql://u:secret@127.0.0.1:5432/x",
        "--env-file",
        str(env_file),
        "config",
        "--json",
        BATCH_SIZE="0",
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert report["settings"]["BATCH_SIZE"] == {"value": "0", "from": "environment"}
    assert report["settings"]["LOG_LEVEL"]["from"] == str(env_file)
    assert report["settings"]["DATABASE_URL"]["value"] == "postgresql://u:***@127.0.0.1:5432/x"
    assert report["settings"]["CONSUMER_NAME"] == {"value": "worker-01", "from": "default"}
    assert sorted(p.split(":")[0] for p in report["problems"]) == ["BATCH_SIZE", "BATCH_TIMEOUT_SEC"]  # all at once
    assert "BATCH_SZIE is not a setting (did you mean BATCH_SIZE?)" in report["warnings"]
    assert "REDIS_URL is set, so REDIS_PORT is ignored" in report["warnings"]
    assert "secret" not in done.stdout + done.stderr
    text = run_main(redis_url, migrated_database_url, "--env-file", str(env_file), "config", BATCH_SIZE="0")
    assert "warning: BATCH_SZIE is not a setting" in text.stdout and "2 problem(s)" in text.stdout


def test_every_entry_point_reads_the_env_file_of_the_current_directory(redis_url, migrated_database_url, tmp_path):
    (tmp_path / ".env").write_text("CONSUMER_NAME=from-the-env-file\n")
    done = run_main(redis_url, migrated_database_url, "config", "--json", cwd=tmp_path)
    assert json.loads(done.stdout)["settings"]["CONSUMER_NAME"]["value"] == "from-the-env-file"
    done = run_main(
        redis_url,
        migrated_database_url,
        "config",
        "--json",
        cwd=tmp_path,
        DB_WRITER_ENV_FILE=str(tmp_path / "missing.env"),
    )
    assert json.loads(done.stdout)["settings"]["CONSUMER_NAME"]["value"] == "worker-01"


def test_health_tells_the_truth_about_two_live_workers_and_none(redis_client, redis_url, migrated_database_url):
    none = run_main(redis_url, migrated_database_url, "health", "--group")
    report = json.loads(none.stdout)
    assert none.returncode == 1 and report["alive"] == 0 and report["schema"]["at_head"] is True
    workers = [start_worker(worker_env(redis_url, migrated_database_url, f"w{i}")) for i in (1, 2)]
    try:
        assert wait_for(lambda: run_main(redis_url, migrated_database_url, "health", "--group").returncode == 0, 30)
        redis_client.xadd("mqtt_stream:a:t", {"value": "1"})
        assert wait_for(
            lambda: (
                json.loads(run_main(redis_url, migrated_database_url, "health", "--group", CONSUMER_NAME="w1").stdout)[
                    "alive"
                ]
                == 2
            ),
            20,
        )

        def counters() -> dict:
            return json.loads(run_main(redis_url, migrated_database_url, "health", "--group").stdout)

        assert wait_for(lambda: sum(w["stats"].get("messages_written", 0) for w in counters()["workers"]) == 1, 20)
        report = counters()
        assert {w["consumer"] for w in report["workers"]} == {"w1", "w2"}
        assert all(w["pid"] in {p.pid for p in workers} and w["heartbeat_age_s"] < 10 for w in report["workers"])
        one = json.loads(run_main(redis_url, migrated_database_url, "health", CONSUMER_NAME="w2").stdout)
        assert one["running"] and one["worker"]["consumer"] == "w2" and one["healthy"]
        assert json.loads(run_main(redis_url, migrated_database_url, "health").stdout)["running"] is False  # worker-01

        status = json.loads(run_main(redis_url, migrated_database_url, "status", "--json").stdout)
        assert {w["consumer"] for w in status["workers"]} == {"w1", "w2"}
        text = run_main(redis_url, migrated_database_url, "status").stdout
        assert "worker" in text and "w1" in text and "w2" in text
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(30)
    # Stopped: their records go with them.
    assert json.loads(run_main(redis_url, migrated_database_url, "health", "--group").stdout)["alive"] == 0


def test_health_says_when_the_schema_is_not_at_head(redis_url, database_url):
    done = run_main(redis_url, database_url, "health")
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["database"] is True and report["schema"]["at_head"] is False


def test_replaying_twice_converges(redis_client, redis_url, migrated_database_url):
    """A replayed entry that fails again makes a dead letter linked to the first, and the next
    replay leaves it alone unless --again: running replay twice replays nothing twice."""
    with psycopg.connect(migrated_database_url) as conn:
        conn.execute("ALTER TABLE sensor_readings ADD CONSTRAINT plausible CHECK (value < 100)")
    for i in range(4):
        redis_client.xadd("mqtt_stream:h:humidity", {"value": str(150 + i), "timestamp": f"2024-01-01T00:00:0{i}Z"})
    settings = settings_for(redis_url, migrated_database_url)
    DatabaseWriterService(settings).run(until_idle=True)

    dry = run_main(redis_url, migrated_database_url, "dlq", "replay", "--match", "humidity", "--dry-run")
    assert dry.stdout.count("would replay #") == 4 and "would replay 4 dead letters" in dry.stdout
    first = run_main(redis_url, migrated_database_url, "dlq", "replay", "--match", "humidity")
    assert "replayed 4 dead letters" in first.stdout
    DatabaseWriterService(settings).run(until_idle=True)  # the constraint is still there: they fail again
    second = run_main(redis_url, migrated_database_url, "dlq", "replay", "--match", "humidity")
    assert "replayed 0 dead letters" in second.stdout  # converged
    with psycopg.connect(migrated_database_url) as conn:
        links = conn.execute("SELECT id, replay_of FROM db_writer_dead_letters ORDER BY id").fetchall()
    originals = [i for i, of in links if of is None]
    assert len(originals) == 4 and sorted(of for _, of in links if of is not None) == originals
    with psycopg.connect(migrated_database_url) as conn:
        conn.execute("ALTER TABLE sensor_readings DROP CONSTRAINT plausible")  # the fix
    again = links[-1][0]
    done = run_main(redis_url, migrated_database_url, "dlq", "replay", "--id", str(again))
    assert "replayed 1 dead letters" in done.stdout
    DatabaseWriterService(settings).run(until_idle=True)
    with psycopg.connect(migrated_database_url) as conn:
        assert conn.execute("SELECT count(*), max(metadata::text) FROM sensor_readings").fetchone() == (1, None)
    listed = run_main(redis_url, migrated_database_url, "dlq", "list").stdout
    assert f"(a replay of #{originals[-1]})" in listed


def test_status_gaps_finds_the_holes_of_each_sensor(redis_url, migrated_database_url):
    """Two sensors with their own rhythm (10 s and 60 s), each with a known hole, and one
    sensor silent since its last reading: periods longer than 3x the usual interval."""
    now = datetime.now(UTC).replace(microsecond=0)

    def series(every_s: int, count: int, hole: range = range(0), until: datetime = now) -> list[datetime]:
        first = until - timedelta(seconds=every_s * (count - 1))
        return [first + timedelta(seconds=every_s * k) for k in range(count) if k not in hole]

    fast = series(10, 2000, range(500, 560))  # a 10-minute hole
    slow = series(60, 300, range(100, 103))  # a 4-minute hole
    quiet = series(30, 100, until=now - timedelta(hours=1))  # then nothing: still open
    with psycopg.connect(migrated_database_url) as conn:
        for device, times in (("fast", fast), ("slow", slow), ("quiet", quiet)):
            with conn.cursor().copy("COPY sensor_readings (timestamp, device_id, sensor_type, value) FROM STDIN") as cp:
                for ts in times:
                    cp.write_row((ts, device, "t", 1.0))
            conn.execute(
                "INSERT INTO db_writer_sensors (device_id, sensor_type, consumer, first_seen, last_seen,"
                " last_written_at, readings) VALUES (%s, 't', 'w1', %s, %s, %s, %s)",
                [device, times[0], times[-1], times[-1], len(times)],
            )
    done = run_main(redis_url, migrated_database_url, "status", "--gaps", "--since", "1d", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)["gaps"]["gaps"]
    spans = {(g["device_id"], _at(g["start"]), _at(g["end"])) for g in found}
    assert ("fast", fast[499], fast[500]) in spans
    assert ("slow", slow[99], slow[100]) in spans
    assert ("quiet", quiet[-1], None) in spans
    assert len(found) == 3  # the others' last readings are recent: no open gap for them
    assert found[0]["end"] is None  # newest first: the open gap
    one = json.loads(
        run_main(
            redis_url, migrated_database_url, "status", "--gaps", "--sensor", "slow:t", "--since", "1d", "--json"
        ).stdout
    )["gaps"]["gaps"]
    assert [g["device_id"] for g in one] == ["slow"]
    with psycopg.connect(migrated_database_url) as conn:
        import gaps

        assert gaps.sensors_in_gap(conn, 3.0) == 1  # quiet


def _at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def test_the_operator_commands_start_quickly(redis_url, migrated_database_url):
    """Reported, not asserted tightly (a shared machine): what `health`, `status` and `trace`
    take from start to exit (median and best of 7), and that they load nothing heavy they do
    not use."""
    timings = {}
    for argv in (("health",), ("status",), ("trace", "mqtt_stream:a:t", "1-0")):
        runs = []
        for _ in range(7):
            started = time.perf_counter()
            run_main(redis_url, migrated_database_url, *argv)
            runs.append(time.perf_counter() - started)
        timings[argv[0]] = (statistics.median(runs), min(runs))
    floor = []  # the machine's own limit, same run: a command needs both libraries
    for _ in range(7):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import psycopg, redis"], check=True)
        floor.append(time.perf_counter() - started)
    timings["import psycopg, redis"] = (statistics.median(floor), min(floor))
    for argv in (("health",), ("status",), ("trace", "mqtt_stream:a:t", "1-0")):
        report = run_main(redis_url, migrated_database_url, *argv, PYTHONPROFILEIMPORTTIME="1").stderr
        modules = {line.rsplit("|", 1)[1].strip() for line in report.splitlines() if "|" in line}
        loaded = {name.split(".")[0] for name in modules}
        assert {"psycopg", "redis"} <= loaded  # what it needs (and the report is there)
        assert not loaded & {"alembic", "sqlalchemy", "prometheus_client", "structlog", "pydantic"}, argv
        assert "redis.asyncio.client" not in modules, argv  # redis-py's asyncio client stays unloaded
    print(
        "operator commands, process start to exit, median (best) of 7: "
        + ", ".join(f"{k} {median * 1000:.0f} ms ({best * 1000:.0f})" for k, (median, best) in timings.items())
    )
    assert all(median < 5 for median, _ in timings.values())
