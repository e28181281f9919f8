"""The scenarios. Each gets a fresh, migrated database and an emptied Valkey, runs real
`main.py` worker processes, does its damage, waits until nothing is pending, and accounts
for every entry it published."""

from __future__ import annotations

import math
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import psycopg
import redis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from redis.crc import key_slot

import harness as h
import redis_topologies as topologies
from harness import Item

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SENSORS = ("temp", "hum")


@dataclass
class Params:
    quick: bool

    def pick(self, quick, full):
        return quick if self.quick else full

    @property
    def entries(self) -> int:
        return self.pick(20_000, 200_000)

    @property
    def rate(self) -> float:  # publishing spread over ~10 s (quick) or ~33 s (full)
        return self.pick(2_000, 6_000)

    @property
    def settle_timeout(self) -> float:
        return self.pick(90, 240)


@dataclass
class Result:
    scenario: str
    sent: int = 0
    written: int = 0
    dead_lettered: int = 0
    pending: int = 0
    lost: int = 0
    duplicated: int = 0
    seconds: float = 0.0
    unread: int = 0
    lost_by_redis: int = 0
    ignored: int = 0  # published where no worker reads (outside STREAM_PATTERN)
    expected_dead_letters: int = 0
    good_dead_lettered: int = 0
    bad_written: int = 0
    dead_letters_repeated: int = 0
    rewrites: int = 0
    worker_crashes: int = 0
    figures: str = ""  # the scenario's key figures, for the table (stall after N s, resumed after N s, ...)
    skipped: str = ""  # why the scenario could not run here (then it has no checks)
    checks: list = field(default_factory=list)  # {"name", "ok", "severity": must|warn, "detail"}
    notes: list = field(default_factory=list)
    accounting: dict = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "", severity: str = "must") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "severity": severity, "detail": detail})
        return ok

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if not c["ok"] and c["severity"] == "must"]

    def as_dict(self) -> dict:
        return asdict(self)


class Context:
    """What a scenario needs: the servers, a clean Valkey, a new database, a log dir."""

    def __init__(self, srv: h.Servers, params: Params, log_root: Path, seed: int) -> None:
        self.srv, self.params, self.log_root = srv, params, log_root
        self.rng = random.Random(seed)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.srv.valkey.url, socket_timeout=30)


# Items


def readings(
    n: int,
    devices: int,
    rng: random.Random,
    poison_every: int = 0,
    kinds: list[str] | None = None,
    t0: datetime = T0,
    sensors: tuple[str, ...] = SENSORS,
) -> list[Item]:
    """n entries, round-robin over devices x sensors streams, each with its own timestamp
    (one second apart per stream, from `t0`), so every reading has a unique key. With
    poison_every, about one entry in that many is a poison entry of a rotating kind (of
    `kinds`, default all of POISON)."""
    items: list[Item] = []
    streams = [(f"dev{d:03d}", s) for d in range(devices) for s in sensors]
    slot = 0
    kinds = list(kinds or POISON)
    while len(items) < n:
        for device, sensor in streams:
            if len(items) >= n:
                break
            ts = t0 + timedelta(seconds=slot)
            value = round(rng.uniform(-40, 120), 3)
            stream = f"mqtt_stream:{device}:{sensor}".encode()
            fields = {"value": repr(value), "timestamp": ts.isoformat()}
            if rng.random() < 0.2:
                fields["metadata"] = f'{{"fw":"1.{slot % 9}","rssi":{-rng.randint(30, 90)}}}'
            if poison_every and rng.randrange(poison_every) == 0:
                kind = kinds[len(items) % len(kinds)]
                items += POISON[kind](items, stream, device, sensor, ts, value, rng)
            else:
                items.append(Item(stream, fields, (device, sensor, ts), value))
        slot += 1
    return items


def _bad(
    kind: str, reason: str, step: str, fields: Callable[[str], dict], stream: Callable[[bytes], bytes] = lambda s: s
) -> Callable:
    def make(items, stream_name, device, sensor, ts, value, rng):
        return [Item(stream(stream_name), fields(ts.isoformat()), None, None, kind=kind, reason=reason, step=step)]

    return make


def _conflict(items, stream, device, sensor, ts, value, rng):
    """Same device, sensor and timestamp as an earlier reading of this stream, another value:
    first write wins, the other is a dead letter ("already stored")."""
    earlier = [
        i
        for i, it in enumerate(items[-2000:], start=max(0, len(items) - 2000))
        if it.stream == stream and it.kind == "good"
    ]
    if not earlier:
        return [Item(stream, {"value": repr(value), "timestamp": ts.isoformat()}, (device, sensor, ts), value)]
    first = items[earlier[0]]
    other = round(first.value + 1000.5, 3)
    first.kind, first.pair = "conflict", len(items)
    return [
        Item(
            stream,
            {"value": repr(other), "timestamp": first.key[2].isoformat()},
            first.key,
            other,
            kind="conflict",
            pair=earlier[0],
        )
    ]


def _exact_dup(items, stream, device, sensor, ts, value, rng):
    """The same reading again (a producer retry): no second row, no dead letter."""
    earlier = next((it for it in reversed(items[-2000:]) if it.stream == stream and it.kind == "good"), None)
    if earlier is None:
        return [Item(stream, {"value": repr(value), "timestamp": ts.isoformat()}, (device, sensor, ts), value)]
    return [Item(stream, dict(earlier.fields), earlier.key, earlier.value, kind="exact_dup")]


LONG_DEVICE = "x" * 101
POISON: dict[str, Callable] = {
    "value_not_a_number": _bad(
        "value_not_a_number", "not a decimal number", "parse", lambda ts: {"value": "abc", "timestamp": ts}
    ),
    "value_nan": _bad("value_nan", "not finite", "validate", lambda ts: {"value": "NaN", "timestamp": ts}),
    "value_empty": _bad("value_empty", "value is empty", "parse", lambda ts: {"value": "", "timestamp": ts}),
    "value_missing": _bad("value_missing", "value is missing", "parse", lambda ts: {"timestamp": ts}),
    "metadata_not_json": _bad(
        "metadata_not_json",
        "metadata is not valid JSON",
        "parse",
        lambda ts: {"value": "1.5", "timestamp": ts, "metadata": "{not json"},
    ),
    "metadata_array": _bad(
        "metadata_array",
        "metadata must be a JSON object",
        "validate",
        lambda ts: {"value": "1.5", "timestamp": ts, "metadata": "[1,2]"},
    ),
    "timestamp_garbage": _bad(
        "timestamp_garbage",
        "neither ISO 8601 nor a Unix epoch",
        "parse",
        lambda ts: {"value": "1.5", "timestamp": "2024-13-45T99:00:00Z"},
    ),
    "device_id_101_chars": _bad(
        "device_id_101_chars",
        "device_id longer than 100 characters",
        "validate",
        lambda ts: {"value": "1.5", "timestamp": ts},
        lambda s: b"mqtt_stream:" + LONG_DEVICE.encode() + b":" + s.rsplit(b":", 1)[1],
    ),
    "conflict": _conflict,
    "exact_dup": _exact_dup,
}
# Entries that are bad on their own (no pairing with another entry): a dead letter each.
BAD_KINDS = [kind for kind in POISON if kind not in ("conflict", "exact_dup")]


def resolve_conflicts(database_url: str, items: list[Item]) -> tuple[int, list[str]]:
    """For each pair of readings with one key and two values, the one stored won; the other
    must be a dead letter. -> (pairs, problems)."""
    problems, pairs = [], 0
    with psycopg.connect(database_url) as conn:
        for index, item in enumerate(items):
            if item.kind != "conflict" or item.pair is None or item.pair < index:
                continue
            pairs += 1
            other = items[item.pair]
            row = conn.execute(
                "SELECT value FROM sensor_readings WHERE device_id = %s AND sensor_type = %s AND timestamp = %s",
                item.key,
            ).fetchone()
            stored = row[0] if row else None
            _winner, loser = (item, other) if stored == item.value else (other, item)
            if stored not in (item.value, other.value):
                problems.append(f"{item.key}: stored {stored!r}, published {item.value!r} and {other.value!r}")
            loser.reason, loser.step = "already stored", "write"
    return pairs, problems


# Running a scenario


def _finish(
    ctx: Context,
    res: Result,
    client: h.Client,
    fleet: h.Fleet,
    database_url: str,
    items: list[Item],
    started: float,
    lost_to_redis: set | None = None,
    killed_hard: bool = False,
    strict: bool = False,
    others: tuple[h.Fleet, ...] = (),
) -> h.Accounting:
    """Wait until nothing is pending, stop the workers (SIGTERM), account for every item.
    `strict` adds the checks of the newer scenarios: no traceback in any worker log (of
    `fleet` and `others`), each bad entry exactly once in the dead-letter stream and table."""
    settled, waited = h.wait_settled(client, fleet, ctx.params.settle_timeout)
    res.check("settled: nothing pending or unread", settled, f"waited {waited:.1f} s")
    fleet.wait_up(client, 30)  # SIGTERM before the handlers are installed would just kill it
    _stop_fleet(res, fleet)
    res.seconds = round(time.monotonic() - started, 1)
    account = h.account(client, database_url, items, lost_to_redis)
    _judge(res, account, items, exact_ledger=not (killed_hard or fleet.crashes), strict=strict)
    if strict:
        _no_tracebacks(res, fleet, *others)
    return account


def _no_tracebacks(res: Result, *fleets: h.Fleet) -> None:
    found = [(w.name, tb) for fleet in fleets for w in fleet.workers.values() for tb in w.tracebacks()]
    res.check(
        "no traceback in any worker log",
        not found,
        f"{len(found)} tracebacks; " + " | ".join(f"{name}: {tb[:700]}" for name, tb in found[:3]),
    )


def _stop_fleet(res: Result, fleet: h.Fleet) -> None:
    codes = fleet.stop()
    res.check("workers exit 0 on SIGTERM", all(c == 0 for c in codes.values()), str(codes))
    res.worker_crashes = len(fleet.crashes)
    res.check(
        "no worker exited on its own",
        not fleet.crashes,
        "; ".join(f"{c['worker']} exit {c['status']} at {c['at']}: {c['log_tail'][-600:]}" for c in fleet.crashes),
    )


def _judge(res: Result, acc: h.Accounting, items: list[Item], exact_ledger: bool = True, strict: bool = False) -> None:
    """The verdict. `exact_ledger`: no worker died without flushing its last second of ledger
    statistics (kill -9), so the ledger's row count must match the table exactly. `strict`:
    a dead letter twice (table or stream) fails, not only warns."""
    for name in (
        "sent",
        "written",
        "dead_lettered",
        "pending",
        "unread",
        "lost",
        "duplicated",
        "lost_by_redis",
        "good_dead_lettered",
        "bad_written",
        "dead_letters_repeated",
        "rewrites",
    ):
        setattr(res, name, getattr(acc, name))
    res.expected_dead_letters = sum(1 for it in items if it.bad)
    res.accounting = dict(vars(acc).items())
    ex = acc.examples
    res.check("lost == 0", acc.lost == 0, "; ".join(ex.get("lost", [])))
    res.check("duplicated == 0", acc.duplicated == 0)
    res.check(
        "pending == 0 and unread == 0",
        acc.pending == 0 and acc.unread == 0,
        f"{acc.pending} pending, {acc.unread} unread",
    )
    if exact_ledger:
        res.check(
            "ledger: sum(rows_inserted) == rows in the table",
            acc.ledger_rows_inserted == acc.rows_in_table,
            f"{acc.ledger_rows_inserted} vs {acc.rows_in_table}",
        )
    else:  # a worker killed with -9 loses at most its last second of statistics, never a row
        res.check(
            "ledger: sum(rows_inserted) <= rows in the table",
            acc.ledger_rows_inserted <= acc.rows_in_table,
            f"{acc.ledger_rows_inserted} vs {acc.rows_in_table}",
        )
    res.check("no good reading dead-lettered", acc.good_dead_lettered == 0, "; ".join(ex.get("good_dead_lettered", [])))
    res.check("no bad entry written", acc.bad_written == 0, "; ".join(ex.get("bad_written", [])))
    if res.expected_dead_letters:
        res.check(
            "every bad entry dead-lettered (table)",
            acc.bad_not_dead_lettered == 0,
            f"{res.expected_dead_letters} bad, {acc.bad_not_dead_lettered} without a trace row; "
            + "; ".join(ex.get("bad_not_dead_lettered", [])),
        )
        res.check(
            "every dead letter has the expected reason",
            acc.dead_letter_reason_wrong == 0,
            "; ".join(ex.get("dead_letter_reason_wrong", [])),
        )
    res.check(
        "every dead letter also in the dead-letter stream",
        acc.dead_letter_stream_missing == 0,
        f"{acc.dead_letter_stream_missing} missing; " + "; ".join(ex.get("dead_letter_stream_missing", [])),
    )
    res.check(
        "no entry both written and dead-lettered",
        "written_and_dead_lettered" not in ex,
        "; ".join(ex.get("written_and_dead_lettered", [])),
    )
    res.check(
        "no entry dead-lettered twice",
        acc.dead_letters_repeated == 0,
        f"{acc.dead_letters_repeated} entries have more than one trace row",
        severity="must" if strict else "warn",
    )
    res.check(
        "no entry twice in the dead-letter stream",
        acc.dead_letter_stream_repeated == 0,
        f"{acc.dead_letter_stream_repeated} entries have more than one dead letter in the stream; "
        + "; ".join(ex.get("dead_letter_stream_repeated", [])),
        severity="must" if strict else "warn",
    )


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            parts = stat.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return math.nan


def _skip(res: Result, reason: str) -> Result:
    """The scenario cannot run on this host: no checks, the reason in the report."""
    res.skipped = reason
    res.notes.append(f"skipped: {reason}")
    res.figures = "skipped"
    return res


def _wait(seconds: float, fleet: h.Fleet | None = None) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if fleet:
            fleet.check()
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))


# 1. kill -9


def kill_workers(ctx: Context, database_url: str) -> Result:
    """kill -9 while the workers are busy: half of the kills are aimed at a worker holding
    read-but-unacked entries; every fourth kills both; every third single kill leaves the
    worker dead for 3 x CLAIM_IDLE_MS, so the other one must XAUTOCLAIM its entries."""
    res = Result("1. kill -9 workers")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    items = readings(p.entries, devices=40, rng=rng)
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "kill", ["w1", "w2"])
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    # Publishing spans the whole kill phase (a kill round takes ~5-7 s: worker start-up is
    # seconds of imports), so every kill lands on workers with entries coming in.
    publisher = h.Publisher(ctx.srv.valkey.url, items, p.entries / p.pick(30, 90))
    publisher.start()
    min_kills, max_kills = p.pick(4, 10), p.pick(8, 24)
    claim_wait = 3 * 2.0  # 3 x CLAIM_IDLE_MS
    left_dead, in_flight, log, n = [], 0, [], 0
    while n < max_kills and (n < min_kills or publisher.is_alive()):
        fleet.wait_up(client)  # a kill during start-up (imports) would test nothing
        names = ["w1", "w2"] if n % 4 == 3 else [rng.choice(["w1", "w2"])]
        leave_dead = n % 3 == 1 and len(names) == 1
        if n % 2 == 0 or leave_dead:  # aimed: wait (up to 3 s) until the victim holds entries it has not acked
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not all(h.pending_by_consumer(client).get(x) for x in names):
                time.sleep(0.002)
        else:
            _wait(rng.uniform(0.3, 2.0), fleet)
        for name in names:
            fleet.workers[name].kill()
        # A dead consumer's pending list is frozen (until CLAIM_IDLE_MS passes): exactly what it
        # had read and not acked when it died.
        after = h.pending_by_consumer(client)
        held = {name: after.get(name, 0) for name in names}
        in_flight += sum(1 for count in held.values() if count)
        if leave_dead:
            name = names[0]
            _wait(claim_wait, fleet)
            later = h.pending_by_consumer(client).get(name, 0)
            left_dead.append((name, held[name], later))
            log.append(f"kill -9 {name} (pending {held[name]}), left dead {claim_wait:.0f} s: its pending -> {later}")
        else:
            log.append(f"kill -9 {' + '.join(f'{k} (pending {v})' for k, v in held.items())}, restarted at once")
        for name in names:
            fleet.workers[name].start()
        n += 1
    log.append(
        f"{n} kill rounds, {in_flight} kills hit a worker holding read-but-unacked entries; "
        f"{publisher.sent} of {len(items)} published by the last kill"
    )
    publisher.join()
    res.check("publisher finished", publisher.error is None, repr(publisher.error))
    res.notes += log
    res.check("kills hit workers holding unacked entries", in_flight > 0, f"{in_flight} of them", severity="warn")
    res.check(
        "a dead worker's pending entries were claimed by the other",
        all(later == 0 for _, _, later in left_dead) and any(at > 0 for _, at, _ in left_dead),
        "; ".join(f"{n}: {a} -> {b}" for n, a, b in left_dead),
        severity="warn",
    )
    _finish(ctx, res, client, fleet, database_url, publisher.published(), started, killed_hard=True)
    res.notes.append("worker starts: " + ", ".join(f"{w.name}={w.starts}" for w in fleet.workers.values()))
    return res


# 2. PostgreSQL outage


def postgres_outage(ctx: Context, database_url: str) -> Result:
    res = Result("2. PostgreSQL down")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    outage = p.pick(10, 30)
    items = readings(p.entries, devices=40, rng=rng)
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "pg-outage", ["w1", "w2"])
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    publisher = h.Publisher(ctx.srv.valkey.url, items, p.rate)
    publisher.start()
    _wait(p.pick(3, 8), fleet)
    ctx.srv.pg.stop()
    stopped = time.monotonic()
    alive, max_pending = True, 0
    try:
        while time.monotonic() - stopped < outage:
            fleet.check(restart=False)
            alive = alive and fleet.all_alive()
            max_pending = max(max_pending, h.backlog(client)[0])
            time.sleep(0.5)
        acked_at_end = h.acked(client, publisher.published())
    finally:
        restart_at = datetime.now(UTC)
        ctx.srv.pg.start()
    res.notes.append(
        f"PostgreSQL down {time.monotonic() - stopped:.0f} s, {publisher.sent} of {len(items)} published by the restart"
    )
    res.check("workers stayed up through the outage", alive and not fleet.crashes)
    res.check(
        "entries stayed pending during the outage (read, not written, not acked)",
        max_pending > 0,
        f"up to {max_pending} pending",
    )
    publisher.join()
    res.check("publisher finished", publisher.error is None, repr(publisher.error))
    _finish(ctx, res, client, fleet, database_url, publisher.published(), started)
    # Everything acked while PostgreSQL was down must have been committed before it went down.
    by_id = {(it.stream, it.entry_id): it for it in publisher.published()}
    with psycopg.connect(database_url) as conn:
        before = {
            (d, s, t)
            for d, s, t in conn.execute(
                "SELECT device_id, sensor_type, timestamp FROM sensor_readings WHERE created_at < %s", [restart_at]
            )
        }
    unwritten = [k for k in acked_at_end if by_id[k].key not in before]
    res.check(
        "nothing acked without its row committed (checked at the end of the outage)",
        not unwritten,
        f"{len(acked_at_end)} acked, {len(unwritten)} of them unwritten: {unwritten[:5]}",
    )
    return res


# 3. Redis restarts


def redis_restart(ctx: Context, database_url: str, empty: bool) -> Result:
    """Publish at a steady rate, then a burst (a backlog the workers are still reading), then
    restart Redis at once; then publish the rest. With the AOF, everything published must end
    up written; restarted empty, what Redis held unacked is gone, except batches in flight."""
    res = Result("3b. Redis restarted EMPTY" if empty else "3a. Redis restarted (AOF)")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    items = readings(p.entries, devices=40, rng=rng)
    steady, burst = int(p.entries * 0.3), p.pick(8_000, 60_000)
    fleet = h.Fleet(
        ctx.srv.valkey.url, database_url, ctx.log_root / ("redis-empty" if empty else "redis-aof"), ["w1", "w2"]
    )
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    before = h.Publisher(ctx.srv.valkey.url, items[:steady], p.rate)
    before.run()
    # The burst lands while the workers are frozen (SIGSTOP, well under the lock TTL), so Redis
    # holds a real backlog when it goes down a moment after they resume.
    fleet.signal(signal.SIGSTOP)
    try:
        burst_items = h.publish_all(ctx.srv.valkey.url, items[steady : steady + burst])
    finally:
        fleet.signal(signal.SIGCONT)
    time.sleep(0.1)
    lost_to_redis = None
    if empty:
        # Freeze writes (XREADGROUP, XACK, XADD), so the snapshot of what Redis holds unacked is exact.
        client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        lost_to_redis = h.unacked(client)
    backlog = h.backlog(client) if not empty else None
    down = time.monotonic()
    ctx.srv.valkey.stop()
    _wait(3.0)
    if empty:
        ctx.srv.valkey.wipe()
    ctx.srv.valkey.start()
    published_before = steady + len(burst_items)
    res.notes.append(
        f"Redis down {time.monotonic() - down:.1f} s, after {published_before} of {len(items)} entries "
        + (
            f"(the last {len(burst_items)} in a burst); it held {len(lost_to_redis)} unacked "
            "(pending or unread) entries, gone with the restart"
            if empty
            else f"(the last {len(burst_items)} in a burst); (pending, unread) at the restart: {backlog}"
        )
    )
    if empty:
        # Streams and groups are gone: the workers have nothing to read until publishing resumes.
        _wait(3.0, fleet)  # reconnect (backoff) and find out
        pids = {w.name: w.proc.pid for w in fleet.workers.values()}
        cpu0 = {n: _cpu_seconds(pid) for n, pid in pids.items()}
        idle = 4.0
        _wait(idle, fleet)
        cpu = {n: _cpu_seconds(pid) - cpu0[n] for n, pid in pids.items()}
        res.check(
            "workers idle (not spinning) while Redis has no stream",
            all(c < 0.25 * idle for c in cpu.values()),
            f"CPU seconds over {idle:.0f} s with zero streams: " + ", ".join(f"{n}={c:.1f}" for n, c in cpu.items()),
            severity="warn",
        )
    res.check("workers survived the restart", fleet.all_alive() and not fleet.crashes)
    after = h.Publisher(ctx.srv.valkey.url, items[steady + burst :], p.rate)
    after.run()
    res.check("publisher finished", before.error is None and after.error is None, repr(before.error or after.error))
    published = before.published() + burst_items + after.published()
    _finish(ctx, res, client, fleet, database_url, published, started, lost_to_redis)
    if empty:
        written_anyway = len(lost_to_redis) - res.lost_by_redis
        res.notes.append(
            f"of the {len(lost_to_redis)} entries Redis held unacked at the restart, {written_anyway} "
            f"were written anyway (batches in flight) and {res.lost_by_redis} were lost by Redis"
        )
    return res


# 4. Poison entries


def poison(ctx: Context, database_url: str) -> Result:
    res = Result("4. poison entries mixed in")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    items = readings(p.entries, devices=40, rng=rng, poison_every=40)
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "poison", ["w1", "w2"])
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    publisher = h.Publisher(ctx.srv.valkey.url, items, p.rate * 2)
    publisher.start()
    publisher.join()
    res.check("publisher finished", publisher.error is None, repr(publisher.error))
    _settled, _ = h.wait_settled(client, fleet, p.settle_timeout)
    pairs, problems = resolve_conflicts(database_url, items)
    res.check("each same-key, other-value pair: one stored, as published", not problems, "; ".join(problems[:5]))
    kinds: dict[str, int] = {}
    for it in items:
        kinds[it.kind] = kinds.get(it.kind, 0) + 1
    res.notes.append("kinds: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())) + f" ({pairs} conflict pairs)")
    _finish(ctx, res, client, fleet, database_url, publisher.published(), started)
    bad = [it for it in items if it.bad]
    stream_letters = {
        h.where(h.as_text(f[b"original_stream"]), f[b"original_id"]): f for _, f in client.xrange(h.DEAD_LETTER_STREAM)
    }
    missing = [
        it.kind
        for it in bad
        if h.where(it.stream, it.entry_id) not in stream_letters
        or it.reason.encode() not in stream_letters[h.where(it.stream, it.entry_id)][b"error"]
    ]
    res.check(
        "every bad entry in the dead-letter stream with the expected reason",
        not missing,
        f"{len(bad)} bad, {len(missing)} missing or without the reason: {sorted(set(missing))[:10]}",
    )
    return res


# 5. The hostile corpus


def corpus(ctx: Context, database_url: str) -> Result:
    """Every corpus item, published verbatim into Redis, read by a real worker. Items whose
    rows share a key go into separate rounds (readings are deleted between rounds), since
    otherwise "first write wins" would turn all but one of them into dead letters."""
    from corpus import load_corpus

    res = Result("5. hostile corpus end to end")
    client = ctx.client()
    loaded = list(load_corpus())
    rounds: list[list] = [[]]
    used: list[set] = [set()]
    for name, stream, fields, expect in loaded:
        key = None
        if "row" in expect:
            row = expect["row"]
            key = (row["device_id"], row["sensor_type"], row["timestamp"])
        target = next((i for i, keys in enumerate(used) if key is None or key not in keys), None)
        if target is None:
            rounds.append([])
            used.append(set())
            target = len(rounds) - 1
        rounds[target].append((name, stream, fields, expect))
        if key is not None:
            used[target].add(key)
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "corpus", ["w1"])
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    outcomes, all_items, total = [], [], h.Accounting()
    for number, batch in enumerate(rounds, 1):
        published = [
            (name, stream, client.xadd(stream, fields), fields, expect) for name, stream, fields, expect in batch
        ]
        settled, waited = h.wait_settled(client, fleet, ctx.params.pick(45, 90), quiet_s=0.3)
        # The ledger (db_writer_progress) is merged once a second after the batches it sums: wait
        # for it before this round's accounting and the truncation that ends the round.
        _wait_for(lambda: _ledger_caught_up(database_url), 5, step=0.1)
        if not settled:
            tail = fleet.workers["w1"].log_tail(600)
            res.check(
                f"round {number} of {len(rounds)} settled",
                False,
                f"still {h.backlog(client)} (pending, unread) after {waited:.0f} s; remaining rounds "
                f"skipped; worker log: {tail}",
            )
        items = []
        letters_in_stream = [f for _, f in client.xrange(h.DEAD_LETTER_STREAM)]
        for name, stream, entry_id, fields, expect in published:
            outcome = _corpus_outcome(letters_in_stream, database_url, name, stream, entry_id, expect)
            outcomes.append(outcome)
            if outcome["outside_pattern"]:
                continue
            key = value = None
            if row := expect.get("row"):
                ts = h.utc(row["timestamp"]) if row["timestamp"] else _entry_time(entry_id)
                key, value = (row["device_id"], row["sensor_type"], ts), row["value"]
            dl = expect.get("dead_letter")
            items.append(
                Item(
                    stream,
                    fields,
                    key,
                    value,
                    kind=name,
                    reason=dl and dl["reason_contains"],
                    step=dl and dl["step"],
                    entry_id=entry_id,
                )
            )
        total = total + h.account(client, database_url, items)
        all_items += items
        # A clean slate for the next round: its rows may share keys with this round's.
        with psycopg.connect(database_url) as conn:
            conn.execute("TRUNCATE sensor_readings, db_writer_progress, db_writer_streams, db_writer_dead_letters")
        client.delete(h.DEAD_LETTER_STREAM)
        if not settled:
            break
    _stop_fleet(res, fleet)
    res.seconds = round(time.monotonic() - started, 1)
    _judge(res, total, all_items)
    ignored = [o for o in outcomes if o["outside_pattern"]]
    res.ignored = len(ignored)
    res.sent = len(loaded)
    wrong = [o for o in outcomes if not o["ok"] and not o["outside_pattern"]]
    if len(outcomes) < len(loaded):
        wrong.append({"name": f"{len(loaded) - len(outcomes)} items", "problem": "never published: a round stalled"})
    res.check(
        "every corpus item: the expected row (value, sign, time, metadata) or dead letter (step, reason)",
        not wrong,
        "; ".join(f"{o['name']}: {o['problem']}" for o in wrong[:10]),
    )
    res.notes.append(
        f"{len(loaded)} items in {len(rounds)} rounds (items whose rows share a key go to separate "
        f"rounds, tables truncated in between); {len(ignored)} items are on streams outside "
        "STREAM_PATTERN, which no worker reads: neither written nor dead-lettered, they stay in Redis "
        "(column 'ignored'): " + ", ".join(o["name"] for o in ignored)
    )
    res.accounting["items"] = outcomes
    return res


def _ledger_caught_up(database_url: str) -> bool:
    """The ledger's rows_inserted add up to the readings table (the last second was flushed)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        ledger, rows = conn.execute(
            "SELECT (SELECT coalesce(sum(rows_inserted), 0) FROM db_writer_progress),"
            " (SELECT count(*) FROM sensor_readings)"
        ).fetchone()
    return ledger == rows


def _entry_time(entry_id: bytes | str) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(h.as_bytes(entry_id).split(b"-")[0]))


def _corpus_outcome(letters_in_stream, database_url, name, stream, entry_id, expect) -> dict:
    import json

    out = {
        "name": name,
        "entry_id": entry_id.decode(),
        "outside_pattern": not stream.startswith(b"mqtt_stream:"),
        "ok": False,
        "problem": "",
    }
    where = h.where(stream, entry_id)
    with psycopg.connect(database_url) as conn:
        letters = conn.execute(
            "SELECT step, error FROM db_writer_dead_letters WHERE original_stream = %s AND original_id = %s", where
        ).fetchall()
        row = None
        if "row" in expect:
            want = expect["row"]
            ts = h.utc(want["timestamp"]) if want["timestamp"] else _entry_time(entry_id)
            row = conn.execute(
                "SELECT value, metadata FROM sensor_readings WHERE device_id = %s AND sensor_type = %s"
                " AND timestamp = %s",
                [want["device_id"], want["sensor_type"], ts],
            ).fetchone()
    in_stream = [
        f
        for f in letters_in_stream
        if f[b"original_id"] == entry_id and h.where(f[b"original_stream"].decode(), entry_id) == where
    ]
    out["outcome"] = ("row" if row else "") + ("dead_letter" if letters else "") or "nothing"
    if out["outside_pattern"]:
        out["problem"] = "stream outside STREAM_PATTERN: never read (expected, not a failure)"
        return out
    if "row" in expect:
        want = expect["row"]
        if row is None:
            out["problem"] = f"no row; dead letters: {letters}"
        elif not (row[0] == want["value"] and math.copysign(1, row[0]) == math.copysign(1, want["value"])):
            out["problem"] = f"value {row[0]!r} != {want['value']!r}"
        elif "metadata" in want and row[1] != want["metadata"]:
            out["problem"] = f"metadata {json.dumps(row[1])[:100]} != {json.dumps(want['metadata'])[:100]}"
        elif letters:
            out["problem"] = f"row, but also dead-lettered: {letters}"
        else:
            out["ok"] = True
        return out
    want = expect["dead_letter"]
    if not letters:
        out["problem"] = "not dead-lettered" + ("; a row was written" if row else "")
    elif not any(step == want["step"] and want["reason_contains"] in error for step, error in letters):
        out["problem"] = f"dead letter {letters[0][0]}: {letters[0][1][:120]!r}, expected {want}"
    elif not any(
        f[b"step"].decode() == want["step"] and want["reason_contains"].encode() in f[b"error"] for f in in_stream
    ):
        out["problem"] = "in the table, but not in the dead-letter stream (with that reason)"
    else:
        out["ok"] = True
    return out


# Shared by the scenarios below


def _admin(ctx: Context) -> psycopg.Connection:
    """An autocommit connection to the private server's admin database."""
    return psycopg.connect(ctx.srv.pg.url, autocommit=True)


def _dbname(database_url: str) -> str:
    # conninfo_to_dict's values are typed str | int | None; a dbname parsed from a URL is a str.
    return cast(str, conninfo_to_dict(database_url)["dbname"])


def _kick_workers(admin: psycopg.Connection, dbname: str, consumer: str | None = None) -> int:
    """pg_terminate_backend() every session of the workers (application_name 'db-writer NAME')."""
    like = f"db-writer {consumer}" if consumer else "db-writer %"
    return len(
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s"
            " AND pid <> pg_backend_pid()",
            [dbname, like],
        ).fetchall()
    )


def _counts(database_url: str) -> tuple[int, int]:
    """(rows, dead letters) in the database now."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT (SELECT count(*) FROM sensor_readings), (SELECT count(*) FROM db_writer_dead_letters)"
        ).fetchone()


def _stream_letters(client: redis.Redis) -> set[tuple[str, str]]:
    return {
        h.where(h.as_text(f[b"original_stream"]), f[b"original_id"]) for _, f in client.xrange(h.DEAD_LETTER_STREAM)
    }


def _events(fleet: h.Fleet, offsets: dict[str, int], event: str, contains: str = "") -> dict[str, list[dict]]:
    """Per worker, its log events named `event` (with `contains` in any value) after `offsets`."""
    return {
        name: [
            e
            for e in w.log_events(offsets.get(name, 0))
            if e.get("event") == event and (not contains or any(contains in str(v) for v in e.values()))
        ]
        for name, w in fleet.workers.items()
    }


def _first_commits(
    fleet: h.Fleet, offsets: dict[str, int], since: float, timeout: float = 30.0
) -> dict[str, float | None]:
    """Seconds from `since` (time.time()) to each worker's first batch committed after it,
    from its "Processed batch" log lines (LOG_LEVEL=INFO; logged after the ack, which took
    ack_ms), whether the batch inserted rows or only met rows another worker wrote."""
    found: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(fleet.workers) and time.monotonic() < deadline:
        for name, events in _events(fleet, offsets, "Processed batch").items():
            committed = [h.event_time(e) - e.get("ack_ms", 0) / 1000 for e in events]
            after = [t for t in committed if t > since]
            if after and name not in found:
                found[name] = min(after) - since
        time.sleep(0.1)
    return {n: (round(found[n], 2) if n in found else None) for n in fleet.workers}


def _worst(values: dict[str, float | None]) -> str:
    """The slowest worker's figure ('never' if one has none)."""
    if any(v is None for v in values.values()):
        return "never"
    return f"{max(values.values()):.1f}s"


def _offsets(fleet: h.Fleet) -> dict[str, int]:
    return {name: w.log_size() for name, w in fleet.workers.items()}


def _fmt(values: dict[str, float | None], unit: str = "s") -> str:
    return ", ".join(
        f"{k} {'-' if v is None else f'{v:.1f}'}{unit if v is not None else ''}" for k, v in values.items()
    )


def _wait_for(predicate: Callable[[], bool], timeout: float, fleet: h.Fleet | None = None, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet:
            fleet.check(restart=False)
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _acked_unhandled(client: redis.Redis, database_url: str, published: list[Item]) -> tuple[int, list[Item]]:
    """(entries acknowledged now, those of them with neither their row nor a dead letter)."""
    acked = h.acked(client, published)
    items = [it for it in published if (it.stream, it.entry_id) in acked]
    return len(items), h.unhandled(database_url, items)


# 6. The database turned read-only


def readonly(ctx: Context, database_url: str) -> Result:
    """ALTER DATABASE ... SET default_transaction_read_only = on, and every worker session
    terminated so that they reconnect into read-only sessions; back after the window. The
    workers must stay up, write (and acknowledge) nothing meanwhile, and catch up."""
    res = Result("6. database read-only")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    window, lead, rate = p.pick(8, 30), p.pick(3, 5), p.pick(700, 2000)
    window2, patience = p.pick(3, 8), p.pick(6.0, 10.0)  # the extra phase: read-only, ended without terminating
    items = readings(
        int(rate * (lead + window + 3 + window2 + patience)), devices=40, rng=rng, poison_every=5, kinds=BAD_KINDS
    )
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "readonly", ["w1", "w2"], LOG_LEVEL="INFO")
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    publisher = h.Publisher(ctx.srv.valkey.url, items, rate)
    publisher.start()
    _wait(lead, fleet)
    dbname, offsets = _dbname(database_url), _offsets(fleet)
    db = sql.Identifier(dbname)
    alive, max_pending, kicked = True, 0, 0
    with _admin(ctx) as admin:
        try:
            admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(db))
            kicked = _kick_workers(admin, dbname)
            time.sleep(0.3)  # a session that was being opened meanwhile may have the old default
            kicked += _kick_workers(admin, dbname)
            ro_at = time.monotonic()
            before = _counts(database_url)
            while time.monotonic() - ro_at < window:
                fleet.check(restart=False)
                alive = alive and fleet.all_alive()
                max_pending = max(max_pending, h.backlog(client)[0])
                time.sleep(0.5)
            after = _counts(database_url)
            acked_n, unwritten = _acked_unhandled(client, database_url, publisher.published())
        finally:
            healing = _offsets(fleet)
            admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = off").format(db))
            _kick_workers(admin, dbname)
            rw_at = time.time()
    resumed = _first_commits(fleet, healing, rw_at)
    refused = _events(fleet, offsets, "transient error; retrying", "database")
    # Beyond the brief: read-only again, and back to writable WITHOUT terminating the sessions (as
    # an operator may do). Sessions opened meanwhile keep their read-only default: does the worker
    # drop them? Afterwards the sessions are terminated anyway, so what follows is not affected.
    _wait(1, fleet)
    with _admin(ctx) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(db))
        _kick_workers(admin, dbname)
        time.sleep(0.3)
        _kick_workers(admin, dbname)
        _wait(window2, fleet)
        healing2 = _offsets(fleet)
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = off").format(db))
        rw2_at = time.time()
        resumed2 = _first_commits(fleet, healing2, rw2_at, patience)
        still_ro = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'db-writer %%'",
            [dbname],
        ).fetchone()[0]
        _kick_workers(admin, dbname)
    res.check(
        "(beyond the brief) read-only ended WITHOUT terminating sessions: each worker writes again within "
        f"{patience:.0f} s",
        all(v is not None for v in resumed2.values()),
        f"first commit after {_fmt(resumed2)} (None: not within {patience:.0f} s; the worker sessions, {still_ro}, "
        "were then terminated so that the rest of the scenario is not affected)",
        severity="warn",
    )
    read_only_named = sum(1 for v in refused.values() for e in v if "read-only" in str(e.get("error")))
    res.check("workers stayed up while the database was read-only", alive and not fleet.crashes)
    res.check(
        "nothing written while read-only (rows, dead letters)",
        before == after,
        f"(rows, dead letters) {before} at the start of the window, {after} at its end",
    )
    res.check("entries stayed pending meanwhile", max_pending > 0, f"up to {max_pending} pending")
    res.check(
        "nothing acknowledged without its row or dead letter (checked at the end of the window)",
        not unwritten,
        f"{acked_n} acknowledged, {len(unwritten)} of them unwritten: {[h.where(i.stream, i.entry_id) for i in unwritten[:5]]}",
    )
    res.check(
        "each worker logged a transient database error",
        all(refused.values()),
        ", ".join(f"{n}: {len(v)} lines" for n, v in refused.items()),
        severity="warn",
    )
    res.check(
        "each worker wrote again after the database turned writable",
        all(v is not None for v in resumed.values()),
        _fmt(resumed),
    )
    publisher.join()
    res.check("publisher finished", publisher.error is None, repr(publisher.error))
    _finish(ctx, res, client, fleet, database_url, publisher.published(), started, strict=True)
    res.figures = (
        f"read-only {window} s: +{after[0] - before[0]} rows; first commit after {_fmt(resumed)}; "
        f"ended without terminating: {_fmt(resumed2)}"
    )
    res.notes.append(
        f"read-only for {window} s ({kicked} worker sessions terminated to enter it); up to {max_pending} entries "
        f"pending meanwhile; (rows, dead letters) {before} -> {after}; first batch committed after it turned writable: "
        f"{_fmt(resumed)}; transient database errors logged: "
        + ", ".join(f"{n}={len(v)}" for n, v in refused.items())
        + f" ({read_only_named} of them name the read-only refusal; the first error of an outage is logged, then"
        " one line every 30 attempts)"
    )
    return res


# 7. Restarts past MAX_RETRIES


def restarts(ctx: Context, database_url: str) -> Result:
    """MAX_RETRIES=2, and the workers killed (-9) and restarted again and again while they
    hold entries. First while the harness holds a SHARE lock on the readings table (writes
    wait DB_LOCK_TIMEOUT_SEC and are put aside, so entries stay pending across kills and
    their deliveries climb past MAX_RETRIES), then while they write. Good readings must all
    be written (alone if need be), none dead-lettered with step 'deliver'."""
    res = Result("7. restarts past MAX_RETRIES")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    locked_rounds, free_rounds, rate = p.pick(2, 4), p.pick(2, 8), p.pick(800, 2000)
    items = readings(p.pick(12_000, 80_000), devices=40, rng=rng, poison_every=10, kinds=BAD_KINDS)
    names = ["w1", "w2"]
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "restarts", names, MAX_RETRIES=2)
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    publisher = h.Publisher(ctx.srv.valkey.url, items, rate)
    publisher.start()
    _wait(2, fleet)
    log, hits = [], 0
    locker = psycopg.connect(database_url)
    try:
        locker.execute("LOCK TABLE sensor_readings IN SHARE MODE")  # held until the rollback below
        for _ in range(locked_rounds):
            _wait_for(lambda: all(h.pending_by_consumer(client).get(n) for n in names), 8, fleet)
            held = h.pending_by_consumer(client)
            for name in names:
                fleet.workers[name].kill()
            hits += sum(1 for n in names if held.get(n))
            log.append("locked: kill -9 " + " + ".join(f"{n} (pending {held.get(n, 0)})" for n in names))
            for name in names:
                fleet.workers[name].start()
            fleet.wait_up(client)
            _wait(1.5, fleet)  # own pending read again (one delivery more), and put aside: the lock
        over = h.deliveries(client)
    finally:
        locker.rollback()
        locker.close()
    many = sum(n for times, n in over.items() if times > 2)
    log.append(
        f"lock released; pending entries by deliveries: {dict(sorted(over.items()))} ({many} delivered more than"
        " MAX_RETRIES=2 times)"
    )
    for _ in range(free_rounds):
        fleet.wait_up(client)
        victim = rng.choice(names)

        def holding(v: str = victim) -> bool:
            return h.pending_by_consumer(client).get(v, 0) > 0

        _wait_for(holding, 3, fleet, step=0.002)
        held = h.pending_by_consumer(client).get(victim, 0)
        fleet.workers[victim].kill()
        hits += held > 0
        log.append(f"kill -9 {victim} (pending {held}), restarted at once")
        fleet.workers[victim].start()
        _wait(rng.uniform(0.5, 1.5), fleet)
    publisher.join()
    res.check("publisher finished", publisher.error is None, repr(publisher.error))
    res.check(
        "many entries were delivered more than MAX_RETRIES times",
        many >= 100,
        f"{many} pending entries delivered more than 2 times when the lock was released",
        severity="warn",
    )
    acc = _finish(ctx, res, client, fleet, database_url, publisher.published(), started, killed_hard=True, strict=True)
    res.check(
        "no good reading dead-lettered with step 'deliver'",
        acc.good_dead_lettered_deliver == 0,
        f"{acc.good_dead_lettered_deliver} good readings dead-lettered as 'deliver'; "
        + "; ".join(acc.examples.get("good_dead_lettered", [])),
    )
    with psycopg.connect(database_url) as conn:
        steps: dict[str, int] = dict(
            conn.execute("SELECT step, count(*) FROM db_writer_dead_letters GROUP BY 1").fetchall()
        )
        alone = conn.execute("SELECT count(*) FROM db_writer_dead_letters WHERE step = 'deliver'").fetchone()[0]
    res.notes += log
    res.notes.append(
        f"{hits} kills hit a worker holding entries; dead letters by step: {steps}; worker starts: "
        + ", ".join(f"{w.name}={w.starts}" for w in fleet.workers.values())
    )
    res.figures = (
        f"{many} entries > MAX_RETRIES; {alone} 'deliver' letters, {acc.good_dead_lettered_deliver} of them good"
    )
    return res


# 8. Redis out of memory


def redis_oom(ctx: Context, database_url: str) -> Result:
    """maxmemory set just above what Valkey uses, noeviction, for the window; then raised.
    XADD (the publisher's and the dead-letter stream's) and SET are refused meanwhile. No
    bad entry may be acknowledged without its dead letter in the stream (checked during the
    window too), no worker may exit, nothing may be lost."""
    res = Result("8. Redis out of memory")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    window, lead, rate = p.pick(8, 20), p.pick(3, 5), p.pick(700, 2000)
    items = readings(int(rate * (lead + window + 2)), devices=40, rng=rng, poison_every=5, kinds=BAD_KINDS)
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "redis-oom", ["w1", "w2"])
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    publisher = h.Publisher(ctx.srv.valkey.url, items, rate, retry_oom=True)
    publisher.start()
    _wait(lead, fleet)
    offsets = _offsets(fleet)
    policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    errors_before = client.info("errorstats").get("errorstat_OOM", {}).get("count", 0)
    used = client.info("memory")["used_memory"]
    limit = used + 512 * 1024
    alive, polls, max_pending, acked_bad = True, 0, 0, 0
    violations: set[tuple[str, str]] = set()
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", limit)
        oom_at = time.monotonic()
        refused_at_start = publisher.oom_refusals
        while time.monotonic() - oom_at < window:
            fleet.check(restart=False)
            alive = alive and fleet.all_alive()
            bad = [it for it in publisher.published() if it.bad]
            acked = h.acked(client, bad)  # first the acks, then the stream: a letter precedes its ack
            letters = _stream_letters(client)
            acked_bad = max(acked_bad, len(acked))
            violations |= {h.where(*key) for key in acked if h.where(*key) not in letters}
            max_pending = max(max_pending, h.backlog(client)[0])
            polls += 1
            time.sleep(0.5)
        used_end = client.info("memory")["used_memory"]
    finally:
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", policy)
    errors = client.info("errorstats").get("errorstat_OOM", {}).get("count", 0) - errors_before
    oom_logged = _events(fleet, offsets, "transient error; retrying", "maxmemory")
    res.check("workers stayed up while Redis was out of memory", alive and not fleet.crashes)
    res.check(
        "no bad entry acknowledged without its dead letter in the stream (during the window)",
        not violations,
        f"{len(violations)} of {acked_bad} acknowledged bad entries had no dead letter in the stream: "
        f"{sorted(violations)[:5]}",
    )
    res.check("Redis refused writes (OOM) during the window", errors > 0, f"{errors} OOM errors", severity="warn")
    publisher.join()
    res.check("publisher finished", publisher.error is None, repr(publisher.error))
    _finish(ctx, res, client, fleet, database_url, publisher.published(), started, strict=True)
    res.notes.append(
        f"maxmemory {limit} (used {used} at the start, {used_end} at the end) for {window} s: {errors} OOM replies, "
        f"{publisher.oom_refusals - refused_at_start} of them to the publisher's XADDs (retried); {polls} checks of "
        f"acknowledged bad entries (up to {acked_bad}); up to {max_pending} pending; workers logging OOM: "
        + ", ".join(f"{n}={len(v)}" for n, v in oom_logged.items())
    )
    res.figures = f"OOM {window} s: {errors} refusals; {len(violations)} bad acked without letter"
    return res


# 9. The consumer group destroyed


def group_destroy(ctx: Context, database_url: str) -> Result:
    """Most entries written and verified (the ledger's checked_through caught up), then
    XGROUP DESTROY on several streams holding bad entries while publishing goes on. The
    workers re-create each group where the ledger says the stream was verified, and say so.
    Redeliveries must be few (those after checked_through), dead letters not doubled."""
    res = Result("9. consumer group destroyed")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    n = p.pick(16_000, 120_000)
    items = readings(n, devices=10, rng=rng, poison_every=6, kinds=BAD_KINDS)
    cut = int(n * 0.75)
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "group-destroy", ["w1", "w2"])
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    first = h.Publisher(ctx.srv.valkey.url, items[:cut], p.rate)
    first.run()
    settled, _ = h.wait_settled(client, fleet, p.settle_timeout, quiet_s=0.5)
    candidates = sorted({it.stream for it in items[:cut] if it.bad and not it.stream.startswith(b"mqtt_stream:xx")})
    victims = sorted(rng.sample(candidates, min(5, len(candidates))))
    names = [v.decode() for v in victims]

    def verified() -> bool:
        with psycopg.connect(database_url) as conn:
            marks: dict[str, str] = dict(
                conn.execute("SELECT stream, checked_through FROM db_writer_streams").fetchall()
            )
        return all(marks.get(v.decode()) == client.xinfo_stream(v)["last-generated-id"].decode() for v in victims)

    res.check(
        "before: the ledger verified the streams up to their ends",
        settled and _wait_for(verified, 15, fleet, step=0.2),
        "checked_through did not reach the streams' last ids",
        severity="warn",
    )
    # Small chunks, so that there are always entries written but not yet verified (after checked_through).
    second = h.Publisher(ctx.srv.valkey.url, items[cut:], p.pick(1500, 4000), chunk=20)
    second.start()
    _wait(1.5, fleet)
    with psycopg.connect(database_url) as conn:
        marks: dict[str, str] = dict(
            conn.execute(
                "SELECT stream, checked_through FROM db_writer_streams WHERE stream = ANY(%s)", [names]
            ).fetchall()
        )
    offsets = _offsets(fleet)
    lengths, after_mark = {}, {}
    for victim, name in zip(victims, names, strict=True):
        lengths[name] = client.xlen(victim)
        after_mark[name] = (
            len(client.xrange(victim, min="(" + marks[name], max="+")) if name in marks else lengths[name]
        )
        client.xgroup_destroy(victim, h.GROUP)
    second.join()
    res.check("publisher finished", first.error is None and second.error is None, repr(first.error or second.error))
    published = first.published() + second.published()
    acc = _finish(ctx, res, client, fleet, database_url, published, started, strict=True)
    warned = _events(fleet, offsets, "consumer group created where the ledger says the stream was written up to")
    by_stream: dict[str, list[str]] = {}
    for worker, events in warned.items():
        for e in events:
            by_stream.setdefault(e.get("stream", ""), []).append(f"{worker} at {e.get('start')}")
    res.check(
        "each destroyed group re-created where the ledger says, with a warning",
        all(name in by_stream for name in names),
        "no warning for " + ", ".join(n for n in names if n not in by_stream),
    )
    total, replay = sum(lengths.values()), sum(after_mark.values())
    res.check(
        "redeliveries (rewrites) far fewer than the destroyed streams' lengths (at most 25 %)",
        acc.rewrites <= 0.25 * total,
        f"{acc.rewrites} rewrites; the {len(victims)} streams held {total} entries",
    )
    res.check(
        "redeliveries at most the entries after checked_through (the groups start there)",
        acc.rewrites <= replay + 0.01 * total,
        f"{acc.rewrites} rewrites, {replay} entries after checked_through when destroyed",
    )
    res.check(
        "some entries were past checked_through when destroyed (the replay was exercised)",
        replay > 0,
        f"{replay} entries",
        severity="warn",
    )
    res.notes.append(
        f"destroyed the group on {len(victims)} streams ({total} entries, {sum(after_mark.values())} after their "
        f"checked_through): {', '.join(f'{n} (len {lengths[n]}, mark {marks.get(n)})' for n in names)}; "
        f"re-created: {by_stream}"
    )
    res.figures = f"{len(victims)} groups destroyed ({total} entries): {acc.rewrites} rewrites"
    return res


# 10. Own pending entries, idle past CLAIM_IDLE_MS


def own_pending(ctx: Context, database_url: str) -> Result:
    """Rounds of: entries read (XREADGROUP) as consumer w1 by the harness and left pending
    longer than CLAIM_IDLE_MS, then the worker w1 starts: its own-pending recovery and its
    claim of idle entries both see them. Each entry must be handled once: the ledger's
    entries (db_writer_progress, exact since w1 stops with SIGTERM) equal the distinct ones."""
    res = Result("10. own pending + idle claim")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    rounds, per_round = p.pick(2, 8), p.pick(4_000, 20_000)
    # INFO: one "Processed batch" line per batch, with its source (claimed, pending, new)
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "own-pending", ["w1"], LOG_LEVEL="INFO")
    worker = fleet.workers["w1"]
    started = time.monotonic()
    published: list[Item] = []
    log, codes = [], []
    for number in range(rounds):
        items = readings(
            per_round, devices=50, rng=rng, poison_every=10, kinds=BAD_KINDS, t0=T0 + timedelta(days=number)
        )
        published += h.publish_all(ctx.srv.valkey.url, items)
        streams = h.consumer_streams(client)
        for stream in streams:
            try:
                client.xgroup_create(stream, h.GROUP, id="0")
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        # Half of each stream read as w1 well over CLAIM_IDLE_MS (2000, the harness default) before
        # w1 starts: its claim takes them. Another 30 % read as w1 the moment it holds its name
        # (a few hundred ms before its loop starts): fresh at its first claim, so its own-pending
        # recovery takes them, while the claimed ones may still be in flight. 20 % new.
        per_stream = -(-per_round // len(streams))
        client.xreadgroup(h.GROUP, "w1", dict.fromkeys(streams, ">"), count=int(per_stream * 0.5))
        time.sleep(2.7)
        worker.start()
        up = _wait_for(lambda: worker.up(client), 60, step=0.005)
        client.xreadgroup(h.GROUP, "w1", dict.fromkeys(streams, ">"), count=int(per_stream * 0.3))
        held = h.pending_by_consumer(client).get("w1", 0)
        settled, waited = h.wait_settled(client, fleet, p.settle_timeout, quiet_s=0.5)
        last = number == rounds - 1 or not settled
        if not last:  # the last round's stop is _finish's
            codes.append(worker.terminate())
        log.append(
            f"round {number + 1}: {len(items)} entries, {held} pending on w1 (half read 2.7 s before it started, the"
            f" rest as it started); up={up}, settled in "
            f"{waited:.1f} s" + ("" if last else f", exit {codes[-1]}")
        )
        if last:
            break
    res.check("w1 exits 0 on SIGTERM each round", all(c == 0 for c in codes), str(codes))
    acc = _finish(ctx, res, client, fleet, database_url, published, started, strict=True)
    res.check(
        "each entry handled once: ledger entries == distinct entries",
        acc.ledger_entries == acc.reached_write,
        f"ledger {acc.ledger_entries} vs {acc.reached_write} distinct entries handled",
    )
    sources: Counter = Counter()
    for e in worker.log_events():
        if e.get("event") == "Processed batch":
            sources[e.get("source")] += e.get("entries", 0)
    res.check(
        "both the claim of idle entries and the own-pending recovery handled entries",
        sources["claimed"] > 0 and sources["pending"] > 0,
        f"entries by batch source: {dict(sources)}",
        severity="warn",
    )
    res.notes += log
    res.notes.append(f"entries handled by batch source: {dict(sources)}")
    res.figures = f"{rounds} rounds: ledger {acc.ledger_entries} for {acc.reached_write} entries; {dict(sources)}"
    return res


# 11. The path to PostgreSQL black-holed (packets dropped, nothing closed)


def pg_blackhole(ctx: Context, database_url: str) -> Result:
    """The workers run in a network namespace and reach PostgreSQL and Valkey through
    FaultProxy instances on the namespace's host-side address. The PostgreSQL path's packets
    are dropped for real (a tc bpf filter on its port, at both ends of the veth: the workers'
    kernel sees no ACK, so tcp_user_timeout and keepalives fire), then the proxy's old
    connections are cut (they never come back) and the filter removed. Each worker must log
    the stall within ~15 s, write again within 2 s of the path working, and exit within
    SHUTDOWN_TIMEOUT_SEC + 1 s of a SIGTERM sent during a second, short blackhole."""
    import netns
    from fault_proxy import FaultProxy

    res = Result("11. PostgreSQL black-holed")
    if reason := netns.available(netem=False, drop=True):
        return _skip(res, f"needs network namespaces that drop packets: {reason}")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    hole, lead, rate, shutdown = p.pick(20, 60), 3, p.pick(400, 1000), 10
    items = readings(int(rate * (hole + 60)), devices=40, rng=rng, poison_every=10, kinds=BAD_KINDS)
    names = ["w1", "w2"]
    started = time.monotonic()
    with (
        netns.Netns() as ns,
        FaultProxy("127.0.0.1", urlsplit(ctx.srv.pg.url).port, listen_host=ns.host_addr) as pg_proxy,
        FaultProxy("127.0.0.1", urlsplit(ctx.srv.valkey.url).port, listen_host=ns.host_addr) as redis_proxy,
    ):
        why = h.port_drop_available(ns)
        scope = "the PostgreSQL path only" if why is None else f"both paths (the whole namespace; {why})"

        def blackhole() -> None:
            h.drop_port(ns, pg_proxy.port) if why is None else ns.blackhole()

        def heal() -> None:
            pg_proxy.cut()  # while still dropped: their RSTs are lost too, the old connections never answer again
            ns.restore()

        fleet = h.Fleet(
            redis_proxy.url_for(ctx.srv.valkey.url),
            pg_proxy.url_for(database_url),
            ctx.log_root / "pg-blackhole",
            names,
            wrap=ns.command([]),
            SHUTDOWN_TIMEOUT_SEC=shutdown,
            LOG_LEVEL="INFO",  # a line per batch: what each worker did when, for the notes
        )
        try:
            fleet.start()
            res.check("workers started", fleet.wait_up(client))
            publisher = h.Publisher(ctx.srv.valkey.url, items, rate)
            publisher.start()
            _wait(lead, fleet)
            offsets = _offsets(fleet)
            blackhole()
            holed_at, holed_m, alive = time.time(), time.monotonic(), True
            while time.monotonic() - holed_m < hole:
                fleet.check(restart=False)
                alive = alive and fleet.all_alive()
                time.sleep(0.2)
            rows_in_hole = _counts(database_url)[0]
            healing = _offsets(fleet)
            heal()
            healed_at = time.time()
            resumed = _first_commits(fleet, healing, healed_at)
            new_rows = h.first_writes(database_url, healed_at, names)
            stalls: dict[str, float | None] = {}
            for name, events in _events(fleet, offsets, "transient error; retrying").items():
                on_db = [e for e in events if "database" in str(e.get("error", ""))]
                stalls[name] = round(h.event_time(on_db[0]) - holed_at, 2) if on_db else None
            first_error = {
                n: next((str(e.get("error"))[:160] for e in v if "database" in str(e.get("error", ""))), None)
                for n, v in _events(fleet, offsets, "transient error; retrying").items()
            }
            first_any = {}
            for name, w in fleet.workers.items():
                seen = [
                    e
                    for e in w.log_events(offsets[name])
                    if "database" in str(e.get("error", "")) and e.get("timestamp")
                ]
                first_any[name] = (
                    f"{seen[0]['event']!r} after {h.event_time(seen[0]) - holed_at:.1f} s" if seen else None
                )
            res.check("workers stayed up through the blackhole", alive and not fleet.crashes)
            res.check(
                "each worker logged the stall ('transient error; retrying', the database) within 15 s",
                all(v is not None and v <= 15 for v in stalls.values()),
                f"after {_fmt(stalls)}; first lines: {first_error}",
            )
            res.check(
                "each worker wrote again within 2 s of the path working",
                all(v is not None and v <= 2 for v in resumed.values()),
                f"after {_fmt(resumed)}",
            )
            # A SIGTERM during a second, short blackhole.
            _wait(p.pick(1.5, 3), fleet)
            offsets2 = _offsets(fleet)
            blackhole()
            _wait(3, fleet)
            exits = h.sigterm_all(list(fleet.workers.values()))
            heal()
            res.check(
                f"SIGTERM during a blackhole: each worker exits within SHUTDOWN_TIMEOUT_SEC + 1 s ({shutdown + 1} s)",
                all(code is not None and secs <= shutdown + 1 for code, secs in exits.values()),
                ", ".join(f"{n}: exit {c} after {s:.1f} s" for n, (c, s) in exits.items()),
            )
            res.check(
                "... with exit status 0 or 1",
                all(code in (0, 1) for code, _ in exits.values()),
                ", ".join(f"{n}: {c}" for n, (c, _) in exits.items()),
            )
            last_words = {
                n: [e.get("event") for e in w.log_events(offsets2[n]) if e.get("level") in ("warning", "error")][-3:]
                for n, w in fleet.workers.items()
            }
            fleet.start()
            res.check("workers started again", fleet.wait_up(client))
            publisher.stop()
            res.check("publisher finished", publisher.error is None, repr(publisher.error))
            # Stopped while the database was unreachable: their last ledger statistics are lost (never a row).
            _finish(
                ctx, res, client, fleet, database_url, publisher.published(), started, killed_hard=True, strict=True
            )
        finally:
            ns.restore()
            for worker in fleet.workers.values():
                if worker.alive():
                    worker.proc.kill()
                    worker.proc.wait()
    res.notes.append(
        f"black-holed {scope} for {hole} s, {_utc(holed_at)} to {_utc(healed_at)} ({rows_in_hole} rows by its end); "
        f"first line naming the database (any event): {first_any}; stall logged after {_fmt(stalls)}; "
        f"first batch committed after {_fmt(resumed)} (first new rows after {_fmt(new_rows)}); SIGTERM in a "
        "second blackhole: "
        + ", ".join(f"{n} exit {c} after {s:.1f} s" for n, (c, s) in exits.items())
        + f"; their last warnings: {last_words}"
    )
    res.figures = (
        f"stall logged after {_fmt(stalls)}; resumed after {_fmt(resumed)}; "
        f"exit after {', '.join(f'{n} {s:.1f}s' for n, (_, s) in exits.items())}"
    )
    return res


# 12. Shutdown bounds


def shutdown_bound(ctx: Context, database_url: str) -> Result:
    """(a) PostgreSQL stopped, then SIGTERM to a worker with SHUTDOWN_TIMEOUT_SEC=10: it must
    exit within 11 s (status 0 or 1, no traceback), and nothing it acknowledged may be
    unwritten. (b) An idle worker with BATCH_TIMEOUT_SEC=40 (in its blocking read) gets
    SIGTERM: it must exit within 2 s."""
    res = Result("12. shutdown bounds")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    rate, shutdown = p.pick(800, 2000), 10
    items = readings(int(rate * p.pick(11, 24)), devices=40, rng=rng, poison_every=10, kinds=BAD_KINDS)
    idle_item = Item(b"idle_stream:idle:temp", {"value": "1.5", "timestamp": T0.isoformat()}, ("idle", "temp", T0), 1.5)
    idle_item.entry_id = client.xadd(idle_item.stream, idle_item.fields)
    log_dir = ctx.log_root / "shutdown"
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, log_dir, ["w1"], SHUTDOWN_TIMEOUT_SEC=shutdown)
    idle = h.Fleet(
        ctx.srv.valkey.url, database_url, log_dir, ["idle"], BATCH_TIMEOUT_SEC=40, STREAM_PATTERN="idle_stream:*"
    )
    started = time.monotonic()
    fleet.start()
    idle.start()
    res.check("workers started", fleet.wait_up(client) and idle.wait_up(client))
    # (b) idle, in a blocking read of up to 40 s
    res.check(
        "(b) the idle worker wrote its one entry", _wait_for(lambda: not h.unhandled(database_url, [idle_item]), 15)
    )
    _wait(2.0)
    idle_code, idle_secs = h.sigterm_all(list(idle.workers.values()), 45)["idle"]
    res.check(
        "(b) an idle worker (BATCH_TIMEOUT_SEC=40) exits 0 within 2 s of SIGTERM",
        idle_code == 0 and idle_secs <= 2,
        f"exit {idle_code} after {idle_secs:.2f} s",
    )
    # (a) PostgreSQL down, SIGTERM
    publisher = h.Publisher(ctx.srv.valkey.url, items, rate)
    publisher.start()
    _wait(3, fleet)
    w1 = fleet.workers["w1"]
    ctx.srv.pg.stop()
    try:
        _wait(2, fleet)
        held = h.pending_by_consumer(client).get("w1", 0)
        offset = w1.log_size()
        code, secs = h.sigterm_all([w1])["w1"]
        acked = h.acked(client, publisher.published())
    finally:
        ctx.srv.pg.start()
    acked_items = [it for it in publisher.published() if (it.stream, it.entry_id) in acked]
    unwritten = h.unhandled(database_url, acked_items)
    res.check(
        f"(a) PostgreSQL down: SIGTERM ends the worker within SHUTDOWN_TIMEOUT_SEC + 1 s ({shutdown + 1} s)",
        code is not None and secs <= shutdown + 1,
        f"exit {code} after {secs:.2f} s",
    )
    res.check("(a) ... with exit status 0 or 1", code in (0, 1), f"exit {code}")
    res.check(
        "(a) nothing it acknowledged is unwritten",
        not unwritten,
        f"{len(acked_items)} acknowledged, {len(unwritten)} unwritten: "
        f"{[h.where(i.stream, i.entry_id) for i in unwritten[:5]]}",
    )
    last_words = [e.get("event") for e in w1.log_events(offset) if e.get("level") in ("warning", "error")][-4:]
    w1.start()
    publisher.join()
    res.check("publisher finished", publisher.error is None, repr(publisher.error))
    _finish(
        ctx,
        res,
        client,
        fleet,
        database_url,
        [*publisher.published(), idle_item],
        started,
        killed_hard=True,
        strict=True,
        others=(idle,),
    )
    res.notes.append(
        f"(b) idle worker: exit {idle_code} {idle_secs:.2f} s after SIGTERM; (a) PostgreSQL stopped with {held} "
        f"entries pending on w1: exit {code} {secs:.2f} s after SIGTERM, its last warnings {last_words}; "
        f"{len(acked_items)} entries acknowledged by then, all written or dead-lettered: {not unwritten}"
    )
    res.figures = f"(a) PG down: exit {code} after {secs:.1f} s; (b) idle: exit {idle_code} after {idle_secs:.2f} s"
    return res


# 13. Connections reset


def reset_recovery(ctx: Context, database_url: str) -> Result:
    """The workers reach PostgreSQL through a FaultProxy on 127.0.0.1. Mid-run every
    connection is reset (cut()), a few times, and once new connections are refused for 5 s.
    Writing must resume within 2 s of the server being reachable again (each worker's first
    transaction that wrote rows, from the sensor registry's last_written_at)."""
    from fault_proxy import FaultProxy

    res = Result("13. connections reset")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    cuts, rate, refuse_s = p.pick(2, 4), p.pick(800, 2000), 5
    items = readings(int(rate * (cuts * 4 + 20)), devices=40, rng=rng, poison_every=10, kinds=BAD_KINDS)
    names = ["w1", "w2"]
    started = time.monotonic()
    # (what was done, seconds to each worker's first commit after it, to its first new rows)
    events: list[tuple[str, dict[str, float | None], dict[str, float | None]]] = []
    with FaultProxy("127.0.0.1", urlsplit(ctx.srv.pg.url).port) as proxy:
        fleet = h.Fleet(
            ctx.srv.valkey.url, proxy.url_for(database_url), ctx.log_root / "reset", names, LOG_LEVEL="INFO"
        )
        fleet.start()
        res.check("workers started", fleet.wait_up(client))
        publisher = h.Publisher(ctx.srv.valkey.url, items, rate)
        publisher.start()
        _wait(3, fleet)
        for number in range(cuts):
            live, offsets = proxy.live, _offsets(fleet)
            at = time.time()
            proxy.cut()
            rows = h.first_writes(database_url, at, names, 15)
            events.append((f"cut {number + 1} ({live} connections)", _first_commits(fleet, offsets, at, 15), rows))
            _wait(2.5, fleet)
        proxy.refuse()
        _wait(refuse_s, fleet)
        offsets = _offsets(fleet)
        at = time.time()
        proxy.restore()
        rows = h.first_writes(database_url, at, names, 15)
        events.append((f"refused {refuse_s} s, then restored", _first_commits(fleet, offsets, at, 15), rows))
        _wait(1, fleet)
        publisher.stop()
        res.check("publisher finished", publisher.error is None, repr(publisher.error))
        accepted = proxy.accepted
        _finish(ctx, res, client, fleet, database_url, publisher.published(), started, strict=True)
    for what, resumed, _rows in events:
        res.check(
            f"{what}: each worker committed a batch again within 2 s",
            all(v is not None and v <= 2 for v in resumed.values()),
            f"after {_fmt(resumed)}",
        )
    res.notes.append(
        "; ".join(
            f"{what}: first batch committed after {_fmt(resumed)} (first new rows after {_fmt(rows)})"
            for what, resumed, rows in events
        )
        + f"; the proxy accepted {accepted} connections in all"
    )
    res.figures = "resumed after " + "; ".join(f"{what.split(' (')[0]}: {_worst(r)}" for what, r, _ in events)
    return res


# 14. One deep stream, alone and among many trickling ones


class Trickle(threading.Thread):
    """XADDs `rate` entries a second, round-robin over one stream per device; remembers each."""

    def __init__(self, url: str, devices: list[str], rate: float, slot: int = 0) -> None:
        super().__init__(name="trickle", daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=30)
        self.devices, self.rate, self.slot = devices, rate, slot
        self.items: list[Item] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            started, sent = time.monotonic(), 0
            while not self._halt.is_set():
                due = int((time.monotonic() - started) * self.rate) - sent
                if due > 0:
                    pipe = self.client.pipeline(transaction=False)
                    part = []
                    for k in range(sent, sent + due):
                        device = self.devices[k % len(self.devices)]
                        ts = T0 + timedelta(seconds=self.slot + k // len(self.devices))
                        value = float(k % 1000) + 0.5
                        item = Item(
                            f"mqtt_stream:{device}:temp".encode(),
                            {"value": repr(value), "timestamp": ts.isoformat()},
                            (device, "temp", ts),
                            value,
                        )
                        pipe.xadd(item.stream, item.fields)
                        part.append(item)
                    for item, entry_id in zip(part, pipe.execute(), strict=True):
                        item.entry_id = entry_id
                    self.items += part
                    sent += due
                self._halt.wait(0.005)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join()


def deep_stream(ctx: Context, database_url: str) -> Result:
    """(a) 10,000 entries on one stream, nothing else, one worker: time to drain. (b) The same
    burst on another stream while 1,000 other streams trickle 200 entries/s in all. (b) must
    drain within twice (a), and the trickling entries published during (b) must reach the
    table within 1 s (p99, entry id time to the row's created_at)."""
    res = Result("14. deep stream")
    p, client = ctx.params, ctx.client()
    burst, trickling, trickle_rate, repeats = 10_000, 1_000, 200.0, p.pick(2, 3)
    devices = [f"tr{i:04d}" for i in range(trickling)]
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "deep", ["w1"], LOG_LEVEL="INFO")
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))

    def entry(device: str, k: int) -> Item:
        ts = T0 + timedelta(seconds=k)
        return Item(
            f"mqtt_stream:{device}:temp".encode(),
            {"value": f"{k}.25", "timestamp": ts.isoformat()},
            (device, "temp", ts),
            k + 0.25,
        )

    # The deep streams exist (discovered, their group created) before anything is timed; (a) runs
    # with no other stream, the 1,000 trickling ones are made (and discovered) before (b).
    published = h.publish_all(ctx.srv.valkey.url, [entry(d, 0) for d in ["deepa", "deepb"]])
    settled, _ = h.wait_settled(client, fleet, p.settle_timeout, quiet_s=1.0)
    res.check("the deep streams were discovered and written", settled)
    monitor = psycopg.connect(database_url, autocommit=True)
    next_k = {"deepa": 1, "deepb": 1}

    starts: list[tuple[str, float]] = []  # (which, time.time() the burst began)

    def drain(device: str, which: str) -> float:
        """Publish a burst to the device's stream; seconds until its last row is in the table."""
        items = [entry(device, k) for k in range(next_k[device], next_k[device] + burst)]
        next_k[device] += burst
        want = next_k[device]
        starts.append((which, time.time()))
        began = time.monotonic()
        published.extend(h.publish_all(ctx.srv.valkey.url, items))
        count = "SELECT count(*) FROM sensor_readings WHERE device_id = %s"
        _wait_for(lambda: monitor.execute(count, [device]).fetchone()[0] >= want, 120, fleet, step=0.01)
        return time.monotonic() - began

    alone = []
    for _ in range(repeats):
        alone.append(drain("deepa", "a"))
        h.wait_settled(client, fleet, 30, quiet_s=0.5)
    offset = fleet.workers["w1"].log_size()
    published += h.publish_all(ctx.srv.valkey.url, [entry(d, 0) for d in devices])
    settled, _ = h.wait_settled(client, fleet, p.settle_timeout, quiet_s=1.0)

    def reconciled() -> list[dict]:  # new streams are reconciled on the loop thread, once
        events = fleet.workers["w1"].log_events(offset)
        return [e for e in events if e.get("event") == "reconciled with the database" and e.get("streams") == 1002]

    res.check(
        "the 1,000 trickling streams were discovered, written and reconciled",
        settled and _wait_for(lambda: bool(reconciled()), 30, fleet, step=0.1),
    )
    reconcile_s = reconciled()[0].get("seconds") if reconciled() else None
    idle = []  # (a') the same burst with the 1,000 streams there but idle: for the notes
    for _ in range(repeats):
        idle.append(drain("deepa", "a'"))
        h.wait_settled(client, fleet, 30, quiet_s=0.5)
    trickle = Trickle(ctx.srv.valkey.url, devices, trickle_rate, slot=1)
    trickle.start()
    _wait(2.5, fleet)
    busy, windows = [], []
    for _ in range(repeats):
        began = time.time()
        busy.append(drain("deepb", "b"))
        windows.append((began, time.time()))
        _wait(1.5, fleet)
    trickle.stop()
    monitor.close()
    published += trickle.items
    res.check("trickle publisher finished", trickle.error is None, repr(trickle.error))
    _finish(ctx, res, client, fleet, database_url, published, started, strict=True)
    with psycopg.connect(database_url) as conn:
        created = {
            (d, s, t): c
            for d, s, t, c in conn.execute(
                "SELECT device_id, sensor_type, timestamp, created_at FROM sensor_readings WHERE device_id LIKE 'tr%%'"
            )
        }

    def latencies(inside: bool) -> list[float]:
        out = []
        for it in trickle.items:
            at = int(it.entry_id.split(b"-")[0]) / 1000
            if any(a <= at <= b for a, b in windows) == inside and it.key in created:
                out.append(created[it.key].timestamp() - at)
        return sorted(out)

    during, outside = latencies(True), latencies(False)
    # Each drain split in two from the worker's batch lines: until its first batch of the burst
    # (>= 300 entries: trickle batches are small) was committed, and from there to the last.
    big = sorted(
        h.event_time(e)
        for e in fleet.workers["w1"].log_events()
        if e.get("event") == "Processed batch" and e.get("entries", 0) >= 300
    )
    phases = []
    for which, began in starts:
        mine = [t for t in big if t >= began][: -(-burst // 500)]  # its batches: BATCH_SIZE 500 (harness)
        if mine:
            phases.append(f"{which}: {mine[0] - began:.2f} s to the first batch + {mine[-1] - mine[0]:.2f} s")
    a, b = statistics.median(alone), statistics.median(busy)
    p99 = _percentile(during, 0.99)
    res.check(
        "(b) with 1,000 trickling streams drains within twice (a)",
        b <= 2 * a,
        f"(a) {a:.2f} s, (b) {b:.2f} s: {b / a:.2f}x (medians of {repeats})",
    )
    res.check(
        "the trickling streams' p99 latency during (b) is under 1 s",
        bool(during) and p99 < 1.0,
        f"p50 {_percentile(during, 0.5):.3f} s, p99 {p99:.3f} s, max {max(during, default=math.nan):.3f} s over {len(during)} entries",
    )
    res.notes.append(
        f"drain of {burst} entries on one stream: (a) alone {', '.join(f'{x:.2f}' for x in alone)} s; (a') with "
        f"{trickling} idle streams {', '.join(f'{x:.2f}' for x in idle)} s; (b) with {trickling} streams "
        f"trickling {trickle_rate:.0f}/s: {', '.join(f'{x:.2f}' for x in busy)} s; the {trickling} new streams' "
        f"reconciliation held the loop {reconcile_s} s; trickle latency during (b): p50 "
        f"{_percentile(during, 0.5) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms ({len(during)} entries); outside the bursts: "
        f"p50 {_percentile(outside, 0.5) * 1000:.0f} ms, p99 {_percentile(outside, 0.99) * 1000:.0f} ms ({len(outside)} entries)"
        f"; each drain from the batch lines: {'; '.join(phases)}"
    )
    res.figures = (
        f"drain alone {a:.2f}s, among idle {statistics.median(idle):.2f}s, busy {b:.2f}s ({b / a:.2f}x); "
        f"trickle p99 {p99 * 1000:.0f} ms"
    )
    return res


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# 15. A worker frozen inside its write transaction (issue 14)


_WRITING = (
    "COPY %",
    "INSERT INTO db_writer_sensors%",
    "INSERT INTO db_writer_dead_letters%",
    "CREATE TEMP TABLE dbw_staging%",
    "INSERT INTO sensor_readings%",
)


def frozen_worker(ctx: Context, database_url: str) -> Result:
    """Two workers, CLAIM_IDLE_MS=5000, a steady load. w1 is frozen (SIGSTOP) while its session
    is inside the batch's write transaction (seen in pg_stat_activity, application_name
    'db-writer w1'), for the window, then thawed (SIGCONT). The group's write rate during the
    freeze must stay above half the rate before it, and w2 must claim w1's entries."""
    res = Result("15. frozen worker (issue 14)")
    p, rng, client = ctx.params, ctx.rng, ctx.client()
    freeze, before_s, rate = p.pick(12, 20), p.pick(4.0, 8.0), p.pick(1500, 3000)
    # Publishing runs ~5 s past the thaw (the polling for a transaction to freeze in takes ~1 s more).
    items = readings(int(rate * (2 + before_s + freeze + 6)), devices=40, rng=rng, poison_every=10, kinds=BAD_KINDS)
    fleet = h.Fleet(ctx.srv.valkey.url, database_url, ctx.log_root / "frozen", ["w1", "w2"], CLAIM_IDLE_MS=5000)
    started = time.monotonic()
    fleet.start()
    res.check("workers started", fleet.wait_up(client))
    publisher = h.Publisher(ctx.srv.valkey.url, items, rate)
    publisher.start()
    _wait(2 + before_s, fleet)
    dbname, w1 = _dbname(database_url), fleet.workers["w1"]
    caught, tries, claimed_after, held, held_end, backend_end = None, 0, None, 0, None, None
    with _admin(ctx) as mon:
        writing = " OR ".join(["query LIKE %s"] * len(_WRITING))
        find = (
            "SELECT pid, xact_start, state, left(query, 50) FROM pg_stat_activity WHERE datname = %s"
            f" AND application_name = 'db-writer w1' AND xact_start IS NOT NULL AND ({writing})"
        )
        deadline = time.monotonic() + 30
        while caught is None and time.monotonic() < deadline:
            row = mon.execute(find, [dbname, *_WRITING]).fetchone()
            if row is None:
                time.sleep(0.001)
                continue
            os.kill(w1.proc.pid, signal.SIGSTOP)
            frozen_at, frozen_m = time.time(), time.monotonic()
            tries += 1
            still = mon.execute(
                "SELECT xact_start, state, left(query, 50) FROM pg_stat_activity WHERE pid = %s AND xact_start = %s",
                [row[0], row[1]],
            ).fetchone()
            if still:
                caught = (row, still)
            else:
                os.kill(w1.proc.pid, signal.SIGCONT)  # it committed meanwhile: try again
        res.check(
            "w1 frozen inside its write transaction",
            caught is not None,
            f"after {tries} tries: {caught[1] if caught else None}",
        )
        if caught is not None:
            try:
                held = h.pending_by_consumer(client).get("w1", 0)
                while time.monotonic() - frozen_m < freeze:
                    fleet.check(restart=False)
                    if claimed_after is None and h.pending_by_consumer(client).get("w1", 0) == 0:
                        claimed_after = time.monotonic() - frozen_m
                    time.sleep(0.25)
                held_end = h.pending_by_consumer(client).get("w1", 0)
                backend_end = mon.execute(
                    "SELECT state, xact_start IS NOT NULL FROM pg_stat_activity WHERE pid = %s", [caught[0][0]]
                ).fetchone()
            finally:
                os.kill(w1.proc.pid, signal.SIGCONT)
                thawed_at = time.time()
    if caught is None:
        publisher.stop()
        _finish(ctx, res, client, fleet, database_url, publisher.published(), started, strict=True)
        return res
    publisher.join()
    res.check("publisher finished", publisher.error is None, repr(publisher.error))
    with psycopg.connect(database_url) as conn:
        window = "SELECT count(*) FROM sensor_readings WHERE created_at >= %s AND created_at < %s"

        def at(t: float) -> datetime:
            return datetime.fromtimestamp(t, UTC)

        n_before = conn.execute(window, [at(frozen_at - before_s), at(frozen_at)]).fetchone()[0]
        n_during = conn.execute(window, [at(frozen_at), at(thawed_at)]).fetchone()[0]
    rate_before, rate_during = n_before / before_s, n_during / (thawed_at - frozen_at)
    res.check(
        "the group's write rate during the freeze stays above half the rate before it",
        rate_during > 0.5 * rate_before,
        f"{rate_during:.0f} rows/s during vs {rate_before:.0f} rows/s before",
    )
    res.check(
        "w2 claimed the frozen w1's entries",
        held > 0 and held_end == 0,
        f"w1 held {held} entries when frozen, {held_end} at the end of the freeze"
        + (f" (all claimed {claimed_after:.1f} s in)" if claimed_after is not None else ""),
    )
    _finish(ctx, res, client, fleet, database_url, publisher.published(), started, strict=True)
    res.notes.append(
        f"w1 frozen {freeze} s after {tries} tries, its backend in {caught[1][1]!r} running {caught[1][2]!r}; "
        f"at the end of the freeze the backend was {backend_end!r} (state, in a transaction); w1 held {held} pending "
        f"entries, {held_end} at the end (0 after {_secs(claimed_after)}); rows/s {rate_before:.0f} before, "
        f"{rate_during:.0f} during (publishing {rate:.0f}/s)"
    )
    res.figures = f"rate {rate_during:.0f}/s during vs {rate_before:.0f}/s before; w1's entries claimed after {_secs(claimed_after)}"
    return res


# 16. Redis Cluster


def redis_cluster(ctx: Context, database_url: str) -> Result:
    """A 3-master Redis Cluster, each master with a replica (tests/redis_topologies.py), 300
    streams over all its slots, poison among good readings, two workers (REDIS_MODE=cluster).
    Rounds of: kill -9 a worker holding entries on several masters, left dead until the other
    one has claimed them all (idle past CLAIM_IDLE_MS), then restarted; then a master handed
    over to its replica (CLUSTER FAILOVER). Every entry the cluster holds must be written once
    or dead-lettered."""
    res = Result("16. Redis Cluster")
    if reason := topologies.skip_reason():
        return _skip(res, f"needs a redis-server or valkey-server (7.0+) for a cluster: {reason}")
    p, rng = ctx.params, ctx.rng
    rounds, rate = p.pick(2, 4), p.pick(1000, 1500)
    claim_timeout = 3 * 2.0 + 10  # 3 x CLAIM_IDLE_MS (the harness's), and room on a busy machine
    items = readings(
        int(rate * (10 + 25 * rounds)), devices=300, rng=rng, poison_every=10, kinds=BAD_KINDS, sensors=("t",)
    )
    names = ["w1", "w2"]
    log: list[str] = []
    figures: list[str] = []  # per round: the claim's seconds, the failover's, the first rows after it
    started = time.monotonic()
    with topologies.redis_cluster(masters=3, replicas_per_master=1) as cluster:
        client = cluster.client(socket_timeout=30)
        fleet = h.Fleet(cluster.startup_url, database_url, ctx.log_root / "cluster", names, REDIS_MODE="cluster")
        try:
            fleet.start()
            res.check("workers started", fleet.wait_up(client))
            publisher = h.Publisher(cluster.client(socket_timeout=30), items, rate, retry_errors=True)
            publisher.start()
            _wait(3, fleet)
            spread = {f"{first}-{last}": node.address for first, last, node in cluster.slot_ranges()}
            for number in range(rounds):
                victim = names[number % 2]
                fleet.wait_up(client)

                def holding(v: str = victim) -> bool:
                    return h.pending_by_consumer(client).get(v, 0) > 0

                # It holds entries for a moment per batch: frozen (SIGSTOP) at random moments while
                # its pending list is read, and killed once it holds entries on several masters, for
                # up to 10 s (then killed anyway).
                worker, deadline = fleet.workers[victim], time.monotonic() + 10
                while time.monotonic() < deadline:
                    worker.proc.send_signal(signal.SIGSTOP)
                    if sum(1 for n in _pending_per_master(cluster, client, victim).values() if n) >= 2:
                        break
                    worker.proc.send_signal(signal.SIGCONT)
                    _wait(rng.uniform(0.02, 0.2), fleet)
                worker.kill()
                killed = time.monotonic()
                held = _pending_per_master(cluster, client, victim)  # a dead consumer's pending list is frozen
                claimed = _wait_for(lambda: not holding(), claim_timeout, fleet, step=0.1)
                claim_s = time.monotonic() - killed
                figures.append(f"claimed {claim_s:.1f}s")
                res.check(
                    f"round {number + 1}: the killed {victim}'s entries claimed by the other worker",
                    claimed,
                    f"pending on {victim} per master when killed: {held}; "
                    f"after {claim_s:.1f} s: {_pending_per_master(cluster, client, victim)}",
                )
                res.check(
                    f"round {number + 1}: {victim} held entries on several masters when killed",
                    sum(1 for n in held.values() if n) >= 2,
                    str(held),
                    severity="warn",
                )
                fleet.workers[victim].start()
                res.check(f"round {number + 1}: {victim} started again", fleet.wait_up(client))
                master = cluster.masters()[number % 3]
                replica = next(
                    r for r in cluster.replicas() if r.admin.info("replication")["master_port"] == master.port
                )
                at = time.time()
                cluster.failover(replica)
                took = time.time() - at
                wrote = h.first_writes(database_url, time.time(), names, 30)
                figures.append(f"failover {took:.1f}s, rows again {_worst(wrote)}")
                res.check(
                    f"round {number + 1}: each worker wrote again after {master.address} failed over to {replica.address}",
                    all(v is not None for v in wrote.values()),
                    f"first new rows after {_fmt(wrote)}",
                )
                log.append(
                    f"round {number + 1}: kill -9 {victim} holding {sum(held.values())} entries ({held} per master), "
                    f"all claimed after {claim_s:.1f} s: {claimed}; CLUSTER FAILOVER {master.address} -> "
                    f"{replica.address} in {took:.1f} s, first new rows after {_fmt(wrote)}"
                )
                _wait(2, fleet)
            _wait(3, fleet)
            publisher.stop()
            res.check("publisher finished", publisher.error is None, repr(publisher.error))
            client.close()
            client = cluster.client(socket_timeout=30)  # a fresh view of which nodes are masters now
            published = publisher.published()
            held_now = h.held(client)
            lost_to_redis = {(it.stream, it.entry_id) for it in published} - held_now
            untracked = len(held_now - {(it.stream, it.entry_id) for it in published})
            _finish(
                ctx, res, client, fleet, database_url, published, started, lost_to_redis, killed_hard=True, strict=True
            )
        finally:
            for worker in fleet.workers.values():
                if worker.alive():
                    worker.proc.kill()
                    worker.proc.wait()
            client.close()
    res.check(
        "the cluster lost no entry (a manual failover waits for the replica)",
        res.lost_by_redis == 0,
        f"{res.lost_by_redis} entries acknowledged by the cluster are gone",
        severity="warn",
    )
    res.notes += log
    res.notes.append(
        f"{cluster.binaries}; slots {spread}; {len({it.stream for it in published})} streams; {len(published)} "
        f"entries published, {len(publisher.failures)} failed chunks retried ({publisher.failures[:3]}); "
        f"{untracked} entries in Redis no XADD reply named; worker starts: "
        + ", ".join(f"{w.name}={w.starts}" for w in fleet.workers.values())
    )
    res.figures = "; ".join(figures)
    return res


def _pending_per_master(cluster: topologies.Cluster, client: h.Client, consumer: str) -> dict[str, int]:
    """Entries pending on `consumer`, per master (address) holding their streams."""
    ranges = cluster.slot_ranges()
    by_master: dict[str, list[bytes]] = {}
    for stream in h.consumer_streams(client):
        slot = key_slot(stream)
        owner = next(node.address for first, last, node in ranges if first <= slot <= last)
        by_master.setdefault(owner, []).append(stream)
    return {
        owner: h.pending_by_consumer(client, streams).get(consumer, 0) for owner, streams in sorted(by_master.items())
    }


# 17. Redis Sentinel failover


def redis_sentinel(ctx: Context, database_url: str) -> Result:
    """A primary, a replica and a sentinel (tests/redis_topologies.py), two workers
    (REDIS_MODE=sentinel) and a publisher that sends again what fails; SENTINEL FAILOVER
    mid-run (the full run fails back over as well). Replication is asynchronous: what the new
    primary lacks of what the old one acknowledged is lost by Redis. Everything it holds must
    be written once or dead-lettered, and the workers must follow it without a restart."""
    res = Result("17. Redis Sentinel failover")
    if reason := topologies.skip_reason():
        return _skip(res, f"needs a redis-server or valkey-server (7.0+) for Sentinel: {reason}")
    p, rng = ctx.params, ctx.rng
    failovers, rate, lead, after = p.pick(1, 2), p.pick(800, 1500), p.pick(4, 8), p.pick(6, 12)
    items = readings(
        int(rate * (lead + failovers * (after + 15))), devices=25, rng=rng, poison_every=10, kinds=BAD_KINDS
    )
    names = ["w1", "w2"]
    log: list[str] = []
    figures: list[str] = []  # per failover: its seconds, the first rows after it
    started = time.monotonic()
    with topologies.redis_sentinel(replicas=1, sentinels=1) as setup:
        client = setup.client(socket_timeout=30)
        fleet = h.Fleet(
            f"redis://{topologies.HOST}:{setup.primary_port()}/0",  # unused in sentinel mode, but a valid setting
            database_url,
            ctx.log_root / "sentinel",
            names,
            REDIS_MODE="sentinel",
            REDIS_SENTINELS=",".join(setup.sentinels),
            REDIS_SENTINEL_MASTER=setup.master_name,
        )
        try:
            fleet.start()
            res.check("workers started", fleet.wait_up(client))
            publisher = h.Publisher(setup.client(socket_timeout=30), items, rate, chunk=50, retry_errors=True)
            publisher.start()
            _wait(lead, fleet)
            for number in range(failovers):
                old, offsets, at = setup.primary(), _offsets(fleet), time.time()
                new = setup.failover()
                took = time.time() - at
                wrote = h.first_writes(database_url, time.time(), names, 30)
                errors = {n: len(v) for n, v in _events(fleet, offsets, "transient error; retrying").items()}
                res.check(
                    f"failover {number + 1}: each worker wrote again once {new.address} was the primary",
                    all(v is not None for v in wrote.values()),
                    f"first new rows after {_fmt(wrote)}",
                )
                figures.append(f"failover {took:.1f}s, rows again {_worst(wrote)}")
                log.append(
                    f"failover {number + 1}: SENTINEL FAILOVER {old.address} -> {new.address}, settled in {took:.1f} s; "
                    f"first new rows after {_fmt(wrote)}; transient errors logged: {errors}"
                )
                _wait(after, fleet)
            publisher.stop()
            res.check("publisher finished", publisher.error is None, repr(publisher.error))
            res.check(
                "the workers followed the new primary without a restart",
                all(w.starts == 1 for w in fleet.workers.values()) and not fleet.crashes,
                "starts: " + ", ".join(f"{w.name}={w.starts}" for w in fleet.workers.values()),
            )
            client.close()
            client = setup.primary().client(socket_timeout=30)
            published = publisher.published()
            held_now = h.held(client)
            lost_to_redis = {(it.stream, it.entry_id) for it in published} - held_now
            untracked = len(held_now - {(it.stream, it.entry_id) for it in published})
            acc = _finish(ctx, res, client, fleet, database_url, published, started, lost_to_redis, strict=True)
        finally:
            for worker in fleet.workers.values():
                if worker.alive():
                    worker.proc.kill()
                    worker.proc.wait()
            client.close()
    res.notes += log
    res.notes.append(
        f"{setup.binaries}; {len(published)} entries published; {len(lost_to_redis)} acknowledged by the old primary "
        f"are not on the new one: {len(lost_to_redis) - res.lost_by_redis} of them were written or dead-lettered "
        f"before the failover (the letters of {acc.dead_letter_stream_lost_by_redis} went from the dead-letter stream "
        f"with them), {res.lost_by_redis} lost by Redis; {len(publisher.failures)} failed chunks sent again "
        f"({publisher.failures[:3]}); {untracked} entries in Redis no XADD reply named"
    )
    res.figures = "; ".join(figures) + f"; lost by Redis {res.lost_by_redis}"
    return res


SCENARIOS: list[tuple[str, Callable[[Context, str], Result]]] = [
    ("kill", kill_workers),
    ("pg-outage", postgres_outage),
    ("redis-aof", lambda ctx, url: redis_restart(ctx, url, empty=False)),
    ("redis-empty", lambda ctx, url: redis_restart(ctx, url, empty=True)),
    ("poison", poison),
    ("corpus", corpus),
    ("readonly", readonly),
    ("restarts", restarts),
    ("redis_oom", redis_oom),
    ("group_destroy", group_destroy),
    ("own_pending", own_pending),
    ("pg_blackhole", pg_blackhole),
    ("shutdown_bound", shutdown_bound),
    ("reset_recovery", reset_recovery),
    ("deep_stream", deep_stream),
    ("frozen_worker", frozen_worker),
    ("cluster", redis_cluster),
    ("sentinel", redis_sentinel),
]
