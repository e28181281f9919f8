"""Reconciliation: is every entry the group acknowledged written or dead-lettered on this server?

Acknowledging only after the commit guarantees it on the server that took the commit. A
failover to an asynchronous standby breaks that: the standby may lack the last commits,
while Redis already forgot that those entries were ever pending. So, per stream, every
acknowledged entry after the ledger's verified prefix (`checked_through`) that Redis still
holds is checked against this server's rows and dead letters, and the missing ones are
written again (idempotent: a false alarm costs nothing). Entries that Redis has trimmed
meanwhile cannot be checked any more; they are reported by range and count.

A worker runs this at start and whenever its connection lands on a different server
(system identifier or timeline), in the background; `main.py reconcile [--repair]` runs it
on demand. The state of every stream is read in a few pipelined round trips, and entries
are checked a thousand at a time, whatever stream they come from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

import dead_letters
from db_writer import DatabaseWriter, Server
from errors import TransientError
from ledger import Ledger
from redis_client import translated
from redis_reader import as_text, id_key, previous_id
from schema import InvalidEntry, Layout, Reading

log = structlog.get_logger("reconcile")
CHUNK = 1000


@dataclass
class StreamReport:
    stream: str
    checked: int = 0  # acknowledged entries still in Redis, looked for in the database
    missing: int = 0  # of those, with neither a row nor a dead letter here
    repaired: int = 0  # written again (rows) or dead-lettered again
    verified_through: str | None = None
    position: int | None = None  # entries ever added up to verified_through, when Redis tells
    unverifiable: str | None = None  # a range trimmed from Redis before it was verified
    unverifiable_count: int | None = None  # entries in it, at most (None: Redis cannot tell)


@dataclass
class Report:
    streams: list[StreamReport] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return sum(s.checked for s in self.streams)

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.streams)

    @property
    def repaired(self) -> int:
        return sum(s.repaired for s in self.streams)

    @property
    def unverifiable(self) -> list[StreamReport]:
        return [s for s in self.streams if s.unverifiable]


@dataclass
class Snapshot:
    streams: list[bytes]
    checked: dict[str, tuple[str, int | None]]  # the ledger's verified prefixes
    states: list[dict | None]  # per stream, see Reconciler._states


@dataclass
class _Candidate:
    report: StreamReport
    stream: bytes
    entry_id: bytes
    fields: dict
    row: Reading | None  # None: the entry is a dead letter


class Reconciler:
    def __init__(
        self,
        client: redis.Redis,
        writer: DatabaseWriter,
        ledger: Ledger,
        layout: Layout,
        group: str,
        publish: Callable[[list[dead_letters.DeadLetter]], object],
    ) -> None:
        """`publish` adds dead letters to the dead-letter stream (once each)."""
        self._redis = client
        self._writer = writer
        self._ledger = ledger
        self._layout = layout
        self._group = group
        self._publish = publish

    def snapshot(self, streams: list[bytes]) -> Snapshot:
        """Each stream's verified prefix and its group's state now: a reconciliation checks
        what had been acknowledged by then. A worker takes it as it starts, before it reads;
        taken later, a worker that started last among 8 on one backlog re-checked 9,000
        entries the others had just written (2.3 s of its CPU within the drain). What others
        acknowledge afterwards, they committed on a server that they watch themselves."""
        names = [dead_letters.stream_text(s) for s in streams]
        checked = self._ledger.checked(names)
        states = self._states(streams, {s for s, name in zip(streams, names, strict=True) if name in checked})
        return Snapshot(streams, checked, states)

    def run(self, snapshot: Snapshot, repair: bool = True, expect: Server | None = None) -> Report:
        """Check (and with `repair`, write again) the acknowledged entries after each stream's
        verified prefix, up to the snapshot; advance the prefix over what proved complete,
        only on `expect`."""
        streams, checked, states = snapshot.streams, snapshot.checked, snapshot.states
        names = [dead_letters.stream_text(s) for s in streams]
        report = Report()
        pending: list[_Candidate] = []
        for stream, name, state in zip(streams, names, states, strict=True):
            if state is None:
                continue  # gone, or no group yet: nothing acknowledged
            part = StreamReport(name)
            report.streams.append(part)
            start, position = checked.get(name, (None, None))
            if start is not None:
                self._note_trimmed(part, start, state["info"], position)
            for batch in self._acknowledged(stream, start, state):
                pending += [_Candidate(part, stream, i, f, self._row(stream, i, f)) for i, f in batch]
                if len(pending) >= CHUNK:
                    self._check(pending, repair)
                    pending = []
            self._frontier(part, start, state)
        self._check(pending, repair)
        for part in report.streams:
            if part.missing > part.repaired:
                part.verified_through = part.position = None  # not all there: the prefix stays
        marks = {s.stream: s.verified_through for s in report.streams if s.verified_through}
        positions = {s.stream: s.position for s in report.streams if s.position is not None}
        if repair and not self._ledger.advance(marks, positions, expect):
            raise TransientError("the database server changed during reconciliation")
        for part in report.unverifiable:
            log.error(
                "acknowledged entries were trimmed from Redis before they could be verified on this database;"
                " those not written are lost",
                stream=part.stream,
                range=part.unverifiable,
                at_most=part.unverifiable_count,
            )
        return report

    def frontiers(self, streams: list[bytes]) -> tuple[dict[str, str], dict[str, int]]:
        """Per stream, the highest id up to which the group has acknowledged everything (just
        before its first pending entry, else its last delivered), and its position when known."""
        marks: dict[str, str] = {}
        positions: dict[str, int] = {}
        for stream, state in zip(streams, self._states(streams, verified=set()), strict=True):
            if state is None:
                continue
            name, last, first_pending = dead_letters.stream_text(stream), state["last"], state["first_pending"]
            if first_pending is None:
                marks[name] = last
                if state["group"].get("entries-read") is not None:
                    positions[name] = int(state["group"]["entries-read"])
            else:
                marks[name] = min(previous_id(first_pending), last, key=id_key)
        return marks, positions

    # Redis

    def _states(self, streams: list[bytes], verified: set[bytes]) -> list[dict | None]:
        """Per stream: the group's last delivered id, its entries-read, the first pending id
        and (for the `verified` streams, whose prefix may have been trimmed) XINFO STREAM; in
        at most three pipelined round trips, each only over the streams that need it."""

        def pipelined(targets: list[bytes], call: Callable[[Any, bytes], object]) -> dict[bytes, Any]:
            if not targets:
                return {}
            pipe = self._redis.pipeline(transaction=False)
            for stream in targets:
                call(pipe, stream)
            return dict(zip(targets, pipe.execute(raise_on_error=False), strict=True))

        with translated("reconcile"):
            groups = pipelined(streams, lambda pipe, s: pipe.xinfo_groups(s))
            ours = {
                stream: next((g for g in found if as_text(g.get("name")) == self._group), None)
                for stream, found in groups.items()
                if isinstance(found, list)
            }
            holding = [s for s, g in ours.items() if g is not None and int(g.get("pending") or 0)]
            summaries = pipelined(holding, lambda pipe, s: pipe.xpending(s, self._group))
            infos = pipelined([s for s in streams if s in verified and ours.get(s)], lambda p, s: p.xinfo_stream(s))
        states: list[dict | None] = []
        for stream in streams:
            group, summary, info = ours.get(stream), summaries.get(stream, {}), infos.get(stream, {})
            if group is None or isinstance(info, Exception) or isinstance(summary, Exception):
                states.append(None)
                continue
            first_pending = summary.get("min")
            states.append(
                {
                    "group": group,
                    "info": info,
                    "last": as_text(group["last-delivered-id"]),
                    "first_pending": as_text(first_pending) if first_pending else None,
                }
            )
        return states

    def _acknowledged(self, stream: bytes, start: str | None, state: dict):
        """The entries after `start` up to the group's last delivered id that are not pending,
        a chunk at a time."""
        last = state["last"]
        if last == "0-0" or (start is not None and id_key(start) >= id_key(last)):
            return  # nothing delivered yet, or nothing after the verified prefix
        lower = f"({start}" if start else "-"
        pending = self._pending_ids(stream, lower, last) if state["first_pending"] else set()
        while True:
            with translated("reconcile"):
                entries: list = self._redis.xrange(stream, min=lower, max=last, count=CHUNK)  # type: ignore[assignment]
            acked = [(i, f) for i, f in entries if i not in pending]
            if acked:
                yield acked
            if len(entries) < CHUNK:
                return
            lower = "(" + as_text(entries[-1][0])

    def _pending_ids(self, stream: bytes, lower: str, upper: str) -> set[bytes]:
        ids: set[bytes] = set()
        with translated("reconcile"):
            while True:
                part: list = self._redis.xpending_range(stream, self._group, min=lower, max=upper, count=10_000)
                ids.update(item["message_id"] for item in part)
                if len(part) < 10_000:
                    return ids
                lower = "(" + as_text(part[-1]["message_id"])

    @staticmethod
    def _frontier(part: StreamReport, start: str | None, state: dict) -> None:
        """Where the verified prefix can move to once every acknowledged entry proved present."""
        last, first_pending = state["last"], state["first_pending"]
        through = last if first_pending is None else min(previous_id(first_pending), last, key=id_key)
        if start is None or id_key(through) > id_key(start):
            part.verified_through = through
            if through == last and state["group"].get("entries-read") is not None:
                part.position = int(state["group"]["entries-read"])

    @staticmethod
    def _note_trimmed(report: StreamReport, start: str, info: dict, position: int | None) -> None:
        """Entries after the verified prefix that Redis removed before this check: trimmed
        away (the first entry is past the prefix while entries were removed) or deleted."""
        added, length = info.get("entries-added"), info.get("length")
        removed = None if added is None or length is None else int(added) - int(length)
        first = info.get("first-entry")
        first_id = as_text(first[0]) if first else as_text(info.get("last-generated-id") or "0-0")
        if removed == 0 or id_key(first_id) <= id_key(start):
            return
        count = None if removed is None or position is None else removed - position
        if count is not None and count <= 0:
            return  # only entries up to the prefix were removed
        report.unverifiable = f"({start}, {first_id})"
        report.unverifiable_count = count

    # The database

    def _row(self, stream: bytes, entry_id: bytes, fields: dict) -> Reading | None:
        try:
            return self._layout.to_row(stream, entry_id, fields)
        except InvalidEntry:
            return None

    def _check(self, candidates: list[_Candidate], repair: bool) -> None:
        """Which of these have neither their row nor their dead letter here; with `repair`,
        write those again, through the writer's usual (idempotent) path."""
        if not candidates:
            return
        for candidate in candidates:
            candidate.report.checked += 1
        missing = [
            candidates[i]
            for i in self._writer.missing([(c.report.stream, as_text(c.entry_id), c.row) for c in candidates])
        ]
        for candidate in missing:
            candidate.report.missing += 1
        if not missing or not repair:
            return
        rows = [c for c in missing if c.row is not None]
        letters = []
        for c in missing:
            if c.row is None:
                try:
                    self._layout.to_row(c.stream, c.entry_id, c.fields)
                except InvalidEntry as exc:
                    letters.append(
                        dead_letters.make(self._layout, c.stream, c.entry_id, c.fields, exc.step, exc.reason, 1)
                    )

        def reject(index: int, reason: str) -> dead_letters.DeadLetter:
            c = rows[index]
            return dead_letters.make(self._layout, c.stream, c.entry_id, c.fields, "write", reason, 1)

        result = self._writer.write([c.row for c in rows if c.row is not None], letters, reject)
        self._publish(letters + result.letters)
        for candidate in missing:
            candidate.report.repaired += 1
        log.warning(
            "acknowledged entries missing from this database were written again",
            entries=len(missing),
            streams=len({c.report.stream for c in missing}),
            rows=result.inserted,
            dead_letters=len(letters) + len(result.letters),
        )
