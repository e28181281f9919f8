"""db-writer: Redis Streams -> PostgreSQL/TimescaleDB.

Delivery guarantee: at least once, written idempotently. An entry is acked only
after the transaction that wrote its row (or its dead letter) committed, and a
redelivered entry adds no second row.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import psycopg
import redis
import structlog
from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

import cli
import dead_letters
import migrations
import redis_reader
import schema
from config import Settings, load_settings
from consumer_lock import ConsumerLock
from db_writer import DatabaseWriter, Ledger
from errors import ConfigError, StartupError, TransientError
from log import configure_logging
from metrics import Metrics
from metrics import serve as serve_metrics
from read_ahead import ReadAhead

log = structlog.get_logger("db_writer")
T = TypeVar("T")


@dataclass
class Stats:
    messages_read: int = 0
    messages_written: int = 0  # rows inserted
    messages_duplicate: int = 0  # already stored with the same value (redeliveries)
    messages_failed: int = 0  # dead-lettered
    messages_trimmed: int = 0  # pending, but deleted from the stream before being written
    batches_processed: int = 0
    errors: int = 0  # transient errors met (each one retried)
    last_batch_at: float | None = None


class DatabaseWriterService:
    """One named worker. Constructing it opens no connection; run() does."""

    def __init__(self, settings: Settings | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings or load_settings()
        self.metrics = metrics
        self.layout = schema.Layout.from_settings(self.settings)
        self.stats = Stats()
        self.running = False
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        self._abort = threading.Event()  # second signal: stop retrying at once
        self._stop_deadline: float | None = None
        self._next_tick = 0.0
        self._recovering = True  # own pending entries first, after a restart
        self._redis: redis.Redis | None = None
        self.reader: redis_reader.StreamReader | None = None
        self.writer: DatabaseWriter | None = None
        self._lock: ConsumerLock | None = None

    # The loop

    def run(self, until_idle: bool = False) -> None:
        """Process batches until stopped (or, with until_idle, until a read comes back empty)."""
        self._start()
        try:
            with ReadAhead(self._read_batch, self._stop) as batches:
                for batch in batches:
                    for part in batch.split(self.settings.batch_size):
                        self._process(part)
                    if self._lock.lost.is_set():
                        self.stop("another process took this CONSUMER_NAME")
                    elif not batch and until_idle:
                        self.stop("idle")
        except TransientError as exc:
            if self.stop_reason is not None:  # a stop was asked for (leaving ReadAhead sets the event too)
                log.warning("stopped before the batch in flight was written; it stays pending", error=str(exc))
            else:
                self.stop_reason = f"outage longer than MAX_OUTAGE_SEC={self.settings.max_outage_sec:g}: {exc}"
                raise
        finally:
            self._teardown()

    def _read_batch(self) -> redis_reader.Batch:
        """Runs in the read-ahead thread. PROCESSING_INTERVAL_SEC only ever follows an empty read."""
        batch = self._retry(self._next_batch)
        if not batch:
            pause = self.settings.processing_interval_sec
            if not self.reader.streams:  # no blocking read to wait in: wait for the next re-scan
                pause = max(pause, min(self.settings.batch_timeout_sec, self._next_tick - time.monotonic()))
            self._stop.wait(pause)
        return batch

    def _next_batch(self) -> redis_reader.Batch:
        """Where the next batch comes from: entries of dead consumers (checked every
        STREAM_RESCAN_SEC, with a re-scan for new streams), then this consumer's own
        pending entries (after a restart), then new entries. An empty batch means idle."""
        if time.monotonic() >= self._next_tick:
            self._next_tick = time.monotonic() + self.settings.stream_rescan_sec
            new = self.reader.refresh_streams()
            if new:
                log.info("new streams", count=len(new), streams=len(self.reader.streams))
            batch = self.reader.claim_abandoned()
            if batch:
                self._next_tick = 0.0  # more may be waiting: claim again next time
                return batch
        if self._recovering:
            batch = self.reader.read_own_pending()
            if batch:
                return batch
            self._recovering = False
        return self.reader.read_new()

    def _process(self, batch: redis_reader.Batch) -> None:
        """Transform, write (rows + trace rows + ledger in one transaction), then ack."""
        started = time.perf_counter()
        rows, sources, letters = self._transform(batch)

        def reject(index: int, reason: str) -> dead_letters.DeadLetter:
            stream, entry_id, fields = sources[index]
            return dead_letters.make(
                self.layout, stream, entry_id, fields, "write", reason, batch.deliveries.get((stream, entry_id), 1)
            )

        written = time.perf_counter()
        result = self._retry(lambda: self.writer.write(rows, letters, _ledger(self.settings, sources), reject))
        committed = time.perf_counter()
        letters += result.letters
        acked = [(stream, entry_id) for stream, entry_id, _ in batch.entries] + batch.trimmed
        self._retry(lambda: self.reader.finish(acked, letters))
        done = time.perf_counter()

        stats = self.stats
        stats.messages_read += len(batch.entries)
        stats.messages_written += result.inserted
        stats.messages_duplicate += result.duplicates
        stats.messages_failed += len(letters)
        stats.messages_trimmed += len(batch.trimmed)
        stats.batches_processed += 1
        stats.last_batch_at = time.time()
        if self.metrics is not None:
            self.metrics.observe_batch(
                done - started,
                len(batch.entries),
                result.inserted,
                result.duplicates,
                [letter.step for letter in letters],
            )
        if batch.trimmed:
            log.warning(
                "pending entries were deleted from their stream before being written; acked away",
                count=len(batch.trimmed),
                entries=[f"{s.decode(errors='replace')}/{i.decode()}" for s, i in batch.trimmed[:10]],
            )
        log.info(
            "Processed batch",
            source=batch.source,
            entries=len(batch.entries),
            rows_written=result.inserted,
            duplicates=result.duplicates,
            dead_lettered=len(letters),
            messages_acknowledged=len(acked),
            first_id=batch.entries[0][1].decode() if batch.entries else None,
            last_id=batch.entries[-1][1].decode() if batch.entries else None,
            transform_ms=round((written - started) * 1000, 2),
            write_ms=round((committed - written) * 1000, 2),
            ack_ms=round((done - committed) * 1000, 2),
        )

    def _transform(self, batch: redis_reader.Batch) -> tuple[list, list, list]:
        """Entries -> rows; a bad entry (or one delivered too often) -> dead letter."""
        rows, sources, letters = [], [], []
        to_row, invalid, layout = self.layout.to_row, schema.InvalidEntry, self.layout
        deliveries, max_retries = batch.deliveries, self.settings.max_retries
        for entry in batch.entries:
            stream, entry_id, fields = entry
            if deliveries and deliveries.get((stream, entry_id), 1) > max_retries:
                count = deliveries[(stream, entry_id)]
                letters.append(
                    dead_letters.make(
                        layout,
                        stream,
                        entry_id,
                        fields,
                        "deliver",
                        f"delivered {count} times without being written (MAX_RETRIES={max_retries})",
                        count,
                    )
                )
                continue
            try:
                rows.append(to_row(stream, entry_id, fields))
            except invalid as exc:
                letters.append(
                    dead_letters.make(
                        layout, stream, entry_id, fields, exc.step, exc.reason, deliveries.get((stream, entry_id), 1)
                    )
                )
                continue
            sources.append(entry)
        return rows, sources, letters

    # Retries and outages

    def _retry(self, call: Callable[[], T]) -> T:
        """Retry transient errors with exponential backoff until they pass, the outage
        outlasts MAX_OUTAGE_SEC, or a stop request outlasts SHUTDOWN_TIMEOUT_SEC.

        The outage is timed per call: the loop and the read-ahead thread retry on their
        own, and a read that succeeds says nothing about a write that keeps failing."""
        since: list[float] = []  # when this call first failed

        def note_outage(state) -> None:
            self.stats.errors += 1
            if self.metrics is not None:
                self.metrics.errors.inc()
            if not since:
                since.append(time.monotonic())
            log.warning("transient error; retrying", error=str(state.outcome.exception()), attempt=state.attempt_number)

        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0),
            stop=lambda state: self._give_up(since[0] if since else None),
            sleep=self._abort.wait,  # not the stop event: a stop must not turn backoff into a busy loop
            before_sleep=note_outage,
            reraise=True,
        )
        result = retrying(call)
        if since:
            log.info("servers reachable again", outage_s=round(time.monotonic() - since[0], 1))
        return result

    def _give_up(self, failing_since: float | None) -> bool:
        now = time.monotonic()
        if self._abort.is_set() or (self._stop.is_set() and now > (self._stop_deadline or 0)):
            return True
        limit = self.settings.max_outage_sec
        return bool(limit) and failing_since is not None and now - failing_since > limit

    # Start and stop

    def stop(self, reason: str = "requested") -> None:
        """Stop reading; the batch in flight is finished (for at most SHUTDOWN_TIMEOUT_SEC)."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_sec
            self._stop.set()

    def _start(self) -> None:
        settings = self.settings
        self._redis = redis_reader.connect(settings)
        self.reader = redis_reader.StreamReader(self._redis, settings)
        self.writer = DatabaseWriter(settings)
        try:
            self._lock = ConsumerLock(
                self._redis, settings.consumer_group_name, settings.consumer_name, settings.consumer_lock_ttl_sec
            )
            self._retry(lambda: _redis_call(self._lock.acquire))
            self.writer.open()
            self._retry(lambda: self.writer.check_schema(migrations.head_revision()))
            self._retry(self.reader.refresh_streams)
        except BaseException:
            self._teardown()
            raise
        self.running = True
        log.info(
            "started",
            consumer=settings.consumer_name,
            group=settings.consumer_group_name,
            streams=len(self.reader.streams),
            table=settings.table_name,
            batch_size=settings.batch_size,
        )

    def _teardown(self) -> None:
        """Release the name first (a replacement may start), then the pool, then Redis."""
        self.running = False
        if self._lock is not None:
            self._lock.release()
        if self.writer is not None:
            self.writer.close()
        if self._redis is not None:
            self._redis.close()
        log.info("stopped", reason=self.stop_reason, **asdict(self.stats))

    # Health

    def health_check(self) -> dict:
        """{'running', 'redis', 'database', 'stats'}; never raises, safe from any thread."""
        return {
            "running": self.running,
            "redis": _redis_up(self.settings),
            "database": _database_up(self.settings),
            "consumer": self.settings.consumer_name,
            "stats": asdict(self.stats),
        }


def _ledger(settings: Settings, sources: list) -> Ledger:
    """Per stream: first and last entry id and count, of the entries that became rows."""
    ledger = Ledger(settings.consumer_group_name, settings.consumer_name)
    last_stream = None
    for stream, entry_id, _ in sources:
        if stream != last_stream:
            ledger.streams.append(stream.decode("utf-8", "backslashreplace"))
            ledger.first_ids.append(entry_id.decode())
            ledger.last_ids.append(entry_id.decode())
            ledger.counts.append(0)
            last_stream = stream
        ledger.last_ids[-1] = entry_id.decode()
        ledger.counts[-1] += 1
    return ledger


def _redis_call(call: Callable[[], T]) -> T:
    try:
        return call()
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
        raise TransientError(f"redis unavailable: {exc}") from exc


def _redis_up(settings: Settings) -> bool:
    try:
        client = redis.Redis.from_url(settings.redis_dsn, socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # health_check never raises: anything wrong means "not up"
        return False


def _database_up(settings: Settings) -> bool:
    try:
        with psycopg.connect(settings.postgres_dsn, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:  # health_check never raises
        return False


def _install_signal_handlers(service: DatabaseWriterService) -> None:
    """First SIGTERM/SIGINT: finish the batch in flight, ack, exit 0. Second: exit now;
    unacked entries stay pending and are redelivered.

    One stop often arrives twice at once (`uv run` forwards the signal that systemd or
    `timeout` also sends to the whole process group), so a repeat within a second is the
    same request, not a second one."""
    first_at: list[float] = []

    def handle(signum: int, _frame) -> None:
        now = time.monotonic()
        if first_at and now - first_at[0] > 1.0:
            service._abort.set()
            raise SystemExit(1)
        if not first_at:
            first_at.append(now)
            service.stop(signal.Signals(signum).name)
            log.info("stopping: finishing the batch in flight", signal=signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="db-writer: Redis Streams -> PostgreSQL/TimescaleDB")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run one worker (the default)")
    cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"db-writer: {exc}", file=sys.stderr)
        return 2
    if args.command not in (None, "run"):
        return cli.dispatch(args, settings)
    return run_worker(settings)


def run_worker(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    metrics = Metrics() if settings.metrics_port else None
    service = DatabaseWriterService(settings, metrics)
    if metrics is not None:
        serve_metrics(settings.metrics_port, service, metrics)
    _install_signal_handlers(service)
    try:
        service.run()
    except StartupError as exc:
        log.error("cannot start", reason=str(exc))
        print(f"db-writer: {exc}", file=sys.stderr)
        return 1
    except TransientError as exc:
        log.error("giving up", reason=service.stop_reason or str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
