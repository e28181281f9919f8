"""Prometheus metrics, /healthz and /readyz on METRICS_PORT.

Counters and histograms are fed once per batch (never per entry); consumer lag and
pending entries per stream are read from Redis when scraped, at most every 5 s, so
a scrape of thousands of streams does not hammer Redis.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

import redis_client
import redis_reader

if TYPE_CHECKING:
    from main import DatabaseWriterService
    from reconcile import Report


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.read = Counter("dbwriter_messages_read", "Entries read from Redis", registry=r)
        self.rows = Counter("dbwriter_rows_written", "Rows inserted", registry=r)
        self.duplicates = Counter("dbwriter_duplicates", "Entries already stored with the same value", registry=r)
        self.dead_letters = Counter("dbwriter_dead_letters", "Dead letters, by step", ["step"], registry=r)
        self.batches = Counter("dbwriter_batches", "Batches committed and acked", registry=r)
        self.errors = Counter("dbwriter_transient_errors", "Transient errors met (each retried)", registry=r)
        self.batch_seconds = Histogram(
            "dbwriter_batch_duration_seconds",
            "Transform + write + ack of one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.reconcile_checked = Counter(
            "dbwriter_reconcile_checked",
            "Acknowledged entries checked against the database by reconciliation",
            registry=r,
        )
        self.reconcile_repaired = Counter(
            "dbwriter_reconcile_repaired",
            "Acknowledged entries missing from the database, written again by reconciliation",
            registry=r,
        )
        self.reconcile_unverifiable = Gauge(
            "dbwriter_reconcile_unverifiable",
            "Acknowledged entries trimmed from Redis before the last reconciliation could verify them (at most)",
            registry=r,
        )
        self.batch_size = Histogram(
            "dbwriter_batch_size",
            "Entries per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=r,
        )

    def observe_reconcile(self, report: Report) -> None:
        self.reconcile_checked.inc(report.checked)
        self.reconcile_repaired.inc(report.repaired)
        self.reconcile_unverifiable.set(sum(s.unverifiable_count or 0 for s in report.unverifiable))

    def observe_batch(self, seconds: float, entries: int, inserted: int, duplicates: int, steps: list[str]) -> None:
        self.read.inc(entries)
        self.rows.inc(inserted)
        self.duplicates.inc(duplicates)
        for step, count in Tally(steps).items():
            self.dead_letters.labels(step).inc(count)
        self.batches.inc()
        self.batch_seconds.observe(seconds)
        self.batch_size.observe(entries)


class _StreamCollector:
    """Lag and pending per stream, read from Redis at scrape time (cached for 5 s)."""

    def __init__(self, service: DatabaseWriterService, max_age_s: float = 5.0) -> None:
        self._service, self._max_age_s = service, max_age_s
        self._cached: tuple[float, list] = (0.0, [])
        self._lock = threading.Lock()

    def collect(self):
        lag = GaugeMetricFamily("dbwriter_consumer_lag", "Entries not yet delivered to the group", labels=["stream"])
        pending = GaugeMetricFamily("dbwriter_pending", "Entries delivered, not yet acked", labels=["stream"])
        for row in self._rows():
            lag.add_metric([row.stream], row.lag or 0)
            pending.add_metric([row.stream], sum(row.pending.values()))
        yield lag
        yield pending

    def _rows(self) -> list:
        with self._lock:
            taken, rows = self._cached
            if time.monotonic() - taken > self._max_age_s:
                settings = self._service.settings
                try:
                    client = redis_client.connect(settings, timeout_s=5)
                    streams = redis_reader.discover(
                        client, settings.stream_pattern, settings.dead_letter_stream.encode()
                    )
                    rows = redis_reader.group_status(client, streams, settings.consumer_group_name)
                    client.close()
                except Exception:  # a scrape must answer even with Redis down; health says why
                    rows = []
                self._cached = (time.monotonic(), rows)
            return rows


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # one line per scrape would drown the batch log
        pass


def serve(port: int, service: DatabaseWriterService, metrics: Metrics, host: str = "0.0.0.0") -> WSGIServer:
    """Serve /metrics, /healthz (the process answers) and /readyz (running, Redis and
    PostgreSQL up) from a daemon thread; returns the server (call shutdown() to stop)."""
    metrics.registry.register(_StreamCollector(service))
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            health = service.health_check()
            ready = health["running"] and health["redis"] and health["database"]
            start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if ready else b"not ready\n"]
        return prometheus(environ, start_response)

    server = make_server(host, port, app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
