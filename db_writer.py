"""Bulk writes through a psycopg connection pool: one transaction per batch.

A batch is binary-COPYed into a temporary staging table (ON COMMIT DROP, so it
works behind PgBouncer in transaction mode) and moved with INSERT ... SELECT
... ON CONFLICT DO NOTHING: a redelivered entry is a no-op. In the same
transaction go the dead letters' trace rows and the ledger row, so a batch is
either entirely recorded or not at all.

Rows the database rejects (DataError, IntegrityError) are isolated by splitting
the batch under savepoints; they become dead letters and the rest commits.
A reading whose key is already stored with another value is a dead letter too
("first write wins"): it is never dropped silently.
Connection problems become TransientError: the caller retries, nothing is acked.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterator

import psycopg
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

import dead_letters
from config import Settings
from errors import StartupError, TransientError

log = structlog.get_logger("db_writer")

Row = tuple[datetime, str, str, float, "str | None"]
_STAGING_COLUMNS = ["int4", "timestamptz", "varchar", "varchar", "float8", "text"]
_TRANSIENT = (psycopg.OperationalError, PoolTimeout, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
_ROW_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


@dataclass
class Ledger:
    """What the batch row in db_writer_batches says about one batch."""

    consumer_group: str
    consumer: str
    streams: list[str] = field(default_factory=list)
    first_ids: list[str] = field(default_factory=list)
    last_ids: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


@dataclass
class WriteResult:
    inserted: int = 0
    duplicates: int = 0  # already stored with the same value: a redelivery
    rejected: list[int] = field(default_factory=list)  # indexes into rows, with reasons below
    reasons: dict[int, str] = field(default_factory=dict)
    letters: list[dead_letters.DeadLetter] = field(default_factory=list)


class DatabaseWriter:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._table = sql.Identifier(settings.table_name)
        # One statement: move staged rows into the table (earliest entry first, so it wins
        # a key clash), register the sensors of the rows actually inserted (in key order,
        # so concurrent workers lock registry rows in the same order), count the inserts.
        self._insert = sql.SQL(
            "WITH inserted AS ("
            " INSERT INTO {} (timestamp, device_id, sensor_type, value, metadata)"
            " SELECT ts, device_id, sensor_type, value, metadata::jsonb FROM dbw_staging ORDER BY idx"
            " ON CONFLICT DO NOTHING RETURNING device_id, sensor_type, timestamp"
            "), registered AS ("
            " INSERT INTO db_writer_sensors AS s (device_id, sensor_type, first_seen, last_seen, readings)"
            " SELECT device_id, sensor_type, min(timestamp), max(timestamp), count(*) FROM inserted"
            " GROUP BY 1, 2 ORDER BY 1, 2"
            " ON CONFLICT (device_id, sensor_type) DO UPDATE SET"
            " first_seen = least(s.first_seen, excluded.first_seen),"
            " last_seen = greatest(s.last_seen, excluded.last_seen),"
            " readings = s.readings + excluded.readings, last_written_at = now()"
            ") SELECT count(*) FROM inserted"
        ).format(self._table)
        self._pool: ConnectionPool | None = None

    def open(self) -> None:
        """Open the pool; server-side prepared statements are off, for PgBouncer."""
        self._pool = ConnectionPool(
            self._settings.postgres_dsn,
            min_size=self._settings.db_pool_min_size,
            max_size=self._settings.db_pool_max_size,
            kwargs={"prepare_threshold": None, "connect_timeout": max(1, int(self._settings.db_connect_timeout_s))},
            timeout=self._settings.db_connect_timeout_s,
            check=ConnectionPool.check_connection,
            open=False,
            name="db-writer",
        )
        self._pool.open(wait=False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def check_schema(self, head: str | None) -> None:
        """Refuse to start unless the schema exists and is at the migration head."""
        with _translated("check the schema"), self._pool.connection() as conn:
            version = None
            if conn.execute("SELECT to_regclass('alembic_version')").fetchone()[0]:
                version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                version = version[0] if version else None
            table = conn.execute("SELECT to_regclass(%s)", [f'"{self._settings.table_name}"']).fetchone()[0]
        if version != head or table is None:
            where = f"at revision {version}" if version else "not migrated"
            missing = "" if table else f", table {self._settings.table_name!r} missing"
            raise StartupError(
                f"the database schema is {where} (head is {head}){missing}: run ./migrate.sh upgrade"
            )

    def ping(self) -> bool:
        try:
            with psycopg.connect(self._settings.postgres_dsn, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def write(
        self,
        rows: list[Row],
        letters: list[dead_letters.DeadLetter],
        ledger: Ledger,
        on_reject: Callable[[int, str], dead_letters.DeadLetter],
    ) -> WriteResult:
        """Write rows, trace rows and the ledger row in one transaction.

        `on_reject(index, reason)` makes the dead letter of a row the database refused
        or that conflicts with a stored reading; it is recorded in the same transaction
        and returned in `result.letters`."""
        with _translated("write a batch"), self._pool.connection() as conn, conn.transaction():
            result = self._insert_rows(conn, rows)
            result.letters = [on_reject(index, result.reasons[index]) for index in result.rejected]
            self._insert_dead_letters(conn, letters + result.letters, ledger)
            self._insert_ledger(conn, ledger, len(rows) + len(letters), result.inserted)
        return result

    # Rows

    def _insert_rows(self, conn: psycopg.Connection, rows: list[Row]) -> WriteResult:
        result = WriteResult()
        if not rows:
            return result
        conn.execute(
            # Key columns typed as in the table: a cast would keep the conflict check off its index.
            "CREATE TEMP TABLE dbw_staging (idx int4, ts timestamptz, device_id varchar, sensor_type varchar,"
            " value float8, metadata text) ON COMMIT DROP"
        )
        pending = [list(range(len(rows)))]
        staged = False  # rows of a part that committed to its savepoint stay in staging
        while pending:
            indexes = pending.pop()
            try:
                with conn.transaction():  # a savepoint: a rejected part is undone alone
                    if staged:
                        conn.execute("DELETE FROM dbw_staging")
                    inserted, conflicts = self._copy_and_insert(conn, rows, indexes)
            except _ROW_ERRORS as exc:
                if len(indexes) == 1:
                    result.rejected.append(indexes[0])
                    result.reasons[indexes[0]] = f"database rejected the row: {exc.diag.message_primary or exc}"
                else:
                    half = len(indexes) // 2
                    pending += [indexes[half:], indexes[:half]]
                continue
            staged = True
            result.inserted += inserted
            for index, stored in conflicts:
                result.rejected.append(index)
                result.reasons[index] = (
                    f"a reading for this device, sensor and timestamp is already stored with value {stored!r}"
                )
            result.duplicates += len(indexes) - inserted - len(conflicts)
        result.rejected.sort()
        return result

    def _copy_and_insert(self, conn: psycopg.Connection, rows: list[Row], indexes: list[int]) -> tuple[int, list]:
        with conn.cursor() as cur:
            with cur.copy("COPY dbw_staging FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_STAGING_COLUMNS)
                for index in indexes:
                    copy.write_row((index, *rows[index]))
            cur.execute(self._insert)
            inserted = cur.fetchone()[0]
            if inserted == len(indexes):
                return inserted, []
            # Some keys were stored already: a redelivery (same value) or a different reading.
            cur.execute(
                sql.SQL(
                    # One primary-key lookup per staged row, whatever the planner thinks of the
                    # table's size (LIMIT keeps the subquery from being flattened into a hash join).
                    "SELECT s.idx, t.value FROM dbw_staging s CROSS JOIN LATERAL ("
                    " SELECT value, metadata FROM {} WHERE device_id = s.device_id"
                    " AND sensor_type = s.sensor_type AND timestamp = s.ts LIMIT 1) t"
                    " WHERE t.value IS DISTINCT FROM s.value OR t.metadata IS DISTINCT FROM s.metadata::jsonb"
                ).format(self._table)
            )
            return inserted, cur.fetchall()

    # Trace rows and ledger

    def _insert_dead_letters(self, conn: psycopg.Connection, letters: list, ledger: Ledger) -> None:
        if not letters:
            return
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO db_writer_dead_letters (failed_at, original_stream, original_id, device_id,"
                " sensor_type, value, step, error, consumer_group, consumer, delivery_count, fields)"
                " VALUES (to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        letter.failed_at, letter.original_stream, letter.original_id,
                        letter.device_id, letter.sensor_type, letter.value, letter.step,
                        letter.error.replace("\x00", "\\x00"), ledger.consumer_group,
                        ledger.consumer, letter.delivery_count, Jsonb(letter.fields),
                    )
                    for letter in letters
                ],
            )

    def _insert_ledger(self, conn: psycopg.Connection, ledger: Ledger, entries: int, inserted: int) -> None:
        conn.execute(
            "INSERT INTO db_writer_batches (consumer_group, consumer, entries, rows_inserted,"
            " streams, first_ids, last_ids, counts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [ledger.consumer_group, ledger.consumer, entries, inserted,
             ledger.streams, ledger.first_ids, ledger.last_ids, ledger.counts],
        )


@contextmanager
def _translated(doing: str) -> Iterator[None]:
    """Turns a lost or busy database into TransientError, naming what was being done."""
    try:
        yield
    except _TRANSIENT as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TransientError(f"database unavailable ({doing}): {first_line}") from exc
