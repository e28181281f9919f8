"""Bulk writes through a psycopg connection pool: one transaction per batch.

The usual batch holds only new readings, so it is binary-COPYed straight into the
table (the fast path). If the COPY meets a key that is already stored (a
redelivery) or a row the database refuses, that transaction is rolled back and
the batch takes the careful path: COPY into a temporary staging table (ON COMMIT
DROP, so it works behind PgBouncer in transaction mode), then INSERT ... SELECT
... ON CONFLICT DO NOTHING, with the batch split under savepoints to isolate rows
the database refuses. A key stored with another value is reported, never
dropped silently ("first write wins").

Either way the same transaction also upserts this worker's sensor-registry rows and
records the dead letters (one per entry, whatever the redeliveries): a batch is recorded
entirely or not at all. Nothing in it is shared with another worker, so no worker ever
waits for another's commit. Every transaction starts with SET LOCAL timeouts (a statement,
a lock wait, an idle transaction) and reads which server it is on, so a failover is
noticed at the first batch after it.

How an error is classified lives here (`classify`): a lost or busy server is transient
(retried, nothing acked); an error raised for some rows (a data error, a constraint, a
user's trigger or rule) is isolated to those rows, which become dead letters; anything
else says nothing about the rows and is retried too, never turned into dead letters.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg import postgres, sql
from psycopg.adapt import Dumper, PyFormat
from psycopg.pq import Format, TransactionStatus
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

import dead_letters
from config import Settings, mask_url
from errors import LockTimeout, PermanentAtStart, Refused, StartupError, TransientError
from schema import COLUMN_TYPES, KEY_COLUMNS, Reading

log = structlog.get_logger("db_writer")

_COLUMNS = list(COLUMN_TYPES)
_VALUE_COLUMNS = [column for column in _COLUMNS if column not in KEY_COLUMNS]

# SQLSTATE classes raised because of particular rows: data exceptions, integrity constraints,
# program limits (an index row too large), and what a table's own logic raises for a row:
# PL/pgSQL RAISE, routine and trigger errors, WITH CHECK OPTION, triggered actions.
_ROW_CLASSES = ("22", "23", "54", "P0", "2F", "38", "39", "44", "27", "09")
# Classes and states that pass with time: connection, transaction rollback (serialization,
# deadlock), insufficient resources, operator intervention (shutdown, cancel), system and
# internal errors, a read-only server (a standby, or default_transaction_read_only),
# a lock timeout, a transaction killed for idling, recovery in progress, an object in use.
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58", "F0", "XX")
_TRANSIENT_STATES = {"25006", "25P03", "55P03", "55000", "55006"}
# At start-up these will not pass by waiting: fix the setting.
_PERMANENT_AT_START = {
    "28000": "the server refused the user",
    "28P01": "the server refused the password",
    "3D000": "the database does not exist",
    "42704": "a role does not exist",
}
# After these the pooled sessions are worth nothing: the server went away, is shutting down
# or starting, turned read-only (a standby, or default_transaction_read_only), or ended one.
_SESSIONS_LOST_STATES = {"25006", "25P03", "57P01", "57P02", "57P03"}
RENEW_AFTER_S = 1.0  # at most one new pool a second, however many calls fail at once
LITERAL_SENSORS = 64  # a batch of at most this many sensors sends its registry upsert with the COMMIT
# One upsert per sensor of the batch into this worker's own registry rows, counting only rows
# actually inserted. No other worker writes these rows: nothing to wait for. Its values are
# (consumer, device ids, sensor types, first seen, last seen, counts), bound or as literals.
_REGISTRY = (
    "INSERT INTO db_writer_sensors AS s (device_id, sensor_type, consumer, first_seen, last_seen, readings)"
    " SELECT d, t, {}::varchar, f, l, n FROM unnest({}::varchar[], {}::varchar[], {}::timestamptz[],"
    " {}::timestamptz[], {}::int8[]) AS u(d, t, f, l, n)"
    " ON CONFLICT (device_id, sensor_type, consumer) DO UPDATE SET"
    " first_seen = least(s.first_seen, excluded.first_seen),"
    " last_seen = greatest(s.last_seen, excluded.last_seen),"
    " readings = s.readings + excluded.readings, last_written_at = now()"
)
STALL_MIN_S = 5.0  # a transaction is cut after max(this, 2 x DB_STATEMENT_TIMEOUT_SEC)


def classify(exc: BaseException) -> str:
    """'transient', 'rows' (isolate the rows) or 'refused' (says nothing about the rows)."""
    if isinstance(exc, PoolTimeout):
        return "transient"
    state = getattr(exc, "sqlstate", None)
    if state is None:  # no server answer at all: the connection failed or was lost
        return "transient" if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) else "refused"
    if state in _TRANSIENT_STATES or state.startswith(_TRANSIENT_CLASSES):
        return "transient"
    if state.startswith(_ROW_CLASSES):
        return "rows"
    return "refused"


@dataclass(frozen=True)
class Server:
    """Which PostgreSQL server a transaction ran on: a promoted standby keeps the system
    identifier and starts a new timeline; another cluster has another identifier."""

    system_identifier: int
    timeline: int

    def __str__(self) -> str:
        return f"system {self.system_identifier}, timeline {self.timeline}"


@dataclass
class WriteResult:
    inserted: int = 0
    duplicates: int = 0  # already stored with the same value: a redelivery
    rejected: list[int] = field(default_factory=list)  # indexes into rows, with reasons below
    reasons: dict[int, str] = field(default_factory=dict)
    letters: list[dead_letters.DeadLetter] = field(default_factory=list)  # made for rejected rows
    new_letters: int = 0  # dead letters recorded for the first time (not redeliveries)
    server: Server | None = None
    duplicate_rows: set[int] = field(default_factory=set)  # indexes of the duplicates (careful path only)


class _NewestFirst(deque):
    """Idle connections, handed out newest first: psycopg_pool takes them with popleft()."""

    def popleft(self) -> Any:
        return self.pop()


class _NewestFirstPool(ConnectionPool):
    """A pool that hands out the connection returned last, as PgBouncer does by default
    (`server_round_robin = 0`). psycopg_pool hands out the one idle longest: a worker whose
    pool once grew to two connections (its reconciliation runs beside the loop at start)
    then alternates between two server processes batch after batch, each with colder caches
    (measured in docs/SCALING.md). A shrink, after `max_idle` with a connection unused, closes
    the newest; the other takes over."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = _NewestFirst()


class DatabaseWriter:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer = settings.consumer_name
        self._group = settings.consumer_group_name
        self._table = sql.Identifier(settings.table_name)
        columns = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        self._copy_rows = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(self._table, columns)
        # Staging columns typed as in the table: a cast would keep the conflict check off its index.
        self._create_staging = sql.SQL("CREATE TEMP TABLE dbw_staging (idx int4, {}) ON COMMIT DROP").format(
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in COLUMN_TYPES.items())
        )
        self._registry_bound = sql.SQL(_REGISTRY).format(*[sql.Placeholder(format=PyFormat.BINARY)] * 6)
        self._registry_parts = [part.encode() for part in _REGISTRY.split("{}")]
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
        # BEGIN, this worker's timeouts and which server this is, in one round trip (a simple
        # query, so the values are literals). SET LOCAL: nothing outlives the transaction,
        # so PgBouncer's transaction pooling is safe.
        timeouts = [
            settings.db_statement_timeout_sec,
            settings.db_lock_timeout_sec,
            settings.db_idle_in_transaction_timeout_sec,
        ]
        self._begin = sql.SQL(
            "BEGIN; SELECT set_config('statement_timeout', {}, true), set_config('lock_timeout', {}, true),"
            " set_config('idle_in_transaction_session_timeout', {}, true),"
            " (pg_control_system()).system_identifier,"
            " CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END"
        ).format(*(sql.Literal(f"{round(seconds * 1000)}ms") for seconds in timeouts))
        self._pool: ConnectionPool | None = None
        self._renew_lock = threading.Lock()
        self._renewed = 0.0
        self._down = False  # the server was lost: connect directly before trusting the pool again
        timeout = settings.db_statement_timeout_sec
        self._stall_after_s = max(STALL_MIN_S, 2 * timeout) if timeout else None
        self._open_transactions: dict[int, tuple[float, psycopg.Connection]] = {}  # id -> (deadline, conn)
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()

    def open(self) -> None:
        self._pool = self._new_pool()
        if self._stall_after_s and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="db-writer-watchdog", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        """Cut the connection of a transaction that outlived its bound. The server's own
        timeouts cannot end every stall: statement_timeout is not applied while the server
        waits for the client (a COPY whose data a middlebox holds back), and TCP timeouts do not
        fire while a live proxy or pooler acknowledges the bytes. Shutting the socket down
        wakes the waiting call with a lost-connection error: retried on a fresh pool."""
        while not self._closed.wait(1.0):
            now = time.monotonic()
            for key, (deadline, conn) in list(self._open_transactions.items()):
                if now < deadline or self._open_transactions.pop(key, None) is None:
                    continue
                log.error(
                    "database transaction stalled; cutting its connection",
                    after_s=self._stall_after_s,
                    server=mask_url(self._settings.postgres_dsn),
                )
                _shutdown(conn)

    def _new_pool(self) -> ConnectionPool:
        """Server-side prepared statements are off, for PgBouncer. Autocommit: transaction()
        sends BEGIN itself, with the statement that follows it (psycopg's would be a round
        trip of its own)."""
        pool = _NewestFirstPool(
            self._settings.postgres_dsn,
            min_size=self._settings.db_pool_min_size,
            max_size=self._settings.db_pool_max_size,
            kwargs={"prepare_threshold": None, "autocommit": True, **self._settings.postgres_connect_kwargs},
            timeout=self._settings.db_connect_timeout_s,
            open=False,
            name="db-writer",
        )
        pool.open(wait=False)
        return pool

    def renew(self, force: bool = False) -> None:
        """Replace the pool after its server was lost. psycopg_pool would keep the sessions a
        promotion or a read-only switch left behind, and reconnect with a backoff that grew
        during the outage (tens of seconds); a new pool connects at the first call."""
        with self._renew_lock:
            if self._pool is None or (not force and time.monotonic() - self._renewed < RENEW_AFTER_S):
                return
            self._renewed = time.monotonic()
            old, self._pool = self._pool, self._new_pool()
        # Its workers may sit in a connect to a silent server: close it off the caller's path.
        # Connections still in use are closed when they come back to it.
        threading.Thread(target=old.close, kwargs={"timeout": 5}, name="db-writer-old-pool", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        if self._pool is not None:
            self._pool.close(timeout=1)

    @contextmanager
    def _watched(self, conn: psycopg.Connection) -> Iterator[None]:
        if self._stall_after_s is None:
            yield
            return
        key = id(conn)
        self._open_transactions[key] = (time.monotonic() + self._stall_after_s, conn)
        try:
            yield
        finally:
            self._open_transactions.pop(key, None)

    @contextmanager
    def transaction(
        self, doing: str, timeout_s: float | None = None, row_errors: bool = False
    ) -> Iterator[tuple[psycopg.Connection, Server]]:
        """A pooled connection in a transaction with this worker's timeouts; errors translated
        (row errors pass through untranslated only with `row_errors`: the writer isolates
        them). `timeout_s` bounds the wait for a connection (a stop in progress has little time).
        The body may end the transaction itself with a last query that ends in COMMIT (write()
        does): the session is autocommit, so nothing may follow that query in the body."""
        assert self._pool is not None, "open() first"
        if self._down and (timeout_s is None or timeout_s >= self._settings.db_connect_timeout_s):
            with self._translated(doing, row_errors, renew=False):
                self._probe()  # (a stop with little time left waits on the pool instead: bounded)
        with (
            self._translated(doing, row_errors),
            self._pool.connection(timeout=timeout_s) as conn,
            self._watched(conn),
        ):
            try:
                cur = conn.execute(self._begin)
                cur.nextset()
                _, _, _, system_id, walfile = cur.fetchone() or (None,) * 5
                if walfile is None:
                    raise psycopg.errors.ReadOnlySqlTransaction("the server is a standby (in recovery)")
                yield conn, Server(int(system_id), int(walfile[:8], 16))
                status = conn.info.transaction_status
                if status == TransactionStatus.INERROR:  # a COMMIT would roll back, silently
                    raise psycopg.errors.InFailedSqlTransaction("the transaction failed before its commit")
                if status == TransactionStatus.INTRANS:  # (IDLE: the body's last query ended with COMMIT)
                    conn.execute("COMMIT")
            except BaseException:
                if conn.info.transaction_status != TransactionStatus.UNKNOWN:  # (a lost one is discarded)
                    with suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                raise

    def check_schema(self, head: str | None) -> None:
        """Refuse to start unless the schema exists and is at the migration head."""
        with self.transaction("check the schema") as (conn, _):
            version = None
            row = conn.execute("SELECT to_regclass('alembic_version')").fetchone()
            if row and row[0]:
                found = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                version = found[0] if found else None
            row = conn.execute("SELECT to_regclass(%s)", [f'"{self._settings.table_name}"']).fetchone()
            table = row[0] if row else None
        if version != head or table is None:
            where = f"at revision {version}" if version else "not migrated"
            missing = "" if table else f", table {self._settings.table_name!r} missing"
            raise StartupError(f"the database schema is {where} (head is {head}){missing}: run ./migrate.sh upgrade")

    def commit_safety(self) -> str | None:
        """A warning when the server acknowledges commits that a crash or a failover could lose:
        synchronous_commit off, or streaming standbys none of which is synchronous."""
        with self.transaction("check commit settings") as (conn, _):
            row = conn.execute(
                "SELECT current_setting('synchronous_commit'), current_setting('synchronous_standby_names'),"
                " (SELECT count(*) FROM pg_stat_replication)"
            ).fetchone()
        commit, standbys, replicas = row if row else ("on", "", 0)
        if commit in ("off", "local"):
            return (
                f"synchronous_commit={commit}: the server acknowledges a commit before it is durable, so a crash"
                " or a failover can lose batches that were already acknowledged in Redis; reconciliation"
                " writes those again while Redis still holds them"
            )
        if replicas and not standbys:
            return (
                f"{replicas} streaming standby(s), none synchronous (synchronous_standby_names is empty): a"
                " failover can lose the last commits; reconciliation writes the lost entries again while Redis"
                " still holds them"
            )
        return None

    def ping(self) -> bool:
        try:
            with psycopg.connect(self._settings.postgres_dsn, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    @contextmanager
    def _translated(self, doing: str, row_errors: bool = False, renew: bool = True) -> Iterator[None]:
        """Lost or busy database -> TransientError (LockTimeout for a lock wait that ran out);
        refused for good (credentials, no such database) -> PermanentAtStart; an error that
        says nothing about the rows -> Refused. All of them are retried; row errors are
        handled where the rows are known. `renew`: replace the pool when its server was lost
        (not for a failed probe: the pool is replaced when the server answers again)."""
        try:
            yield
        except (psycopg.Error, PoolTimeout) as exc:
            kind = classify(exc)
            if kind == "rows" and row_errors:
                raise
            cause: BaseException = exc
            reason = _first_line(exc)
            if isinstance(exc, PoolTimeout):  # the pool logs why it cannot connect; say it here
                cause = self._why_no_connection() or exc
                if cause is not exc:
                    reason += f" ({_first_line(cause)})"
            if renew and _sessions_lost(cause):
                self._down = True
                self.renew()
            if getattr(exc, "sqlstate", None) == "55P03":
                raise LockTimeout(f"lock wait over DB_LOCK_TIMEOUT_SEC ({doing}): {reason}") from exc
            if why := _permanent(cause):
                raise PermanentAtStart(f"{why} at {mask_url(self._settings.postgres_dsn)}: {reason}") from exc
            if kind == "transient":
                raise TransientError(f"database unavailable ({doing}): {reason}") from exc
            raise Refused(f"the database refused to {doing}: {reason}") from exc

    def _probe(self) -> None:
        """While the server is lost, each retry connects directly (a refused connection fails at
        once) instead of waiting on a pool whose own reconnection backs off 1, 2, 4 s: work
        resumes within one retry interval of the server coming back, on a fresh pool."""
        if error := self._why_no_connection():
            raise error
        with self._renew_lock:
            if not self._down:
                return  # another thread saw it back first and renewed
            self._down = False
        self.renew(force=True)

    def _why_no_connection(self) -> psycopg.Error | None:
        try:
            psycopg.connect(self._settings.postgres_dsn, **self._settings.postgres_connect_kwargs).close()  # type: ignore[arg-type]
            return None  # it connects now: the pool was only busy
        except psycopg.Error as exc:
            return exc

    def server(self) -> Server:
        """The server this worker's connections reach now."""
        with self.transaction("identify the server") as (_, server):
            return server

    def write(
        self,
        rows: list[Reading],
        letters: list[dead_letters.DeadLetter],
        on_reject: Callable[[int, str], dead_letters.DeadLetter],
        timeout_s: float | None = None,
    ) -> WriteResult:
        """Write rows, this worker's registry rows and the dead letters in one transaction.

        `on_reject(index, reason)` makes the dead letter of a row the database refused
        or that conflicts with a stored reading; it is recorded in the same transaction
        and returned in `result.letters`."""
        if rows:
            try:
                with self.transaction("write a batch", timeout_s, row_errors=True) as (conn, server):
                    self._copy_into_table(conn, rows)
                    result = WriteResult(inserted=len(rows), server=server)
                    keys = ((row.device_id, row.sensor_type, row.timestamp) for row in rows)
                    result.new_letters = self._record(conn, keys, letters)
                return result
            except psycopg.Error as exc:
                if classify(exc) != "rows":
                    raise
                # rolled back: take the careful path
        with self.transaction("write a batch", timeout_s) as (conn, server):
            result, inserted_keys = self._insert_carefully(conn, rows)
            result.server = server
            result.letters = [on_reject(index, result.reasons[index]) for index in result.rejected]
            result.new_letters = self._record(conn, inserted_keys, letters + result.letters)
        return result

    def _record(self, conn: psycopg.Connection, keys: Iterable, letters: list) -> int:
        """Registry and dead letters; -> dead letters new. The usual batch (no dead letters, a
        few sensors) sends its registry upsert with the COMMIT, in one query: a round trip
        less. Otherwise they go pipelined, and transaction() commits. (The COMMIT stays out of
        a pipeline: the TimescaleDB test server would not see the transaction end behind the
        Flush that psycopg sends after a pipeline's Sync.)"""
        spans = _sensor_spans(keys)
        if not letters and len(spans) <= LITERAL_SENSORS:
            conn.execute(self._registry_literal(conn, spans) + b"; COMMIT" if spans else b"COMMIT")
            return 0
        with conn.cursor() as registry, conn.cursor() as letters_cur:
            with conn.pipeline():
                if spans:
                    registry.execute(self._registry_bound, self._registry_values(spans))
                if letters:
                    self._insert_dead_letters(letters_cur, letters)
            return max(letters_cur.rowcount, 0) if letters else 0

    # Rows

    def _copy_into_table(self, conn: psycopg.Connection, rows: list[Reading]) -> None:
        with _json_text_cursor(conn) as cur, cur.copy(self._copy_rows) as copy:
            copy.set_types(list(COLUMN_TYPES.values()))
            for row in rows:
                copy.write_row(row)

    def _insert_carefully(self, conn: psycopg.Connection, rows: list[Reading]) -> tuple[WriteResult, list]:
        """Staging table, ON CONFLICT DO NOTHING, and savepoints to isolate refused rows: a
        part that fails is split in two until the rows that fail stand alone; those are the
        dead letters, with the server's reason, whatever their SQLSTATE class (a data error,
        a constraint, a user's trigger or rule raising for them)."""
        result: WriteResult = WriteResult()
        inserted_keys: list = []
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
            except psycopg.Error as exc:
                if classify(exc) != "rows":
                    raise
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
            inserted = set(map(tuple, keys))
            clashing = {index for index, *_ in conflicts}
            for index in indexes:
                key = tuple(getattr(rows[index], column) for column in KEY_COLUMNS)
                if key in inserted:
                    inserted.discard(key)  # the earliest entry with the key is the one inserted
                elif index not in clashing:
                    result.duplicate_rows.add(index)
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

    # Registry and dead letters

    def _registry_values(self, spans: dict) -> list:
        return [
            self._consumer,
            [k[0] for k in spans],
            [k[1] for k in spans],
            [v[0] for v in spans.values()],
            [v[1] for v in spans.values()],
            [v[2] for v in spans.values()],
        ]

    def _registry_literal(self, conn: psycopg.Connection, spans: dict) -> bytes:
        """The registry upsert with its values as literals: names quoted by psycopg, for the
        connection; timestamps (aware, UTC) and counts written out, which needs no quoting
        and costs a third of psycopg's adaptation."""
        consumer, devices, sensors, first, last, counts = self._registry_values(spans)
        values = [
            sql.Literal(consumer).as_bytes(conn),
            sql.Literal(devices).as_bytes(conn),
            sql.Literal(sensors).as_bytes(conn),
            _array(ts.isoformat() for ts in first),
            _array(ts.isoformat() for ts in last),
            _array(map(str, counts)),
        ]
        parts = self._registry_parts
        return b"".join(part + value for part, value in zip(parts, values, strict=False)) + parts[-1]

    def _insert_dead_letters(self, cur: psycopg.Cursor, letters: list) -> None:
        """One dead letter per entry: a redelivered bad entry adds no second one."""
        cur.executemany(
            "INSERT INTO db_writer_dead_letters (failed_at, original_stream, original_id, device_id,"
            " sensor_type, value, step, error, consumer_group, consumer, delivery_count, fields, replay_of)"
            " VALUES (to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (original_stream, original_id) DO NOTHING",
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
                    self._group,
                    self._consumer,
                    letter.delivery_count,
                    Jsonb(letter.fields),
                    letter.replay_of,
                )
                for letter in letters
            ],
        )

    # Reads for the operator commands and the reconciliation

    def missing(self, candidates: list[tuple[str, str, Reading | None]]) -> list[int]:
        """Indexes of the candidates (stream as dead letters name it, entry id, its row or None
        when it is a dead letter) that have neither their row nor a dead letter on this server."""
        if not candidates:
            return []
        streams = [stream for stream, _, _ in candidates]
        ids = [entry_id for _, entry_id, _ in candidates]
        key_rows = [row for _, _, row in candidates]
        with self.transaction("check entries") as (conn, _):
            found = conn.execute(
                sql.SQL(
                    "SELECT c.i FROM unnest(%b::text[], %b::text[], %b::varchar[], %b::varchar[], %b::timestamptz[])"
                    " WITH ORDINALITY AS c(stream, entry_id, device_id, sensor_type, ts, i)"
                    " WHERE NOT EXISTS (SELECT 1 FROM db_writer_dead_letters d"
                    "  WHERE d.original_stream = c.stream AND d.original_id = c.entry_id)"
                    " AND (c.device_id IS NULL OR NOT EXISTS (SELECT 1 FROM {} r"
                    "  WHERE r.device_id = c.device_id AND r.sensor_type = c.sensor_type AND r.timestamp = c.ts))"
                ).format(self._table),
                [
                    streams,
                    ids,
                    [r.device_id if r else None for r in key_rows],
                    [r.sensor_type if r else None for r in key_rows],
                    [r.timestamp if r else None for r in key_rows],
                ],
            ).fetchall()
        return [int(i) - 1 for (i,) in found]


def _sensor_spans(keys: Iterable[tuple[str, str, datetime]]) -> dict[tuple[str, str], list]:
    """(device, sensor) -> [first, last, count] of the rows inserted."""
    spans: dict[tuple[str, str], list] = {}
    for device, sensor, ts in keys:
        span = spans.get((device, sensor))
        if span is None:
            spans[(device, sensor)] = [ts, ts, 1]
        else:
            if ts < span[0]:
                span[0] = ts
            elif ts > span[1]:
                span[1] = ts
            span[2] += 1
    return spans


def _array(elements: Iterable[str]) -> bytes:
    """An array literal of elements that need no quoting (digits, '-', ':', '.', 'T', '+')."""
    return ("'{" + ",".join(elements) + "}'").encode()


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

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + obj.encode()


def _shutdown(conn: psycopg.Connection) -> None:
    """Shut the connection's socket down under the thread that waits on it (a duplicate
    descriptor: closing it leaves libpq's own alone)."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass  # closed meanwhile


def _sessions_lost(exc: BaseException) -> bool:
    if isinstance(exc, PoolTimeout):
        return False  # the pool was only busy (else the connection error is asked for)
    state = getattr(exc, "sqlstate", None)
    if state in _SESSIONS_LOST_STATES:
        return True
    if state is None:  # no answer from the server at all
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state.startswith("08")


def _permanent(exc: BaseException) -> str | None:
    """Why a connection was refused for good (a setting to fix), or None."""
    state = getattr(exc, "sqlstate", None)
    if state in _PERMANENT_AT_START:
        return _PERMANENT_AT_START[state]
    text = _first_line(exc)
    if isinstance(exc, psycopg.OperationalError) and state is None:
        if "password authentication failed" in text or "no password supplied" in text:
            return "the server refused the password"
        if "does not exist" in text and ("database" in text or "role" in text):
            return "the database or role does not exist"
        if "certificate" in text or ("SSL" in text and "SYSCALL" not in text and "EOF" not in text):
            return "TLS failed"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
