"""Scale-out (issue 14): 1, 2, 4 and 8 workers draining the same backlog, against
PostgreSQL's own ingest limit measured in the same run, and one worker behind added
network round-trip time.

    uv run python bench/scaling.py [--entries 200000] [--streams 400] [--repeat 5] [--out bench/results]

Per run: entries/s, PostgreSQL connections (db-writer's backends, sampled), commits/s and
WAL bytes per row (pg_stat_database and the WAL position before and after), and lock
waits sampled every 50 ms from pg_stat_activity: how many samples showed a db-writer
backend waiting on a lock, and how many of those were in the sensor-registry statement.
The limit: binary COPY of the same rows into sensor_readings (its primary key and BRIN
index included), 1,000 rows a transaction, from 1, 2, 4 and 8 client processes at once.
Round-trip time: this kernel has no netem, so the worker reaches Redis and PostgreSQL
through a TCP proxy (tests/fault_proxy.py) that delays every chunk by half the RTT each
way (1 ms and 5 ms RTT); the proxy runs in this process, on the same 2 CPUs.

Writes OUT/scaling.json and OUT/scaling.png. Uses Redis db 12 and a dbw_bench_* database.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path
from statistics import median

import psycopg

import infra
import limits
import report
import scenarios
import workload

sys.path.insert(0, str(infra.ROOT / "tests"))
from fault_proxy import FaultProxy

WORKERS = (1, 2, 4, 8)
RTTS_MS = (1.0, 5.0)
REGISTRY = "INSERT INTO db_writer_sensors"


class Sampler(threading.Thread):
    """pg_stat_activity every 50 ms: db-writer's backends, and which of them wait on a lock."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.samples = self.max_connections = self.lock_waits = self.registry_lock_waits = 0
        self.waits: dict[str, int] = {}

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.wait(0.05):
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event, query FROM pg_stat_activity"
                    " WHERE application_name LIKE 'db-writer %'"
                ).fetchall()
                self.samples += 1
                self.max_connections = max(self.max_connections, len(rows))
                for _, kind, event, query in rows:
                    if kind:
                        self.waits[f"{kind}:{event}"] = self.waits.get(f"{kind}:{event}", 0) + 1
                    if kind == "Lock":
                        self.lock_waits += 1
                        self.registry_lock_waits += REGISTRY in (query or "")


def _database_counters(url: str) -> tuple[int, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        commits = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]
        wal = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    return int(commits), int(wal)


def drain(
    db_url: str,
    names: list[bytes],
    total: int,
    workers: int,
    batch_size: int,
    redis_url: str | None = None,
    pg_url: str | None = None,
) -> dict:
    """scenarios.drain with the PostgreSQL-side measurements around it."""
    sampler = Sampler(db_url)
    before = _database_counters(db_url)
    sampler.start()
    if redis_url or pg_url:
        result = scenarios.drain(db_url, names, total, batch_size, workers, redis_url=redis_url, worker_db_url=pg_url)
    else:
        result = scenarios.drain(db_url, names, total, batch_size, workers)
    sampler.stop.set()
    sampler.join()
    after = _database_counters(db_url)
    return result | {
        "connections": sampler.max_connections,
        "commits_per_s": (after[0] - before[0]) / result["seconds"],
        "wal_bytes_per_row": (after[1] - before[1]) / total,
        "lock_wait_samples": sampler.lock_waits,
        "registry_lock_wait_samples": sampler.registry_lock_waits,
        "samples": sampler.samples,
        "waits": sampler.waits,
    }


def _copy_client(url: str, rows: list[tuple], batch: int, ready, go) -> None:
    with psycopg.connect(url) as conn:
        ready.set()
        go.wait()
        for start in range(0, len(rows), batch):
            with conn.cursor().copy(f"COPY sensor_readings ({limits.COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(limits.TYPES)
                for row in rows[start : start + batch]:
                    copy.write_row(row)
            conn.commit()


def copy_limit(db_url: str, rows: list[tuple], clients: int, batch: int = 1000) -> dict:
    """Binary COPY into sensor_readings from `clients` processes at once, each its own rows."""
    infra.reset_database(db_url)
    context = multiprocessing.get_context("fork")
    go = context.Event()
    procs, readies = [], []
    for k in range(clients):
        ready = context.Event()
        proc = context.Process(target=_copy_client, args=(db_url, rows[k::clients], batch, ready, go))
        proc.start()
        procs.append(proc)
        readies.append(ready)
    for ready in readies:
        ready.wait(60)
    started = time.perf_counter()
    go.set()
    for proc in procs:
        proc.join()
    seconds = time.perf_counter() - started
    if any(p.exitcode for p in procs):
        raise RuntimeError("a COPY client failed")
    return {"entries": len(rows), "seconds": seconds, "rate": len(rows) / seconds}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=8, help="repeats (default 8: each count twice in each position)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta = report.start_meta(args, infra.server_versions())
    names = workload.stream_names(args.streams)
    items = workload.entries(args.entries, args.streams)
    rows = [limits.parse(stream, fields) for stream, fields in items]
    runs: list[dict] = []
    with infra.database() as db_url:
        with infra.redis_client() as client:
            client.flushdb()
            workload.publish(client, items)
        for repeat in range(args.repeat):
            for clients in _rotated(WORKERS, repeat):
                result = copy_limit(db_url, rows, clients)
                runs.append({"repeat": repeat, "kind": "copy", "workers": clients, **result})
                print(
                    f"  [{repeat + 1}/{args.repeat}] COPY, {clients} client(s)       {result['rate']:>9,.0f} rows/s",
                    flush=True,
                )
            for workers in _rotated(WORKERS, repeat):
                result = drain(db_url, names, args.entries, workers, args.batch_size)
                runs.append({"repeat": repeat, "kind": "drain", "workers": workers, **result})
                print(
                    f"  [{repeat + 1}/{args.repeat}] db-writer, {workers} worker(s)  {result['rate']:>9,.0f} rows/s,"
                    f" {result['connections']} connections, {result['commits_per_s']:.0f} commits/s,"
                    f" {result['wal_bytes_per_row']:.0f} B WAL/row, lock waits {result['lock_wait_samples']}"
                    f" (registry {result['registry_lock_wait_samples']}) of {result['samples']} samples",
                    flush=True,
                )
            for rtt in RTTS_MS:
                with (
                    FaultProxy("127.0.0.1", infra.redis_port()) as redis_proxy,
                    FaultProxy("127.0.0.1", infra.postgres_port()) as pg_proxy,
                ):
                    redis_proxy.delay(rtt / 2000)
                    pg_proxy.delay(rtt / 2000)
                    result = drain(
                        db_url,
                        names,
                        args.entries,
                        1,
                        args.batch_size,
                        redis_url=redis_proxy.url_for(infra.REDIS_URL),
                        pg_url=pg_proxy.url_for(db_url),
                    )
                runs.append({"repeat": repeat, "kind": "rtt", "workers": 1, "rtt_ms": rtt, **result})
                print(
                    f"  [{repeat + 1}/{args.repeat}] db-writer, 1 worker, +{rtt:g} ms RTT  {result['rate']:>9,.0f}"
                    " rows/s",
                    flush=True,
                )
    with infra.redis_client() as client:
        client.flushdb()
    report.finish_meta(meta, runs, started)
    summary = _summary(runs)
    _print(summary)
    report.save_json(args.out / "scaling.json", {"meta": meta, "summary": summary, "runs": runs})
    _plot(args.out / "scaling.png", summary)
    print(f"\nwrote {args.out / 'scaling.json'} and {args.out / 'scaling.png'} ({meta['seconds']:.0f} s)")
    return 0


def _rotated(counts: tuple[int, ...], repeat: int) -> tuple[int, ...]:
    """Each repeat starts one count later (1 2 4 8, then 2 4 8 1, ...): no count always runs
    right after the COPYs, or last, where a checkpoint or the machine's drift would keep
    falling on it."""
    shift = repeat % len(counts)
    return counts[shift:] + counts[:shift]


def _summary(runs: list[dict]) -> dict:
    out: dict = {"copy": {}, "drain": {}, "rtt": {}}
    for kind, key in (("copy", "workers"), ("drain", "workers"), ("rtt", "rtt_ms")):
        for value in sorted({r[key] for r in runs if r["kind"] == kind}):
            rs = [r for r in runs if r["kind"] == kind and r[key] == value]
            s = {
                "rate": median(r["rate"] for r in rs),
                "rate_min": min(r["rate"] for r in rs),
                "rate_max": max(r["rate"] for r in rs),
            }
            for name in (
                "connections",
                "commits_per_s",
                "wal_bytes_per_row",
                "lock_wait_samples",
                "registry_lock_wait_samples",
                "samples",
                "cpu_s",
                "peak_rss_mb",
            ):
                if name in rs[0]:
                    s[name] = (
                        median(r[name] for r in rs)
                        if name not in ("registry_lock_wait_samples",)
                        else max(r[name] for r in rs)
                    )
            out[kind][str(value)] = s
    drains = out["drain"]
    best = max(s["rate"] for s in drains.values())
    out["targets"] = {
        "min_of_2_4_8_over_best": min(drains[w]["rate"] for w in ("2", "4", "8") if w in drains) / best,
        "registry_lock_wait_samples": sum(s["registry_lock_wait_samples"] for s in drains.values()),
    }
    return out


def _print(summary: dict) -> None:
    print(
        f"\n{'':28} {'rows/s (median, min-max)':>28} {'conns':>6} {'commits/s':>10} {'WAL B/row':>10}"
        f" {'lock waits':>11} {'registry':>9}"
    )
    for workers, s in summary["copy"].items():
        print(f"{'COPY, ' + workers + ' client(s)':28} {_spread(s):>28}")
    for workers, s in summary["drain"].items():
        print(
            f"{'db-writer, ' + workers + ' worker(s)':28} {_spread(s):>28} {s['connections']:>6.0f}"
            f" {s['commits_per_s']:>10.0f} {s['wal_bytes_per_row']:>10.0f} {s['lock_wait_samples']:>11.0f}"
            f" {s['registry_lock_wait_samples']:>9.0f}"
        )
    for rtt, s in summary["rtt"].items():
        print(f"{'1 worker, +' + rtt + ' ms RTT':28} {_spread(s):>28}")
    t = summary["targets"]
    print(
        f"\nslowest of 2, 4, 8 workers / best: {t['min_of_2_4_8_over_best']:.2f} (goal >= 0.9); registry lock-wait"
        f" samples: {t['registry_lock_wait_samples']:.0f} (goal 0)"
    )


def _spread(s: dict) -> str:
    return f"{s['rate']:,.0f} ({s['rate_min']:,.0f}-{s['rate_max']:,.0f})"


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, label, style in (
        ("drain", "db-writer workers", "o-"),
        ("copy", "binary COPY clients (the limit)", "s--"),
    ):
        xs = sorted(int(k) for k in summary[kind])
        ys = [summary[kind][str(x)]["rate"] for x in xs]
        ax.plot(xs, ys, style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(WORKERS), [str(w) for w in WORKERS])
    ax.set_xlabel("processes (2 CPUs, PostgreSQL and Redis on the same machine)")
    ax.set_ylabel("rows/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Scale-out, {os.cpu_count()} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
