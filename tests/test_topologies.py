"""db-writer on the Redis topologies production uses: a 3-master Redis Cluster and a
Sentinel-managed primary with a failover mid-run. Real servers (tests/redis_topologies.py),
real worker processes; skipped with the reason only where no server binary is found."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis

import redis_topologies as topologies
from test_pipeline import rows, start_worker, wait_for, worker_env

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(bool(topologies.skip_reason()), reason=str(topologies.skip_reason())),
]
GROUP = b"db_writer"
T0 = datetime(2024, 9, 1, tzinfo=UTC)


def publish(client: redis.Redis, streams: int, per_stream: int, start: int = 0) -> dict:
    expected = {}
    pipe = client.pipeline(transaction=False)
    for k in range(start, start + per_stream):
        for s in range(streams):
            ts = T0 + timedelta(seconds=k)
            pipe.xadd(f"mqtt_stream:dev{s:03d}:t", {"value": f"{s}.{k}", "timestamp": ts.isoformat()})
            expected[(f"dev{s:03d}", "t", ts)] = float(f"{s}.{k}")
    pipe.execute()
    return expected


def backlog(client: redis.Redis) -> int:
    """Pending plus not yet delivered, over every stream of every node."""
    total = 0
    for stream in client.scan_iter(match="mqtt_stream:dev*", _type="STREAM"):
        group = next((g for g in client.xinfo_groups(stream) if g["name"] == GROUP), None)
        total += client.xlen(stream) if group is None else group["pending"] + (group["lag"] or 0)
    return total


def stop(workers) -> list[str]:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    errs = []
    for worker in workers:
        _, err = worker.communicate(timeout=60)
        errs.append(err)
    return errs


def test_two_workers_on_a_three_master_cluster_write_every_entry_once(redis_url, migrated_database_url):
    with topologies.redis_cluster(masters=3) as cluster, cluster.client() as client:
        expected = publish(client, streams=300, per_stream=10)
        owners = {cluster.owner(client.keyslot(f"mqtt_stream:dev{s:03d}:t")).port for s in range(300)}
        assert len(owners) == 3  # the streams are spread over every primary
        env = {"REDIS_MODE": "cluster", "BATCH_SIZE": "200", "CLAIM_IDLE_MS": "2000"}
        workers = [start_worker(worker_env(cluster.startup_url, migrated_database_url, f"w{i}", **env)) for i in (1, 2)]
        try:
            assert wait_for(lambda: len(rows(migrated_database_url)) > 500, 60)
            workers[0].kill()  # kill -9 mid-run: its entries must be claimed by the other, across nodes
            workers[0].wait()
            expected |= publish(client, streams=300, per_stream=5, start=10)
            assert wait_for(lambda: len(rows(migrated_database_url)) == len(expected) and backlog(client) == 0, 90)
        finally:
            errs = stop(workers)
        assert rows(migrated_database_url) == expected
        assert workers[1].returncode == 0 and "Traceback" not in errs[1], errs[1][-3000:]
        with psycopg.connect(migrated_database_url) as conn:
            consumers = dict(conn.execute("SELECT consumer, sum(entries) FROM db_writer_progress GROUP BY 1"))
        assert set(consumers) <= {"w1", "w2"} and consumers.get("w2")
        lock = client.get("db_writer:lock:db_writer:w2")
        assert lock is None  # released at the clean stop, on whichever node holds it


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_worker_on_a_cluster_costs_little_and_still_answers_within_a_second(redis_url, migrated_database_url):
    idle_s = float(os.environ.get("DBW_IDLE_TEST_S", "10"))  # the figure is 60 s: DBW_IDLE_TEST_S=60
    with topologies.redis_cluster(masters=3) as cluster, cluster.client() as client:
        publish(client, streams=300, per_stream=1)
        env = worker_env(
            cluster.startup_url,
            migrated_database_url,
            "idle",
            REDIS_MODE="cluster",
            BATCH_TIMEOUT_SEC=5,
            STREAM_RESCAN_SEC=10,
        )  # the defaults, not the tests' quick ones
        worker = start_worker(env)
        try:
            assert wait_for(lambda: len(rows(migrated_database_url)) == 300 and backlog(client) == 0, 60)
            time.sleep(2)  # past start-up work (reconciliation, discovery)
            cpu, wall = _cpu_seconds(worker.pid), time.monotonic()
            time.sleep(idle_s)
            share = (_cpu_seconds(worker.pid) - cpu) / (time.monotonic() - wall)
            sent = client.xadd("mqtt_stream:dev123:t", {"value": "4242.5"})
            sent_at = int(sent.split(b"-")[0]) / 1000
            assert wait_for(lambda: len(rows(migrated_database_url)) == 301, 10, 0.02)
            with psycopg.connect(migrated_database_url) as conn:
                written_at = conn.execute(
                    "SELECT extract(epoch FROM created_at)::float8 FROM sensor_readings WHERE value = 4242.5"
                ).fetchone()[0]
        finally:
            stop([worker])
        print(
            f"idle {idle_s:.0f} s on a 300-stream cluster: {share:.1%} of a CPU; "
            f"then an entry written {written_at - sent_at:.3f} s after it was added"
        )
        assert share < 0.05
        assert written_at - sent_at < 1.0


def test_workers_follow_a_sentinel_failover_and_lose_nothing_redis_still_holds(redis_url, migrated_database_url):
    with topologies.redis_sentinel(replicas=1, sentinels=1) as setup:
        client = setup.client()
        env = {
            "REDIS_MODE": "sentinel",
            "REDIS_SENTINELS": ",".join(setup.sentinels),
            "REDIS_SENTINEL_MASTER": setup.master_name,
            "BATCH_SIZE": "200",
            "MAX_OUTAGE_SEC": "120",
        }
        env_url = f"redis://127.0.0.1:{setup.primary_port()}/0"  # unused in sentinel mode, but a valid setting
        workers = [start_worker(worker_env(env_url, migrated_database_url, f"w{i}", **env)) for i in (1, 2)]
        sent: list[tuple[bytes, bytes]] = []
        stop_publishing = threading.Event()

        def publisher() -> None:
            n = 0
            while not stop_publishing.is_set():
                stream = f"mqtt_stream:dev{n % 50:03d}:t"
                try:
                    entry_id = client.xadd(
                        stream, {"value": str(n), "timestamp": (T0 + timedelta(seconds=n)).isoformat()}
                    )
                    sent.append((stream.encode(), entry_id))
                except redis.RedisError:
                    time.sleep(0.05)  # failing over: the producer retries, as a real one would
                n += 1
                time.sleep(0.001)

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: len(rows(migrated_database_url)) > 500, 60)
            old = setup.primary()
            new = setup.failover()
            assert new is not old
            time.sleep(3)
            stop_publishing.set()
            thread.join(10)
            # Whatever the new primary holds must be written, once; what it lost, Redis lost.
            held = set()
            with new.client() as primary:
                for stream in primary.scan_iter(match="mqtt_stream:dev*", _type="STREAM"):
                    held |= {(stream, i) for i, _ in primary.xrange(stream)}
            assert wait_for(lambda: backlog(client) == 0, 90)
        finally:
            stop_publishing.set()
            errs = stop(workers)
        assert [w.returncode for w in workers] == [0, 0], [e[-2000:] for e in errs]
        assert all("Traceback" not in e for e in errs)
        stored = rows(migrated_database_url)
        with new.client() as primary:
            expected = {}
            for stream, entry_id in held:
                ((_, fields),) = primary.xrange(stream, entry_id, entry_id)
                device = stream.decode().split(":")[1]
                ts = datetime.fromisoformat(fields[b"timestamp"].decode())
                expected[(device, "t", ts)] = float(fields[b"value"])
        assert {k: stored.get(k) for k in expected} == expected  # every entry Redis holds has its row
        lost_by_redis = len(set(sent) - held)
        print(
            f"sentinel failover: {len(sent)} published, {len(held)} held by the new primary,"
            f" {lost_by_redis} lost by Redis itself (asynchronous replication), {len(stored)} rows"
        )
