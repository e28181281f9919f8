"""The machine's limits, measured in the same run as db-writer.

round_trips:  median Redis PING, PostgreSQL SELECT 1, and 1-row INSERT + COMMIT (fsync).
raw_redis:    XREADGROUP (~1,000 entries a read) + pipelined XACK, no database.
raw_copy:     binary COPY of 1,000-row batches into a plain table (no index), a commit each.
simple_loop:  the simplest single-thread loop: XREADGROUP -> parse (float, fromisoformat)
              -> COPY into sensor_readings -> commit -> XACK. No idempotency, ledger or
              dead letters: what db-writer does beyond this is its overhead.
"""

from __future__ import annotations

import time
from datetime import datetime
from statistics import median

import psycopg
from psycopg.types.json import Jsonb

from infra import GROUP, reset_groups

PER_READ = 1000
PREFIX = len(b"mqtt_stream:")
COLUMNS = "timestamp, device_id, sensor_type, value, metadata"
TYPES = ["timestamptz", "text", "text", "float8", "jsonb"]


def _as_is(text: str) -> str:
    return text


def parse(stream: bytes, fields: dict) -> tuple:
    """The simplest parse: no validation at all."""
    device, sensor = stream[PREFIX:].decode().split(":", 1)
    meta = fields.get(b"metadata")
    return (
        datetime.fromisoformat(fields[b"timestamp"].decode()),
        device,
        sensor,
        float(fields[b"value"]),
        None if meta is None else Jsonb(meta.decode(), dumps=_as_is),
    )


def _reads(client, names: list[bytes]):
    """Yield XREADGROUP replies of ~PER_READ entries (windows of streams, COUNT per stream,
    as db-writer reads) until a whole round of windows comes back empty."""
    size = min(len(names), PER_READ)
    windows = [dict.fromkeys(names[i : i + size], ">") for i in range(0, len(names), size)]
    count = max(1, PER_READ // size)
    while True:
        got = False
        for window in windows:
            reply = client.xreadgroup(GROUP, b"bench", window, count=count)
            if reply:
                got = True
                yield reply
        if not got:
            return


def _ack(client, reply) -> int:
    pipe = client.pipeline(transaction=False)
    n = 0
    for stream, messages in reply:
        pipe.xack(stream, GROUP, *[entry_id for entry_id, _ in messages])
        n += len(messages)
    pipe.execute()
    return n


def _median_ms(call, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return median(times) * 1000


def round_trips(client, url: str, n: int = 200) -> dict:
    """What each round trip of a batch costs on this machine now."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_commit (x int)")
        return {
            "redis_ping_ms": _median_ms(client.ping, n),
            "pg_select_ms": _median_ms(lambda: conn.execute("SELECT 1").fetchone(), n),
            "pg_commit_ms": _median_ms(lambda: conn.execute("INSERT INTO bench_commit VALUES (1)"), n // 4),
        }


def raw_redis(client, names: list[bytes]) -> dict:
    reset_groups(client, names)
    started = time.perf_counter()
    n = sum(_ack(client, reply) for reply in _reads(client, names))
    seconds = time.perf_counter() - started
    return {"entries": n, "seconds": seconds, "rate": n / seconds}


def raw_copy(url: str, rows: list[tuple], batch: int = PER_READ) -> dict:
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_plain (timestamp timestamptz, device_id text,"
            " sensor_type text, value float8, metadata jsonb)"
        )
        conn.execute("TRUNCATE bench_plain")
        conn.commit()
        started = time.perf_counter()
        for start in range(0, len(rows), batch):
            with conn.cursor().copy(f"COPY bench_plain ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(TYPES)
                for row in rows[start : start + batch]:
                    copy.write_row(row)
            conn.commit()
        seconds = time.perf_counter() - started
    return {"entries": len(rows), "seconds": seconds, "rate": len(rows) / seconds}


def simple_loop(client, url: str, names: list[bytes]) -> dict:
    """Also times its phases, as a yardstick for db-writer's own breakdown."""
    reset_groups(client, names)
    phases = dict.fromkeys(("read", "parse", "copy", "commit", "ack"), 0.0)
    n = 0
    with psycopg.connect(url) as conn:
        started = mark = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[phase] += now - mark
            mark = now

        for reply in _reads(client, names):
            lap("read")
            rows = [parse(stream, fields) for stream, messages in reply for _, fields in messages]
            lap("parse")
            with conn.cursor().copy(f"COPY sensor_readings ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(TYPES)
                for row in rows:
                    copy.write_row(row)
            lap("copy")
            conn.commit()
            lap("commit")
            n += _ack(client, reply)
            lap("ack")
        seconds = time.perf_counter() - started
    share = {phase: round(t / seconds, 3) for phase, t in phases.items()}
    return {"entries": n, "seconds": seconds, "rate": n / seconds, "phases": share}
