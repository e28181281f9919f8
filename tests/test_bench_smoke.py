"""The benchmark runs end to end (`bench/run.py --quick`) on the tests' servers.

A smoke test: it checks that every scenario ran and drained completely (each drain
verifies rows and pending itself) and that the report and plot are written. It never
asserts a speed; the numbers come from `bench/run.py` on a quiet machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_runs_every_scenario(redis_url, pg_admin_url, tmp_path):
    env = dict(os.environ, BENCH_REDIS_URL=redis_url, BENCH_ADMIN_URL=pg_admin_url)
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--entries",
            "4000",
            "--latency-seconds",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads((tmp_path / "latest.json").read_text())
    ran = {r["scenario"] for r in report["runs"]}
    assert {
        "raw_redis",
        "raw_copy",
        "simple_loop",
        "dbw-s200-b1000-w2",
        "dbw-s4000-b1000-w1",
        "latency-s400-b100",
    } <= ran, ran
    drains = [r for r in report["runs"] if r["kind"] == "drain"]
    assert all(r["entries"] == 4000 and r["rate"] > 0 and r["peak_rss_mb"] > 0 for r in drains)
    assert {t["target"] for t in report["targets"]} and (tmp_path / "throughput.png").stat().st_size > 10_000
