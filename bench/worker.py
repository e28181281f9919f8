"""One db-writer worker in a process of its own, for the benchmark.

Processes are forked from a multiprocessing forkserver that has imported the service
once: a worker starts without paying for its imports (about 0.6 s here) in the middle of
a measurement, and its peak RSS is that of a `python main.py` process. The worker runs the service's own loop,
`DatabaseWriterService(settings).run()`; the parent sends "go" (and, for a worker
not run until idle, "stop") over a pipe and gets back the stats. A held worker (a drain)
answers "started" once its start-up is done and runs its loop at a second "go".
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict
from pathlib import Path

import log
from config import load_settings
from main import DatabaseWriterService

SERVICE = ("service.py", "redis_reader.py", "db_writer.py", "schema.py", "config.py", "ledger.py", "read_ahead.py")


def code_version() -> dict:
    """Which service code runs (the tree may change under a benchmark; no git here)."""
    root = Path(__file__).resolve().parents[1]
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:12] for name in SERVICE}


CODE = code_version()  # taken when the forkserver imports the service, as close as it gets


class TimedService(DatabaseWriterService):
    """The service, noting when its start-up (connect, lock, schema check, SCAN) is done.
    With `hold`, it then says "started" and waits for "go": workers of a drain all start
    before the clock does, so none drains alone while the others start."""

    started_at: float | None = None
    cpu_at_start = 0.0  # CPU seconds spent until then (start-up), left out of cpu_s

    def __init__(self, settings, conn=None, hold: bool = False) -> None:
        super().__init__(settings)
        self._conn, self._hold = conn, hold

    def _start(self) -> None:
        super()._start()
        if self._hold:
            self._conn.send("started")
            self._conn.recv()
        self.started_at = time.time()
        self.cpu_at_start = time.process_time()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def serve(conn, overrides: dict, until_idle: bool, hold: bool = False) -> None:
    settings = load_settings(**overrides)
    log.configure_logging(settings.log_level, settings.log_format)
    service = TimedService(settings, conn, hold)
    conn.send("ready")
    conn.recv()
    if not until_idle:
        threading.Thread(target=lambda: (conn.recv(), service.stop("benchmark over")), daemon=True).start()
    error = None
    try:
        service.run(until_idle=until_idle)
    except Exception as exc:
        error = repr(exc)
    cpu = time.process_time()
    conn.send(
        {
            "started_at": service.started_at,
            "last_batch_at": service.stats.last_batch_at,
            "stats": asdict(service.stats),
            "peak_rss_mb": peak_rss_mb(),
            "cpu_s": cpu - service.cpu_at_start,
            "startup_cpu_s": service.cpu_at_start,
            "error": error,
            "code": CODE,
        }
    )
