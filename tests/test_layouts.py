"""Input layouts end to end: two real worker processes, real Redis and PostgreSQL.

Each layout gets good readings (unique keys) and bad entries mixed in; afterwards
every good one is exactly one row with the right device, sensor, time and value,
every bad one exactly one dead letter with its reason, and nothing is pending.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis

from redis_reader import as_text
from test_pipeline import rows, start_worker, wait_for, worker_env

GROUP = "db_writer"
T0 = datetime(2024, 3, 1, tzinfo=UTC)


@dataclass
class Published:
    pattern: str
    expected: dict = field(default_factory=dict)  # (device, sensor, ts) -> value
    bad: dict = field(default_factory=dict)  # (stream, entry id) -> reason text
    ignored: int = 0  # published where the pattern does not reach


def pending_and_unread(client: redis.Redis, pattern: str) -> int:
    total = 0
    for stream in client.scan_iter(match=pattern, _type="STREAM"):
        if stream == b"mqtt_stream:failed":
            continue
        groups = {g["name"]: g for g in client.xinfo_groups(stream)}
        group = groups.get(GROUP.encode())
        total += client.xlen(stream) if group is None else group["pending"] + (group["lag"] or 0)
    return total


def run_two_workers(
    redis_url: str, database_url: str, client: redis.Redis, published: Published, entries: list, **env
) -> None:
    """Start both workers, wait until both are up, then publish in paced chunks so both take part."""
    workers = [
        start_worker(
            worker_env(redis_url, database_url, f"w{i}", STREAM_PATTERN=published.pattern, BATCH_SIZE=64, **env)
        )
        for i in (1, 2)
    ]
    try:
        up = lambda: all(client.exists(f"db_writer:lock:{GROUP}:w{i}") for i in (1, 2))  # noqa: E731
        assert wait_for(up, 30), [w.poll() for w in workers]
        for start in range(0, len(entries), 100):
            publish(client, published, entries[start : start + 100])
            time.sleep(1.5 if start == 0 else 0.05)  # the first streams exist: let both workers find them
        total = len(published.expected)
        assert wait_for(lambda: len(rows(database_url)) >= total, 60), "rows did not arrive"
        assert wait_for(lambda: pending_and_unread(client, published.pattern) == 0, 20), "entries left pending"
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        results = [worker.communicate(timeout=30) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in results]
    assert all("Traceback" not in err for _, err in results)


def check_outcome(database_url: str, client: redis.Redis, published: Published) -> None:
    assert rows(database_url) == published.expected
    with psycopg.connect(database_url) as conn:
        letters = {
            (s, i): e
            for s, i, e in conn.execute("SELECT original_stream, original_id, error FROM db_writer_dead_letters")
        }
        consumers = {c for (c,) in conn.execute("SELECT DISTINCT consumer FROM db_writer_progress")}
    assert set(letters) == set(published.bad)
    for key, reason in published.bad.items():
        assert reason in letters[key], (key, letters[key])
    in_stream = [
        (as_text(f[b"original_stream"]), as_text(f[b"original_id"])) for _, f in client.xrange("mqtt_stream:failed")
    ]
    assert sorted(in_stream) == sorted(published.bad)  # one dead letter each, in the stream too
    assert consumers == {"w1", "w2"}  # both workers took part


def publish(client: redis.Redis, published: Published, entries: list[tuple[str, dict, tuple | None, str | None]]):
    """entries: (stream, fields, expected key or None, dead-letter reason or None)."""
    pipe = client.pipeline(transaction=False)
    for stream, fields, _, _ in entries:
        pipe.xadd(stream, fields)
    for (stream, fields, key, reason), entry_id in zip(entries, pipe.execute(), strict=True):
        if reason is not None:
            published.bad[(stream, entry_id.decode())] = reason
        elif key is not None:
            published.expected[key] = float(fields["value"])
        else:
            published.ignored += 1


def test_another_stream_prefix(redis_client, redis_url, migrated_database_url):
    published = Published("telemetry:*")
    entries: list = []
    for k in range(60):
        for turbine in range(10):
            for sensor in ("wind_speed", "rotor_rpm"):
                ts = T0 + timedelta(seconds=k)
                value = f"{turbine * 100 + k}.5"
                entries.append(
                    (
                        f"telemetry:wtg{turbine:02d}:{sensor}",
                        {"value": value, "timestamp": ts.isoformat()},
                        (f"wtg{turbine:02d}", sensor, ts),
                        None,
                    )
                )
    entries += [
        ("telemetry:wtg01:wind_speed", {"value": "abc"}, None, "value is not a decimal number"),
        ("telemetry:wtg02:", {"value": "1"}, None, "stream name has an empty sensor_type"),
        ("mqtt_stream:wtg01:wind_speed", {"value": "1"}, None, None),  # not matched by the pattern: never read
    ]
    run_two_workers(redis_url, migrated_database_url, redis_client, published, entries)
    check_outcome(migrated_database_url, redis_client, published)
    assert redis_client.xlen("mqtt_stream:wtg01:wind_speed") == 1 and published.ignored == 1


def upstream_entry(device: str, metric: str, at: datetime, value: str) -> dict:
    """The upstream's later producer (services/mqtt_ingestion/src/redis_writer.py): naive UTC isoformat."""
    return {"device_id": device, "metric": metric, "value": value, "timestamp": at.replace(tzinfo=None).isoformat()}


def identity_in_fields(streams: list[str], pattern: str) -> tuple[Published, list]:
    published = Published(pattern)
    macs = [f"a4:cf:12:00:00:{n:02x}" for n in range(20)]
    entries: list = []
    for k in range(50):
        for n, mac in enumerate(macs):
            for metric in ("temperature", "humidity"):
                at = T0 + timedelta(milliseconds=k * 250 + 7)
                value = f"{n}.{k:02d}"
                stream = streams[(n + k) % len(streams)]  # one device's readings spread over every shard
                entries.append((stream, upstream_entry(mac, metric, at, value), (mac, metric, at), None))
    first = streams[0]
    entries += [
        (
            first,
            {"metric": "temperature", "value": "1", "timestamp": "2024-03-01T00:00:00"},
            None,
            "device_id field 'device_id' is missing",
        ),
        (
            first,
            {"device_id": macs[0], "value": "1", "timestamp": "2024-03-01T00:00:00"},
            None,
            "sensor_type field 'metric' is missing",
        ),
        (first, upstream_entry(macs[1], "temperature", T0, "NaN"), None, "value is not finite"),
    ]
    return published, entries


def test_one_shared_stream_with_identity_in_fields(redis_client, redis_url, migrated_database_url):
    published, entries = identity_in_fields(["mqtt:ingestion"], "mqtt:ingestion")
    run_two_workers(
        redis_url,
        migrated_database_url,
        redis_client,
        published,
        entries,
        DEVICE_ID_FIELD="device_id",
        SENSOR_TYPE_FIELD="metric",
    )
    check_outcome(migrated_database_url, redis_client, published)
    with psycopg.connect(migrated_database_url) as conn:
        leaked = conn.execute(
            "SELECT count(*) FROM sensor_readings WHERE metadata ? 'device_id' OR metadata ? 'metric'"
        ).fetchone()[0]
        letter = conn.execute(
            "SELECT device_id, sensor_type FROM db_writer_dead_letters WHERE error LIKE 'value is not finite%'"
        ).fetchone()
    assert leaked == 0  # the identity fields are not copied into metadata
    assert letter == ("a4:cf:12:00:00:01", "temperature")  # the dead letter names its sensor in this layout too


def test_hash_tagged_shard_streams_with_identity_in_fields(redis_client, redis_url, migrated_database_url):
    shards = [f"ingest:{{{n}}}" for n in range(8)]
    published, entries = identity_in_fields(shards, "ingest:*")
    run_two_workers(
        redis_url,
        migrated_database_url,
        redis_client,
        published,
        entries,
        DEVICE_ID_FIELD="device_id",
        SENSOR_TYPE_FIELD="metric",
    )
    check_outcome(migrated_database_url, redis_client, published)
    assert sorted(s.decode() for s in redis_client.scan_iter(match="ingest:*")) == sorted(shards)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAM_PATTERN": "*:raw"}, "STREAM_PATTERN: '*:raw' starts with a wildcard"),
        ({"STREAM_PATTERN": "mqtt:ingestion"}, "STREAM_PATTERN: 'mqtt:ingestion' names one stream"),
        ({"DEVICE_ID_FIELD": "device_id"}, "SENSOR_TYPE_FIELD: DEVICE_ID_FIELD and SENSOR_TYPE_FIELD are set together"),
    ],
)
def test_a_layout_the_settings_cannot_describe_stops_start_up_in_one_line(
    redis_url, migrated_database_url, env, message
):
    worker = start_worker(worker_env(redis_url, migrated_database_url, "w1", **env))
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 2
    assert err.strip().splitlines() == [f"db-writer: {message}" + err.strip().split(message, 1)[1]]
    assert "Traceback" not in err
