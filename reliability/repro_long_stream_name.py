"""Reproduction: one entry on a stream with a very long name stalls the worker for good.

    uv run python reliability/repro_long_stream_name.py

The entry is rightly refused ("stream name longer than 1024 bytes"), but its dead letter's
trace row carries the whole name in db_writer_dead_letters.original_stream, which is indexed
(original_stream, original_id): PostgreSQL refuses the index entry ("index row requires
11504 bytes, maximum size is 8191", SQLSTATE 54000 program_limit_exceeded). psycopg raises
that as ProgramLimitExceeded, a subclass of OperationalError, which db_writer._TRANSIENT
treats as "database unavailable": the batch is retried forever (MAX_OUTAGE_SEC, then exit;
after a restart the same batch again), and every good entry read with it stays pending.
A non-UTF-8 name of ~700 bytes is enough (backslashreplace makes each byte 4 characters,
past btree's 2704-byte limit); this uses the hostile corpus's 1 MB name.

Exit status 1 while the bug is there, 0 once fixed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

import config  # noqa: E402  (harness put the project on sys.path)
import psycopg  # noqa: E402
import redis  # noqa: E402
from errors import TransientError  # noqa: E402
from main import DatabaseWriterService  # noqa: E402


def main() -> int:
    with h.private_servers() as srv, h.fresh_database(srv.pg.url) as database_url:
        client = redis.Redis.from_url(srv.valkey.url)
        client.xadd("mqtt_stream:dev1:temp", {"value": "21.5", "timestamp": "2024-01-01T00:00:00Z"})
        client.xadd(b"mqtt_stream:" + b"d" * 1_000_000, {"value": "1"})
        settings = config.load_settings(redis_url=srv.valkey.url, database_url=database_url, log_level="ERROR",
                                        batch_timeout_sec=0.2, max_outage_sec=10)
        started = time.monotonic()
        try:
            DatabaseWriterService(settings).run(until_idle=True)
            outcome = "ran until idle"
        except TransientError as exc:
            outcome = f"gave up after {time.monotonic() - started:.0f} s: {exc}"
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT count(*) FROM sensor_readings").fetchone()[0]
            letters = conn.execute("SELECT count(*) FROM db_writer_dead_letters").fetchone()[0]
        pending = sum(client.xpending(s, "db_writer")["pending"] for s in h.consumer_streams(client))
        print(f"{outcome}\nrows written: {rows} (expected 1), trace rows: {letters} (expected 1), "
              f"pending: {pending} (expected 0)")
        return 0 if (rows, letters, pending) == (1, 1, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
