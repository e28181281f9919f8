"""The pipeline end to end against real Redis and PostgreSQL: read -> transform -> write -> ack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import redis

import config
import servers
from main import DatabaseWriterService

ROOT = Path(__file__).resolve().parents[1]
GROUP = b"db_writer"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def settings_for(redis_url: str, database_url: str, **overrides):
    values: dict = {
        "redis_url": redis_url,
        "database_url": database_url,
        "batch_timeout_sec": 0.2,
        "log_level": "WARNING",
        "claim_idle_ms": 1000,
    }
    values.update(overrides)
    return config.load_settings(**values)


def publish(client, devices: int, sensors: tuple[str, ...], per_stream: int) -> dict:
    """XADD readings with unique timestamps; returns {(device, sensor, ts): value}."""
    return publish_range(client, devices, sensors, 0, per_stream)


def publish_range(client, devices: int, sensors: tuple[str, ...], first: int, count: int) -> dict:
    """XADD the readings first..first+count-1 of each stream (unique timestamps); returns
    {(device, sensor, ts): value}."""
    expected = {}
    pipe = client.pipeline(transaction=False)
    for d in range(devices):
        for sensor in sensors:
            for k in range(first, first + count):
                ts = T0 + timedelta(seconds=k)
                value = round(d * 1000 + k * 0.25, 2)
                pipe.xadd(f"mqtt_stream:dev{d}:{sensor}", {"value": str(value), "timestamp": ts.isoformat()})
                expected[(f"dev{d}", sensor, ts)] = value
    pipe.execute()
    return expected


def rows(database_url: str) -> dict:
    with psycopg.connect(database_url) as conn:
        return {
            (d, s, t): v
            for t, d, s, v in conn.execute("SELECT timestamp, device_id, sensor_type, value FROM sensor_readings")
        }


def pending(client) -> int:
    total = 0
    for key in client.scan_iter(match="mqtt_stream:*", _type="STREAM"):
        try:
            total += client.xpending(key, GROUP)["pending"]
        except redis.ResponseError:  # no group on this stream (yet)
            pass
    return total


def worker_env(redis_url: str, database_url: str, name: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DB_", "DATABASE_"))}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        CONSUMER_NAME=name,
        BATCH_TIMEOUT_SEC="0.2",
        LOG_LEVEL="WARNING",
        CONSUMER_LOCK_TTL_SEC="3",
        STREAM_RESCAN_SEC="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_worker(env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_every_entry_becomes_exactly_one_row(redis_client, redis_url, migrated_database_url):
    expected = publish(redis_client, devices=30, sensors=("temperature", "humidity"), per_stream=40)
    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url, batch_size=250))
    service.run(until_idle=True)

    assert rows(migrated_database_url) == expected
    assert service.stats.messages_written == len(expected) == 2400
    assert pending(redis_client) == 0
    with psycopg.connect(migrated_database_url) as conn:
        entries, rows_inserted, streams = conn.execute(
            "SELECT sum(entries), sum(rows_inserted), count(*) FROM db_writer_progress"
        ).fetchone()
    assert entries == rows_inserted == len(expected)  # the ledger: one row per stream, every entry counted
    assert streams == 60
    assert service.stats.messages_read / service.stats.batches_processed <= 250  # BATCH_SIZE bounds a batch


def test_redelivered_entries_add_no_rows(redis_client, redis_url, migrated_database_url):
    expected = publish(redis_client, devices=3, sensors=("t",), per_stream=10)
    settings = settings_for(redis_url, migrated_database_url)
    DatabaseWriterService(settings).run(until_idle=True)
    # The same readings again, as a producer retry or a replay would send them.
    publish(redis_client, devices=3, sensors=("t",), per_stream=10)
    service = DatabaseWriterService(settings)
    service.run(until_idle=True)

    assert rows(migrated_database_url) == expected
    assert service.stats.messages_written == 0 and service.stats.messages_duplicate == 30
    assert redis_client.xlen("mqtt_stream:failed") == 0


def test_bad_entries_are_dead_lettered_and_good_ones_land(redis_client, redis_url, migrated_database_url):
    expected = publish(redis_client, devices=2, sensors=("t",), per_stream=20)
    bad = {
        "mqtt_stream:dev0:t": {"value": "abc", "timestamp": "2024-02-01T00:00:00Z"},
        "mqtt_stream:dev1:t": {"value": "1.5", "timestamp": "2024-02-01T00:00:00Z", "metadata": "{not json"},
        "mqtt_stream:" + "x" * 101 + ":t": {"value": "1", "timestamp": "2024-02-01T00:00:00Z"},
        "mqtt_stream:dev0:other": {"value": "NaN"},
    }
    bad_ids = {redis_client.xadd(stream, fields).decode(): stream for stream, fields in bad.items()}
    # Same key as a stored reading, different value: first write wins, the second is a dead letter.
    conflict_id = redis_client.xadd("mqtt_stream:dev0:t", {"value": "-1", "timestamp": T0.isoformat()}).decode()

    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url, batch_size=16))
    service.run(until_idle=True)

    assert rows(migrated_database_url) == expected
    letters = {f[b"original_id"].decode(): f for _, f in redis_client.xrange("mqtt_stream:failed")}
    assert set(letters) == set(bad_ids) | {conflict_id}
    for _entry_id, fields in letters.items():
        assert fields[b"error"] and fields[b"step"] in {b"parse", b"validate", b"write"}
        assert {b"original_stream", b"device_id", b"sensor_type", b"value", b"failed_at", b"fields"} <= set(fields)
    assert b"already stored" in letters[conflict_id][b"error"]
    with psycopg.connect(migrated_database_url) as conn:
        traced = dict(conn.execute("SELECT original_id, error FROM db_writer_dead_letters").fetchall())
    assert set(traced) == set(letters)
    assert pending(redis_client) == 0


def test_rows_the_database_rejects_are_isolated(redis_client, redis_url, migrated_database_url):
    """A constraint the validator knows nothing about: the batch is split, the rest commits."""
    with psycopg.connect(migrated_database_url) as conn:
        conn.execute("ALTER TABLE sensor_readings ADD CONSTRAINT plausible CHECK (value < 1000)")
    expected = {k: v for k, v in publish(redis_client, devices=3, sensors=("t",), per_stream=30).items() if v < 1000}
    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url, batch_size=100))
    service.run(until_idle=True)

    assert rows(migrated_database_url) == expected
    with psycopg.connect(migrated_database_url) as conn:
        steps = conn.execute("SELECT step, count(*), min(error) FROM db_writer_dead_letters GROUP BY step").fetchall()
    assert [(step, count) for step, count, _ in steps] == [("write", 60)]
    assert "plausible" in steps[0][2]
    assert pending(redis_client) == 0


def test_own_pending_entries_are_finished_first_after_a_crash(redis_client, redis_url, migrated_database_url):
    expected = publish(redis_client, devices=2, sensors=("t",), per_stream=5)
    settings = settings_for(redis_url, migrated_database_url, consumer_name="worker-07")
    # A crashed worker-07: it read everything and wrote nothing.
    for stream in (b"mqtt_stream:dev0:t", b"mqtt_stream:dev1:t"):
        redis_client.xgroup_create(stream, GROUP, id="0")
    redis_client.xreadgroup(GROUP, "worker-07", {"mqtt_stream:dev0:t": ">", "mqtt_stream:dev1:t": ">"})
    assert pending(redis_client) == 10

    service = DatabaseWriterService(settings)
    service.run(until_idle=True)
    assert rows(migrated_database_url) == expected
    assert pending(redis_client) == 0


def test_entries_of_a_dead_consumer_are_claimed(redis_client, redis_url, migrated_database_url):
    expected = publish(redis_client, devices=1, sensors=("t",), per_stream=5)
    redis_client.xgroup_create("mqtt_stream:dev0:t", GROUP, id="0")
    redis_client.xreadgroup(GROUP, "dead-worker", {"mqtt_stream:dev0:t": ">"})
    time.sleep(1.1)  # idle longer than CLAIM_IDLE_MS=1000

    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url))
    service.run(until_idle=True)
    assert rows(migrated_database_url) == expected
    assert pending(redis_client) == 0


def redeliver(client, stream: str, times: int) -> bytes:
    """An entry delivered `times` times without being written (workers that kept restarting)."""
    entry_id = client.xadd(stream, {"value": "1", "timestamp": T0.isoformat()})
    client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for n in range(times):
        client.xreadgroup(GROUP, "worker-01", {stream: "0" if n else ">"})
    return entry_id


def test_an_entry_delivered_too_often_is_written_alone_not_dead_lettered(
    redis_client, redis_url, migrated_database_url
):
    """Deliveries also grow when workers restart for reasons of their own (outages, deploys):
    an innocent entry past MAX_RETRIES is written, alone, and the others of its batch too."""
    suspect = redeliver(redis_client, "mqtt_stream:dev0:t", 3)
    others = publish(redis_client, devices=2, sensors=("h",), per_stream=5)
    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url, max_retries=3))
    service.run(until_idle=True)
    assert rows(migrated_database_url) == others | {("dev0", "t", T0): 1.0}
    assert redis_client.xlen("mqtt_stream:failed") == 0 and pending(redis_client) == 0
    assert not redis_client.keys("db_writer:writing-alone:*")  # the proof is over: the marker is gone
    assert suspect


def test_an_entry_that_stopped_the_worker_twice_while_alone_is_dead_lettered(
    redis_client, redis_url, migrated_database_url
):
    entry_id = redeliver(redis_client, "mqtt_stream:dev0:t", 3)
    # Two earlier workers began writing it alone and never finished (each crashed on it).
    redis_client.set(f"db_writer:writing-alone:{GROUP.decode()}:mqtt_stream:dev0:t:{entry_id.decode()}", 2)
    others = publish(redis_client, devices=2, sensors=("h",), per_stream=5)
    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url, max_retries=3))
    service.run(until_idle=True)
    ((_, letter),) = redis_client.xrange("mqtt_stream:failed")
    assert letter[b"original_id"] == entry_id and letter[b"step"] == b"deliver"
    assert letter[b"delivery_count"] == b"4" and b"MAX_RETRIES=3" in letter[b"error"]
    assert b"stopped the worker each of the 2 times it was written alone" in letter[b"error"]
    assert rows(migrated_database_url) == others  # the other entries were written first
    assert pending(redis_client) == 0


def test_pending_entries_deleted_from_the_stream_are_acked_away(redis_client, redis_url, migrated_database_url):
    stream = "mqtt_stream:dev0:t"
    ids = [
        redis_client.xadd(stream, {"value": str(i), "timestamp": (T0 + timedelta(seconds=i)).isoformat()})
        for i in range(3)
    ]
    redis_client.xgroup_create(stream, GROUP, id="0")
    redis_client.xreadgroup(GROUP, "worker-01", {stream: ">"})
    redis_client.xdel(stream, ids[0])

    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url))
    service.run(until_idle=True)
    assert service.stats.messages_trimmed == 1
    assert len(rows(migrated_database_url)) == 2
    assert pending(redis_client) == 0


def test_a_recreated_stream_gets_its_group_back(redis_client, redis_url, migrated_database_url):
    publish(redis_client, devices=1, sensors=("t",), per_stream=3)
    settings = settings_for(redis_url, migrated_database_url, stream_rescan_sec=0.2)
    service = DatabaseWriterService(settings)
    thread = threading.Thread(target=service.run)
    thread.start()
    try:
        assert wait_for(lambda: len(rows(migrated_database_url)) == 3, 10)
        redis_client.delete("mqtt_stream:dev0:t")  # group gone with it
        redis_client.xadd("mqtt_stream:dev0:t", {"value": "7", "timestamp": "2025-01-01T00:00:00Z"})
        assert wait_for(lambda: len(rows(migrated_database_url)) == 4, 10)
    finally:
        service.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_refuses_to_start_on_an_unmigrated_database(redis_url, database_url):
    service = DatabaseWriterService(settings_for(redis_url, database_url))
    with pytest.raises(Exception, match=r"run \./migrate\.sh upgrade"):
        service.run(until_idle=True)


def test_constructing_the_service_opens_no_connection():
    settings = config.load_settings(redis_url="redis://127.0.0.1:1/0", database_url="postgresql://u:pw@127.0.0.1:1/x")
    service = DatabaseWriterService(settings)
    health = service.health_check()
    assert health["running"] is False and health["redis"] is False and health["database"] is False
    assert "pw" not in repr(service.settings) and "pw" not in str(health)


def test_two_workers_share_the_load_and_write_each_entry_once(redis_client, redis_url, migrated_database_url):
    workers = [start_worker(worker_env(redis_url, migrated_database_url, f"w{i}", BATCH_SIZE=200)) for i in (1, 2)]
    try:
        # Both up first: otherwise the quicker one drains it all before the other has started.
        assert wait_for(lambda: all(redis_client.exists(f"db_writer:lock:db_writer:w{i}") for i in (1, 2)), 30)
        expected = publish(redis_client, devices=40, sensors=("a", "b"), per_stream=1)
        time.sleep(1.5)  # a re-scan: both see the streams
        for start in range(1, 100, 10):
            expected |= publish_range(redis_client, devices=40, sensors=("a", "b"), first=start, count=10)
            time.sleep(0.05)
        assert wait_for(lambda: len(rows(migrated_database_url)) == len(expected), 60)
        assert wait_for(lambda: pending(redis_client) == 0, 10)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(30) for worker in workers]
    assert codes == [0, 0]
    assert rows(migrated_database_url) == expected
    with psycopg.connect(migrated_database_url) as conn:
        per_worker = dict(conn.execute("SELECT consumer, sum(entries) FROM db_writer_progress GROUP BY consumer"))
    assert sum(per_worker.values()) == len(expected)
    assert set(per_worker) == {"w1", "w2"}  # both took part


def test_a_second_worker_with_the_same_name_is_refused(redis_url, migrated_database_url):
    env = worker_env(redis_url, migrated_database_url, "same-name")
    first = start_worker(env)
    try:
        time.sleep(1.5)
        assert first.poll() is None
        second = start_worker(env)
        _, err = second.communicate(timeout=30)
        assert second.returncode == 1
        assert "CONSUMER_NAME 'same-name' is in use by a live worker" in err
        assert "Traceback" not in err
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0


def test_a_worker_killed_hard_restarts_at_once_under_its_name(redis_client, redis_url, migrated_database_url):
    env = worker_env(redis_url, migrated_database_url, "phoenix", CONSUMER_LOCK_TTL_SEC="30")
    first = start_worker(env)
    time.sleep(1.5)
    first.kill()
    first.wait()
    expected = publish(redis_client, devices=2, sensors=("t",), per_stream=10)
    started = time.monotonic()
    second = start_worker(env)
    try:
        assert wait_for(lambda: rows(migrated_database_url) == expected, 20)
        assert time.monotonic() - started < 10  # far less than the 30 s lock TTL
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0


def test_sigterm_mid_run_loses_nothing(redis_client, redis_url, migrated_database_url):
    expected = publish(redis_client, devices=50, sensors=("t", "h"), per_stream=200)  # 20,000 entries
    env = worker_env(redis_url, migrated_database_url, "w1", BATCH_SIZE=100)
    worker = start_worker(env)
    assert wait_for(lambda: len(rows(migrated_database_url)) > 1000, 30, 0.05)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert len(rows(migrated_database_url)) < len(expected)  # it really stopped mid-run
    assert pending(redis_client) == 0  # the batch in flight was finished and acked

    resumed = DatabaseWriterService(settings_for(redis_url, migrated_database_url, consumer_name="w1"))
    resumed.run(until_idle=True)
    assert rows(migrated_database_url) == expected


def test_postgres_outage_health_and_recovery(redis_client, redis_url, tmp_path):
    """Stop a real PostgreSQL (a throwaway one, so no other test is disturbed) mid-run."""
    with servers.embedded_postgres() as pg, servers.temp_database(pg.url) as url:
        servers.migrate(url)
        service = DatabaseWriterService(settings_for(redis_url, url, max_outage_sec=120, stream_rescan_sec=0.2))
        thread = threading.Thread(target=service.run)
        thread.start()
        try:
            publish(redis_client, devices=1, sensors=("t",), per_stream=5)
            assert wait_for(lambda: len(rows(url)) == 5, 15)
            health = service.health_check()
            assert health["running"] and health["redis"] and health["database"]

            pg.stop()
            try:
                assert service.health_check()["database"] is False
                redis_client.xadd("mqtt_stream:dev0:t", {"value": "9", "timestamp": "2025-01-01T00:00:00Z"})
                assert wait_for(lambda: service.stats.errors > 0, 15)
                assert pending(redis_client) > 0  # read, not written, so not acked
                assert thread.is_alive()
            finally:
                pg.start()
            assert wait_for(lambda: len(rows(url)) == 6, 30)
            assert service.health_check()["database"] is True
            assert wait_for(lambda: pending(redis_client) == 0, 10)
        finally:
            service.stop()
            thread.join(30)
        assert not thread.is_alive()


def test_an_outage_longer_than_max_outage_sec_ends_the_worker_with_status_1(redis_client, redis_url, tmp_path):
    """So that a supervisor restarts it; what it could not write stays pending."""
    with servers.embedded_postgres() as pg, servers.temp_database(pg.url) as url:
        servers.migrate(url)
        publish(redis_client, devices=1, sensors=("t",), per_stream=1)
        env = worker_env(redis_url, url, "w-outage", MAX_OUTAGE_SEC="2", LOG_FORMAT="json", LOG_LEVEL="INFO")
        worker = start_worker(env)
        try:
            assert wait_for(lambda: len(rows(url)) == 1, 30)
            pg.stop()
            try:
                redis_client.xadd("mqtt_stream:dev0:t", {"value": "9", "timestamp": "2025-01-01T00:00:00Z"})
                out, err = worker.communicate(timeout=60)
                output = out + err
                assert worker.returncode == 1, output
                assert "giving up" in output and "MAX_OUTAGE_SEC=2" in output
                assert pending(redis_client) == 1
            finally:
                pg.start()
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def test_the_sensor_registry_counts_inserted_rows(redis_client, redis_url, migrated_database_url):
    publish(redis_client, devices=2, sensors=("t", "h"), per_stream=10)
    settings = settings_for(redis_url, migrated_database_url, batch_size=7)
    DatabaseWriterService(settings).run(until_idle=True)
    publish(redis_client, devices=2, sensors=("t", "h"), per_stream=10)  # redeliveries: not counted again
    DatabaseWriterService(settings).run(until_idle=True)
    with psycopg.connect(migrated_database_url) as conn:
        registry = conn.execute(
            "SELECT device_id, sensor_type, first_seen, last_seen, readings FROM db_writer_sensors ORDER BY 1, 2"
        ).fetchall()
    assert registry == [(f"dev{d}", s, T0, T0 + timedelta(seconds=9), 10) for d in (0, 1) for s in ("h", "t")]


def test_metadata_and_extra_fields_land_as_jsonb(redis_client, redis_url, migrated_database_url):
    redis_client.xadd(
        "mqtt_stream:esp32:temperature",
        {"value": "23.5", "timestamp": "2023-10-18T14:30:00Z", "metadata": '{"unit": "C", "n": [1, 2.5, null]}'},
    )
    redis_client.xadd("mqtt_stream:esp32:humidity", {"value": "40", "timestamp": "2023-10-18T14:30:00Z", "rssi": "-70"})
    redis_client.xadd("mqtt_stream:esp32:pressure", {"value": "1013", "timestamp": "2023-10-18T14:30:00Z"})
    DatabaseWriterService(settings_for(redis_url, migrated_database_url)).run(until_idle=True)
    with psycopg.connect(migrated_database_url) as conn:
        stored = dict(conn.execute("SELECT sensor_type, metadata FROM sensor_readings").fetchall())
    assert stored == {"temperature": {"unit": "C", "n": [1, 2.5, None]}, "humidity": {"rssi": "-70"}, "pressure": None}


def test_an_enormous_stream_name_is_dead_lettered_and_blocks_nothing(redis_client, redis_url, migrated_database_url):
    """Found by the reliability suite: its trace row once overflowed a btree entry, and the
    batch was retried forever as if the database were down."""
    expected = publish(redis_client, devices=1, sensors=("t",), per_stream=3)
    redis_client.xadd(b"mqtt_stream:" + b"d" * 1_000_000, {"value": "1"})
    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url, max_outage_sec=5))
    service.run(until_idle=True)
    assert rows(migrated_database_url) == expected
    assert service.stats.messages_failed == 1 and service.stats.errors == 0
    assert pending(redis_client) == 0


def test_a_doubled_sigterm_is_one_clean_stop_and_a_later_one_is_hard(redis_client, redis_url, migrated_database_url):
    """systemd (KillMode=control-group) and `timeout` signal the whole group and `uv run`
    forwards too: the same stop arrives twice at once, and must not abandon the batch."""
    lock = "db_writer:lock:db_writer:twice"
    worker = start_worker(worker_env(redis_url, migrated_database_url, "twice", BATCH_TIMEOUT_SEC="3"))
    assert wait_for(lambda: redis_client.exists(lock), 30)  # started: handlers are in place
    worker.send_signal(signal.SIGTERM)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0

    redis_client.xadd("mqtt_stream:x:t", {"value": "1"})
    worker = start_worker(worker_env(redis_url, migrated_database_url, "twice", DB_LOCK_TIMEOUT_SEC="0"))
    assert wait_for(lambda: redis_client.exists(lock) and len(rows(migrated_database_url)) == 1, 30)
    with psycopg.connect(migrated_database_url) as blocker:
        blocker.execute("LOCK TABLE sensor_readings IN ACCESS EXCLUSIVE MODE")  # the next write waits
        redis_client.xadd("mqtt_stream:x:t", {"value": "2"})
        time.sleep(1)
        worker.send_signal(signal.SIGTERM)  # it would finish the batch in flight (30 s allowed) ...
        time.sleep(1.5)
        worker.send_signal(signal.SIGTERM)  # ... unless a second, later request says: now
        assert worker.wait(30) == 1
    assert pending(redis_client) == 1  # the batch in flight stays pending, to be delivered again


def test_a_worker_with_no_stream_to_read_waits_instead_of_spinning(redis_client, redis_url, migrated_database_url):
    """A Redis restarted empty leaves nothing to block on: the worker must idle, not spin."""
    settings = settings_for(redis_url, migrated_database_url, batch_timeout_sec=1, stream_rescan_sec=0.5)
    service = DatabaseWriterService(settings)
    thread = threading.Thread(target=service.run)
    thread.start()
    try:
        time.sleep(1)  # started, found no stream
        cpu = time.process_time()
        time.sleep(3)
        assert time.process_time() - cpu < 0.5  # spinning burns ~3 s of CPU here
        redis_client.xadd("mqtt_stream:late:t", {"value": "1", "timestamp": "2025-01-01T00:00:00Z"})
        assert wait_for(lambda: len(rows(migrated_database_url)) == 1, 10)  # and the next re-scan finds it
    finally:
        service.stop()
        thread.join(10)
    assert not thread.is_alive()
