"""The metrics endpoint, scraped over HTTP while a worker runs."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request

from main import DatabaseWriterService
from metrics import Metrics, serve
from test_pipeline import settings_for, wait_for


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def value(text: str, name: str) -> float:
    return float(
        next(
            line.split()[-1] for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")
        )
    )


def test_metrics_healthz_readyz(redis_client, redis_url, migrated_database_url):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics()
    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url, batch_size=10), metrics)
    server = serve(port, service, metrics, host="127.0.0.1")
    try:
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/readyz")[0] == 503  # not running yet
        for i in range(25):
            redis_client.xadd("mqtt_stream:dev:t", {"value": str(i), "timestamp": f"2024-01-01T00:00:{i:02d}Z"})
        redis_client.xadd("mqtt_stream:dev:t", {"value": "bad"})
        redis_client.xadd("mqtt_stream:other:t", {"value": "1"})  # read below, never acked: pending
        thread = threading.Thread(target=service.run)
        thread.start()
        try:
            assert wait_for(lambda: service.stats.messages_read == 27, 20)
            assert get(port, "/readyz") == (200, "ready\n")
        finally:
            service.stop()
            thread.join(20)
        redis_client.xadd("mqtt_stream:other:t", {"value": "2"})
        redis_client.xreadgroup("db_writer", "ghost", {"mqtt_stream:other:t": ">"})

        status, text = get(port, "/metrics")
        assert status == 200
        assert value(text, "dbwriter_messages_read_total") == 27
        assert value(text, "dbwriter_rows_written_total") == 26
        assert 'dbwriter_dead_letters_total{step="parse"} 1.0' in text
        assert value(text, "dbwriter_batches_total") >= 3  # batches of at most 10
        assert value(text, "dbwriter_batch_size_count") == value(text, "dbwriter_batches_total")
        assert "dbwriter_batch_duration_seconds_bucket" in text
        # Group-wide gauges carry the group: the same on every worker, combined with max().
        assert 'dbwriter_pending{group="db_writer",stream="mqtt_stream:other:t"} 1.0' in text
        assert 'dbwriter_consumer_lag{group="db_writer",stream="mqtt_stream:dev:t"} 0.0' in text
        assert value(text, 'dbwriter_oldest_pending_age_seconds{group="db_writer",stream="mqtt_stream:other:t"}') >= 0
        assert 'dbwriter_sensors_in_gap{group="db_writer"}' in text
        assert 0 <= value(text, "dbwriter_group_metrics_age_seconds") < 10
        assert value(text, "process_resident_memory_bytes") > 10e6 and "process_open_fds" in text
        assert "_created" not in text
        assert get(port, "/anything")[0] == 404 and get(port, "/metrics/x")[0] == 404
    finally:
        server.shutdown()


def test_group_gauges_keep_their_last_values_while_a_server_is_down(
    redis_client, redis_url, migrated_database_url, monkeypatch
):
    import metrics as metrics_module

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis_client.xadd("mqtt_stream:dev:t", {"value": "1"})
    registry = Metrics()
    service = DatabaseWriterService(settings_for(redis_url, migrated_database_url), registry)
    server = serve(port, service, registry, host="127.0.0.1")
    try:
        _, before = get(port, "/metrics")
        assert 'dbwriter_consumer_lag{group="db_writer",stream="mqtt_stream:dev:t"} 1.0' in before

        def down(*args, **kwargs):
            raise ConnectionError("Redis is down")

        monkeypatch.setattr(metrics_module.redis_client, "connect", down)
        collector = next(
            c for c in registry.registry._collector_to_names if isinstance(c, metrics_module._GroupCollector)
        )
        collector._max_age_s = 0.0  # read again at every scrape
        import time

        time.sleep(1.1)
        status, after = get(port, "/metrics")
        assert status == 200
        assert 'dbwriter_consumer_lag{group="db_writer",stream="mqtt_stream:dev:t"} 1.0' in after  # kept
        assert value(after, "dbwriter_group_metrics_age_seconds") >= 1.0  # and marked stale
    finally:
        server.shutdown()
