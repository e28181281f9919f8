"""Benchmark db-writer against this machine's limits, measured in the same run (issue 5).

    uv run python bench/run.py [--quick] [--entries N] [--streams S] [--repeat R] [--out bench/results]

Each repeat publishes a backlog (N entries over S streams, XADD pipelined, before
any timing) and measures, in turn:

  limits      round trips (Redis PING, SELECT 1, 1-row INSERT + COMMIT), raw Redis
              (XREADGROUP ~1,000 a read + pipelined XACK), raw binary COPY of
              1,000-row batches with a commit each, and the simplest single-thread loop
              (see limits.py);
  drain       db-writer, BATCH_SIZE 100/500/1000/2000 x 1 and 2 workers (each a process
              running DatabaseWriterService.run(until_idle=True)), then the same backlog
              over 4,000 streams; time runs from the workers being started (connected,
              streams found) to their last commit, and every row and ack is checked;
  latency     one worker while 2,000 entries/s are published over 400 streams;
              latency = created_at - timestamp (created_at is the transaction's start).

Printed: medians over the repeats; ratios are medians of per-repeat ratios, so a slow
patch of a shared machine moves the limits and db-writer together. Saved:
OUT/latest.json and OUT/throughput.png. Uses Redis db 12 and a dbw_bench_* database
(created, migrated, dropped).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import infra
import limits
import report
import scenarios
import workload

BATCH_SIZES = (100, 500, 1000, 2000)
WORKERS = (1, 2)
MANY_STREAMS = 4000  # 1,000 devices x 4 sensors
LATENCY_RATE, LATENCY_STREAMS = 2000, 400


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, small sizes: a smoke test for CI")
    parser.add_argument("--entries", type=int, help="backlog size (default 100,000; --quick 10,000)")
    parser.add_argument("--streams", type=int, default=200, help="streams of the backlog (default 200)")
    parser.add_argument("--repeat", type=int, help="repeats, medians reported (default 3; --quick 1)")
    parser.add_argument("--latency-seconds", type=float, help="producer run (default 20; --quick 5)")
    parser.add_argument("--trickle-seconds", type=float, help="steady-trickle run (default 30; --quick 5)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    args.entries = args.entries or (10_000 if args.quick else 100_000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.latency_seconds = args.latency_seconds or (5.0 if args.quick else 20.0)
    args.trickle_seconds = args.trickle_seconds or (5.0 if args.quick else 30.0)
    args.many_batch_sizes = (1000,) if args.quick else (100, 1000)
    args.latency_batch_sizes = (100,) if args.quick else (100, 1000)
    return args


def one_repeat(repeat: int, args: argparse.Namespace, db_url: str, runs: list[dict]) -> None:
    def record(scenario: str, kind: str, label: str, result: dict, **params) -> None:
        runs.append(
            {
                "repeat": repeat,
                "scenario": scenario,
                "kind": kind,
                "label": label,
                **params,
                **result,
                "load1": os.getloadavg()[0],
            }
        )  # the machine is shared: how busy it was
        if "rate" in result:
            shown = f"{result['rate']:>9,.0f} entries/s"
        else:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k.endswith("_ms"))
        print(f"  [{repeat + 1}/{args.repeat}] {label:<44} {shown}", flush=True)

    n, s = args.entries, args.streams
    names = workload.stream_names(s)
    items = workload.entries(n, s)
    with infra.redis_client() as client:
        client.flushdb()
        workload.publish(client, items)
        record("round_trips", "limit", "round trips (median ms)", limits.round_trips(client, db_url))
        record("raw_redis", "limit", "raw Redis: XREADGROUP + XACK", limits.raw_redis(client, names), streams=s)
        infra.reset_database(db_url)
        rows = [limits.parse(stream, fields) for stream, fields in items]
        record("raw_copy", "limit", "raw COPY, 1,000 rows/commit", limits.raw_copy(db_url, rows))
        del rows, items
        infra.reset_database(db_url)
        record(
            "simple_loop",
            "limit",
            "simplest loop (1,000/batch)",
            limits.simple_loop(client, db_url, names),
            streams=s,
            batch_size=1000,
            workers=1,
        )
    for batch_size in BATCH_SIZES:
        for workers in WORKERS:
            label = f"db-writer {s} streams, batch {batch_size}, {workers}w"
            record(
                f"dbw-s{s}-b{batch_size}-w{workers}",
                "drain",
                label,
                scenarios.drain(db_url, names, n, batch_size, workers),
                streams=s,
                batch_size=batch_size,
                workers=workers,
            )

    record(
        f"dbw-s{s}-default-w1",
        "drain",
        f"db-writer {s} streams, default settings, 1w",
        scenarios.drain(db_url, names, n, None, 1),
        streams=s,
        workers=1,
    )

    many = workload.stream_names(MANY_STREAMS)
    with infra.redis_client() as client:
        client.flushdb()
        workload.publish(client, workload.entries(n, MANY_STREAMS))
    for batch_size in args.many_batch_sizes:
        record(
            f"dbw-s{MANY_STREAMS}-b{batch_size}-w1",
            "drain",
            f"db-writer {MANY_STREAMS} streams, batch {batch_size}, 1w",
            scenarios.drain(db_url, many, n, batch_size, 1),
            streams=MANY_STREAMS,
            batch_size=batch_size,
            workers=1,
        )

    latency_names = workload.stream_names(LATENCY_STREAMS)
    for batch_size in args.latency_batch_sizes:
        record(
            f"latency-s{LATENCY_STREAMS}-b{batch_size}",
            "latency",
            f"{LATENCY_RATE:,}/s over {LATENCY_STREAMS} streams, batch {batch_size}, no linger",
            scenarios.latency(db_url, latency_names, LATENCY_RATE, args.latency_seconds, batch_size),
            streams=LATENCY_STREAMS,
            batch_size=batch_size,
            workers=1,
        )


def trickle(repeat: int, args: argparse.Namespace, db_url: str, runs: list[dict]) -> None:
    names = workload.stream_names(LATENCY_STREAMS)
    result = scenarios.trickle(db_url, names, LATENCY_RATE, args.trickle_seconds)
    label = f"{LATENCY_RATE:,}/s over {LATENCY_STREAMS} streams, defaults"
    runs.append(
        {
            "repeat": repeat,
            "scenario": "trickle",
            "kind": "trickle",
            "label": label,
            "streams": LATENCY_STREAMS,
            "workers": 1,
            **result,
            "load1": os.getloadavg()[0],
        }
    )
    print(
        f"  [{repeat + 1}/{args.repeat}] {label:<44} {result['entries_per_commit']:.0f}/commit, p99"
        f" {result['p99_ms']:.0f} ms, {result['cpu_us_per_entry']:.1f} us CPU/entry,"
        f" {result['wal_bytes_per_entry']:.0f} B WAL/entry, service/readings {result['service_over_readings']:.3f}",
        flush=True,
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta = report.start_meta(args, infra.server_versions())
    print(
        f"db-writer benchmark: {args.entries:,} entries over {args.streams} streams, {args.repeat} repeat(s);"
        f" {meta['cpus']} CPUs, load {meta['load_before'][0]:.2f}"
    )
    runs: list[dict] = []
    with infra.database() as db_url:
        try:
            for repeat in range(args.repeat):
                one_repeat(repeat, args, db_url, runs)
                trickle(repeat, args, db_url, runs)
        finally:
            with infra.redis_client() as client:
                client.flushdb()
    report.finish_meta(meta, runs, started)
    summary = report.summarize(runs)
    goals = report.targets(runs, summary, args.streams, MANY_STREAMS)
    report.print_table(summary, goals)
    report.save_json(args.out / "latest.json", {"meta": meta, "summary": summary, "targets": goals, "runs": runs})
    report.plot(args.out / "throughput.png", summary, args.streams)
    print(f"\nwrote {args.out / 'latest.json'} and {args.out / 'throughput.png'} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
