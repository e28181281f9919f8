"""Consumer-group reads from every stream matching STREAM_PATTERN; dead letters and acks.

XREADGROUP's COUNT applies per stream, so reads go over windows of streams with a COUNT
that keeps a window within BATCH_SIZE entries, whatever the number of streams. A round
reads one window; a stream that comes back with a full COUNT has more, and is topped up
at once with the room left, so one deep stream among many idle ones drains in big
batches while the others keep their turn. Only when a whole turn of windows was empty
does a read block, in slices of at most a second (a stop is seen that fast), for up to
BATCH_TIMEOUT_SEC. At a trickle, a batch waits up to BATCH_LINGER_MS for more entries.

redis and its errors stay in this module and redis_client.py: a lost connection becomes
TransientError, a missing group (stream recreated, Redis restarted empty) is created
again where the ledger says this stream was written up to.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

import dead_letters
from config import Settings
from errors import TransientError
from redis_client import BLOCK_SLICE_MS, call_packed, hash_tag, is_cluster, pack, read_reply, send_packed, translated

CLUSTER_POLL_S = 0.4  # a cluster cannot block on keys of several slots: an idle worker polls this often

Entry = tuple[bytes, bytes, dict]  # (stream, entry id, fields)
DEDUP_TTL_S = 7 * 24 * 3600  # a dead letter published again within a week is published once

# Publish each dead letter unless it was published before (its marker key exists); the
# marker is set only after the XADD, so a refused XADD (OOM) leaves nothing half done.
_PUBLISH = """
local added = {}
local pos = 3
for i = 2, #KEYS do
  local n = tonumber(ARGV[pos])
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*'}
    for j = pos + 1, pos + 2 * n do args[#args + 1] = ARGV[j] end
    redis.call(unpack(args))
    redis.call('SET', KEYS[i], '1', 'EX', ARGV[2])
    added[#added + 1] = i - 2
  end
  pos = pos + 1 + 2 * n
end
return added
"""


# XACK a batch's entries over many streams in one command: a pipeline of one XACK per stream
# costs the client ~15 us a command, which at a trickle over hundreds of streams is most of a
# worker's CPU. (A cluster pipelines per slot instead: keys of one script share a slot.)
_ACK = """
local group = ARGV[1]
local pos = #KEYS + 2
local acked = 0
for i, key in ipairs(KEYS) do
  local last = pos + tonumber(ARGV[i + 1]) - 1
  for first = pos, last, 1000 do
    acked = acked + redis.call('XACK', key, group, unpack(ARGV, first, math.min(first + 999, last)))
  end
  pos = last + 1
end
return acked
"""


def _ids_by_stream(keys: Iterable[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    by_stream: dict[bytes, list[bytes]] = defaultdict(list)
    for stream, entry_id in keys:
        by_stream[stream].append(entry_id)
    return by_stream


_FIBONACCI = 2654435769  # 2**32 divided by the golden ratio: k * it, mod 2**32, spreads k evenly


def ring_start(consumer_name: str) -> float:
    """Where a worker starts its turn over the streams, as a fraction of the list. Names that
    end in a number (a StatefulSet's db-writer-0, -1, ..., compose's replicas) are spread by
    the golden ratio, so any run of consecutive numbers splits the list into near-equal gaps
    (8 workers: 9 % and 15 % of it); the rest of the name shifts them all (crc32). A hash of
    the whole name spread them at random: of 400 streams, bench-1 to bench-8 started at
    3, 4, 29, 56, ..., and w0 to w7 seven of eight within 80 streams, so neighbours kept
    reading windows the other had just drained."""
    number = re.search(r"\d+$", consumer_name)
    prefix = consumer_name[: number.start()] if number else consumer_name
    spread = int(number.group()) * _FIBONACCI if number else 0
    return ((zlib.crc32(prefix.encode()) + spread) % 2**32) / 2**32


def id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def previous_id(entry_id: bytes | str) -> str:
    """The highest id below this one: everything up to it comes before the entry."""
    ms, seq = id_key(entry_id)
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-18446744073709551615" if ms else "0-0"


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
    last_delivered: str | None = None
    first_pending: str | None = None
    entries_read: int | None = None  # the group's position in the stream (Redis 7)


def group_status(client: redis.Redis, streams: list[bytes], group: str) -> list[StreamStatus]:
    """Length, lag and pending entries of each stream, in three pipelined round trips."""

    def pipelined(call: Callable[[Any, bytes], object]) -> list:
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
        if isinstance(length, Exception):
            continue  # deleted meanwhile
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
                as_text(info.get("last-delivered-id")),
                as_text(oldest) if oldest else None,
                info.get("entries-read"),
            )
        )
    return result


def _reply_items(reply: Any) -> Iterable:
    """(stream, entries) pairs of an XREADGROUP reply: a list in RESP2, a dict in RESP3."""
    if not reply:
        return ()
    return reply.items() if isinstance(reply, dict) else reply


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

    def extend(self, other: Batch) -> None:
        self.entries += other.entries
        self.trimmed += other.trimmed
        self.deliveries.update(other.deliveries)

    def keys(self) -> list[tuple[bytes, bytes]]:
        return [(stream, entry_id) for stream, entry_id, _ in self.entries] + self.trimmed


class InFlight:
    """Entries this worker has read and not yet acknowledged, so that each is in flight at
    most once per worker whichever way it came back (read ahead, own pending, claimed)."""

    def __init__(self) -> None:
        self._keys: set[tuple[bytes, bytes]] = set()
        self._lock = threading.RLock()

    def admit_read(self, read: Callable[[], Batch]) -> tuple[Batch, Batch]:
        """`read()` and admit its batch with releases held off in between: an entry read back
        from the pending list while its ack is under way would otherwise be released (acked)
        just before the admit, and written twice. -> (what was read, what was admitted)."""
        with self._lock:
            batch = read()
            return batch, self.admit(batch)

    def admit(self, batch: Batch) -> Batch:
        """The batch without entries already in flight; the rest are now in flight."""
        with self._lock:
            entries = [e for e in batch.entries if (e[0], e[1]) not in self._keys]
            trimmed = [k for k in batch.trimmed if k not in self._keys]
            self._keys.update((s, i) for s, i, _ in entries)
            self._keys.update(trimmed)
        return Batch(entries, batch.deliveries, trimmed, batch.source)

    def release(self, keys: Iterable[tuple[bytes, bytes]]) -> None:
        with self._lock:
            self._keys.difference_update(keys)

    def __len__(self) -> int:
        return len(self._keys)


class StreamReader:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        group_start: Callable[[list[bytes]], dict[bytes, str]] | None = None,
        wait: Callable[[float], object] = time.sleep,
    ) -> None:
        """`group_start(streams)` says where a group created anew should start (the ledger's
        checked-through id, else the beginning); `wait(seconds)` is a stoppable sleep."""
        import structlog  # here, not at import: `status` and `trace` use the functions above

        self._log = structlog.get_logger("redis_reader")
        self._redis = client
        self._group = settings.consumer_group_name
        self._consumer = settings.consumer_name
        self._batch_size = settings.batch_size
        # A batch within 5 % of BATCH_SIZE is full: its last few entries would be read over
        # windows as narrow as they are few (COUNT 1, two streams a read), and when the
        # streams are thin, as with 8 workers on one backlog, that took hundreds of reads.
        self._full_at = self._batch_size - self._batch_size // 20
        self._block_ms = settings.block_ms
        self._linger_s = settings.batch_linger_ms / 1000
        self._pattern = settings.stream_pattern
        self._dead_letter_stream = settings.dead_letter_stream.encode()
        self._dead_letter_maxlen = settings.dead_letter_maxlen
        self._dedup_prefix = f"{{{hash_tag(settings.dead_letter_stream)}}}:db_writer:dead-lettered:"
        self._claim_idle_ms = settings.claim_idle_ms
        self._group_start = group_start
        self._wait = wait
        self._publish = client.register_script(_PUBLISH)
        self._ack = client.register_script(_ACK)
        self._cluster = is_cluster(client)
        self._packed_read: tuple[tuple, list[bytes]] = ((), [])  # the last XREADGROUP, packed (see _xreadgroup)
        # An ack sent without waiting for its reply: (its connection, or None to send it again; its keys).
        self._unconfirmed: tuple[Any, list[tuple[bytes, bytes]]] | None = None
        # Workers of one group start their turn of windows at different streams, so they do
        # not all read (and then lock) the same streams in the same order at the same moment.
        self._start = ring_start(settings.consumer_name)
        self.streams: list[bytes] = []
        self._cursor = 0
        # COUNT per stream of the next window (see _round). It starts high: over a backlog the
        # first windows are then a stream or two, not a climb from all streams at COUNT 1
        # (each of 8 workers on one backlog spent its first batches on ~900 streams' acks and
        # registry rows); over a trickle, the first turn costs ~log2(BATCH_SIZE) reads, once.
        self._count = self._batch_size
        self._pending_after: dict[bytes, bytes] = {}
        self._was_full = False  # the last batch of read_new
        self._partial_at: float | None = None  # when the last batch, not full, was read

    # Streams and groups

    def refresh_streams(self) -> list[bytes]:
        """SCAN for streams (never KEYS) and create the group where it is missing."""
        with translated("discover streams"):
            found = set(discover(self._redis, self._pattern, self._dead_letter_stream))
            new = sorted(found - set(self.streams))
            self._create_groups(new)
        if not self.streams and found:
            self._cursor = int(self._start * len(found))
        self.streams = sorted(found)
        return new

    def _create_groups(self, streams: list[bytes]) -> None:
        """A new group starts where the ledger says the stream was written up to (everything
        before it is written or dead-lettered), else at the beginning: entries queued before
        the first start are read, and a lost group does not replay the whole stream."""
        if not streams:
            return
        starts = self._group_start(streams) if self._group_start else {}
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xgroup_create(stream, self._group, id=starts.get(stream, "0"))
        for stream, result in zip(streams, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(result, redis.ResponseError) and "BUSYGROUP" not in str(result):
                raise result
            if result is True and stream in starts:
                self._log.warning(
                    "consumer group created where the ledger says the stream was written up to",
                    stream=as_text(stream),
                    start=starts[stream],
                )

    # Reads

    def read_new(self) -> Batch:
        """Entries never delivered to anyone. Non-blocking rounds first; when a whole turn was
        empty, a read that blocks up to BATCH_TIMEOUT_SEC. A batch that is not full waits up
        to BATCH_LINGER_MS (from its first entry) for more, then takes what has come; right
        after a full batch it does not wait: that is the tail of a backlog, not a trickle.
        Right after a batch that was not full, the linger comes first: what arrives at a
        trickle is then read once a batch, not twice (a read over hundreds of streams costs
        the worker as much as a hundred entries)."""
        if not self.streams:
            return Batch()
        lingered = False
        if self._linger_s and self._partial_at is not None:
            self._wait(max(0.0, self._linger_s - (time.monotonic() - self._partial_at)))
            lingered = True
        batch = self._fill(Batch(), self._batch_size)
        started = time.monotonic()
        if not batch:
            lingered = False
            batch = self._block()
            if not batch:
                self._partial_at = None
                return batch
            started = time.monotonic()
            if not self._linger_s:  # else the read after the linger takes what came meanwhile
                batch.extend(self._fill(Batch(), self._batch_size - len(batch)))
        if self._linger_s and not lingered and len(batch) < self._full_at and not self._was_full:
            self._wait(max(0.0, self._linger_s - (time.monotonic() - started)))
            batch.extend(self._fill(Batch(), self._batch_size - len(batch)))
        self._was_full = len(batch) >= self._full_at
        self._partial_at = None if self._was_full else time.monotonic()
        return batch

    def _fill(self, batch: Batch, budget: int) -> Batch:
        """Non-blocking rounds until `budget` entries (less 5 % of BATCH_SIZE: see _full_at), or
        until a round says there is no more (it read every stream and none filled its COUNT):
        a trickle costs one read, not two. A round that had to narrow its COUNT to find entries
        hands that COUNT to the next round of the batch, which would otherwise start again
        from the adapted one and narrow again over the same empty streams."""
        slack = self._batch_size - self._full_at
        ceiling = self._batch_size
        while budget > 0:
            part, more, ceiling = self._round(budget, ceiling)
            batch.extend(part)
            budget -= len(part)
            if not part or not more or budget <= slack:
                break
        return batch

    def _round(self, budget: int, ceiling: int) -> tuple[Batch, bool, int]:
        """One window of streams read with COUNT c, in turn until one has entries (one turn
        over the streams at most). c adapts to the backlog: it doubles while windows come back
        full and halves when they come back less than half full, so over a deep backlog a
        batch touches few streams (fewer XACKs and registry rows); within the turn, an empty
        window makes the next one twice as wide. An empty window leaves c as it is: it says
        that another worker drained those streams, not that the others are thin. A whole
        turn that was empty sets c to its floor: nothing is waiting anywhere. A stream that
        filled its COUNT is topped up at once. `ceiling`: the highest COUNT to start from.
        -> (entries, whether more may be waiting, the COUNT they were found with)."""
        if not self.streams:  # all gone (a Redis restarted empty): nothing to read until a re-scan
            return Batch(), False, 1
        base = max(1, self._batch_size // len(self.streams))
        self._count = max(base, self._count)
        count = min(budget, self._count, ceiling)  # the tail of a batch: a smaller window
        covered = 0
        while covered < len(self.streams):
            width = max(1, budget // count)
            window = self._next_window(min(width, len(self.streams) - covered))
            covered += len(window)
            batch = self._read(dict.fromkeys(window, ">"), count)
            capacity = len(window) * count
            if count == self._count:
                if len(batch.entries) >= capacity:
                    self._count = min(self._batch_size, self._count * 2)
                elif batch.entries and len(batch.entries) < capacity // 2:
                    self._count = max(base, self._count // 2)
            if not batch:
                # With 8 workers on one backlog, windows as narrow as the first one over streams
                # the others had drained cost a worker hundreds of empty reads a turn.
                count = max(1, count // 2)
                continue
            room = budget - len(batch)
            per_stream: dict[bytes, int] = defaultdict(int)
            for stream, _, _ in batch.entries:
                per_stream[stream] += 1
            full = [stream for stream, n in per_stream.items() if n >= count][:room]
            if full and len(full) < len(window):
                batch.extend(self._read(dict.fromkeys(full, ">"), room // len(full)))
            return batch, bool(full) or width < len(self.streams), count
        self._count = base
        return Batch(), False, base

    def _block(self) -> Batch:
        """Wait for the next entry on any stream, in slices so that a stop is seen quickly. A
        cluster has no read that blocks on several slots: there a round of reads every
        CLUSTER_POLL_S does, cheap enough when idle, and an entry is seen within that."""
        deadline = time.monotonic() + self._block_ms / 1000
        if self._cluster:
            while time.monotonic() < deadline:
                if self._wait(min(CLUSTER_POLL_S, max(0.0, deadline - time.monotonic()))) or not self.streams:
                    return Batch()
                batch = self._fill(Batch(), self._batch_size)
                if batch:
                    return batch
            return Batch()
        while self.streams:
            left_ms = int((deadline - time.monotonic()) * 1000)
            base = max(1, self._batch_size // len(self.streams))
            batch = self._read(dict.fromkeys(self.streams, ">"), base, block=max(1, min(BLOCK_SLICE_MS, left_ms)))
            if batch or left_ms <= BLOCK_SLICE_MS or self._wait(0):  # _wait(0): has a stop been asked for?
                return batch
        return Batch()

    def read_own_pending(self) -> Batch:
        """This consumer's pending entries (left by a crash of the same name), oldest first.

        Each stream is read after the last pending id already returned, so an entry read
        ahead while the previous batch is still being written is not delivered twice."""
        batch = Batch(source="pending")
        for start in range(0, len(self.streams), self._batch_size):
            window = self.streams[start : start + self._batch_size]
            starts = {stream: self._pending_after.get(stream, b"0") for stream in window}
            part = self._read(starts, max(1, self._batch_size // len(window)))
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
        """XAUTOCLAIM entries idle longer than CLAIM_IDLE_MS on any consumer (dead or frozen
        workers, and this one's own entries that it put aside).

        Redis 7 drops entries that were deleted while pending and names them: they are
        reported as trimmed and acked away, never looped on."""
        batch = Batch(source="claimed")
        if not self.streams:
            return batch
        count = max(1, self._batch_size // len(self.streams))
        with translated("claim pending entries"):
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
        """The next `width` streams in turn, wrapping around the end of the list."""
        count = len(self.streams)
        start = self._cursor % count
        window = self.streams[start : start + width]
        if len(window) < width:
            window += self.streams[: min(width - len(window), start)]
        self._cursor = (start + len(window)) % count
        return window

    def _read(self, starts: dict, count: int, block: int | None = None) -> Batch:
        """XREADGROUP from each stream after its start id ('>' for new entries). In a cluster,
        one command per hash slot (keys of two slots never share one), pipelined."""
        with translated("read"):
            try:
                if self._cluster:
                    replies = self._read_by_slot(starts, count)
                else:
                    replies = [call_packed(self._redis, self._xreadgroup(starts, count, block))]
            except redis.ResponseError as exc:
                # NOGROUP: a stream was recreated, or Redis restarted empty. UNBLOCKED: a
                # stream was deleted during the blocking read.
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                self._log.warning("stream or consumer group gone; discovering again", error=str(exc))
                self.streams = []
                self.refresh_streams()
                return Batch()
        batch = Batch()
        entries, trimmed = batch.entries, batch.trimmed
        for stream, messages in (item for reply in replies for item in _reply_items(reply)):
            for entry_id, fields in messages:
                if not fields:  # a pending entry deleted from the stream: Redis returns it without fields
                    trimmed.append((stream, entry_id))
                    continue
                if type(fields) is list:  # unparsed: [name, value, name, value, ...]
                    pairs = iter(fields)
                    fields = dict(zip(pairs, pairs, strict=False))
                entries.append((stream, entry_id, fields))
        return batch

    def _xreadgroup(self, starts: dict, count: int, block: int | None) -> list[bytes]:
        """XREADGROUP, packed. At a trickle the same read comes again and again (every stream,
        '>', the same COUNT): it is packed once, not once a batch. Its reply is left as hiredis
        parsed it and _read makes each entry's dict: redis-py's parsing of it costs a function
        call per stream and per entry."""
        key = (count, block, *starts, *starts.values())
        if key != self._packed_read[0]:
            args: list[Any] = [b"XREADGROUP", b"GROUP", self._group, self._consumer, b"COUNT", count]
            if block is not None:
                args += [b"BLOCK", block]
            self._packed_read = key, pack(*args, b"STREAMS", *starts, *starts.values())
        return self._packed_read[1]

    def _read_by_slot(self, starts: dict, count: int) -> list:
        """One XREADGROUP per hash slot, pipelined per primary over that node's own connection:
        an idle poll of hundreds of streams is then cheap. A slot that moved meanwhile (MOVED,
        ASK, a failover) is read again through the cluster client, which follows it."""
        client: Any = self._redis
        by_node: dict[str, tuple[Any, dict[int, dict]]] = {}
        for stream, start in starts.items():
            node = client.get_node_from_key(stream)
            by_node.setdefault(node.name, (node, defaultdict(dict)))[1][client.keyslot(stream)][stream] = start
        replies, moved = [], []
        for node, slots in by_node.values():
            parts = list(slots.values())
            pipe = client.get_redis_connection(node).pipeline(transaction=False)
            for part in parts:
                pipe.xreadgroup(self._group, self._consumer, part, count=count)
            try:
                results = pipe.execute(raise_on_error=False)
            except redis.ConnectionError:
                client.nodes_manager.initialize()  # a primary gone: learn the new map before the retry
                raise
            for part, reply in zip(parts, results, strict=True):
                if isinstance(reply, redis.ResponseError) and str(reply).startswith(("MOVED", "ASK", "TRYAGAIN")):
                    moved.append(part)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    replies.append(reply)
        if moved:
            client.nodes_manager.initialize()
            pipe = client.pipeline(transaction=False)
            for part in moved:
                pipe.xreadgroup(self._group, self._consumer, part, count=count)
            replies += pipe.execute()
        return replies

    def _delivery_counts(self, entries: list[Entry]) -> dict[tuple[bytes, bytes], int]:
        by_stream: dict[bytes, list[bytes]] = defaultdict(list)
        for stream, entry_id, _ in entries:
            by_stream[stream].append(entry_id)
        if not by_stream:
            return {}
        with translated("count deliveries"):
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

    def publish_dead_letters(self, letters: list[dead_letters.DeadLetter]) -> list[dead_letters.DeadLetter]:
        """Add each dead letter to DEAD_LETTER_STREAM (capped) once, however often its entry is
        delivered: a marker key per entry, next to the stream (same hash slot), remembers it
        for a week. Returns those that were new. Raises TransientError while Redis refuses."""
        added: list[dead_letters.DeadLetter] = []
        for start in range(0, len(letters), 100):
            part = letters[start : start + 100]
            keys = [self._dead_letter_stream] + [self._dedup_key(letter) for letter in part]
            args: list[Any] = [self._dead_letter_maxlen, DEDUP_TTL_S]
            for letter in part:
                fields = dead_letters.stream_fields(letter, self._group, self._consumer)
                args.append(len(fields))
                for name, value in fields.items():
                    args += [name, value]
            with translated("publish dead letters"):
                added += [part[int(i)] for i in self._publish(keys=keys, args=args)]
        return added

    def _dedup_key(self, letter: dead_letters.DeadLetter) -> str:
        digest = hashlib.sha1(f"{letter.original_stream}\0{letter.original_id}".encode(), usedforsecurity=False)
        return self._dedup_prefix + digest.hexdigest()

    def ack(self, keys: Iterable[tuple[bytes, bytes]], wait: bool = True) -> list[tuple[bytes, bytes]]:
        """XACK in one round trip: one script call (a cluster: one XACK per stream, pipelined).
        The ack sent before without waiting is confirmed first. With `wait=False` this one is
        only sent (except in a cluster): its reply is read at the next ack or confirm_acks(),
        by when Redis has long answered. The loop writes its next batch meanwhile instead of
        waiting on Redis, which on 2 busy CPUs took 2-3 ms a batch for 1 ms of Redis work (a
        worker on another machine would wait a network round trip more).
        -> the keys whose ack is confirmed now. (The loop thread's alone: one ack in flight.)"""
        confirmed = self.confirm_acks()
        keys = list(keys)
        if wait or self._cluster:
            self._ack_now(keys)
            return confirmed + keys
        command = self._ack_command(keys)
        if command is None:
            return confirmed
        with translated("acknowledge"):
            self._unconfirmed = (send_packed(self._redis, command), keys)
        return confirmed

    def confirm_acks(self) -> list[tuple[bytes, bytes]]:
        """Read the reply of the ack sent without waiting. If its connection was lost or the
        script was flushed meanwhile (a restarted Redis), it is sent again, waited for; while
        Redis is away that raises TransientError and it stays to be sent at the next call.
        -> its keys, acked now (none if there was no such ack)."""
        if self._unconfirmed is None:
            return []
        conn, keys = self._unconfirmed
        if conn is not None:
            self._unconfirmed = (None, keys)  # the connection's reply is read once, whatever it says
            try:
                with translated("acknowledge"):
                    read_reply(self._redis, conn)
            except (redis.exceptions.NoScriptError, TransientError):
                pass  # sent again below (which loads the script), to the primary there is now
            else:
                self._unconfirmed = None
                return keys
        self._ack_now(keys)
        self._unconfirmed = None
        return keys

    def _ack_now(self, keys: list[tuple[bytes, bytes]]) -> None:
        with translated("acknowledge"):
            if not self._cluster:
                command = self._ack_command(keys)
                if command is None:
                    return
                try:
                    call_packed(self._redis, command)
                except redis.exceptions.NoScriptError:  # a restarted or flushed Redis: load it again
                    streams, args = self._ack_arguments(keys)
                    self._ack(keys=streams, args=args)
                return
            pipe = self._redis.pipeline(transaction=False)
            for stream, stream_ids in _ids_by_stream(keys).items():
                pipe.xack(stream, self._group, *stream_ids)
            pipe.execute()

    def _ack_arguments(self, keys: list[tuple[bytes, bytes]]) -> tuple[list[bytes], list]:
        """The ack script's keys (the streams) and arguments (the group, the count per stream, the ids)."""
        by_stream = _ids_by_stream(keys)
        streams = list(by_stream)
        counts = [len(by_stream[s]) for s in streams]
        return streams, [self._group, *counts, *(entry_id for stream in streams for entry_id in by_stream[stream])]

    def _ack_command(self, keys: list[tuple[bytes, bytes]]) -> list[bytes] | None:
        """The ack script's call, packed (None: nothing to ack)."""
        if not keys:
            return None
        streams, args = self._ack_arguments(keys)
        return pack(b"EVALSHA", self._ack.sha, len(streams), *streams, *args)

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except (redis.RedisError, OSError):
            return False
