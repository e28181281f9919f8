"""Operator commands besides `run`: health, status, trace, dlq list and dlq replay.

Each reads the same settings as the worker. A server that cannot be reached is one line
on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime

import psycopg
import redis

import consumer_lock
import dead_letters
import redis_reader
from config import Settings, mask_url


def add_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "health",
        help="print health as JSON; exit 0 only if Redis and PostgreSQL answer "
        "and a live worker holds CONSUMER_NAME (a container health probe)",
    )
    status = commands.add_parser("status", help="per stream: length, lag, pending per consumer, oldest pending age")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--sensors", action="store_true", help="list sensors silent longer than --silent-for")
    status.add_argument("--silent-for", type=float, default=3600, metavar="SECONDS", help="default: 3600")
    trace = commands.add_parser("trace", help="where one entry went: written, dead-lettered, pending or unread")
    trace.add_argument("stream")
    trace.add_argument("entry_id")
    trace.add_argument("--json", action="store_true")
    dlq = commands.add_parser("dlq", help="dead letters: list, replay")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_commands.add_parser("list", help="newest dead letters, from the trace table")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    replay = dlq_commands.add_parser(
        "replay", help="re-inject dead letters into their stream after a fix; each is replayed once"
    )
    replay.add_argument("--since", help="only those failed at or after this time (ISO 8601 or epoch seconds)")
    replay.add_argument("--match", help="only those whose error or stream contains this text")
    replay.add_argument("--dry-run", action="store_true")


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command = {"health": health, "status": status, "trace": trace, "dlq": dlq}[args.command]
    try:
        return command(args, settings)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _fail(f"cannot reach Redis at {mask_url(settings.redis_dsn)}: {exc}")
    except psycopg.OperationalError as exc:
        first = (str(exc).strip().splitlines() or ["connection failed"])[0]
        return _fail(f"cannot reach PostgreSQL at {mask_url(settings.postgres_dsn)}: {first}")


def _fail(message: str) -> int:
    print(f"db-writer: {message}", file=sys.stderr)
    return 1


def _redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_dsn, socket_timeout=5, socket_connect_timeout=3)


def _db(settings: Settings) -> psycopg.Connection:
    return psycopg.connect(settings.postgres_dsn, connect_timeout=3, autocommit=True, prepare_threshold=None)


# health


def health(args: argparse.Namespace, settings: Settings) -> int:
    from main import DatabaseWriterService

    report = DatabaseWriterService(settings).health_check()
    try:
        holder = consumer_lock.holder(_redis(settings), settings.consumer_group_name, settings.consumer_name)
    except redis.RedisError:
        holder = None
    # This runs in its own process: "running" means a live worker holds the name.
    report.update(running=holder is not None, worker=holder)
    print(json.dumps(report, indent=2))
    return 0 if report["running"] and report["redis"] and report["database"] else 1


# status


def status(args: argparse.Namespace, settings: Settings) -> int:
    client = _redis(settings)
    streams = redis_reader.discover(client, settings.stream_pattern, settings.dead_letter_stream.encode())
    rows = redis_reader.group_status(client, streams, settings.consumer_group_name)
    report = {
        "group": settings.consumer_group_name,
        "streams": [asdict(row) for row in rows],
        "totals": {
            "streams": len(rows),
            "length": sum(row.length for row in rows),
            "lag": sum(row.lag or 0 for row in rows),
            "pending": sum(sum(row.pending.values()) for row in rows),
        },
        "dead_letter_stream": {"name": settings.dead_letter_stream, "length": client.xlen(settings.dead_letter_stream)},
    }
    with _db(settings) as conn:
        report["dead_letter_table"] = conn.execute("SELECT count(*) FROM db_writer_dead_letters").fetchone()[0]
        if args.sensors:
            report["silent_sensors"] = [
                {"device_id": d, "sensor_type": s, "last_seen": last.isoformat(), "readings": n}
                for d, s, last, n in conn.execute(
                    "SELECT device_id, sensor_type, last_seen, readings FROM db_writer_sensors"
                    " WHERE last_seen < now() - make_interval(secs => %s) ORDER BY last_seen",
                    [args.silent_for],
                )
            ]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'stream':40} {'length':>8} {'lag':>8} {'pending':>8} {'oldest pending':>15}  consumers")
    for row in rows:
        oldest = "-" if row.oldest_pending_age_s is None else f"{row.oldest_pending_age_s:.1f} s"
        consumers = ", ".join(f"{name}={count}" for name, count in row.pending.items()) or "-"
        lag = "?" if row.lag is None else row.lag
        print(f"{row.stream:40} {row.length:>8} {lag:>8} {sum(row.pending.values()):>8} {oldest:>15}  {consumers}")
    totals = report["totals"]
    print(f"{totals['streams']} streams, {totals['length']} entries, lag {totals['lag']}, pending {totals['pending']}")
    print(
        f"dead letters: {report['dead_letter_stream']['length']} in {settings.dead_letter_stream}"
        f" (capped), {report['dead_letter_table']} in db_writer_dead_letters"
    )
    if args.sensors:
        silent = report["silent_sensors"]
        print(f"{len(silent)} sensors silent for more than {args.silent_for:g} s")
        for sensor in silent:
            print(f"  {sensor['device_id']}:{sensor['sensor_type']}  last reading {sensor['last_seen']}")
    return 0


# trace


def trace(args: argparse.Namespace, settings: Settings) -> int:
    result = locate(settings, args.stream, args.entry_id)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        details = ", ".join(f"{k}={v}" for k, v in result.items() if k not in {"stream", "entry_id", "state"})
        print(f"{args.stream} {args.entry_id}: {result['state']}" + (f" ({details})" if details else ""))
    return 0


def locate(settings: Settings, stream: str, entry_id: str) -> dict:
    """Written, dead-lettered, pending, unread, or unknown: where the ledger, the trace
    table and Redis put this entry, asked in that order."""
    found = {"stream": stream, "entry_id": entry_id}
    with _db(settings) as conn:
        letter = conn.execute(
            "SELECT failed_at, step, error, consumer, delivery_count, replayed_at FROM db_writer_dead_letters"
            " WHERE original_stream = %s AND original_id = %s ORDER BY id DESC LIMIT 1",
            [stream, entry_id],
        ).fetchone()
        if letter:
            keys = ("failed_at", "step", "error", "consumer", "delivery_count", "replayed_at")
            return found | {"state": "dead-lettered"} | dict(zip(keys, letter, strict=True))
        target = redis_reader.id_key(entry_id.encode())
        for batch, committed, consumer, first, last in conn.execute(
            "SELECT b.id, b.committed_at, b.consumer, s.first_id, s.last_id FROM db_writer_batches b,"
            " unnest(b.streams, b.first_ids, b.last_ids) AS s(stream, first_id, last_id)"
            " WHERE b.streams @> ARRAY[%s] AND s.stream = %s ORDER BY b.id",
            [stream, stream],
        ):
            if redis_reader.id_key(first.encode()) <= target <= redis_reader.id_key(last.encode()):
                return found | {"state": "written", "batch": batch, "committed_at": committed, "consumer": consumer}
    client = _redis(settings)
    try:
        pending = client.xpending_range(stream, settings.consumer_group_name, min=entry_id, max=entry_id, count=1)
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream or group
        pending, groups = [], []
    if pending:
        item = pending[0]
        return found | {
            "state": "pending",
            "consumer": item["consumer"].decode(),
            "deliveries": item["times_delivered"],
            "idle_ms": item["time_since_delivered"],
        }
    exists = bool(client.xrange(stream, entry_id, entry_id)) if client.exists(stream) else False
    info = next((g for g in groups if redis_reader.as_text(g.get("name")) == settings.consumer_group_name), None)
    last_delivered = redis_reader.as_text(info["last-delivered-id"]) if info else "0-0"
    if exists and target > redis_reader.id_key(last_delivered.encode()):
        return found | {"state": "not yet read"}
    return found | {
        "state": "unknown",
        "in_stream": exists,
        "note": "no ledger, dead letter or pending record (a wrong id, or trimmed before it was read)",
    }


# dlq


def dlq(args: argparse.Namespace, settings: Settings) -> int:
    return dlq_list(args, settings) if args.dlq_command == "list" else dlq_replay(args, settings)


def dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings) as conn:
        cur = conn.execute(
            "SELECT id, failed_at, original_stream, original_id, step, error, delivery_count, replayed_at"
            " FROM db_writer_dead_letters ORDER BY id DESC LIMIT %s",
            [args.limit],
        )
        names = [c.name for c in cur.description]
        letters = [dict(zip(names, row, strict=True)) for row in cur]
    if args.json:
        print(json.dumps(letters, indent=2, default=str))
        return 0
    for letter in letters:
        replayed = f"  replayed {letter['replayed_at']:%Y-%m-%d %H:%M:%S}" if letter["replayed_at"] else ""
        print(
            f"#{letter['id']} {letter['failed_at']:%Y-%m-%d %H:%M:%S} {letter['original_stream']} "
            f"{letter['original_id']} [{letter['step']}] {letter['error']}{replayed}"
        )
    return 0


def dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    """XADD each chosen dead letter's original fields to its stream and mark it replayed,
    inside one transaction that holds the rows locked: replaying twice re-injects nothing.
    If the process dies between XADD and COMMIT, the next replay injects those again; the
    readings table's key makes such a duplicate a no-op."""
    since = _parse_since(args.since) if args.since else datetime.fromtimestamp(0, UTC)
    match = f"%{args.match}%" if args.match else "%"
    client = _redis(settings)
    replayed, skipped = [], []
    with _db(settings) as conn, conn.transaction():
        chosen = conn.execute(
            "SELECT id, original_stream, original_id, fields FROM db_writer_dead_letters"
            " WHERE replayed_at IS NULL AND failed_at >= %s AND (error ILIKE %s OR original_stream ILIKE %s)"
            " ORDER BY id FOR UPDATE SKIP LOCKED",
            [since, match, match],
        ).fetchall()
        for letter_id, stream, entry_id, fields in chosen:
            if not dead_letters.is_complete(fields):
                skipped.append(letter_id)  # cut when stored: it cannot be replayed as it was
                continue
            original = dead_letters.decode_fields(fields)
            # Keep the original time: without a timestamp field it came from the old entry id.
            original.setdefault(b"timestamp", entry_id.partition("-")[0].encode())
            if not args.dry_run:
                client.xadd(stream, original)
            replayed.append(letter_id)
        if replayed and not args.dry_run:
            conn.execute("UPDATE db_writer_dead_letters SET replayed_at = now() WHERE id = ANY(%s)", [replayed])
    verb = "would replay" if args.dry_run else "replayed"
    print(
        f"{verb} {len(replayed)} dead letters"
        + (f"; skipped {len(skipped)} cut when stored: {skipped}" if skipped else "")
    )
    return 0


def _parse_since(value: str) -> datetime:
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
