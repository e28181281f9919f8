"""Consumer-group reads from every stream matching STREAM_PATTERN, and acks after commit.

XREADGROUP's COUNT applies per stream, so reads go over windows of at most
BATCH_SIZE streams with COUNT = BATCH_SIZE // window: a batch never holds more
than BATCH_SIZE entries, however many streams there are (the original read up
to BATCH_SIZE x streams). Only when a whole round of windows was empty does a
read block, over all streams at once, for BATCH_TIMEOUT_SEC.

redis and its errors stay in this module: a lost connection becomes
TransientError, a missing group (stream recreated, Redis restarted empty) is
created again.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis
import structlog

import dead_letters
from config import Settings
from errors import TransientError

log = structlog.get_logger("redis_reader")

Entry = tuple[bytes, bytes, dict]  # (stream, entry id, fields)
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def connect(settings: Settings) -> redis.Redis:
    """A client whose socket timeout outlasts the blocking read (redis-py 8 defaults to 5 s)."""
    return redis.Redis.from_url(
        settings.redis_dsn,
        socket_timeout=settings.batch_timeout_sec + 10,
        socket_connect_timeout=settings.db_connect_timeout_s,
        health_check_interval=30,
        decode_responses=False,
    )


def discover(client: redis.Redis, pattern: str, dead_letter_stream: bytes) -> list[bytes]:
    """Streams matching the pattern (SCAN, never KEYS), without the dead-letter stream."""
    keys = client.scan_iter(match=pattern, count=1000, _type="STREAM")
    return sorted(key for key in keys if key != dead_letter_stream)


@dataclass
class StreamStatus:
    stream: str
    length: int
    lag: int | None  # entries not yet delivered to the group (None: Redis cannot tell)
    pending: dict[str, int]  # per consumer
    oldest_pending_age_s: float | None  # since the oldest pending entry was added


def group_status(client: redis.Redis, streams: list[bytes], group: str) -> list[StreamStatus]:
    """Length, lag and pending entries of each stream, in three pipelined round trips."""

    def pipelined(call) -> list:
        pipe = client.pipeline(transaction=False)
        for stream in streams:
            call(pipe, stream)
        return pipe.execute(raise_on_error=False)

    lengths = pipelined(lambda pipe, stream: pipe.xlen(stream))
    groups = pipelined(lambda pipe, stream: pipe.xinfo_groups(stream))
    summaries = pipelined(lambda pipe, stream: pipe.xpending(stream, group))
    now_ms = time.time() * 1000
    result = []
    for stream, length, infos, summary in zip(streams, lengths, groups, summaries, strict=True):
        info = next((g for g in infos if as_text(g.get("name")) == group), None) if isinstance(infos, list) else None
        if info is None or isinstance(summary, Exception):
            result.append(StreamStatus(as_text(stream), length, length, {}, None))  # no group yet: all of it waits
            continue
        oldest = summary.get("min")
        result.append(
            StreamStatus(
                as_text(stream),
                length,
                info.get("lag"),
                {as_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []},
                round((now_ms - id_key(oldest)[0]) / 1000, 3) if oldest else None,
            )
        )
    return result


def as_text(value: bytes | str | None) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


@dataclass
class Batch:
    """Entries to write together. `deliveries` is filled for redelivered entries only."""

    entries: list[Entry] = field(default_factory=list)
    deliveries: dict[tuple[bytes, bytes], int] = field(default_factory=dict)
    trimmed: list[tuple[bytes, bytes]] = field(default_factory=list)  # pending, but gone from the stream
    source: str = "new"  # new | pending | claimed

    def __len__(self) -> int:
        return len(self.entries) + len(self.trimmed)

    def split(self, size: int) -> Iterable[Batch]:
        if not self:
            return
        if len(self.entries) <= size:
            yield self
            return
        for start in range(0, len(self.entries), size):
            part = self.entries[start : start + size]
            keys = {(s, i) for s, i, _ in part}
            yield Batch(
                part,
                {k: v for k, v in self.deliveries.items() if k in keys},
                self.trimmed if start == 0 else [],
                self.source,
            )


class StreamReader:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._group = settings.consumer_group_name
        self._consumer = settings.consumer_name
        self._batch_size = settings.batch_size
        self._block_ms = settings.block_ms
        self._pattern = settings.stream_pattern
        self._dead_letter_stream = settings.dead_letter_stream.encode()
        self._dead_letter_maxlen = settings.dead_letter_maxlen
        self._claim_idle_ms = settings.claim_idle_ms
        self.streams: list[bytes] = []
        self._cursor = 0
        self._count = 1  # COUNT per stream of the next window, see read_new
        self._pending_after: dict[bytes, bytes] = {}

    # Streams and groups

    def refresh_streams(self) -> list[bytes]:
        """SCAN for streams (never KEYS) and create the group where it is missing.

        A new group starts at id 0, so entries queued before the first start are read."""
        with _translated("discover streams"):
            found = set(discover(self._redis, self._pattern, self._dead_letter_stream))
            new = sorted(found - set(self.streams))
            self._create_groups(new)
        self.streams = sorted(found)
        return new

    def _create_groups(self, streams: list[bytes]) -> None:
        if not streams:
            return
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xgroup_create(stream, self._group, id="0")
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, redis.ResponseError) and "BUSYGROUP" not in str(result):
                raise result

    # Reads

    def read_new(self) -> Batch:
        """Entries never delivered to anyone: windows of streams without blocking, in turn,
        then, when all were empty, one blocking read of every stream.

        XREADGROUP's COUNT is per stream, so a window of W streams read with COUNT c holds at
        most W * c = BATCH_SIZE entries. c adapts to the backlog: it doubles while windows come
        back full and halves when they come back less than half full. Over a deep backlog a
        batch then touches few streams (fewer XACKs and registry rows per batch); at a trickle
        it touches many, and every stream still gets its turn."""
        if not self.streams:
            return Batch()
        base = max(1, self._batch_size // len(self.streams))
        self._count = max(base, self._count)
        width = max(1, self._batch_size // self._count)
        if width < len(self.streams):
            for _ in range(-(-len(self.streams) // width)):
                window = self._next_window(width)
                capacity = len(window) * self._count
                batch = self._read(dict.fromkeys(window, ">"), self._count, block=None)
                if len(batch.entries) >= capacity:
                    self._count = min(self._batch_size, self._count * 2)
                elif len(batch.entries) < capacity // 2:
                    self._count = max(base, self._count // 2)
                if batch.entries:
                    return batch
        batch = self._read(dict.fromkeys(self.streams, ">"), base, block=self._block_ms)
        full = len(batch.entries) >= len(self.streams) * base and base < self._batch_size
        self._count = base * 2 if full else base
        return batch

    def read_own_pending(self) -> Batch:
        """This consumer's pending entries (left by a crash of the same name), oldest first.

        Each stream is read after the last pending id already returned, so an entry read
        ahead while the previous batch is still being written is not delivered twice."""
        batch = Batch(source="pending")
        for start in range(0, len(self.streams), self._batch_size):
            window = self.streams[start : start + self._batch_size]
            starts = {stream: self._pending_after.get(stream, b"0") for stream in window}
            part = self._read(starts, max(1, self._batch_size // len(window)), block=None)
            for stream, entry_id, _ in part.entries:
                self._pending_after[stream] = entry_id
            for stream, entry_id in part.trimmed:
                self._pending_after[stream] = max(self._pending_after.get(stream, b"0"), entry_id, key=id_key)
            batch.entries += part.entries
            batch.trimmed += part.trimmed
            if len(batch) >= self._batch_size:
                break
        batch.deliveries = self._delivery_counts(batch.entries)
        return batch

    def claim_abandoned(self) -> Batch:
        """XAUTOCLAIM entries idle longer than CLAIM_IDLE_MS on any consumer (dead workers).

        Redis 7 drops entries that were deleted while pending and names them: they are
        reported as trimmed and acked away, never looped on."""
        batch = Batch(source="claimed")
        if not self.streams:
            return batch
        count = max(1, self._batch_size // len(self.streams))
        with _translated("claim pending entries"):
            pipe = self._redis.pipeline(transaction=False)
            for stream in self.streams:
                pipe.xautoclaim(stream, self._group, self._consumer, self._claim_idle_ms, "0-0", count=count)
            replies = pipe.execute(raise_on_error=False)
        for stream, reply in zip(self.streams, replies, strict=True):
            if isinstance(reply, Exception):
                continue  # NOGROUP on a stream deleted meanwhile: the next refresh drops it
            _, claimed, deleted = reply
            batch.entries += [(stream, entry_id, fields) for entry_id, fields in claimed]
            batch.trimmed += [(stream, entry_id) for entry_id in deleted]
        batch.deliveries = self._delivery_counts(batch.entries)
        return batch

    def _next_window(self, width: int) -> list[bytes]:
        if self._cursor >= len(self.streams):
            self._cursor = 0
        window = self.streams[self._cursor : self._cursor + width]
        self._cursor += len(window)
        return window

    def _read(self, starts: dict, count: int, block: int | None) -> Batch:
        """XREADGROUP from each stream after its start id ('>' for new entries)."""
        with _translated("read"):
            try:
                reply = self._redis.xreadgroup(self._group, self._consumer, starts, count=count, block=block)
            except redis.ResponseError as exc:
                # NOGROUP: a stream was recreated, or Redis restarted empty. UNBLOCKED: a
                # stream was deleted during the blocking read.
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                log.warning("stream or consumer group gone; discovering again", error=str(exc))
                self.streams = []
                self.refresh_streams()
                return Batch()
        batch = Batch()
        for stream, messages in reply or ():
            for entry_id, fields in messages:
                if fields:
                    batch.entries.append((stream, entry_id, fields))
                else:  # a pending entry deleted from the stream: Redis returns it without fields
                    batch.trimmed.append((stream, entry_id))
        return batch

    def _delivery_counts(self, entries: list[Entry]) -> dict[tuple[bytes, bytes], int]:
        by_stream: dict[bytes, list[bytes]] = defaultdict(list)
        for stream, entry_id, _ in entries:
            by_stream[stream].append(entry_id)
        if not by_stream:
            return {}
        with _translated("count deliveries"):
            pipe = self._redis.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xpending_range(stream, self._group, min=ids[0], max=ids[-1], count=len(ids) * 2 + 10)
            replies = pipe.execute()
        return {
            (stream, item["message_id"]): item["times_delivered"]
            for stream, reply in zip(by_stream, replies, strict=True)
            for item in reply
        }

    # After the commit

    def finish(self, acked: Iterable[tuple[bytes, bytes]], letters: list[dead_letters.DeadLetter]) -> None:
        """Publish dead letters (capped stream) and XACK, in one pipelined round trip."""
        by_stream: dict[bytes, list[bytes]] = defaultdict(list)
        for stream, entry_id in acked:
            by_stream[stream].append(entry_id)
        with _translated("acknowledge"):
            pipe = self._redis.pipeline(transaction=False)
            for letter in letters:
                pipe.xadd(
                    self._dead_letter_stream,
                    dead_letters.stream_fields(letter, self._group, self._consumer),
                    maxlen=self._dead_letter_maxlen,
                    approximate=True,
                )
            for stream, ids in by_stream.items():
                pipe.xack(stream, self._group, *ids)
            pipe.execute()

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except (redis.RedisError, OSError):
            return False


@contextmanager
def _translated(doing: str) -> Iterator[None]:
    """Turns a lost or busy Redis into TransientError, naming what was being done."""
    try:
        yield
    except _TRANSIENT as exc:
        raise TransientError(f"redis unavailable ({doing}): {exc}") from exc
