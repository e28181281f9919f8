"""./run-standalone.sh --demo end to end, as a newcomer runs it.

It starts its own embedded Valkey and PostgreSQL (in a temporary STANDALONE_DIR,
on free ports), the demo producer and two workers; rows must arrive, a Ctrl-C
(SIGINT to its process group, as a terminal sends it) must stop everything and
leave no process behind, and a second start must find the data again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120  # uv sync check, initdb, migrations, on a loaded machine
ROWS_WITHIN_S = 30  # after the servers are up
STOP_TIMEOUT_S = 60
DEMO_STREAM = "mqtt_stream:esp32-kitchen:temperature"
# Settings that would point the script at other servers: the test wants the embedded ones.
FOREIGN = (
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "REDIS_PASSWORD",
    "DATABASE_URL",
    "DB_NAME",
    "DB_HOST",
    "DB_PORT",
    "DB_USER",
    "DB_PASSWORD",
    "WORKERS",
    "STANDALONE_DB_NAME",
)

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Outside pytest's 0700 tmp tree: PostgreSQL runs as `nobody` when the tests run as root."""
    path = Path(tempfile.mkdtemp(prefix="dbw-standalone-"))
    path.chmod(0o755)
    yield path
    for pid in _processes_of(path):  # only after a failure: the test asserts there are none
        _kill(pid)
    shutil.rmtree(path, ignore_errors=True)


class Run:
    """One ./run-standalone.sh --demo in its own process group, output to a file."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        env = {key: value for key, value in os.environ.items() if key not in FOREIGN}
        env.update(STANDALONE_DIR=str(data_dir), STANDALONE_REDIS_PORT="0", STANDALONE_PG_PORT="0")
        self.env_file = data_dir / "env"
        self.log = log
        self.started = time.monotonic()
        with open(log, "wb") as out:
            # --embedded: even a developer's .env naming other servers must not redirect the test.
            self.proc = subprocess.Popen(
                [str(ROOT / "run-standalone.sh"), "--demo", "--embedded"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def urls(self) -> dict[str, str]:
        """REDIS_URL and DATABASE_URL, once the servers are up and migrated."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.env_file.exists():
            assert self.proc.poll() is None, f"run-standalone.sh exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"not up after {START_TIMEOUT_S} s:\n{self.output()}"
            time.sleep(0.2)
        return dict(line.split("=", 1) for line in self.env_file.read_text().split())

    def ctrl_c(self) -> float:
        """SIGINT to the whole process group, as a terminal sends it; returns the seconds to exit."""
        sent = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT_S} s after Ctrl-C:\n{self.output()}")
        return time.monotonic() - sent

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the children then get their PR_SET_PDEATHSIG signal
            self.proc.wait()


def rows(database_url: str) -> int:
    with psycopg.connect(database_url, connect_timeout=3) as conn:
        return conn.execute("SELECT count(*) FROM sensor_readings").fetchone()[0]


def wait_for_rows(database_url: str, more_than: int, run: Run) -> tuple[int, float]:
    started = time.monotonic()
    while (count := rows(database_url)) <= more_than:
        assert run.proc.poll() is None, f"run-standalone.sh exited with {run.proc.returncode}:\n{run.output()}"
        assert time.monotonic() - started < ROWS_WITHIN_S, (
            f"no new rows (still {count}) {ROWS_WITHIN_S} s after the servers were up:\n{run.output()}"
        )
        time.sleep(0.25)
    return count, time.monotonic() - started


def stream_length(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url, socket_timeout=3) as client:
        return client.xlen(DEMO_STREAM)


def test_demo_shows_rows_ctrl_c_stops_everything_and_a_restart_keeps_the_data(data_dir: Path, tmp_path: Path) -> None:
    first = Run(data_dir, tmp_path / "first.log")
    try:
        urls = first.urls()
        count, waited = wait_for_rows(urls["DATABASE_URL"], 0, first)
        print(f"first run: up after {time.monotonic() - first.started:.1f} s, rows after {waited:.1f} more")
        time.sleep(2)  # a few more rounds in flight while stopping
        before_stop = rows(urls["DATABASE_URL"])
        published = stream_length(urls["REDIS_URL"])
        print(f"first run: stopped {first.ctrl_c():.1f} s after Ctrl-C")
    finally:
        first.kill()
    output = first.output()
    assert first.proc.returncode == 0, output
    assert "Running 2 worker(s) (standalone-1, standalone-2) and the demo producer" in output
    assert "all stopped" in output
    assert _processes_of(data_dir) == [], f"left running after Ctrl-C:\n{output}"
    assert not (data_dir / "env").exists()

    second = Run(data_dir, tmp_path / "second.log")
    try:
        urls = second.urls()  # before the workers start: what the first run left
        kept = rows(urls["DATABASE_URL"])
        assert kept >= before_stop >= count > 0
        assert stream_length(urls["REDIS_URL"]) >= published  # Valkey's append-only file was read back
        grown, waited = wait_for_rows(urls["DATABASE_URL"], kept, second)
        print(f"second run: {kept} rows kept, {grown} after {waited:.1f} s")
        second.ctrl_c()
    finally:
        second.kill()
    output = second.output()
    assert second.proc.returncode == 0, output
    assert "rows in sensor_readings from earlier runs" in output
    assert "first start" not in output  # no second initdb
    assert _processes_of(data_dir) == [], f"left running after Ctrl-C:\n{output}"


def _processes_of(data_dir: Path) -> list[str]:
    """Live processes started for this data dir: it is in their command line, working directory
    (PostgreSQL and Valkey run in their data dirs) or environment (STANDALONE_DIR, inherited)."""
    marker = str(data_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if status == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            hits = marker in cmdline
            try:
                hits = hits or os.readlink(entry / "cwd").encode().startswith(marker)
                hits = hits or marker in (entry / "environ").read_bytes()
            except PermissionError:
                pass
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours to read
        if hits:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append(f"{entry.name}: {command}")
    return found


def _kill(process: str) -> None:
    try:
        os.kill(int(process.split(":", 1)[0]), signal.SIGKILL)
    except ProcessLookupError:
        pass
