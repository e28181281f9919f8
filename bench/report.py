"""Medians over repeats, ratios to the limits measured in the same repeat, the table, JSON and plot."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

NUMBERS = (
    "rate",
    "seconds",
    "startup_s",
    "cpu_s",
    "offered_rate",
    "mean_batch",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "redis_ping_ms",
    "pg_select_ms",
    "pg_commit_ms",
    "entries_per_commit",
    "cpu_us_per_entry",
    "wal_bytes_per_entry",
    "service_over_readings",
)


def start_meta(args, servers: dict) -> dict:
    """When, on what and how busy: the machine is shared, so every result carries it."""
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
        **servers,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }


def finish_meta(meta: dict, runs: list[dict], started: float) -> None:
    """Load after, duration, and which service code the workers ran (the tree may change under a run)."""
    meta["load_after"] = os.getloadavg()
    codes = [dict(c) for c in {tuple(sorted(r["code"].items())) for r in runs if "code" in r}]
    meta["code"] = codes[0] if len(codes) == 1 else codes
    if len(codes) > 1:
        print(f"WARNING: the service's code changed during the run; {len(codes)} versions measured")
    meta["seconds"] = round(time.monotonic() - started, 1)


def ratio(runs: list[dict], a: str, b: str) -> float | None:
    """Median over repeats of rate(a) / rate(b), each pair from the same repeat."""
    rates = {(r["scenario"], r["repeat"]): r["rate"] for r in runs if "rate" in r}
    pairs = [rates[a, k] / rates[b, k] for (s, k) in rates if s == a and (b, k) in rates]
    return median(pairs) if pairs else None


def summarize(runs: list[dict]) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    for run in runs:
        summary.setdefault(run["scenario"], {"runs": []})["runs"].append(run)
    for scenario, s in summary.items():
        rs = s.pop("runs")
        s.update({k: rs[0][k] for k in ("kind", "label", "streams", "batch_size", "workers") if k in rs[0]})
        s["repeats"] = len(rs)
        for key in NUMBERS:
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                s[key] = median(values)
        if "rate" in s:
            s["rate_min"], s["rate_max"] = min(r["rate"] for r in rs), max(r["rate"] for r in rs)
            s["vs_simple"] = ratio(runs, scenario, "simple_loop")
            s["vs_copy"] = ratio(runs, scenario, "raw_copy")
            if "cpu_s" in s:
                s["cpu_us_per_entry"] = median(r["cpu_s"] / r["entries"] * 1e6 for r in rs)
        if any("peak_rss_mb" in r for r in rs):
            s["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)  # the worst, not the median
        if "phases" in rs[0]:
            s["phases"] = {p: median(r["phases"][p] for r in rs) for p in rs[0]["phases"]}
    return summary


def targets(runs: list[dict], summary: dict, streams: int, many: int) -> list[dict]:
    one, two = f"dbw-s{streams}-b1000-w1", f"dbw-s{streams}-b1000-w2"
    rows = [
        ("1 worker / simplest loop (BATCH_SIZE 1000)", ratio(runs, one, "simple_loop"), ">=", 0.8),
        ("2 workers / 1 worker (BATCH_SIZE 1000)", ratio(runs, two, one), ">=", 1.3),
        (f"{many} streams / {streams} streams (BATCH_SIZE 1000)", ratio(runs, f"dbw-s{many}-b1000-w1", one), ">=", 0.8),
    ]
    for s in summary.values():
        if s["kind"] == "latency":
            rows += [(f"{s['label']}: p50 ms", s["p50_ms"], "<=", 15), (f"{s['label']}: p99 ms", s["p99_ms"], "<=", 50)]
    rss = [s["peak_rss_mb"] for s in summary.values() if s["kind"] in ("drain", "latency", "trickle")]
    rows.append(("worker peak RSS MB (worst scenario)", max(rss) if rss else None, "<=", 150))
    # Issue 11: default settings.
    rows.append(
        ("defaults / simplest loop (drain)", ratio(runs, f"dbw-s{streams}-default-w1", "simple_loop"), ">=", 0.7)
    )
    best = max(
        (s["rate"], k)
        for k, s in summary.items()
        if s["kind"] == "drain" and s.get("streams") == streams and s.get("workers") == 1
    )
    rows.append(("defaults / best BATCH_SIZE (drain)", ratio(runs, f"dbw-s{streams}-default-w1", best[1]), ">=", 0.8))
    for s in summary.values():
        if s["kind"] == "trickle":
            rows += [
                (f"{s['label']}: entries per commit", s["entries_per_commit"], ">=", 80),
                (f"{s['label']}: p99 ms", s["p99_ms"], "<=", 250),
                (f"{s['label']}: worker CPU us per entry", s["cpu_us_per_entry"], "<=", 30),
                (f"{s['label']}: service tables growth / readings growth", s["service_over_readings"], "<=", 0.05),
            ]
    return [
        {
            "target": name,
            "measured": value,
            "goal": f"{op} {goal}",
            "ok": None if value is None else (value >= goal if op == ">=" else value <= goal),
        }
        for name, value, op, goal in rows
    ]


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(summary: dict, goals: list[dict]) -> None:
    print(
        f"\n{'scenario':<44} {'entries/s (median, min-max)':>28} {'x simple':>8} {'x COPY':>7}"
        f" {'CPU us/entry':>12} {'start s':>7} {'RSS MB':>7}"
    )
    for s in summary.values():
        if "rate" in s:
            spread = f"{s['rate']:,.0f} ({s['rate_min']:,.0f}-{s['rate_max']:,.0f})"
            print(
                f"{s['label']:<44} {spread:>28} {_f(s['vs_simple'], '.2f'):>8} {_f(s['vs_copy'], '.2f'):>7}"
                f" {_f(s.get('cpu_us_per_entry'), '.1f'):>12} {_f(s.get('startup_s'), '.2f'):>7}"
                f" {_f(s.get('peak_rss_mb'), '.0f'):>7}"
            )
    trips = summary.get("round_trips")
    if trips:
        print(
            f"round trips (median ms): Redis PING {trips['redis_ping_ms']:.2f}, PostgreSQL SELECT 1"
            f" {trips['pg_select_ms']:.2f}, 1-row INSERT + COMMIT {trips['pg_commit_ms']:.2f}"
        )
    simple = summary.get("simple_loop", {}).get("phases")
    if simple:
        print("simplest loop, share of its time: " + ", ".join(f"{p} {v:.0%}" for p, v in simple.items()))
    print(
        f"\n{'latency scenario':<44} {'offered/s':>9} {'batch':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
        f" {'max ms':>7} {'RSS MB':>7}"
    )
    for s in summary.values():
        if s["kind"] == "latency":
            print(
                f"{s['label']:<44} {s['offered_rate']:>9,.0f} {s['mean_batch']:>6.1f} {s['p50_ms']:>7.1f}"
                f" {s['p95_ms']:>7.1f} {s['p99_ms']:>7.1f} {s['max_ms']:>7.1f} {s['peak_rss_mb']:>7.0f}"
            )
    print(
        f"\n{'steady trickle, default settings':<44} {'offered/s':>9} {'/commit':>7} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'CPU us':>7} {'WAL B':>6} {'svc/rd':>7}"
    )
    for s in summary.values():
        if s["kind"] == "trickle":
            print(
                f"{s['label']:<44} {s['offered_rate']:>9,.0f} {s['entries_per_commit']:>7.1f} {s['p50_ms']:>7.1f}"
                f" {s['p99_ms']:>7.1f} {s['cpu_us_per_entry']:>7.1f} {s['wal_bytes_per_entry']:>6.0f}"
                f" {s['service_over_readings']:>7.3f}"
            )
    print(f"\n{'target (issues 5 and 11)':<60} {'measured':>9} {'goal':>8}  result")
    for g in goals:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[g["ok"]]
        print(f"{g['target']:<60} {_f(g['measured'], '.2f'):>9} {g['goal']:>8}  {verdict}")


def save_json(path: Path, document: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def plot(path: Path, summary: dict, streams: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drains = [s for s in summary.values() if s["kind"] == "drain" and s["streams"] == streams and "batch_size" in s]
    for workers in sorted({s["workers"] for s in drains}):
        line = sorted((s for s in drains if s["workers"] == workers), key=lambda s: s["batch_size"])
        x = [s["batch_size"] for s in line]
        y = [s["rate"] for s in line]
        err = [[s["rate"] - s["rate_min"] for s in line], [s["rate_max"] - s["rate"] for s in line]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"db-writer, {workers} worker{'s' * (workers > 1)}")
    for key, style in (("simple_loop", "--"), ("raw_copy", ":")):
        if key in summary:
            ax.axhline(summary[key]["rate"], linestyle=style, color="grey")
            ax.annotate(
                summary[key]["label"],
                (0.01, summary[key]["rate"]),
                xycoords=("axes fraction", "data"),
                textcoords="offset points",
                xytext=(0, 3),
                fontsize=8,
                color="dimgrey",
            )
    ax.set_xscale("log")
    ax.set_xticks([s["batch_size"] for s in drains if s["workers"] == 1], minor=False)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("BATCH_SIZE")
    ax.set_ylabel("entries/s (median; bars: min-max)")
    ax.set_ylim(bottom=0)
    ax.get_yaxis().set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_title(f"db-writer draining a backlog over {streams} streams")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    plt.close(fig)
