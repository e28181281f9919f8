"""Long runs for the two targets of issue 5 that run.py does not cover: memory and table growth.

    uv run python bench/long.py [--backlog N] [--steady-minutes M] [--preload-rows R]
                                [--only memory,growth] [--out bench/results]

memory  one worker (BATCH_SIZE 1000) drains a backlog of N entries (seed format, 200
        streams; published in chunks first); then one worker while a producer publishes
        2,000 entries/s over 400 streams for M minutes. The parent samples the worker's
        VmRSS every few seconds. Targets: RSS <= 150 MB, and flat in the steady run
        (max after the first minute within 10 % of the RSS at one minute).
growth  one worker (BATCH_SIZE 1000) drains 300,000 entries over 200 streams into a table
        already holding R rows, against the same on an empty table (two databases,
        interleaved, alternating which goes first, 3 repeats). Target: the median of the per-repeat ratios full / empty
        >= 0.85; both medians are reported too.

Saved: OUT/long.json. Uses Redis db 12 and dbw_bench_* databases (created, dropped).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from statistics import median

import psycopg

import infra
import report
import scenarios
import workload

BATCH_SIZE = 1000
DRAIN_STREAMS = 200
STEADY_RATE, STEADY_STREAMS = 2000, 400
GROWTH_ENTRIES, GROWTH_REPEATS = 300_000, 3  # 100,000 drained in 2-4 s: too noisy a measure
PRELOAD_SERIES = 4000  # 1,000 "pre*" devices x 4 sensors, all before workload.T0: no key in common
SAMPLE_S = 2.0
RSS_LIMIT_MB, FLAT, GROWTH_GOAL = 150, 0.10, 0.85


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=1_000_000, help="entries drained by one worker (memory)")
    parser.add_argument("--steady-minutes", type=float, default=10.0, help="steady producer run (memory)")
    parser.add_argument("--preload-rows", type=int, default=10_000_000, help="rows already in the table (growth)")
    parser.add_argument("--only", default="memory,growth", help="comma-separated: memory, growth")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    args.only = [part.strip() for part in args.only.split(",") if part.strip()]
    if not args.only or set(args.only) - {"memory", "growth"}:
        parser.error("--only takes memory, growth or both")
    return args


def rss_mb(pid: int) -> float | None:
    """VmRSS now (VmHWM, reported by the worker, is only the peak)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return None


def backlog(total: int, streams: int, chunk: int = 100_000):
    """workload.entries' format and keys, made `chunk` entries at a time, so the publisher
    never holds a million entries (that list alone would be ~1 GB of Python objects)."""
    rng = random.Random(12)
    names = workload.stream_names(streams)
    for start in range(0, total, chunk):
        out = []
        for i in range(start, min(total, start + chunk)):
            ts = workload.T0 + timedelta(seconds=i // streams, microseconds=rng.randrange(1_000_000))
            fields = {b"value": f"{rng.uniform(-20, 40):.2f}".encode(), b"timestamp": workload.iso(ts).encode()}
            if i % 10 == 0:
                fields[b"metadata"] = (workload.METADATA % rng.randrange(101)).encode()
            out.append((names[i % streams], fields))
        yield out


def publish_backlog(total: int, streams: int) -> list[bytes]:
    with infra.redis_client() as client:
        client.flushdb()
        for items in backlog(total, streams):
            workload.publish(client, items)
    return workload.stream_names(streams)


def workload_rows(db_url: str, names: list[bytes]) -> int:
    devices = sorted({name.split(b":")[1].decode() for name in names})
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM sensor_readings WHERE device_id = ANY(%s)", [devices]).fetchone()[0]


def drain(db_url: str, names: list[bytes], total: int) -> dict:
    """scenarios.drain without its TRUNCATE (growth keeps the preloaded rows), and with the
    worker's VmRSS sampled from here while it runs. The caller resets the groups and tables."""
    procs = scenarios.start_workers(db_url, BATCH_SIZE, 1, until_idle=True)
    proc, conn = procs[0]
    rss_start = rss_mb(proc.pid)
    go = time.time()
    conn.send("go")
    samples = []
    deadline = time.monotonic() + max(900, total / 500)
    while not conn.poll(SAMPLE_S) and proc.is_alive() and time.monotonic() < deadline:
        samples.append((round(time.time() - go, 1), rss_mb(proc.pid)))
    result = scenarios.finish_workers(procs, timeout=10)[0]
    with infra.redis_client() as client:
        rows, left = workload_rows(db_url, names), infra.pending(client, names)
    if rows != total or left:
        raise RuntimeError(f"drain incomplete: {rows} rows of {total}, {left} entries pending")
    seconds = result["last_batch_at"] - result["started_at"]
    return {
        "entries": total,
        "rows": rows,
        "seconds": seconds,
        "rate": total / seconds,
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_start_mb": rss_start,
        "rss_sampled_max_mb": max((mb for _, mb in samples if mb), default=None),
        "cpu_s": result["cpu_s"],
        "batches": result["stats"]["batches_processed"],
        "samples": samples,
        "code": result["code"],
    }


def steady(db_url: str, names: list[bytes], minutes: float) -> dict:
    """One worker under a steady producer; VmRSS sampled by a thread while this one publishes."""
    seconds = minutes * 60
    warmup = min(60.0, seconds / 3)  # the first minute; a shorter test run uses its first third
    with infra.redis_client() as client:
        infra.empty_streams(client, names)
        infra.reset_database(db_url)
        procs = scenarios.start_workers(db_url, BATCH_SIZE, 1, until_idle=False)
        proc, conn = procs[0]
        conn.send("go")
        time.sleep(1.0)
        samples, done = [], threading.Event()
        started = time.time()

        def sample() -> None:
            while not done.wait(SAMPLE_S):
                samples.append((round(time.time() - started, 1), rss_mb(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sent, took = workload.produce(client, names, STEADY_RATE, seconds)
        deadline = time.monotonic() + 60
        while infra.count_rows(db_url) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        done.set()
        sampler.join()
        conn.send("stop")
        result = scenarios.finish_workers(procs, timeout=60)[0]
        rows, left = infra.count_rows(db_url), infra.pending(client, names)
    if rows != sent or left:
        raise RuntimeError(f"steady run incomplete: {rows} rows of {sent} published, {left} pending")
    later = [mb for t, mb in samples if t >= warmup and mb] or [mb for _, mb in samples if mb]
    warm = later[0]
    top = max(later)
    return {
        "entries": sent,
        "rows": rows,
        "offered_rate": sent / took,
        "seconds": took,
        "warmup_s": warmup,
        "rss_warm_mb": warm,
        "rss_max_mb": top,
        "rss_last_mb": later[-1],
        "growth": top / warm - 1,
        "growth_last": later[-1] / warm - 1,
        "peak_rss_mb": result["peak_rss_mb"],
        "cpu_share": result["cpu_s"] / took,
        "samples": samples,
        "code": result["code"],
    }


def memory(args: argparse.Namespace) -> dict:
    with infra.database() as db_url:
        print(f"memory: publishing {args.backlog:,} entries over {DRAIN_STREAMS} streams ...", flush=True)
        t = time.monotonic()
        names = publish_backlog(args.backlog, DRAIN_STREAMS)
        print(f"  published in {time.monotonic() - t:.0f} s; one worker, batch {BATCH_SIZE}, draining ...", flush=True)
        with infra.redis_client() as client:
            infra.reset_groups(client, names)
        infra.reset_database(db_url)
        d = drain(db_url, names, args.backlog)
        print(
            f"  drain: {d['rate']:,.0f} entries/s over {d['seconds']:.0f} s, peak RSS {d['peak_rss_mb']:.0f} MB"
            f" (at start {d['rss_start_mb']:.0f})",
            flush=True,
        )
        print(
            f"memory: steady {STEADY_RATE:,}/s over {STEADY_STREAMS} streams for {args.steady_minutes:g} min ...",
            flush=True,
        )
        s = steady(db_url, workload.stream_names(STEADY_STREAMS), args.steady_minutes)
        print(
            f"  steady: RSS {s['rss_warm_mb']:.1f} MB at {s['warmup_s']:.0f} s, max {s['rss_max_mb']:.1f},"
            f" last {s['rss_last_mb']:.1f} ({s['growth']:+.1%}); {s['entries']:,} rows",
            flush=True,
        )
    with infra.redis_client() as client:
        client.flushdb()
    return {"drain": d, "steady": s}


def preload(db_url: str, rows: int) -> float:
    """R rows in key order, made by the server (a client would take minutes), in 1M-row
    statements; the registry as the migration fills it; then VACUUM ANALYZE, as a table
    that has grown slowly would be."""
    started = time.monotonic()
    per = math.ceil(rows / PRELOAD_SERIES)
    with psycopg.connect(db_url, autocommit=True) as conn:
        for lo in range(0, rows, 1_000_000):
            conn.execute(
                "INSERT INTO sensor_readings (timestamp, device_id, sensor_type, value, metadata)"
                " SELECT %(t0)s - (%(per)s - i %% %(per)s) * interval '1 second',"
                "  'pre' || lpad((i / %(per)s / 4)::text, 5, '0'),"
                "  (ARRAY['co2', 'humidity', 'pressure', 'temperature'])[i / %(per)s %% 4 + 1],"
                "  round((random() * 60 - 20)::numeric, 2)::float8,"
                "  CASE WHEN i %% 10 = 0 THEN jsonb_build_object('unit', 'C', 'battery', i %% 101, 'rssi', -61,"
                "   'fw', '1.4.2') END"
                " FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) i",
                {"t0": workload.T0, "per": per, "lo": lo, "hi": min(rows, lo + 1_000_000) - 1},
            )
            print(f"  {min(rows, lo + 1_000_000):,} rows ({time.monotonic() - started:.0f} s)", flush=True)
        conn.execute(
            "INSERT INTO db_writer_sensors (device_id, sensor_type, consumer, first_seen, last_seen, readings)"
            " SELECT device_id, sensor_type, '', min(timestamp), max(timestamp), count(*)"
            " FROM sensor_readings GROUP BY 1, 2"
        )
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        stored = conn.execute("SELECT count(*) FROM sensor_readings").fetchone()[0]
    if stored != rows:
        raise RuntimeError(f"preload: {stored} rows of {rows}")
    return time.monotonic() - started


def reset_workload(db_url: str, names: list[bytes]) -> None:
    """Remove the last repeat's rows only (the preload stays), VACUUM so the next repeat
    meets no dead index entries (INDEX_CLEANUP ON: 100,000 of 10M rows is under the 2 % of
    pages below which VACUUM would skip the indexes), and a CHECKPOINT as infra.reset_database."""
    devices = sorted({name.split(b":")[1].decode() for name in names})
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM sensor_readings WHERE device_id = ANY(%s)", [devices])
        conn.execute("DELETE FROM db_writer_sensors WHERE device_id = ANY(%s)", [devices])
        conn.execute("TRUNCATE db_writer_progress, db_writer_streams, db_writer_dead_letters")
        conn.execute("VACUUM (INDEX_CLEANUP ON, ANALYZE) sensor_readings")
        conn.execute("CHECKPOINT")


def growth(args: argparse.Namespace) -> dict:
    with infra.database() as empty_url, infra.database() as full_url:
        print(f"growth: preloading {args.preload_rows:,} rows ...", flush=True)
        took = preload(full_url, args.preload_rows)
        with psycopg.connect(full_url, autocommit=True) as conn:
            size = conn.execute("SELECT pg_total_relation_size('sensor_readings')").fetchone()[0] / 2**20
        print(f"  preloaded in {took:.0f} s; sensor_readings is {size:,.0f} MB with its indexes", flush=True)
        names = publish_backlog(GROWTH_ENTRIES, DRAIN_STREAMS)
        runs = []
        for repeat in range(GROWTH_REPEATS):
            pair = (("empty", empty_url), ("full", full_url))
            for table, url in pair if repeat % 2 == 0 else pair[::-1]:  # alternate which goes first
                reset_workload(url, names)
                with infra.redis_client() as client:
                    infra.reset_groups(client, names)
                r = drain(url, names, GROWTH_ENTRIES)
                runs.append(
                    {
                        "repeat": repeat,
                        "table": table,
                        **{k: v for k, v in r.items() if k != "samples"},
                        "load1": os.getloadavg()[0],
                    }
                )
                print(f"  [{repeat + 1}/{GROWTH_REPEATS}] {table:<5} table: {r['rate']:>8,.0f} entries/s", flush=True)
    with infra.redis_client() as client:
        client.flushdb()
    rate = {t: median(r["rate"] for r in runs if r["table"] == t) for t in ("empty", "full")}
    by = {(r["table"], r["repeat"]): r["rate"] for r in runs}
    pairs = [by["full", k] / by["empty", k] for k in range(GROWTH_REPEATS)]
    # as run.py: the median of per-repeat ratios, so a slow patch of the shared machine moves both
    return {
        "preload_rows": args.preload_rows,
        "preload_s": took,
        "table_mb": size,
        "entries": GROWTH_ENTRIES,
        "empty_rate": rate["empty"],
        "full_rate": rate["full"],
        "ratio_of_medians": rate["full"] / rate["empty"],
        "ratio": median(pairs),
        "ratio_per_repeat": pairs,
        "runs": runs,
    }


def targets(result: dict) -> list[dict]:
    rows = []
    if m := result.get("memory"):
        d, s = m["drain"], m["steady"]
        rows += [
            (f"drain {d['entries']:,}: worker peak RSS MB", d["peak_rss_mb"], "<=", RSS_LIMIT_MB),
            ("steady: worker peak RSS MB", s["peak_rss_mb"], "<=", RSS_LIMIT_MB),
            ("steady: RSS growth after warm-up (max / warm - 1)", s["growth"], "<=", FLAT),
        ]
    if g := result.get("growth"):
        rows.append((f"{g['preload_rows']:,}-row table / empty table (rate)", g["ratio"], ">=", GROWTH_GOAL))
    return [
        {
            "target": name,
            "measured": value,
            "goal": f"{op} {goal}",
            "ok": value >= goal if op == ">=" else value <= goal,
        }
        for name, value, op, goal in rows
    ]


def print_table(result: dict, goals: list[dict]) -> None:
    if m := result.get("memory"):
        d, s = m["drain"], m["steady"]
        sampled = "-" if d["rss_sampled_max_mb"] is None else f"{d['rss_sampled_max_mb']:.0f}"
        print(f"\n{'memory':<44} {'value':>19}")
        for label, value in (
            (f"drain {d['entries']:,} entries: entries/s", f"{d['rate']:,.0f}"),
            ("drain: rows / entries", f"{d['rows']:,} / {d['entries']:,}"),
            (
                "drain: RSS MB at start / sampled max / peak",
                f"{d['rss_start_mb']:.0f} / {sampled} / {d['peak_rss_mb']:.0f}",
            ),
            (f"steady {s['offered_rate']:,.0f}/s: rows / entries", f"{s['rows']:,} / {s['entries']:,}"),
            (
                f"steady: RSS MB at {s['warmup_s']:.0f} s / max / last",
                f"{s['rss_warm_mb']:.1f} / {s['rss_max_mb']:.1f} / {s['rss_last_mb']:.1f}",
            ),
            ("steady: worker CPU share", f"{s['cpu_share']:.0%}"),
        ):
            print(f"{label:<44} {value:>19}")
    if g := result.get("growth"):
        print(f"\n{'growth: entries/s, median of ' + str(GROWTH_REPEATS):<44} {'empty':>9} {'full':>9} {'ratio':>6}")
        label = f"{g['entries']:,} entries, {g['preload_rows']:,} rows ({g['table_mb']:,.0f} MB)"
        print(f"{label:<44} {g['empty_rate']:>9,.0f} {g['full_rate']:>9,.0f} {g['ratio_of_medians']:>6.2f}")
        print(
            f"full / empty per repeat: {', '.join(f'{x:.2f}' for x in g['ratio_per_repeat'])}"
            f" (median {g['ratio']:.2f}, the target's measure)"
        )
    print(f"\n{'target (issue 5)':<56} {'measured':>9} {'goal':>8}  result")
    for t in goals:
        print(f"{t['target']:<56} {t['measured']:>9.2f} {t['goal']:>8}  {'PASS' if t['ok'] else 'FAIL'}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta = report.start_meta(args, infra.server_versions())
    print(f"db-writer long benchmark ({', '.join(args.only)}); {meta['cpus']} CPUs, load {meta['load_before'][0]:.2f}")
    result = {}
    try:
        if "memory" in args.only:
            result["memory"] = memory(args)
        if "growth" in args.only:
            result["growth"] = growth(args)
    finally:
        with infra.redis_client() as client:
            client.flushdb()
    report.finish_meta(meta, [*result.get("memory", {}).values(), *result.get("growth", {}).get("runs", [])], started)
    goals = targets(result)
    print_table(result, goals)
    report.save_json(args.out / "long.json", {"meta": meta, **result, "targets": goals})
    print(f"\nwrote {args.out / 'long.json'} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
