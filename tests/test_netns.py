"""Network namespaces (netns.py): a real added RTT where netem exists, real packet loss, cleanup.

Skipped with the reason where the machine does not allow them. Traffic only goes between the
root namespace and namespaces made here, over their veth pair.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import netns
from fault_proxy import FaultProxy

pytestmark = pytest.mark.timeout(120)
ONE_WAY_MS = 50


def need(**features: bool) -> None:
    if reason := netns.available(**features):
        pytest.skip(reason)


@pytest.fixture
def echo_on() -> Iterator[Callable[[str], int]]:
    """Starts an echo server on the given address (a veth's root side); returns its port."""
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(host: str) -> int:
        listener = socket.create_server((host, 0))
        listeners.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    while data := conn.recv(65536):
                        conn.sendall(data)

        thread = threading.Thread(target=serve, daemon=True)
        threads.append(thread)
        thread.start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
    for thread in threads:
        thread.join(5)


def round_trips(sock: socket.socket, n: int = 5) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        times.append(time.perf_counter() - started)
    return times


def test_round_trip_takes_twice_the_one_way_delay(echo_on) -> None:
    need(netem=True)
    with netns.Netns(delay_ms=ONE_WAY_MS) as ns:
        port = echo_on(ns.host_addr)
        with ns.entered():
            sock = socket.create_connection((ns.host_addr, port), timeout=10)
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = round_trips(sock)
        assert min(times) >= 2 * ONE_WAY_MS / 1000, times
        assert min(times) < 2 * ONE_WAY_MS / 1000 + 0.1, times
        ns.set_delay(0)
        with ns.entered():
            fast = socket.create_connection((ns.host_addr, port), timeout=10)
        with fast:
            assert min(round_trips(fast)) < ONE_WAY_MS / 1000


def test_namespace_reaches_only_the_veth_and_is_removed(echo_on) -> None:
    need(netem=False)
    with netns.Netns() as ns:
        port = echo_on(ns.host_addr)
        with ns.entered():  # this thread only
            sock = socket.create_connection((ns.host_addr, port), timeout=10)
        with sock:
            assert sock.getsockname()[0] == ns.ns_addr
            assert round_trips(sock, 2)
        # A process inside, as a benchmark would run a worker.
        code = (
            f"import socket; s = socket.create_connection(({ns.host_addr!r}, {port}), timeout=10); "
            "s.sendall(b'ping'); print(s.recv(4).decode())"
        )
        assert ns.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ping"
        # Nothing else is reachable from inside: one /30, no default route.
        routes = ns.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        assert "default" not in routes and ns.subnet in routes, routes
        devices = set(ns.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.split())
        assert f"{ns.ns_dev}@if" in " ".join(devices) and "eth0:" not in devices
        name, host_dev, subnet = ns.name, ns.host_dev, ns.subnet
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", host_dev], capture_output=True).returncode != 0
    assert (
        subnet
        not in subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    )


class Query:
    """A query on a thread: `outcome` is its rows or its exception."""

    def __init__(self, conn: psycopg.Connection, sql: str) -> None:
        self.outcome: object = None
        self.ended = float("inf")  # when it ended
        self._thread = threading.Thread(target=self._run, args=(conn, sql), daemon=True)
        self._thread.start()

    def _run(self, conn: psycopg.Connection, sql: str) -> None:
        try:
            self.outcome = conn.execute(sql).fetchall()
        except Exception as exc:
            self.outcome = exc
        self.ended = time.monotonic()

    def wait(self, timeout: float) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "still blocked"
        return self.outcome

    def running(self) -> bool:
        return self._thread.is_alive()


def test_dropped_packets_and_libpq_tcp_timeouts(pg_admin_url: str) -> None:
    """Which libpq options end a query when the network drops every packet.

    tcp_user_timeout bounds bytes sent and not acknowledged; keepalives bound waiting on a
    reply with nothing unacknowledged. Each leaves the other case hung, as does the default.
    """
    need(netem=False, drop=True)
    params = conninfo_to_dict(pg_admin_url)
    keepalive: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 1}
    with (
        netns.Netns() as ns,
        FaultProxy(
            str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432), listen_host=ns.host_addr
        ) as proxy,
    ):
        url = proxy.url_for(pg_admin_url)
        with ns.entered():
            conns = {
                "user_timeout_sending": psycopg.connect(url, autocommit=True, tcp_user_timeout=1000),
                "user_timeout_waiting": psycopg.connect(url, autocommit=True, tcp_user_timeout=1000),
                "keepalive_sending": psycopg.connect(url, autocommit=True, **keepalive),
                "keepalive_waiting": psycopg.connect(url, autocommit=True, **keepalive),
            }
        try:
            # The "waiting" queries reach the server (ACKed) before the packets start dropping.
            sent_before = proxy.bytes_to_server
            waiting = {
                k: Query(conns[k], "SELECT 7 FROM pg_sleep(3)") for k in ("user_timeout_waiting", "keepalive_waiting")
            }
            deadline = time.monotonic() + 10
            while proxy.bytes_to_server < sent_before + 2 * 30 and time.monotonic() < deadline:
                time.sleep(0.01)  # each is a 31-byte Query message
            assert proxy.bytes_to_server >= sent_before + 2 * 30
            time.sleep(0.1)  # the proxy's ACKs are on their way back
            ns.blackhole()
            dropped_at = time.monotonic()
            sending = {k: Query(conns[k], "SELECT 1") for k in ("user_timeout_sending", "keepalive_sending")}

            # tcp_user_timeout=1000: the unacknowledged query is given up after ~1 s of retransmits.
            outcome = sending["user_timeout_sending"].wait(15)
            took = sending["user_timeout_sending"].ended - dropped_at
            assert isinstance(outcome, psycopg.OperationalError) and "timed out" in str(outcome), outcome
            assert 0.9 <= took < 5, took
            print(f"tcp_user_timeout=1000, query unacknowledged: ended after {took:.2f} s")
            # Keepalives idle 1 s, 1 probe 1 s apart: waiting on a reply ends after ~2 s.
            outcome = waiting["keepalive_waiting"].wait(15)
            took = waiting["keepalive_waiting"].ended - dropped_at
            assert isinstance(outcome, psycopg.OperationalError) and "timed out" in str(outcome), outcome
            assert 1.0 <= took < 8, took
            print(f"keepalives 1/1/1, waiting on a reply: ended after {took:.2f} s")
            # The same options in the other case: still hung. Keepalives are not sent while data
            # is unacknowledged; tcp_user_timeout has nothing unacknowledged to time out.
            assert sending["keepalive_sending"].running()
            assert waiting["user_timeout_waiting"].running()

            ns.restore()  # the network heals: retransmission carries both through
            assert sending["keepalive_sending"].wait(30) == [(1,)]
            assert waiting["user_timeout_waiting"].wait(30) == [(7,)]
            assert conns["keepalive_sending"].execute("SELECT 2").fetchone() == (2,)
            healed = sending["keepalive_sending"].ended - dropped_at
            print(f"keepalives alone, query unacknowledged: hung until restore(), done at {healed:.2f} s")
        finally:
            ns.restore()
            for conn in conns.values():
                conn.close()
