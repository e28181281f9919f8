"""The scenarios. Each gets a fresh, migrated database and an emptied Valkey, runs real
`main.py` worker processes, does its damage, waits until nothing is pending, and accounts
for every entry it published."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import redis

import harness as h
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


def readings(n: int, devices: int, rng: random.Random, poison_every: int = 0) -> list[Item]:
    """n entries, round-robin over devices x SENSORS streams, each with its own timestamp
    (one second apart per stream), so every reading has a unique key. With poison_every,
    about one entry in that many is a poison entry of a rotating kind."""
    items: list[Item] = []
    streams = [(f"dev{d:03d}", s) for d in range(devices) for s in SENSORS]
    slot = 0
    kinds = list(POISON)
    while len(items) < n:
        for device, sensor in streams:
            if len(items) >= n:
                break
            ts = T0 + timedelta(seconds=slot)
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
    client: redis.Redis,
    fleet: h.Fleet,
    database_url: str,
    items: list[Item],
    started: float,
    lost_to_redis: set | None = None,
) -> None:
    settled, waited = h.wait_settled(client, fleet, ctx.params.settle_timeout)
    res.check("settled: nothing pending or unread", settled, f"waited {waited:.1f} s")
    fleet.wait_up(client, 30)  # SIGTERM before the handlers are installed would just kill it
    _stop_fleet(res, fleet)
    res.seconds = round(time.monotonic() - started, 1)
    _judge(res, h.account(client, database_url, items, lost_to_redis), items)


def _stop_fleet(res: Result, fleet: h.Fleet) -> None:
    codes = fleet.stop()
    res.check("workers exit 0 on SIGTERM", all(c == 0 for c in codes.values()), str(codes))
    res.worker_crashes = len(fleet.crashes)
    res.check(
        "no worker exited on its own",
        not fleet.crashes,
        "; ".join(f"{c['worker']} exit {c['status']} at {c['at']}: {c['log_tail'][-600:]}" for c in fleet.crashes),
    )


def _judge(res: Result, acc: h.Accounting, items: list[Item]) -> None:
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
    res.check(
        "ledger: sum(rows_inserted) == rows in the table",
        acc.ledger_rows_inserted == acc.rows_in_table,
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
        severity="warn",
    )


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            parts = stat.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return math.nan


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
            while time.monotonic() < deadline and not all(_pending_by_consumer(client).get(x) for x in names):
                time.sleep(0.002)
        else:
            _wait(rng.uniform(0.3, 2.0), fleet)
        for name in names:
            fleet.workers[name].kill()
        # A dead consumer's pending list is frozen (until CLAIM_IDLE_MS passes): exactly what it
        # had read and not acked when it died.
        after = _pending_by_consumer(client)
        held = {name: after.get(name, 0) for name in names}
        in_flight += sum(1 for count in held.values() if count)
        if leave_dead:
            name = names[0]
            _wait(claim_wait, fleet)
            later = _pending_by_consumer(client).get(name, 0)
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
    _finish(ctx, res, client, fleet, database_url, publisher.published(), started)
    res.notes.append("worker starts: " + ", ".join(f"{w.name}={w.starts}" for w in fleet.workers.values()))
    return res


def _pending_by_consumer(client: redis.Redis) -> dict[str, int]:
    """Pending entries per consumer name, over all streams (one pipelined round trip)."""
    streams = h.consumer_streams(client)
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xpending(stream, h.GROUP)
    totals: dict[str, int] = {}
    for reply in pipe.execute(raise_on_error=False):
        if isinstance(reply, dict):
            for consumer in reply["consumers"]:
                name = consumer["name"].decode()
                totals[name] = totals.get(name, 0) + consumer["pending"]
    return totals


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
    kinds = {}
    for it in items:
        kinds[it.kind] = kinds.get(it.kind, 0) + 1
    res.notes.append("kinds: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())) + f" ({pairs} conflict pairs)")
    _finish(ctx, res, client, fleet, database_url, publisher.published(), started)
    bad = [it for it in items if it.bad]
    stream_letters = {
        h.where(f[b"original_stream"].decode(), f[b"original_id"]): f for _, f in client.xrange(h.DEAD_LETTER_STREAM)
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
            conn.execute("TRUNCATE sensor_readings, db_writer_batches, db_writer_dead_letters")
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


def _entry_time(entry_id: bytes) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(entry_id.split(b"-")[0]))


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


SCENARIOS: list[tuple[str, Callable[[Context, str], Result]]] = [
    ("kill", kill_workers),
    ("pg-outage", postgres_outage),
    ("redis-aof", lambda ctx, url: redis_restart(ctx, url, empty=False)),
    ("redis-empty", lambda ctx, url: redis_restart(ctx, url, empty=True)),
    ("poison", poison),
    ("corpus", corpus),
]
