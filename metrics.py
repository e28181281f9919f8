"""Prometheus metrics, /healthz and /readyz on METRICS_HOST:METRICS_PORT.

Counters and histograms are this worker's, fed once per batch (never per entry). The
group-wide gauges (lag, pending and oldest pending age per stream, sensors in a gap) are
the same on every worker of a group: they carry a `group` label, and are to be combined
with max() (or read from one worker), never summed. They are read from Redis and
PostgreSQL when scraped, at most every 5 s; while a server does not answer, the last
values stay, and `dbwriter_group_metrics_age_seconds` says how old they are.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

import redis_client
import redis_reader

if TYPE_CHECKING:
    from reconcile import Report
    from service import DatabaseWriterService

prometheus_client.disable_created_metrics()  # the _created series double every counter and tell nothing


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # CPU seconds, resident memory, open file descriptors
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
        self.batch_size = Histogram(
            "dbwriter_batch_size",
            "Entries per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
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


class _GroupCollector:
    """Group-wide gauges, read at scrape time (cached for 5 s; the last values kept while a
    server does not answer)."""

    def __init__(self, service: DatabaseWriterService, max_age_s: float = 5.0) -> None:
        self._service, self._max_age_s = service, max_age_s
        self._rows: list = []
        self._in_gap: int | None = None
        self._read_at = 0.0  # when the values were last read successfully
        self._tried_at = 0.0
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        group = self._service.settings.consumer_group_name
        rows, in_gap, read_at = self._refresh()
        lag = GaugeMetricFamily(
            "dbwriter_consumer_lag",
            "Entries not yet delivered to the group (group-wide: max() over workers)",
            labels=["group", "stream"],
        )
        pending = GaugeMetricFamily(
            "dbwriter_pending", "Entries delivered, not yet acked (group-wide)", labels=["group", "stream"]
        )
        oldest = GaugeMetricFamily(
            "dbwriter_oldest_pending_age_seconds",
            "Age of the oldest pending entry, since it was added (group-wide); alert when above CLAIM_IDLE_MS",
            labels=["group", "stream"],
        )
        for row in rows:
            lag.add_metric([group, row.stream], row.lag or 0)
            pending.add_metric([group, row.stream], sum(row.pending.values()))
            if row.oldest_pending_age_s is not None:
                oldest.add_metric([group, row.stream], row.oldest_pending_age_s)
        yield lag
        yield pending
        yield oldest
        if in_gap is not None:
            gaps = GaugeMetricFamily(
                "dbwriter_sensors_in_gap",
                "Sensors silent for longer than GAP_FACTOR x their usual interval (group-wide)",
                labels=["group"],
            )
            gaps.add_metric([group], in_gap)
            yield gaps
        age = GaugeMetricFamily(
            "dbwriter_group_metrics_age_seconds",
            "How old the group-wide gauges are: grows while Redis or PostgreSQL does not answer",
            labels=["group"],
        )
        age.add_metric([group], time.time() - read_at if read_at else float("nan"))
        yield age

    def _refresh(self) -> tuple[list, int | None, float]:
        with self._lock:
            if time.monotonic() - self._tried_at > self._max_age_s:
                self._tried_at = time.monotonic()
                settings = self._service.settings
                try:
                    client = redis_client.connect(settings, timeout_s=3)
                    streams = redis_reader.discover(
                        client, settings.stream_pattern, settings.dead_letter_stream.encode()
                    )
                    self._rows = redis_reader.group_status(client, streams, settings.consumer_group_name)
                    client.close()
                    self._in_gap = _sensors_in_gap(settings)
                    self._read_at = time.time()
                except Exception:  # a scrape must answer with a server down: the age gauge shows it
                    pass
            return self._rows, self._in_gap, self._read_at


def _sensors_in_gap(settings: Any) -> int:
    import psycopg

    import gaps

    with psycopg.connect(settings.postgres_dsn, connect_timeout=3, autocommit=True) as conn:
        return gaps.sensors_in_gap(conn, settings.gap_factor)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # one line per scrape would drown the batch log
        pass


def serve(port: int, service: DatabaseWriterService, metrics: Metrics, host: str = "0.0.0.0") -> WSGIServer:
    """Serve /metrics, /healthz (the process answers) and /readyz (running, Redis and
    PostgreSQL up), and nothing else (404), from a daemon thread; returns the server (call
    shutdown() to stop). Raises OSError when the port is taken."""
    metrics.registry.register(_GroupCollector(service))
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict, start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            health = service.health_check()
            ready = health["running"] and health["redis"] and health["database"]
            start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if ready else b"not ready\n"]
        if path == "/metrics":
            return prometheus(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: /metrics, /healthz, /readyz\n"]

    server = make_server(host, port, app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
