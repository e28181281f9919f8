"""Bulk writes through a psycopg connection pool: one transaction per batch.

The usual batch holds only new readings, so it is binary-COPYed straight into the
table (the fast path). If the COPY meets a key that is already stored (a
redelivery) or a row the database refuses, that transaction is rolled back and
the batch takes the careful path: COPY into a temporary staging table (ON COMMIT
DROP, so it works behind PgBouncer in transaction mode), then INSERT ... SELECT
... ON CONFLICT DO NOTHING, with the batch split under savepoints to isolate rows
the database refuses. A key stored with another value is reported, never
dropped silently ("first write wins").

Either way the same transaction also upserts the sensor registry, records the
dead letters' trace rows and the ledger row: a batch is recorded entirely or not
at all. Connection problems become TransientError: the caller retries, and
nothing is acked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
import structlog
from psycopg import postgres, sql
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

import dead_letters
from config import Settings
from errors import StartupError, TransientError
from schema import COLUMN_TYPES, KEY_COLUMNS, Reading

log = structlog.get_logger("db_writer")

_COLUMNS = list(COLUMN_TYPES)
_VALUE_COLUMNS = [column for column in _COLUMNS if column not in KEY_COLUMNS]
# Refused because of the rows themselves: isolate them. ProgramLimitExceeded (54xxx, e.g. an
# index row too large) is an OperationalError in psycopg's tree, but retrying never helps.
_ROW_ERRORS = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded)
# SQLSTATE classes that pass with time: connection, transaction rollback (serialization,
# deadlock), insufficient resources, operator intervention (shutdown), system errors.
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")


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
        columns = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        self._copy_rows = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(self._table, columns)
        # Staging columns typed as in the table: a cast would keep the conflict check off its index.
        self._create_staging = sql.SQL("CREATE TEMP TABLE dbw_staging (idx int4, {}) ON COMMIT DROP").format(
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in COLUMN_TYPES.items())
        )
        # Earliest entry first, so it wins a key clash inside the batch.
        self._insert_staged = sql.SQL(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM dbw_staging ORDER BY idx"
            " ON CONFLICT DO NOTHING RETURNING {key}"
        ).format(table=self._table, columns=columns, key=sql.SQL(", ").join(map(sql.Identifier, KEY_COLUMNS)))
        # One primary-key lookup per staged row, whatever the planner thinks of the table's
        # size (LIMIT keeps the subquery from being flattened into a hash join).
        self._find_conflicts = sql.SQL(
            "SELECT s.idx, {stored} FROM dbw_staging s CROSS JOIN LATERAL (SELECT {values} FROM {table} t"
            " WHERE {same_key} LIMIT 1) t WHERE {differs}"
        ).format(
            stored=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in _VALUE_COLUMNS),
            values=sql.SQL(", ").join(map(sql.Identifier, _VALUE_COLUMNS)),
            table=self._table,
            same_key=sql.SQL(" AND ").join(sql.SQL("t.{0} = s.{0}").format(sql.Identifier(c)) for c in KEY_COLUMNS),
            differs=sql.SQL(" OR ").join(
                sql.SQL("t.{0} IS DISTINCT FROM s.{0}").format(sql.Identifier(c)) for c in _VALUE_COLUMNS
            ),
        )
        self._pool: ConnectionPool | None = None

    def open(self) -> None:
        """Open the pool; server-side prepared statements are off, for PgBouncer."""
        self._pool = ConnectionPool(
            self._settings.postgres_dsn,
            min_size=self._settings.db_pool_min_size,
            max_size=self._settings.db_pool_max_size,
            kwargs={"prepare_threshold": None, "connect_timeout": max(1, int(self._settings.db_connect_timeout_s))},
            timeout=self._settings.db_connect_timeout_s,
            open=False,
            name="db-writer",
        )
        self._pool.open(wait=False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def check_schema(self, head: str | None) -> None:
        """Refuse to start unless the schema exists and is at the migration head."""
        with self._translated("check the schema"), self._pool.connection() as conn:
            version = None
            if conn.execute("SELECT to_regclass('alembic_version')").fetchone()[0]:
                version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                version = version[0] if version else None
            table = conn.execute("SELECT to_regclass(%s)", [f'"{self._settings.table_name}"']).fetchone()[0]
        if version != head or table is None:
            where = f"at revision {version}" if version else "not migrated"
            missing = "" if table else f", table {self._settings.table_name!r} missing"
            raise StartupError(f"the database schema is {where} (head is {head}){missing}: run ./migrate.sh upgrade")

    def ping(self) -> bool:
        try:
            with psycopg.connect(self._settings.postgres_dsn, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """Turns a lost or busy database into TransientError, naming what was being done."""
        try:
            yield
        except (psycopg.Error, PoolTimeout) as exc:
            if not _is_transient(exc):
                raise
            reason = _first_line(exc)
            if isinstance(exc, PoolTimeout):  # the pool logs why it cannot connect; say it here
                reason += self._why_no_connection()
            raise TransientError(f"database unavailable ({doing}): {reason}") from exc

    def _why_no_connection(self) -> str:
        try:
            psycopg.connect(self._settings.postgres_dsn, connect_timeout=2).close()
            return ""  # it connects now: the pool was only busy
        except psycopg.Error as exc:
            return f" ({_first_line(exc)})"

    def write(
        self,
        rows: list[Reading],
        letters: list[dead_letters.DeadLetter],
        ledger: Ledger,
        on_reject: Callable[[int, str], dead_letters.DeadLetter],
    ) -> WriteResult:
        """Write rows, registry, trace rows and the ledger row in one transaction.

        `on_reject(index, reason)` makes the dead letter of a row the database refused
        or that conflicts with a stored reading; it is recorded in the same transaction
        and returned in `result.letters`."""
        with self._translated("write a batch"), self._pool.connection() as conn:
            if rows:
                try:
                    with conn.transaction():
                        self._copy_into_table(conn, rows)
                        result = WriteResult(inserted=len(rows))
                        keys = ((row.device_id, row.sensor_type, row.timestamp) for row in rows)
                        self._record(conn, keys, letters, ledger, result, len(rows) + len(letters))
                    return result
                except _ROW_ERRORS:
                    pass  # rolled back: take the careful path
            with conn.transaction():
                result, inserted_keys = self._insert_carefully(conn, rows)
                result.letters = [on_reject(index, result.reasons[index]) for index in result.rejected]
                self._record(conn, inserted_keys, letters + result.letters, ledger, result, len(rows) + len(letters))
            return result

    def _record(
        self, conn: psycopg.Connection, keys: Iterable, letters: list, ledger: Ledger, result: WriteResult, entries: int
    ) -> None:
        """Registry, dead letters and ledger, pipelined into one round trip."""
        with conn.pipeline(), conn.cursor() as cur:
            self._register_sensors(cur, keys)
            if letters:
                self._insert_dead_letters(cur, letters, ledger)
            self._insert_ledger(cur, ledger, entries, result.inserted)

    # Rows

    def _copy_into_table(self, conn: psycopg.Connection, rows: list[Reading]) -> None:
        with _json_text_cursor(conn) as cur, cur.copy(self._copy_rows) as copy:
            copy.set_types(list(COLUMN_TYPES.values()))
            for row in rows:
                copy.write_row(row)

    def _insert_carefully(self, conn: psycopg.Connection, rows: list[Reading]) -> tuple[WriteResult, list]:
        """Staging table, ON CONFLICT DO NOTHING, and savepoints to isolate refused rows."""
        result, inserted_keys = WriteResult(), []
        if not rows:
            return result, inserted_keys
        conn.execute(self._create_staging)
        pending = [list(range(len(rows)))]
        staged = False  # rows of a part that committed to its savepoint stay in staging
        while pending:
            indexes = pending.pop()
            try:
                with conn.transaction():  # a savepoint: a refused part is undone alone
                    if staged:
                        conn.execute("DELETE FROM dbw_staging")
                    keys, conflicts = self._stage_and_insert(conn, rows, indexes)
            except _ROW_ERRORS as exc:
                if len(indexes) == 1:
                    result.rejected.append(indexes[0])
                    result.reasons[indexes[0]] = f"database rejected the row: {exc.diag.message_primary or exc}"
                else:
                    half = len(indexes) // 2
                    pending += [indexes[half:], indexes[:half]]
                continue
            staged = True
            inserted_keys += keys
            for index, *stored in conflicts:
                result.rejected.append(index)
                result.reasons[index] = _conflict_reason(rows[index], dict(zip(_VALUE_COLUMNS, stored, strict=True)))
            result.duplicates += len(indexes) - len(keys) - len(conflicts)
        result.inserted = len(inserted_keys)
        result.rejected.sort()
        return result, inserted_keys

    def _stage_and_insert(self, conn: psycopg.Connection, rows: list[Reading], indexes: list[int]) -> tuple[list, list]:
        with _json_text_cursor(conn) as cur:
            with cur.copy("COPY dbw_staging FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", *COLUMN_TYPES.values()])
                for index in indexes:
                    copy.write_row((index, *rows[index]))
            keys = cur.execute(self._insert_staged).fetchall()
            if len(keys) == len(indexes):
                return keys, []
            # Some keys were stored already: a redelivery (same value) or a different reading.
            return keys, cur.execute(self._find_conflicts).fetchall()

    # Registry, trace rows and ledger

    def _register_sensors(self, cur: psycopg.Cursor, keys: Iterable[tuple[str, str, datetime]]) -> None:
        """One upsert per sensor of the batch, counting only rows actually inserted; in key
        order, so concurrent workers lock registry rows in the same order."""
        seen: dict[tuple[str, str], list] = {}
        for device, sensor, ts in keys:
            span = seen.get((device, sensor))
            if span is None:
                seen[(device, sensor)] = [ts, ts, 1]
            else:
                if ts < span[0]:
                    span[0] = ts
                elif ts > span[1]:
                    span[1] = ts
                span[2] += 1
        if not seen:
            return
        ordered = sorted(seen.items())
        cur.execute(
            "INSERT INTO db_writer_sensors AS s (device_id, sensor_type, first_seen, last_seen, readings)"
            " SELECT * FROM unnest(%b::varchar[], %b::varchar[], %b::timestamptz[], %b::timestamptz[], %b::int8[])"
            " ON CONFLICT (device_id, sensor_type) DO UPDATE SET"
            " first_seen = least(s.first_seen, excluded.first_seen),"
            " last_seen = greatest(s.last_seen, excluded.last_seen),"
            " readings = s.readings + excluded.readings, last_written_at = now()",
            [
                [k[0] for k, _ in ordered],
                [k[1] for k, _ in ordered],
                [v[0] for _, v in ordered],
                [v[1] for _, v in ordered],
                [v[2] for _, v in ordered],
            ],
        )

    def _insert_dead_letters(self, cur: psycopg.Cursor, letters: list, ledger: Ledger) -> None:
        cur.executemany(
            "INSERT INTO db_writer_dead_letters (failed_at, original_stream, original_id, device_id,"
            " sensor_type, value, step, error, consumer_group, consumer, delivery_count, fields)"
            " VALUES (to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    letter.failed_at,
                    letter.original_stream,
                    letter.original_id,
                    letter.device_id,
                    letter.sensor_type,
                    letter.value,
                    letter.step,
                    letter.error,
                    ledger.consumer_group,
                    ledger.consumer,
                    letter.delivery_count,
                    Jsonb(letter.fields),
                )
                for letter in letters
            ],
        )

    def _insert_ledger(self, cur: psycopg.Cursor, ledger: Ledger, entries: int, inserted: int) -> None:
        cur.execute(
            "INSERT INTO db_writer_batches (consumer_group, consumer, entries, rows_inserted,"
            " streams, first_ids, last_ids, counts) VALUES (%s, %s, %s, %s, %b, %b, %b, %b)",  # binary arrays: no escaping
            [
                ledger.consumer_group,
                ledger.consumer,
                entries,
                inserted,
                ledger.streams,
                ledger.first_ids,
                ledger.last_ids,
                ledger.counts,
            ],
        )


def _conflict_reason(row: Reading, stored: dict) -> str:
    """Why a reading is refused when its key is stored already, naming what differs."""
    ours = row._asdict()
    if "value" in stored and stored["value"] != ours["value"]:
        return f"a reading for this device, sensor and timestamp is already stored with value {stored['value']!r}"
    differs = ", ".join(column for column, value in stored.items() if value != ours[column])
    return f"a reading for this device, sensor and timestamp is already stored with another {differs or 'content'}"


def _json_text_cursor(conn: psycopg.Connection) -> psycopg.Cursor:
    cur = conn.cursor()
    cur.adapters.register_dumper(_JsonText, _JsonTextDumper)  # metadata is JSON text already
    return cur


class _JsonText(str):
    """Marks nothing at run time: only registers _JsonTextDumper for the jsonb OID."""


class _JsonTextDumper(Dumper):
    """Binary jsonb from JSON text that schema.py already validated: no re-serialising."""

    format = Format.BINARY
    oid = postgres.types["jsonb"].oid

    def dump(self, obj: str) -> bytes:
        return b"\x01" + obj.encode()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, PoolTimeout):
        return True
    state = getattr(exc, "sqlstate", None)
    if state is None:  # no server answer at all: the connection failed or was lost
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith(_TRANSIENT_CLASSES)
