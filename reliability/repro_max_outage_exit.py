"""Reproduction: a worker that gives up after MAX_OUTAGE_SEC must exit non-zero.

    uv run python reliability/repro_max_outage_exit.py

A real worker (main.py) runs with MAX_OUTAGE_SEC=5; PostgreSQL is stopped and one entry is
published. After 5 s of failed writes the worker gives up. Expected: exit status 1 and a
"giving up" log line, so that a supervisor (systemd Restart=on-failure, Kubernetes) starts
it again. Nothing may be acked: the entry must still be pending.

Exit status of this script: 0 when the worker behaves, 1 otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

import redis  # noqa: E402


def main() -> int:
    with h.private_servers() as srv, h.fresh_database(srv.pg.url) as database_url, \
            tempfile.TemporaryDirectory() as logs:
        client = redis.Redis.from_url(srv.valkey.url)
        client.xadd("mqtt_stream:dev1:temp", {"value": "1", "timestamp": "2024-01-01T00:00:00Z"})
        fleet = h.Fleet(srv.valkey.url, database_url, Path(logs), ["w1"], MAX_OUTAGE_SEC="5", LOG_LEVEL="INFO")
        fleet.start()
        assert fleet.wait_up(client), "worker did not start"
        assert h.wait_settled(client, None, 30)[0], "first entry not written"
        srv.pg.stop()
        client.xadd("mqtt_stream:dev1:temp", {"value": "2", "timestamp": "2024-01-01T00:00:01Z"})
        worker = fleet.workers["w1"]
        try:
            status = worker.proc.wait(60)
        except subprocess.TimeoutExpired:
            status = None
            worker.kill()
        pending, _ = h.backlog(client)
        log = worker.log_path.read_text()
        srv.pg.start()
        gave_up = "giving up" in log
        print(f"exit status {status} (expected 1); 'giving up' logged: {gave_up} (expected True); "
              f"pending {pending} (expected 1)")
        for line in log.splitlines():
            if '"stopped' in line or "giving up" in line or "stopped before" in line:
                print("  log:", line[:300])
        time.sleep(0)
        return 0 if (status, gave_up, pending) == (1, True, 1) else 1


if __name__ == "__main__":
    sys.exit(main())
