"""Operator commands besides `run`: health, status, trace, reconcile, config, dlq list and replay.

Each reads the same settings as the worker. Whatever goes wrong is one line on stderr
and a non-zero exit status, never a traceback: 2 for a wrong argument or setting, 1
for a server that cannot be reached or refuses. Each command imports only what it
uses, so a health probe does not pay for the worker's modules.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from config import Settings, mask_url


class CommandError(Exception):
    """A command cannot do what was asked: one line on stderr, exit status 2."""


# The command line


def add_commands(commands: argparse._SubParsersAction) -> None:
    health = commands.add_parser(
        "health",
        help="JSON: is this worker (CONSUMER_NAME) alive, when did it last commit, its counters, Redis, "
        "PostgreSQL, the schema; exit 0 only if all is well (a container health probe)",
        description="Exit 0 only if Redis and PostgreSQL answer, the schema is at the migration head, and "
        "the worker named CONSUMER_NAME is alive (with --group: at least one worker of the group).",
    )
    health.add_argument("--group", action="store_true", help="every live worker of the group, not only this one")

    status = commands.add_parser(
        "status",
        help="per stream: length, lag, pending per consumer, oldest pending age; the live workers; dead letters",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--sensors", action="store_true", help="also list sensors silent longer than --silent-for")
    status.add_argument(
        "--silent-for",
        type=_positive(float, zero=True),
        default=3600,
        metavar="SECONDS",
        help="how long without a reading arriving is silent (default 3600)",
    )
    status.add_argument(
        "--gaps",
        action="store_true",
        help="also list periods with no reading longer than GAP_FACTOR x each sensor's usual interval",
    )
    status.add_argument(
        "--since",
        type=_since,
        default=None,
        metavar="TIME",
        help="--gaps from this time on: ISO 8601, epoch seconds or an age like 24h, 7d (default 7d)",
    )
    status.add_argument(
        "--sensor", type=_sensor, default=None, metavar="DEVICE:SENSOR", help="--gaps of this sensor only"
    )

    trace = commands.add_parser("trace", help="where one entry went: written, dead-lettered, pending, unread or lost")
    trace.add_argument("stream", help="the stream name, e.g. mqtt_stream:esp32:temperature")
    trace.add_argument("entry_id", type=_entry_id, help="the Redis entry id, e.g. 1700000000000-0")
    trace.add_argument("--json", action="store_true", help="machine-readable output")

    reconcile = commands.add_parser(
        "reconcile",
        help="check that every entry the group acknowledged and Redis still holds is written or dead-lettered "
        "in this database (after a failover or a restore); report what is missing",
    )
    reconcile.add_argument("--repair", action="store_true", help="write the missing entries again (idempotent)")
    reconcile.add_argument("--json", action="store_true", help="machine-readable output")

    config = commands.add_parser(
        "config",
        help="the effective settings (secrets masked), where each came from, and every problem at once; "
        "exit 2 if there is one",
    )
    config.add_argument("--json", action="store_true", help="machine-readable output")

    dlq = commands.add_parser("dlq", help="dead letters: list them, replay them after a fix")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="{list,replay}")
    listing = dlq_commands.add_parser("list", help="the newest dead letters, from the db_writer_dead_letters table")
    listing.add_argument("--limit", type=_positive(int), default=20, help="how many (default 20)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    replay = dlq_commands.add_parser(
        "replay",
        help="add dead letters' original entries to their stream again, after a fix; each is replayed once, and "
        "a replay that fails again is not replayed again unless --again",
    )
    replay.add_argument(
        "--since", type=_since, help="only those failed at or after TIME (ISO 8601, epoch, 24h, 7d)", metavar="TIME"
    )
    replay.add_argument("--match", help="only those whose error or stream contains this text")
    replay.add_argument(
        "--id",
        type=_positive(int),
        action="append",
        dest="ids",
        metavar="N",
        help="only dead letter #N (repeatable), as `dlq list` numbers them",
    )
    replay.add_argument(
        "--again",
        action="store_true",
        help="also those already replayed, and those that came from a replay and failed again",
    )
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")


def _positive(kind: type, zero: bool = False) -> Any:
    """An argparse type: a number above 0 (or 0 and above, with `zero`)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'more than 0'} (got {text})")
        return value

    return parse


def _since(text: str) -> datetime:
    """ISO 8601 (UTC when it has no offset), epoch seconds, or an age: 30m, 24h, 7d."""
    if age := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip()):
        seconds = float(age.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[age.group(2)]
        return datetime.now(UTC) - timedelta(seconds=seconds)
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601 (2024-05-01T12:00:00Z), epoch seconds, or an age (24h, 7d)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _entry_id(text: str) -> str:
    if not re.fullmatch(r"\d+(-\d+)?", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Redis entry id (milliseconds-sequence, e.g. 1700000000000-0)"
        )
    return text if "-" in text else f"{text}-0"


def _sensor(text: str) -> tuple[str, str]:
    device, _, sensor = text.rpartition(":")
    if not device or not sensor:
        raise argparse.ArgumentTypeError(f"{text!r}: give DEVICE:SENSOR, e.g. esp32:temperature")
    return device, sensor


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    """Run one command; every failure becomes one line on stderr."""
    import psycopg
    import redis

    from errors import DbWriterError

    command = {"health": health, "status": status, "trace": trace, "reconcile": reconcile, "dlq": dlq}[args.command]
    try:
        return command(args, settings)
    except CommandError as exc:
        return _fail(str(exc), 2)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _fail(f"cannot reach Redis at {mask_url(settings.redis_dsn)}: {exc}")
    except redis.RedisError as exc:
        return _fail(f"Redis refused: {exc}")
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        return _fail(f"the database is not migrated to this version ({_first_line(exc)}): run ./migrate.sh upgrade")
    except psycopg.OperationalError as exc:
        return _fail(f"cannot reach PostgreSQL at {mask_url(settings.postgres_dsn)}: {_first_line(exc)}")
    except psycopg.Error as exc:
        return _fail(f"PostgreSQL refused: {_first_line(exc)}")
    except DbWriterError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def _fail(message: str, status: int = 1) -> int:
    print(f"db-writer: {message}", file=sys.stderr)
    return status


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _redis(settings: Settings) -> Any:
    import redis_client

    return redis_client.connect(settings, timeout_s=5)


def _db(settings: Settings) -> Any:
    import psycopg

    return psycopg.connect(settings.postgres_dsn, connect_timeout=3, autocommit=True, prepare_threshold=None)


def _print(report: Any) -> None:
    print(json.dumps(report, indent=2, default=str))


# config


def config_command(settings_file: str | None, as_json: bool) -> int:
    """Runs before the settings are built (they may be what is wrong): see main.main."""
    from config import inspect_settings

    report = inspect_settings(settings_file)
    if as_json:
        _print(
            {
                "env_file": str(report.env_file),
                "env_file_exists": report.env_file.is_file(),
                "settings": {k: {"value": v, "from": src} for k, (v, src) in report.values.items()},
                "problems": report.problems,
                "warnings": report.warnings,
            }
        )
    else:
        where = report.env_file if report.env_file.is_file() else f"{report.env_file} (not found)"
        print(f"settings (.env: {where})")
        for name, (value, source) in report.values.items():
            print(f"  {name:<36} {value:<40} {source}")
        for warning in report.warnings:
            print(f"warning: {warning}")
        for problem in report.problems:
            print(f"problem: {problem}")
        print(f"{len(report.problems)} problem(s), {len(report.warnings)} warning(s)")
    return 2 if report.problems else 0


# health


def health(args: argparse.Namespace, settings: Settings) -> int:
    import consumer_lock
    import schema_version

    group, name = settings.consumer_group_name, settings.consumer_name
    report: dict[str, Any] = {"consumer": name, "group": group, "running": False, "worker": None}
    try:
        client = _redis(settings)
        record = consumer_lock.worker(client, group, name)
        report.update(redis=True, running=record is not None, worker=record)
        if args.group:
            live = consumer_lock.workers(client, group)
            report.update(workers=live, alive=len(live))
    except Exception as exc:  # a probe answers whatever fails: the report says what
        report.update(redis=False, redis_error=_first_line(exc))
    head = schema_version.head()
    try:
        with _db(settings) as conn:
            found = conn.execute("SELECT to_regclass('alembic_version')").fetchone()
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone() if found and found[0] else None
            current = row[0] if row else None
        report.update(
            database=True,
            schema={
                "head": head,
                "database": current,
                "at_head": current is not None and current == head,
            },
        )
    except Exception as exc:
        report.update(database=False, database_error=_first_line(exc), schema=None)
    report["stats"] = (report["worker"] or {}).get("stats", {})
    alive = report.get("alive", 0) > 0 if args.group else report["running"]
    report["healthy"] = bool(alive and report["redis"] and report["database"] and report["schema"]["at_head"])
    _print(report)
    return 0 if report["healthy"] else 1


# status


def status(args: argparse.Namespace, settings: Settings) -> int:
    import consumer_lock
    import redis_reader

    client = _redis(settings)
    group = settings.consumer_group_name
    streams = redis_reader.discover(client, settings.stream_pattern, settings.dead_letter_stream.encode())
    rows = redis_reader.group_status(client, streams, group)
    held: dict[str, int] = {}
    for row in rows:
        for consumer, count in row.pending.items():
            held[consumer] = held.get(consumer, 0) + count
    live = consumer_lock.workers(client, group)
    report: dict[str, Any] = {
        "group": group,
        "streams": [asdict(row) for row in rows],
        "totals": {
            "streams": len(rows),
            "length": sum(row.length for row in rows),
            "lag": sum(row.lag or 0 for row in rows),
            "pending": sum(held.values()),
            "oldest_pending_age_s": max((r.oldest_pending_age_s for r in rows if r.oldest_pending_age_s), default=None),
        },
        "workers": [{**w, "pending": held.get(w["consumer"] or "", 0)} for w in live]
        + [
            {"consumer": c, "pending": n, "alive": False}
            for c, n in sorted(held.items())
            if n and c not in {w["consumer"] for w in live}
        ],
        "dead_letter_stream": {"name": settings.dead_letter_stream, "length": client.xlen(settings.dead_letter_stream)},
    }
    with _db(settings) as conn:
        report["dead_letter_table"] = conn.execute("SELECT count(*) FROM db_writer_dead_letters").fetchone()[0]
        if args.sensors:
            report["silent_sensors"] = _silent(conn, args.silent_for)
        if args.gaps:
            import gaps

            since = args.since or datetime.now(UTC) - timedelta(days=7)
            found = gaps.find(conn, settings.table_name, since, settings.gap_factor, args.sensor)
            report["gaps"] = {
                "since": since.isoformat(),
                "factor": settings.gap_factor,
                "gaps": [asdict(g) for g in found],
            }
    if args.json:
        _print(report)
        return 0
    _print_status(report, rows, settings, args)
    return 0


def _silent(conn: Any, silent_for: float) -> list[dict]:
    """Sensors whose last reading ARRIVED longer ago than `silent_for` (not by the sensor's own
    clock: a reading written now with an old timestamp is not silence), with the clock skew."""
    return [
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
            [silent_for],
        )
    ]


def _print_status(report: dict, rows: list, settings: Settings, args: argparse.Namespace) -> None:
    print(f"{'stream':40} {'length':>8} {'lag':>8} {'pending':>8} {'oldest pending':>15}  consumers")
    for row in rows:
        oldest = "-" if row.oldest_pending_age_s is None else f"{row.oldest_pending_age_s:.1f} s"
        consumers = ", ".join(f"{name}={count}" for name, count in row.pending.items()) or "-"
        lag = "?" if row.lag is None else row.lag
        print(f"{row.stream:40} {row.length:>8} {lag:>8} {sum(row.pending.values()):>8} {oldest:>15}  {consumers}")
    totals = report["totals"]
    print(f"{totals['streams']} streams, {totals['length']} entries, lag {totals['lag']}, pending {totals['pending']}")
    print(f"\n{'worker':24} {'host/pid':28} {'heartbeat':>10} {'last commit':>12} {'pending':>8}")
    for w in report["workers"]:
        if w.get("alive") is False:
            print(f"{w['consumer']:24} {'(not running)':28} {'-':>10} {'-':>12} {w['pending']:>8}")
            continue
        commit = "-" if w["last_commit_age_s"] is None else f"{w['last_commit_age_s']:.1f} s ago"
        print(
            f"{w['consumer']:24} {w['host'] + '/' + str(w['pid']):28} {w['heartbeat_age_s']:>8.1f} s"
            f" {commit:>12} {w['pending']:>8}"
        )
    if not report["workers"]:
        print("(no live worker in this group)")
    print(
        f"\ndead letters: {report['dead_letter_stream']['length']} in {settings.dead_letter_stream}"
        f" (capped), {report['dead_letter_table']} in db_writer_dead_letters"
    )
    if args.sensors:
        silent = report["silent_sensors"]
        print(f"{len(silent)} sensors silent for more than {args.silent_for:g} s (by arrival)")
        for sensor in silent:
            print(
                f"  {sensor['device_id']}:{sensor['sensor_type']}  last written {sensor['last_written_at']}"
                f"  (its own clock: {sensor['last_reading_at']}, skew {sensor['clock_skew_s']:.0f} s)"
            )
    if args.gaps:
        found = report["gaps"]["gaps"]
        print(
            f"{len(found)} gaps since {report['gaps']['since']} (longer than {report['gaps']['factor']:g} x the"
            " usual interval), newest first"
        )
        for gap in found:
            end = gap["end"].isoformat() if gap["end"] else "now (still open)"
            print(
                f"  {gap['device_id']}:{gap['sensor_type']}  {gap['start'].isoformat()} -> {end}"
                f"  ({gap['seconds']:.0f} s; usually {gap['usual_s']:.1f} s)"
            )


# trace


def trace(args: argparse.Namespace, settings: Settings) -> int:
    result = locate(settings, args.stream, args.entry_id)
    if args.json:
        _print(result)
    else:
        details = ", ".join(f"{k}={v}" for k, v in result.items() if k not in {"stream", "entry_id", "state"})
        print(f"{args.stream} {args.entry_id}: {result['state']}" + (f" ({details})" if details else ""))
    return 0


def locate(settings: Settings, stream: str, entry_id: str) -> dict:
    """Where one entry went. While Redis holds the entry, its row is looked up by its key:
    the answer is exact. Once Redis has trimmed it, the ledger says what it knows, and how
    sure that is. Every lookup is by an index: milliseconds, however big the tables."""
    from psycopg import sql

    import redis_reader
    from schema import InvalidEntry, Layout

    layout = Layout.from_settings(settings)
    found: dict = {"stream": stream, "entry_id": entry_id}
    target = redis_reader.id_key(entry_id)
    client = _redis(settings)
    entries = client.xrange(stream, entry_id, entry_id) if client.exists(stream) else []
    row, invalid = None, None
    with _db(settings) as conn:
        letter = conn.execute(
            "SELECT id, failed_at, step, error, consumer, delivery_count, replayed_at FROM db_writer_dead_letters"
            " WHERE original_stream = %s AND original_id = %s",
            [stream, entry_id],
        ).fetchone()
        if letter:
            keys = ("dead_letter", "failed_at", "step", "error", "consumer", "delivery_count", "replayed_at")
            return found | {"state": "dead-lettered"} | dict(zip(keys, letter, strict=True))
        if entries:
            _, fields = entries[0]
            try:
                row = layout.to_row(stream.encode(), entry_id.encode(), fields)
            except InvalidEntry as exc:
                invalid = exc.reason
            else:
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
        return found | _in_redis(client, settings, stream, entry_id, invalid)
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


def _never_existed(client: Any, stream: str, target: tuple[int, int]) -> bool:
    import redis_reader

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


def _in_redis(client: Any, settings: Settings, stream: str, entry_id: str, reason: str | None) -> dict:
    """An entry Redis still holds, without its row or dead letter: pending, unread, or missing."""
    import redis

    import redis_reader

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
        return {"state": "not yet read"} | ({"will be dead-lettered": reason} if reason else {})
    what = f"a dead letter ({reason})" if reason else "its row"
    return {
        "state": "missing",
        "note": f"acknowledged, but {what} is not in this database (a failover?):"
        " `main.py reconcile --repair` writes it again",
    }


# reconcile


def reconcile(args: argparse.Namespace, settings: Settings) -> int:
    import redis_reader
    from db_writer import DatabaseWriter
    from ledger import Ledger
    from reconcile import Reconciler
    from schema import Layout

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
        report = reconciler.run(reconciler.snapshot(streams), repair=args.repair)
    finally:
        writer.close()
    if args.json:
        _print(
            {
                "checked": report.checked,
                "missing": report.missing,
                "repaired": report.repaired,
                "streams": [asdict(s) for s in report.streams if s.missing or s.unverifiable],
            }
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
            "SELECT id, failed_at, original_stream, original_id, step, error, delivery_count, replayed_at, replay_of"
            " FROM db_writer_dead_letters ORDER BY id DESC LIMIT %s",
            [args.limit],
        )
        names = [c.name for c in cur.description]
        letters = [dict(zip(names, row, strict=True)) for row in cur]
    if args.json:
        _print(letters)
        return 0
    for letter in letters:
        replayed = f"  replayed {letter['replayed_at']:%Y-%m-%d %H:%M:%S}" if letter["replayed_at"] else ""
        again = f"  (a replay of #{letter['replay_of']})" if letter["replay_of"] else ""
        print(
            f"#{letter['id']} {letter['failed_at']:%Y-%m-%d %H:%M:%S} {letter['original_stream']} "
            f"{letter['original_id']} [{letter['step']}] {letter['error']}{replayed}{again}"
        )
    return 0


def dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    """XADD each chosen dead letter's original fields to its stream, with the field
    db_writer_replay_of naming the letter, and mark it replayed, inside one transaction that
    holds the rows locked: replaying twice re-injects nothing, and an entry that fails again
    makes a dead letter that says where it came from, left alone by the next replay unless
    --again. If the process dies between XADD and COMMIT, the next replay injects those
    again; the readings table's key makes such a duplicate a no-op."""
    import dead_letters
    from schema import REPLAY_FIELD

    since = args.since or datetime.fromtimestamp(0, UTC)
    match = f"%{args.match}%" if args.match else "%"
    where = ["failed_at >= %s", "(error ILIKE %s OR original_stream ILIKE %s)"]
    params: list[Any] = [since, match, match]
    if not args.again:  # not replayed yet, and (unless named) not the failure of an earlier replay
        where.append("replayed_at IS NULL" if args.ids else "replayed_at IS NULL AND replay_of IS NULL")
    if args.ids:
        where.append("id = ANY(%s)")
        params.append(args.ids)
    client = _redis(settings)
    replayed, skipped = [], []
    with _db(settings) as conn, conn.transaction():
        chosen = conn.execute(
            "SELECT id, original_stream, original_id, step, error, fields FROM db_writer_dead_letters"
            f" WHERE {' AND '.join(where)} ORDER BY id FOR UPDATE SKIP LOCKED",
            params,
        ).fetchall()
        for letter_id, stream, entry_id, step, error, fields in chosen:
            if not dead_letters.is_complete(fields):
                skipped.append(letter_id)  # cut when stored: it cannot be replayed as it was
                continue
            if args.dry_run:
                print(f"would replay #{letter_id} {stream} {entry_id} [{step}] {error}")
            else:
                original = dead_letters.decode_fields(fields)
                # Keep the original time: without a timestamp field it came from the old entry id.
                original.setdefault(b"timestamp", entry_id.partition("-")[0].encode())
                original[REPLAY_FIELD.encode()] = str(letter_id).encode()
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
