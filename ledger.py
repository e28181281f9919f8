"""The ledger: what each worker handled per stream, and how far each stream is verified.

Two tables, both one row per stream (and consumer), however many batches:

* db_writer_progress: per group, stream and consumer, the lowest and highest entry id
  handled, and how many entries, rows and dead letters. Each worker merges its own rows
  in place, once a second, after the batches it sums have committed: it never waits for
  another worker, and a crash loses at most a second of these statistics (never a row).
* db_writer_streams: per group and stream, `checked_through`: every entry up to it is
  written or dead-lettered on this server. A worker that has reconciled on the server it
  writes to advances it to the group's acknowledged frontier; after a failover the
  entries past it are checked row by row (reconcile.py).

Retention (LEDGER_RETENTION, DEAD_LETTER_RETENTION) is applied here too, hourly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

import dead_letters
from config import Settings
from db_writer import DatabaseWriter, Server
from redis_reader import id_key

log = structlog.get_logger("ledger")

FLUSH_EVERY_S = 1.0
PRUNE_EVERY_S = 3600.0
_ID = "string_to_array({}, '-')::numeric[]"  # entry ids compared as (milliseconds, sequence)


ROW, DUPLICATE, DEAD = 0, 1, 2  # what became of a handled entry (Ledger.note)


@dataclass(slots=True)
class _Tally:
    first: tuple[int, int]  # entry ids as id_key() gives them: compared without parsing again
    last: tuple[int, int]
    entries: int = 0
    rows: int = 0
    dead: int = 0

    def add(self, other: _Tally) -> None:
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.entries += other.entries
        self.rows += other.rows
        self.dead += other.dead


@dataclass
class Ledger:
    writer: DatabaseWriter
    settings: Settings
    _tallies: dict[bytes | str, _Tally] = field(default_factory=dict)
    _flushed_at: float = field(default_factory=time.monotonic)
    _pruned_at: float = 0.0

    def note(self, handled: Iterable[tuple[bytes | str, bytes | str, int]]) -> None:
        """Handled entries of a batch as (stream, entry id, ROW | DUPLICATE | DEAD). At a
        trickle a batch holds about one entry per stream, so this is per-entry work: one
        pass, no objects per entry; the names become text once a second, at the flush."""
        tallies = self._tallies
        for stream, entry_id, outcome in handled:
            key = id_key(entry_id)
            tally = tallies.get(stream)
            if tally is None:
                tally = tallies[stream] = _Tally(key, key)
            elif key < tally.first:
                tally.first = key
            elif key > tally.last:
                tally.last = key
            tally.entries += 1
            if outcome == ROW:
                tally.rows += 1
            elif outcome == DEAD:
                tally.dead += 1

    def flush(self, force: bool = False, timeout_s: float | None = None) -> None:
        """Merge what was noted into this worker's progress rows (at most once a second)."""
        if not self._tallies or (not force and time.monotonic() - self._flushed_at < FLUSH_EVERY_S):
            return
        noted, self._tallies = self._tallies, {}
        tallies: dict[str, _Tally] = {}  # a stream noted by its bytes and by its text is one row
        for stream, tally in noted.items():
            text = dead_letters.stream_text(stream)
            if text in tallies:
                tallies[text].add(tally)
            else:
                tallies[text] = tally
        streams = sorted(tallies)
        first, last = _ID.format("excluded.first_id"), _ID.format("excluded.last_id")
        try:
            with self.writer.transaction("record progress", timeout_s) as (conn, _):
                conn.execute(
                    "INSERT INTO db_writer_progress AS p (consumer_group, stream, consumer, first_id, last_id,"
                    " entries, rows_inserted, dead_letters)"
                    " SELECT %s, s, %s, f, l, e, r, d FROM unnest(%b::text[], %b::text[], %b::text[], %b::int8[],"
                    " %b::int8[], %b::int8[]) AS u(s, f, l, e, r, d)"
                    " ON CONFLICT (consumer_group, stream, consumer) DO UPDATE SET"
                    f" first_id = CASE WHEN {first} < {_ID.format('p.first_id')} THEN excluded.first_id"
                    " ELSE p.first_id END,"
                    f" last_id = CASE WHEN {last} > {_ID.format('p.last_id')} THEN excluded.last_id ELSE p.last_id END,"
                    " entries = p.entries + excluded.entries, rows_inserted = p.rows_inserted + excluded.rows_inserted,"
                    " dead_letters = p.dead_letters + excluded.dead_letters, updated_at = now()",
                    [
                        self.settings.consumer_group_name,
                        self.settings.consumer_name,
                        streams,
                        [_id_text(tallies[s].first) for s in streams],
                        [_id_text(tallies[s].last) for s in streams],
                        [tallies[s].entries for s in streams],
                        [tallies[s].rows for s in streams],
                        [tallies[s].dead for s in streams],
                    ],
                )
        except Exception:
            for stream, tally in tallies.items():  # keep them for the next flush
                self._merge(stream, tally)
            raise
        self._flushed_at = time.monotonic()

    def _merge(self, stream: bytes | str, tally: _Tally) -> None:
        mine = self._tallies.get(stream)
        if mine is None:
            self._tallies[stream] = tally
        else:
            mine.add(tally)

    # Verified prefixes of the streams

    def checked_through(self, streams: list[str]) -> dict[str, str]:
        """The verified prefix of each stream that has one."""
        return {stream: through for stream, (through, _) in self.checked(streams).items()}

    def checked(self, streams: list[str]) -> dict[str, tuple[str, int | None]]:
        """Per stream that has one: its verified prefix, and the entries ever added up to it."""
        if not streams:
            return {}
        with self.writer.transaction("read the ledger") as (conn, _):
            found = conn.execute(
                "SELECT stream, checked_through, checked_position FROM db_writer_streams"
                " WHERE consumer_group = %s AND stream = ANY(%s)",
                [self.settings.consumer_group_name, streams],
            ).fetchall()
        return {stream: (through, position) for stream, through, position in found}

    def advance(
        self, marks: dict[str, str], positions: dict[str, int] | None = None, expect: Server | None = None
    ) -> bool:
        """Move each stream's verified prefix forward (never back) to the given entry id;
        `positions` are the entries ever added up to it, where Redis told. With `expect`,
        nothing is written unless this transaction runs on that server (False then)."""
        if not marks:
            return True
        streams = sorted(marks)
        positions = positions or {}
        old, new = _ID.format("s.checked_through"), _ID.format("excluded.checked_through")
        with self.writer.transaction("advance the ledger") as (conn, server):
            if expect is not None and server != expect:
                return False
            conn.execute(
                "INSERT INTO db_writer_streams AS s (consumer_group, stream, checked_through, checked_position)"
                " SELECT %s, u.stream, u.through, u.position"
                " FROM unnest(%b::text[], %b::text[], %b::int8[]) AS u(stream, through, position)"
                " ON CONFLICT (consumer_group, stream) DO UPDATE SET checked_through = excluded.checked_through,"
                f" checked_position = excluded.checked_position, checked_at = now() WHERE {old} < {new}",
                [
                    self.settings.consumer_group_name,
                    streams,
                    [marks[s] for s in streams],
                    [positions.get(s) for s in streams],
                ],
            )
        return True

    # Retention

    def prune(self, live_streams: list[str], force: bool = False) -> dict[str, int]:
        """Apply LEDGER_RETENTION and DEAD_LETTER_RETENTION, at most once an hour."""
        if not force and time.monotonic() - self._pruned_at < PRUNE_EVERY_S:
            return {}
        self._pruned_at = time.monotonic()
        done: dict[str, int] = {}
        group = self.settings.consumer_group_name
        if keep := self.settings.ledger_retention:
            with self.writer.transaction("apply LEDGER_RETENTION") as (conn, _):
                done["progress"] = conn.execute(
                    "DELETE FROM db_writer_progress WHERE consumer_group = %s AND updated_at < now() - %s::interval",
                    [group, keep],
                ).rowcount
                done["streams"] = conn.execute(
                    "DELETE FROM db_writer_streams WHERE consumer_group = %s AND checked_at < now() - %s::interval"
                    " AND NOT stream = ANY(%s)",
                    [group, keep, live_streams],
                ).rowcount
                # Registry rows of workers gone that long fold into consumer '': no count is lost.
                done["registry"] = conn.execute(
                    "WITH gone AS (DELETE FROM db_writer_sensors WHERE consumer <> ''"
                    " AND last_written_at < now() - %s::interval RETURNING *)"
                    " INSERT INTO db_writer_sensors AS s (device_id, sensor_type, consumer, first_seen, last_seen,"
                    " last_written_at, readings)"
                    " SELECT device_id, sensor_type, '', min(first_seen), max(last_seen), max(last_written_at),"
                    " sum(readings) FROM gone GROUP BY 1, 2 ORDER BY 1, 2"
                    " ON CONFLICT (device_id, sensor_type, consumer) DO UPDATE SET"
                    " first_seen = least(s.first_seen, excluded.first_seen),"
                    " last_seen = greatest(s.last_seen, excluded.last_seen),"
                    " last_written_at = greatest(s.last_written_at, excluded.last_written_at),"
                    " readings = s.readings + excluded.readings",
                    [keep],
                ).rowcount
        if keep := self.settings.dead_letter_retention:
            done["dead_letters"] = 0
            while True:  # in slices, so no transaction holds many rows for long
                with self.writer.transaction("apply DEAD_LETTER_RETENTION") as (conn, _):
                    deleted = conn.execute(
                        "DELETE FROM db_writer_dead_letters WHERE id IN (SELECT id FROM db_writer_dead_letters"
                        " WHERE failed_at < now() - %s::interval LIMIT 10000 FOR UPDATE SKIP LOCKED)",
                        [keep],
                    ).rowcount
                done["dead_letters"] += deleted
                if deleted < 10000:
                    break
        if any(done.values()):
            log.info("retention applied", **done)
        return done


def _id_text(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"
