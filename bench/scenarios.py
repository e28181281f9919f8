"""db-writer end to end: draining a backlog with 1..n workers, and latency under a steady load."""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import UTC, datetime

import psycopg

import infra
import worker
import workload

# The forkserver preloads `worker` (and so `main`) once. Python 3.11's forkserver ignores
# the parent's sys.path, so it finds bench/ and the service's modules through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(infra.ROOT / "bench"), str(infra.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["worker"])


def _settings(db_url: str, batch_size: int | None, name: str, redis_url: str | None = None) -> dict:
    """batch_size None: the service's defaults throughout (BATCH_SIZE, linger, timeouts). A
    given batch size comes without the linger: issue 5's few-millisecond latency setting."""
    settings = {
        "redis_url": redis_url or infra.REDIS_URL,
        "database_url": db_url,
        "log_level": "WARNING",
        "consumer_name": name,
    }
    if batch_size is not None:
        settings |= {"batch_size": batch_size, "batch_timeout_sec": 0.2, "batch_linger_ms": 0}
    return settings


def start_workers(
    db_url: str,
    batch_size: int | None,
    count: int,
    until_idle: bool,
    redis_url: str | None = None,
    hold: bool = False,
) -> list:
    """Start `count` workers (each its own CONSUMER_NAME) and wait until they are ready
    (`hold`: see worker.TimedService)."""
    workers = []
    for k in range(count):
        conn, child = _CTX.Pipe()
        proc = _CTX.Process(
            target=worker.serve,
            daemon=True,
            args=(child, _settings(db_url, batch_size, f"bench-{k + 1}", redis_url), until_idle, hold),
        )
        proc.start()
        workers.append((proc, conn))
    for proc, conn in workers:
        if not conn.poll(120) or conn.recv() != "ready":
            raise RuntimeError(f"worker {proc.pid} did not start")
    return workers


def finish_workers(workers: list, timeout: float) -> list[dict]:
    results = []
    for proc, conn in workers:
        if not conn.poll(timeout):
            proc.kill()
            raise RuntimeError(f"worker {proc.pid} did not finish within {timeout:.0f} s")
        results.append(conn.recv())
        proc.join(10)
    if errors := [r["error"] for r in results if r["error"]]:
        raise RuntimeError(f"worker failed: {errors}")
    return results


def drain(
    db_url: str,
    names: list[bytes],
    total: int,
    batch_size: int | None,
    workers: int = 1,
    redis_url: str | None = None,
    worker_db_url: str | None = None,
) -> dict:
    """Time from every worker being started (connected, streams found, reconciled) to the
    last commit: start-up is reported apart (`startup_s`, until the last one was ready).
    `redis_url`, `worker_db_url`: what the workers connect to (through a proxy, say)."""
    with infra.redis_client() as client:
        infra.reset_groups(client, names)
        infra.reset_database(db_url)
        procs = start_workers(
            worker_db_url or db_url, batch_size, workers, until_idle=True, redis_url=redis_url, hold=True
        )
        start = time.time()
        for _, conn in procs:
            conn.send("go")
        for proc, conn in procs:
            if not conn.poll(120) or conn.recv() != "started":
                raise RuntimeError(f"worker {proc.pid} did not start")
        go = time.time()
        for _, conn in procs:
            conn.send("go")
        results = finish_workers(procs, timeout=900)
        rows, left = infra.count_rows(db_url), infra.pending(client, names)
    if rows != total or left:
        raise RuntimeError(f"drain incomplete: {rows} rows of {total}, {left} entries pending")
    first = min(r["started_at"] for r in results)
    seconds = max(r["last_batch_at"] for r in results if r["last_batch_at"]) - first
    return {
        "entries": total,
        "seconds": seconds,
        "rate": total / seconds,
        "startup_s": go - start,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "cpu_s": sum(r["cpu_s"] for r in results),
        "batches": sum(r["stats"]["batches_processed"] for r in results),
        "code": results[0]["code"],
    }


def latency(db_url: str, names: list[bytes], rate: float, seconds: float, batch_size: int, warmup: float = 1.0) -> dict:
    """One worker while `rate` entries/s are published; latency = created_at - timestamp,
    over the entries published after the first `warmup` seconds."""
    with infra.redis_client() as client:
        infra.empty_streams(client, names)
        infra.reset_database(db_url)
        procs = start_workers(db_url, batch_size, 1, until_idle=False)
        procs[0][1].send("go")
        time.sleep(1.0)  # start-up: connect, schema check, SCAN, first blocking read
        since = datetime.fromtimestamp(time.time() + warmup, UTC)
        sent, took = workload.produce(client, names, rate, seconds)
        deadline = time.monotonic() + 60
        while infra.count_rows(db_url) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        procs[0][1].send("stop")
        result = finish_workers(procs, timeout=60)[0]
    with psycopg.connect(db_url, autocommit=True) as conn:
        p50, p95, p99, top, n = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.95) WITHIN GROUP"
            " (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms), count(*) FROM"
            " (SELECT extract(epoch FROM created_at - timestamp) * 1000 AS ms FROM sensor_readings"
            "  WHERE timestamp >= %s) s",
            [since],
        ).fetchone()
        rows = conn.execute("SELECT count(*) FROM sensor_readings").fetchone()[0]
    if rows != sent:
        raise RuntimeError(f"latency run incomplete: {rows} rows of {sent} published")
    batches = result["stats"]["batches_processed"]
    return {
        "entries": sent,
        "offered_rate": sent / took,
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(top),
        "measured_rows": n,
        "batches": batches,
        "mean_batch": sent / max(1, batches),
        "peak_rss_mb": result["peak_rss_mb"],
        "cpu_share": result["cpu_s"] / took,
        "code": result["code"],
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVICE_TABLES = ("db_writer_progress", "db_writer_streams", "db_writer_dead_letters", "db_writer_sensors")


def _sizes(conn: psycopg.Connection) -> tuple[int, int, int]:
    """(readings bytes, service tables bytes, WAL position) right now."""
    readings = conn.execute("SELECT pg_total_relation_size('sensor_readings')").fetchone()[0]
    service = sum(conn.execute("SELECT pg_total_relation_size(%s)", [t]).fetchone()[0] for t in SERVICE_TABLES)
    wal = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    return int(readings), int(service), int(wal)


def trickle(db_url: str, names: list[bytes], rate: float, seconds: float, warmup: float = 2.0) -> dict:
    """One worker with DEFAULT settings (BATCH_SIZE, BATCH_LINGER_MS, BATCH_TIMEOUT_SEC) while
    `rate` entries/s arrive: entries per commit, latency, the worker's CPU and the WAL per
    entry over the paced window, and how much the service tables grow against the readings."""
    with infra.redis_client() as client:
        infra.empty_streams(client, names)
        infra.reset_database(db_url)
        procs = start_workers(db_url, None, 1, until_idle=False)
        pid = procs[0][0].pid
        procs[0][1].send("go")
        time.sleep(1.0)  # start-up: connect, schema check, SCAN, reconciliation
        workload.produce(client, names, rate, warmup)  # the first batches of every stream: registry rows made
        deadline = time.monotonic() + 30
        while infra.count_rows(db_url) < int(rate * warmup) * 0.99 and time.monotonic() < deadline:
            time.sleep(0.05)
        with psycopg.connect(db_url, autocommit=True) as conn:
            before = _sizes(conn)
        cpu_before, since = _cpu_s(pid), datetime.now(UTC)
        sent, took = workload.produce(client, names, rate, seconds)
        cpu_after = _cpu_s(pid)
        total = sent + int(rate * warmup)
        deadline = time.monotonic() + 60
        while infra.count_rows(db_url) < total * 0.999 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the ledger merges once a second
        with psycopg.connect(db_url, autocommit=True) as conn:
            after = _sizes(conn)
        procs[0][1].send("stop")
        result = finish_workers(procs, timeout=60)[0]
    with psycopg.connect(db_url, autocommit=True) as conn:
        p50, p99, top, n = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP"
            " (ORDER BY ms), max(ms), count(*) FROM"
            " (SELECT extract(epoch FROM created_at - timestamp) * 1000 AS ms FROM sensor_readings"
            "  WHERE timestamp >= %s) s",
            [since],
        ).fetchone()
    batches = result["stats"]["batches_processed"]
    readings_growth, service_growth = after[0] - before[0], after[1] - before[1]
    return {
        "entries": sent,
        "offered_rate": sent / took,
        "entries_per_commit": result["stats"]["messages_read"] / max(1, batches),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "max_ms": float(top),
        "measured_rows": n,
        "cpu_us_per_entry": (cpu_after - cpu_before) / sent * 1e6,
        "wal_bytes_per_entry": (after[2] - before[2]) / sent,
        "readings_growth_bytes": readings_growth,
        "service_tables_growth_bytes": service_growth,
        "service_over_readings": service_growth / max(1, readings_growth),
        "peak_rss_mb": result["peak_rss_mb"],
        "code": result["code"],
    }
