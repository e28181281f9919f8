"""Operator commands besides `run`: health, status, trace, reconcile, dlq list and dlq replay.

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
from psycopg import sql

import consumer_lock
import dead_letters
import redis_client
import redis_reader
from config import Settings, mask_url
from schema import InvalidEntry, Layout


class CommandError(Exception):
    """A command cannot do what was asked: one line on stderr, exit status 2."""


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
    reconcile = commands.add_parser(
        "reconcile",
        help="check that every entry the group acknowledged and Redis still holds is written or dead-lettered"
        " in this database (after a failover); report what is missing",
    )
    reconcile.add_argument("--repair", action="store_true", help="write the missing entries again (idempotent)")
    reconcile.add_argument("--json", action="store_true", help="machine-readable output")
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
    command = {"health": health, "status": status, "trace": trace, "reconcile": reconcile, "dlq": dlq}[args.command]
    try:
        return command(args, settings)
    except CommandError as exc:
        print(f"db-writer: {exc}", file=sys.stderr)
        return 2
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _fail(f"cannot reach Redis at {mask_url(settings.redis_dsn)}: {exc}")
    except psycopg.OperationalError as exc:
        first = (str(exc).strip().splitlines() or ["connection failed"])[0]
        return _fail(f"cannot reach PostgreSQL at {mask_url(settings.postgres_dsn)}: {first}")


def _fail(message: str) -> int:
    print(f"db-writer: {message}", file=sys.stderr)
    return 1


def _redis(settings: Settings) -> redis.Redis:
    return redis_client.connect(settings, timeout_s=5)


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
            # Silence is judged by arrival (last_written_at), not by the sensor's own clock.
            report["silent_sensors"] = [
                {
                    "device_id": d,
                    "sensor_type": s,
                    "last_written_at": arrived.isoformat(),
                    "last_reading_at": last.isoformat(),
                    "clock_skew_s": round(skew, 3),
                    "readings": n,
                }
                for d, s, arrived, last, skew, n in conn.execute(
                    "SELECT device_id, sensor_type, max(last_written_at), max(last_seen),"
                    " extract(epoch FROM max(last_written_at) - max(last_seen))::float8, sum(readings)::int8"
                    " FROM db_writer_sensors GROUP BY 1, 2"
                    " HAVING max(last_written_at) < now() - make_interval(secs => %s) ORDER BY 3",
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
            print(
                f"  {sensor['device_id']}:{sensor['sensor_type']}  last written {sensor['last_written_at']}"
                f"  (its own clock: {sensor['last_reading_at']})"
            )
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
    """Where one entry went. While Redis holds the entry, its row is looked up by its key:
    the answer is exact. Once Redis has trimmed it, the ledger says what it knows, and how
    sure that is. Every lookup is by an index: milliseconds, however big the tables."""
    layout = Layout.from_settings(settings)
    found: dict = {"stream": stream, "entry_id": entry_id}
    try:
        target = redis_reader.id_key(entry_id)
    except ValueError:
        raise CommandError(
            f"{entry_id!r} is not a Redis entry id (milliseconds-sequence, e.g. 1700000000000-0)"
        ) from None
    client = _redis(settings)
    entries = client.xrange(stream, entry_id, entry_id) if client.exists(stream) else []
    with _db(settings) as conn:
        letter = conn.execute(
            "SELECT failed_at, step, error, consumer, delivery_count, replayed_at FROM db_writer_dead_letters"
            " WHERE original_stream = %s AND original_id = %s",
            [stream, entry_id],
        ).fetchone()
        if letter:
            keys = ("failed_at", "step", "error", "consumer", "delivery_count", "replayed_at")
            return found | {"state": "dead-lettered"} | dict(zip(keys, letter, strict=True))
        if entries:
            _, fields = entries[0]
            try:
                row = layout.to_row(stream.encode(), entry_id.encode(), fields)
            except InvalidEntry as exc:
                row, invalid = None, exc.reason
            else:
                invalid = None
                stored = conn.execute(
                    sql.SQL(
                        "SELECT value, created_at FROM {} WHERE device_id = %s AND sensor_type = %s AND timestamp = %s"
                    ).format(sql.Identifier(settings.table_name)),
                    [row.device_id, row.sensor_type, row.timestamp],
                ).fetchone()
                if stored and stored[0] == row.value:
                    return found | {
                        "state": "written",
                        "device_id": row.device_id,
                        "sensor_type": row.sensor_type,
                        "timestamp": row.timestamp,
                        "written_at": stored[1],
                    }
                if stored:
                    found["note"] = f"its key holds another reading (value {stored[0]!r})"
        progress = conn.execute(
            "SELECT consumer, first_id, last_id FROM db_writer_progress WHERE consumer_group = %s AND stream = %s",
            [settings.consumer_group_name, stream],
        ).fetchall()
        checked = conn.execute(
            "SELECT checked_through, checked_at FROM db_writer_streams WHERE consumer_group = %s AND stream = %s",
            [settings.consumer_group_name, stream],
        ).fetchone()
    if entries:
        return found | _in_redis(client, settings, stream, entry_id, row is None, invalid)
    # Redis no longer holds it, or never did: an id past the last one Redis generated, or
    # within what the stream still holds (and never deleted one by one), never existed.
    if _never_existed(client, stream, target):
        return found | {"state": "no such entry", "note": "the stream never held this id"}
    handled_by = [c for c, lo, hi in progress if redis_reader.id_key(lo) <= target <= redis_reader.id_key(hi)]
    if checked and target <= redis_reader.id_key(checked[0]):
        return found | {
            "state": "trimmed, verified",
            "verified_at": checked[1],
            "note": f"every entry of this stream up to {checked[0]} was verified as written or"
            " dead-lettered; if this id existed, it was written",
        }
    if handled_by:
        return found | {
            "state": "trimmed, handled",
            "consumers": handled_by,
            "note": "within the ids these workers handled, not verified one by one: written if it existed,"
            " unless it was lost in a database failover before reconciliation",
        }
    return found | {
        "state": "unknown",
        "in_stream": False,
        "note": "no row, dead letter or ledger record covers it (a wrong id, or trimmed before it was read)",
    }


def _never_existed(client: redis.Redis, stream: str, target: tuple[int, int]) -> bool:
    if not client.exists(stream):
        return False
    info = client.xinfo_stream(stream)
    if target > redis_reader.id_key(info["last-generated-id"]):
        return True
    if info.get("entries-added") is not None and int(info["entries-added"]) == int(info["length"]):
        return True  # nothing was ever removed from this stream
    first, deleted = info.get("first-entry"), info.get("max-deleted-entry-id")
    within = first is not None and target >= redis_reader.id_key(first[0])
    return within and (deleted is None or target > redis_reader.id_key(deleted))


def _in_redis(
    client: redis.Redis, settings: Settings, stream: str, entry_id: str, invalid: bool, reason: str | None
) -> dict:
    """An entry Redis still holds, without its row or dead letter: pending, unread, or missing."""
    group = settings.consumer_group_name
    try:
        pending = client.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        info = next((g for g in client.xinfo_groups(stream) if redis_reader.as_text(g.get("name")) == group), None)
    except redis.ResponseError:  # no group
        pending, info = [], None
    if pending:
        item = pending[0]
        return {
            "state": "pending",
            "consumer": item["consumer"].decode(),
            "deliveries": item["times_delivered"],
            "idle_ms": item["time_since_delivered"],
        }
    last = redis_reader.as_text(info["last-delivered-id"]) if info else "0-0"
    if redis_reader.id_key(entry_id) > redis_reader.id_key(last):
        return {"state": "not yet read"} | ({"will be dead-lettered": reason} if invalid else {})
    what = f"a dead letter ({reason})" if invalid else "its row"
    return {
        "state": "missing",
        "note": f"acknowledged, but {what} is not in this database (a failover?):"
        " `main.py reconcile --repair` writes it again",
    }


# reconcile


def reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from db_writer import DatabaseWriter
    from ledger import Ledger
    from reconcile import Reconciler

    client = _redis(settings)
    streams = redis_reader.discover(client, settings.stream_pattern, settings.dead_letter_stream.encode())
    writer = DatabaseWriter(settings)
    writer.open()
    try:
        reader = redis_reader.StreamReader(client, settings)
        reconciler = Reconciler(
            client,
            writer,
            Ledger(writer, settings),
            Layout.from_settings(settings),
            settings.consumer_group_name,
            reader.publish_dead_letters,
        )
        report = reconciler.run(streams, repair=args.repair)
    finally:
        writer.close()
    if args.json:
        print(
            json.dumps(
                {
                    "checked": report.checked,
                    "missing": report.missing,
                    "repaired": report.repaired,
                    "streams": [asdict(s) for s in report.streams if s.missing or s.unverifiable],
                },
                indent=2,
            )
        )
    else:
        print(
            f"{len(streams)} streams: {report.checked} acknowledged entries checked, {report.missing} missing"
            + (f", {report.repaired} written again" if args.repair else "")
        )
        for part in report.streams:
            if part.missing:
                print(f"  {part.stream}: {part.missing} missing")
            if part.unverifiable:
                count = "an unknown number" if part.unverifiable_count is None else f"at most {part.unverifiable_count}"
                print(
                    f"  {part.stream}: {count} entries in {part.unverifiable} were trimmed from Redis before"
                    " they could be verified"
                )
    return 1 if report.missing > report.repaired else 0


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
