"""Pooled sessions that a server left behind: after their server ended them or turned
read-only, the writer's next attempts reach a live, writable session within seconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from db_writer import LITERAL_SENSORS, RENEW_AFTER_S, DatabaseWriter
from errors import TransientError
from schema import Reading
from test_pipeline import settings_for


def _database(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])


def _terminate(url: str, consumer: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return len(
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                [f"db-writer {consumer}"],
            ).fetchall()
        )


def _first_write(writer: DatabaseWriter, within_s: float) -> tuple[float, list[str]]:
    """Seconds until a transaction that writes commits, and the errors met on the way."""
    errors: list[str] = []
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        try:
            with writer.transaction("write") as (conn, _):
                conn.execute("CREATE TABLE written (x int)")
                conn.execute("DROP TABLE written")
            return time.monotonic() - started, errors
        except TransientError as exc:
            errors.append(str(exc))
            time.sleep(0.1)
    pytest.fail(f"no write within {within_s} s: {errors[-3:]}")


def _read_only_setting(writer: DatabaseWriter) -> str:
    for _ in range(50):
        try:
            with writer.transaction("look") as (conn, _):
                return conn.execute("SHOW default_transaction_read_only").fetchone()[0]
        except TransientError:  # a session the termination ended
            time.sleep(0.1)
    pytest.fail("no session answered")


@pytest.fixture
def writer(redis_url, migrated_database_url):
    settings = settings_for(
        redis_url, migrated_database_url, consumer_name="sessions-test", db_pool_min_size=2, db_pool_max_size=2
    )
    writer = DatabaseWriter(settings)
    writer.open()
    writer.server()  # the pool has live sessions
    yield writer
    writer.close()


def test_one_thread_s_transactions_run_on_the_session_it_used_last(writer):
    """Two idle sessions in the pool (as after a start, when the reconciliation ran beside the
    loop): the loop's batches go on one server process, not on each in turn."""
    time.sleep(0.5)  # both pooled sessions connected
    with writer.transaction("one") as (first, _), writer.transaction("another at once") as (second, _):
        pids = {first.info.backend_pid, second.info.backend_pid}
    assert len(pids) == 2
    used = []
    for _ in range(6):
        with writer.transaction("a batch") as (conn, _):
            used.append(conn.info.backend_pid)
    assert len(set(used)) == 1, used
    assert used[0] in pids


def test_sessions_ended_by_the_server_are_replaced_at_once(writer, migrated_database_url):
    time.sleep(0.5)  # both pooled sessions connected
    assert _terminate(migrated_database_url, "sessions-test") >= 1
    took, errors = _first_write(writer, within_s=5)
    assert took < RENEW_AFTER_S + 1.0, (took, errors)


def test_a_server_that_turned_writable_again_is_written_to_without_a_restart(writer, migrated_database_url):
    """default_transaction_read_only turned off again applies only to new sessions: the ones
    opened while it was on stay read-only for good unless the pool is renewed."""
    name = sql.Identifier(_database(migrated_database_url))
    with psycopg.connect(migrated_database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
        _terminate(migrated_database_url, "sessions-test")
        time.sleep(RENEW_AFTER_S)  # the pool renewed after the termination may be renewed again
        assert _read_only_setting(writer) == "on"  # the pool now holds sessions opened read-only
        admin.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(name))
    took, errors = _first_write(writer, within_s=10)
    assert any("read-only" in error for error in errors), errors
    assert took < 2 * RENEW_AFTER_S + 1.0, (took, errors)


def test_writing_resumes_at_once_when_a_refusing_server_answers_again(redis_url, migrated_database_url):
    """psycopg_pool's own reconnection backs off 1, 2, 4 s: a writer that waited on it wrote
    again up to 2.5 s after the server was back. It connects directly while the server is
    lost, so the first attempt after the server answers writes."""
    from fault_proxy import FaultProxy

    host, port = "127.0.0.1", psycopg.conninfo.conninfo_to_dict(migrated_database_url).get("port") or 5432
    with FaultProxy(host, int(port)) as proxy:
        settings = settings_for(redis_url, proxy.url_for(migrated_database_url), consumer_name="refused-test")
        writer = DatabaseWriter(settings)
        writer.open()
        try:
            writer.server()
            proxy.refuse()
            failures: list[float] = []
            refused_until = time.monotonic() + 5
            while time.monotonic() < refused_until:  # retries as the service makes them, a second apart
                started = time.monotonic()
                with pytest.raises(TransientError):
                    writer.server()
                failures.append(time.monotonic() - started)
                time.sleep(1)
            proxy.restore()
            started = time.monotonic()
            writer.server()
            took = time.monotonic() - started
        finally:
            writer.close()
    assert max(failures[1:]) < 0.5, failures  # each retry fails at once, not after the pool's wait
    assert took < 0.5, took  # the first attempt after the server is back gets through


def test_a_transaction_stalled_behind_a_live_proxy_is_cut_and_retried(redis_url, migrated_database_url):
    """A proxy (or pooler) that holds the bytes back keeps TCP alive, so neither keepalives
    nor tcp_user_timeout fire, and the server waits for the client: without a bound of
    its own the worker waited for ever (seen in the benchmark behind a delaying proxy)."""
    import threading

    from db_writer import STALL_MIN_S
    from fault_proxy import FaultProxy

    port = psycopg.conninfo.conninfo_to_dict(migrated_database_url).get("port") or 5432
    with FaultProxy("127.0.0.1", int(port)) as proxy:
        settings = settings_for(
            redis_url, proxy.url_for(migrated_database_url), consumer_name="stall-test", db_statement_timeout_sec=1
        )
        writer = DatabaseWriter(settings)
        writer.open()
        try:
            writer.server()
            proxy.blackhole()
            outcome: list[BaseException | None] = []

            def call() -> None:
                try:
                    writer.server()
                    outcome.append(None)
                except BaseException as exc:
                    outcome.append(exc)

            started = time.monotonic()
            caller = threading.Thread(target=call, daemon=True)
            caller.start()
            caller.join(STALL_MIN_S + 5)
            took = time.monotonic() - started
            assert outcome, "the stalled transaction was never cut"
            assert isinstance(outcome[0], TransientError), outcome
            assert STALL_MIN_S - 0.5 <= took <= STALL_MIN_S + 2.5, took
            proxy.restore()
            _first_write(writer, within_s=5)  # a fresh connection writes
        finally:
            writer.close()


def test_a_transaction_costs_two_round_trips_and_its_timeouts_end_with_it(redis_url, migrated_database_url, tmp_path):
    """BEGIN goes with the statement that sets the worker's timeouts and identifies the server
    (one round trip), then COMMIT: a worker on another machine pays each round trip once a
    transaction. The timeouts are SET LOCAL: a session handed on (PgBouncer) keeps none."""
    settings = settings_for(
        redis_url,
        migrated_database_url,
        consumer_name="round-trips-test",
        db_pool_min_size=1,
        db_pool_max_size=1,
        db_lock_timeout_sec=7,
    )
    writer = DatabaseWriter(settings)
    writer.open()
    trace = tmp_path / "trace"
    try:
        with trace.open("wb") as out:
            with writer._pool.connection() as conn:  # the pool's only session
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            with writer.transaction("look") as (conn, _):
                inside = conn.execute("SHOW lock_timeout").fetchone()[0]
            with writer._pool.connection() as conn:
                conn.pgconn.untrace()
                after = conn.execute("SHOW lock_timeout").fetchone()[0]
    finally:
        writer.close()
    sent = [line.split("\t")[2] for line in trace.read_text().splitlines() if line.startswith("F")]
    waits = sum(1 for line in trace.read_text().splitlines() if "\tReadyForQuery\t" in line)
    assert inside == "7s" and after == "0"
    # BEGIN + settings, SHOW, COMMIT: three round trips, of which the transaction's own are two
    assert waits == 3, trace.read_text()
    assert sent == ["Query", "Query", "Query"], trace.read_text()


@pytest.mark.parametrize("sensors", [3, LITERAL_SENSORS + 1])
def test_a_batch_registers_its_sensors_exactly_and_the_usual_one_does_so_with_its_commit(
    redis_url, migrated_database_url, tmp_path, sensors
):
    """A batch of a few sensors and no dead letters sends its registry upsert in one query
    with the COMMIT (values as literals: names that need quoting come through as they are);
    a larger one pipelines it with binary values, then commits. Both count the same."""
    consumer = f"registry-{sensors}"
    settings = settings_for(redis_url, migrated_database_url, consumer_name=consumer, db_pool_max_size=1)
    names = [(f"dev'{k}\\\"{{x}},", f"s {k} %s") for k in range(sensors)]
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def batch(first: int) -> list[Reading]:
        return [
            Reading(start + timedelta(seconds=first + n), device, sensor, 1.0, None)
            for device, sensor in names
            for n in range(3)
        ]

    writer = DatabaseWriter(settings)
    writer.open()
    trace = tmp_path / "trace"
    try:
        writer.write(batch(0), [], lambda i, r: pytest.fail(r))
        with trace.open("wb") as out:
            with writer._pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            result = writer.write(batch(10), [], lambda i, r: pytest.fail(r))
            with writer._pool.connection() as conn:
                conn.pgconn.untrace()
    finally:
        writer.close()
    assert result.inserted == 3 * sensors
    with psycopg.connect(migrated_database_url) as conn:
        registry = conn.execute(
            "SELECT device_id, sensor_type, first_seen, last_seen, readings FROM db_writer_sensors WHERE consumer = %s",
            [consumer],
        ).fetchall()
    assert sorted(registry) == sorted((d, s, start, start + timedelta(seconds=12), 6) for d, s in names)
    lines = trace.read_text().splitlines()
    waits = sum(1 for line in lines if "\tReadyForQuery\t" in line)
    commits = [line for line in lines if line.startswith("F") and "COMMIT" in line]
    # BEGIN + settings, COPY, then the registry with the COMMIT (3); or the registry pipelined, then COMMIT (4)
    assert waits == (3 if sensors <= LITERAL_SENSORS else 4), trace.read_text()
    assert len(commits) == 1 and ("INSERT INTO db_writer_sensors" in commits[0]) == (sensors <= LITERAL_SENSORS)
