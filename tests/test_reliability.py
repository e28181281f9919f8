"""The reliability suite, quick version (reliability/run.py --quick): its eighteen scenarios
(kill -9, PostgreSQL and Redis outages, poison entries, the hostile corpus, a read-only or
black-holed database, Redis out of memory, a destroyed group, a frozen worker, a Redis Cluster,
a Sentinel failover, ...) against private servers it starts itself. About seven minutes;
`pytest -m slow tests/test_reliability.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import redis_topologies

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_reliability_suite_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "reliability" / "run.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    report_path = tmp_path / "latest-quick.json"
    assert report_path.exists(), f"no report (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    table = (tmp_path / "latest-quick.md").read_text()
    scenarios = {s["scenario"]: s for s in report["scenarios"]}
    assert len(scenarios) == 18, table  # reliability/scenarios.py SCENARIOS

    skipped = {name: s["skipped"] for name, s in scenarios.items() if s.get("skipped")}
    may_skip = {"11. PostgreSQL black-holed"}  # network namespaces, which a host may not allow
    if redis_topologies.skip_reason():  # no redis-server or valkey-server that runs a cluster
        may_skip |= {"16. Redis Cluster", "17. Redis Sentinel failover"}
    assert set(skipped) <= may_skip, skipped
    for name, s in scenarios.items():
        if name in skipped:
            continue
        assert s["sent"] > 0, f"{name}: nothing published\n{table}"
        assert s["lost"] == 0, f"{name}: {s['lost']} lost\n{table}"
        assert s["duplicated"] == 0, f"{name}: {s['duplicated']} duplicated\n{table}"
        assert s["pending"] == 0 and s["unread"] == 0, f"{name}: {s['pending']} pending, {s['unread']} unread\n{table}"
        assert s["worker_crashes"] == 0, f"{name}: a worker exited on its own\n{table}"
        # Every bad entry dead-lettered, with a reason, and no good reading among the dead letters.
        acc = s["accounting"]
        assert acc["bad_not_dead_lettered"] == 0 and acc["dead_letter_reason_wrong"] == 0, f"{name}\n{table}"
        assert acc["dead_letter_stream_missing"] == 0, f"{name}: dead letters missing from the stream\n{table}"
        assert s["good_dead_lettered"] == 0 and s["bad_written"] == 0, f"{name}\n{table}"
        failed = [c for c in s["checks"] if not c["ok"] and c["severity"] == "must"]
        assert not failed, f"{name}: {failed}\n{table}"

    poison = scenarios["4. poison entries mixed in"]
    assert poison["expected_dead_letters"] > 0 and poison["dead_lettered"] == poison["expected_dead_letters"]
    corpus = scenarios["5. hostile corpus end to end"]
    assert corpus["expected_dead_letters"] > 0 and corpus["dead_lettered"] == corpus["expected_dead_letters"]
    assert report["ok"], table
