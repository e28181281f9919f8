"""Where one worker's time goes while it drains a backlog: py-spy, wall clock (idle included).

    uv tool install py-spy       # a tool for this script only, not a project dependency
    uv run python bench/profile_worker.py [--entries 100000] [--streams 200] [--batch-size 1000 ...]

py-spy samples the worker's threads, waiting on a socket or a lock included, so each
thread's shares add up to its wall time. Reported for the loop thread (transform ->
write -> ack, DatabaseWriterService.run) and, if the service reads ahead, the read-ahead
thread; the lock heartbeat and pool threads, start-up and teardown are left out.
Printed per batch size: each thread's share per step, then the loop thread's costliest
lines of the service's own code and the functions where its samples were taken (self
time). The collapsed stacks are saved as OUT/profile-s{STREAMS}-b{BATCH_SIZE}.txt
(flamegraph.pl and speedscope read them).
"""

from __future__ import annotations

import argparse
import linecache
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import infra
import scenarios
import workload

OWN = (
    "service.py",
    "redis_reader.py",
    "db_writer.py",
    "schema.py",
    "dead_letters.py",
    "read_ahead.py",
    "ledger.py",
    "reconcile.py",
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")
STAGING = ("_insert_carefully", "_stage_and_insert", "_insert_rows", "_copy_and_insert")  # the careful path

# (step, test on the innermost frame of the service's own code: function, file, source line)
STEPS = [
    ("transform (schema.to_row)", lambda f, file, src: file == "schema.py" or f == "_transform"),
    ("ledger: note / flush", lambda f, file, src: file == "ledger.py"),
    ("XREADGROUP", lambda f, file, src: f in ("_read", "read_new", "_next_window")),
    (
        "rescan/claim/pending",
        lambda f, file, src: (
            f
            in (
                "refresh_streams",
                "claim_abandoned",
                "discover",
                "read_own_pending",
                "_delivery_counts",
                "_create_groups",
            )
        ),
    ),
    ("XACK", lambda f, file, src: f == "ack"),
    ("write: COPY", lambda f, file, src: f == "_copy_into_table"),
    ("write: staging path (temp table, savepoint, INSERT..SELECT)", lambda f, file, src: f in STAGING),
    ("write: sensor registry upsert", lambda f, file, src: f == "_register_sensors"),
    ("write: dead-letter rows", lambda f, file, src: f == "_insert_dead_letters"),
    ("write: registry pipeline sync", lambda f, file, src: f == "_record"),
    ("write: begin/commit/pool", lambda f, file, src: f == "write"),
    ("loop waits for the read-ahead", lambda f, file, src: file == "read_ahead.py" and f == "__iter__"),
    ("read-ahead waits for a free slot", lambda f, file, src: file == "read_ahead.py" and f == "_run"),
]


def source(file: str, line: int) -> str:
    return linecache.getline(str(infra.ROOT / file), line).strip()


def classify(stack: list[tuple[str, str, int]]) -> tuple[str, str]:
    """-> (step, 'file:line function: source') from the innermost frame of the service's own code."""
    for func, file, line in reversed(stack):
        if file in OWN:
            src = source(file, line)
            where = f"{file}:{line} {func}: {src}"
            return next((step for step, test in STEPS if test(func, file, src)), "other (loop, retry, logging)"), where
    return "other (loop, retry, logging)", "(no frame of the service)"


def thread_of(funcs: set) -> str | None:
    if {("_start", "service.py"), ("_teardown", "service.py")} & funcs:
        return None
    if ("run", "service.py") in funcs:
        return "loop"
    if ("_run", "read_ahead.py") in funcs:
        return "read-ahead"
    return None  # lock heartbeat, pool workers, waiting for "go"


def analyse(path: Path, top: int = 12) -> dict:
    steps: dict[str, Counter] = defaultdict(Counter)
    lines: Counter = Counter()
    leaves: Counter = Counter()
    totals: Counter = Counter()
    for raw in path.read_text().splitlines():
        stack_text, _, count = raw.rpartition(" ")
        frames = [m.groups() for m in map(FRAME.match, stack_text.split(";")) if m]
        # function names without their class (py-spy shows Class.method), file names without their folder
        stack = [(func.rpartition(".")[2], Path(file).name, int(line)) for func, file, line in frames]
        thread = thread_of({(func, file) for func, file, _ in stack})
        if thread is None or not frames:
            continue
        n = int(count)
        totals[thread] += n
        step, where = classify(stack)
        steps[thread][step] += n
        if thread == "loop":
            lines[where] += n
            func, file, line = frames[-1]
            leaves[f"{func} ({file}:{line})"] += n

    def shares(counter: Counter, total: int, limit: int | None = None) -> list:
        return [(k, round(v / total, 4)) for k, v in counter.most_common(limit)]

    return {
        "samples": dict(totals),
        "steps": {thread: shares(steps[thread], totals[thread]) for thread in totals},
        "own_lines": shares(lines, totals["loop"], top),
        "leaves": shares(leaves, totals["loop"], top),
    }


def profile_one(db_url: str, names: list[bytes], total: int, batch_size: int, raw: Path, py_spy: str) -> dict:
    with infra.redis_client() as client:
        infra.reset_groups(client, names)
    infra.reset_database(db_url)
    procs = scenarios.start_workers(db_url, batch_size, 1, until_idle=True)
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(procs[0][0].pid),
            "--idle",
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # let py-spy attach
    procs[0][1].send("go")
    result = scenarios.finish_workers(procs, timeout=900)[0]
    spy.wait(60)
    seconds = result["last_batch_at"] - result["started_at"]
    return {
        "batch_size": batch_size,
        "rate": total / seconds,
        "cpu_share": result["cpu_s"] / seconds,
        "code": result["code"],
        **analyse(raw),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1000])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    places = [Path(sys.executable).parent, Path.home() / ".local" / "bin"]  # uv pip / uv tool install
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=":".join(map(str, places)))
    if not py_spy:
        print("py-spy not found: uv tool install py-spy (or uv pip install py-spy)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    names = workload.stream_names(args.streams)
    with infra.database() as db_url, infra.redis_client() as client:
        client.flushdb()
        workload.publish(client, workload.entries(args.entries, args.streams))
        try:
            for batch_size in args.batch_size:
                raw = args.out / f"profile-s{args.streams}-b{batch_size}.txt"
                report = profile_one(db_url, names, args.entries, batch_size, raw, py_spy)
                print(
                    f"\n{args.streams} streams, BATCH_SIZE {batch_size}: {report['rate']:,.0f} entries/s under"
                    f" py-spy, worker CPU {report['cpu_share']:.0%} of wall, samples {report['samples']},"
                    f" code {report['code']}"
                )
                for thread, steps in report["steps"].items():
                    print(f"  {thread} thread, by step:")
                    for name, share in steps:
                        print(f"    {share:6.1%}  {name}")
                for title, key in (("own code line", "own_lines"), ("self (leaf)", "leaves")):
                    print(f"  loop thread, by {title}:")
                    for name, share in report[key]:
                        print(f"    {share:6.1%}  {name[:150]}")
        finally:
            client.flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
