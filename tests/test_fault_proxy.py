"""FaultProxy against real servers: a private Valkey, the session's PostgreSQL, and tiny TCP servers."""

from __future__ import annotations

import functools
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool
from redis.backoff import NoBackoff
from redis.retry import Retry

import servers
from fault_proxy import FaultProxy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def valkey_url() -> Iterator[str]:
    """A Valkey of our own: faults on it disturb nobody else."""
    with servers.embedded_valkey() as info:
        yield info.url


@pytest.fixture
def redis_proxy(valkey_url: str) -> Iterator[FaultProxy]:
    parts = urlsplit(valkey_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        yield proxy


@pytest.fixture
def pg_proxy(pg_admin_url: str) -> Iterator[FaultProxy]:
    params = conninfo_to_dict(pg_admin_url)
    with FaultProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)) as proxy:
        yield proxy


def no_retry_redis(url: str, **kwargs) -> redis.Redis:
    """redis-py (>= 6) retries a failed command 3 times on a new connection by default, which
    hides a cut; the tests want to see the fault itself."""
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def elapsed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds fn took, what it returned or the exception it raised)."""
    started = time.monotonic()
    try:
        outcome: object = fn()
    except Exception as exc:
        outcome = exc
    return time.monotonic() - started, outcome


class Background:
    """A call run on a thread, to show that it hangs and later how it ended."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.outcome: object = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.outcome = fn()
        except Exception as exc:
            self.outcome = exc

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float = 10.0) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "still blocked"
        return self.outcome


@pytest.fixture
def tcp_server() -> Iterator[Callable[[Callable[[socket.socket], None]], tuple[str, int]]]:
    """Starts a one-purpose TCP server on 127.0.0.1: handler(conn) runs per connection."""
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(handler: Callable[[socket.socket], None]) -> tuple[str, int]:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                worker = threading.Thread(target=_handle, args=(handler, conn), daemon=True)
                threads.append(worker)
                worker.start()

        thread = threading.Thread(target=serve, daemon=True)
        threads.append(thread)
        thread.start()
        return listener.getsockname()[:2]

    yield start
    for listener in listeners:
        listener.shutdown(socket.SHUT_RDWR)  # close() alone does not wake a thread in accept()
        listener.close()
    for thread in threads:
        thread.join(5)


def _handle(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn:
        try:
            handler(conn)
        except OSError:
            pass


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close back: lets a test follow a SHUT_WR through the proxy."""
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- forwarding ---------------------------------------------------------------------------


def test_url_for_rewrites_only_host_and_port() -> None:
    with FaultProxy("127.0.0.1", 9) as proxy:
        hp = f"127.0.0.1:{proxy.port}"
        assert proxy.url_for("redis://:pw@10.1.2.3:6379/9") == f"redis://:pw@{hp}/9"
        assert proxy.url_for("rediss://h/0?ssl_cert_reqs=none") == f"rediss://{hp}/0?ssl_cert_reqs=none"
        assert proxy.url_for("postgresql://u:p@db:5432/x?sslmode=require") == f"postgresql://u:p@{hp}/x?sslmode=require"
        # host/port in the query would win over the netloc in libpq: they go.
        assert proxy.url_for("postgres:///x?host=/tmp&port=5433&application_name=a") == (
            f"postgres://{hp}/x?application_name=a"
        )
        with pytest.raises(ValueError):
            proxy.url_for("http://example.invalid/")


def test_forwards_redis_and_postgres(
    redis_proxy: FaultProxy, valkey_url: str, pg_proxy: FaultProxy, pg_admin_url: str
) -> None:
    with no_retry_redis(redis_proxy.url_for(valkey_url)) as client:
        client.set("k", "v")
        assert client.get("k") == b"v"
    with psycopg.connect(pg_proxy.url_for(pg_admin_url), autocommit=True) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
    stats = redis_proxy.stats()
    assert stats.accepted == 1 and stats.bytes_to_server > 0 and stats.bytes_to_client > 0
    assert pg_proxy.stats().accepted >= 1


def test_half_close_is_forwarded_both_ways(tcp_server) -> None:
    host, port = tcp_server(echo)
    with FaultProxy(host, port) as proxy, socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold at once

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = Background(send)
        # The echo server only half-closes after it saw our EOF: getting EOF back proves both.
        assert recv_all(sock) == payload
        sender.wait()

    def greet_then_listen(conn: socket.socket) -> None:  # the server half-closes first
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        got = recv_all(conn)
        with socket.create_connection(report) as back:
            back.sendall(got)

    received = socket.create_server(("127.0.0.1", 0))
    report = received.getsockname()[:2]
    host, port = tcp_server(greet_then_listen)
    with (
        received,
        FaultProxy(host, port) as proxy,
        socket.create_connection((proxy.host, proxy.port), timeout=10) as sock,
    ):
        assert recv_all(sock) == b"hello"  # EOF from the server, while we can still write
        sock.sendall(b"still here")
        sock.shutdown(socket.SHUT_WR)
        received.settimeout(10)
        back, _ = received.accept()
        with back:
            assert recv_all(back) == b"still here"


def test_resets_are_passed_on_after_the_bytes_before_them(tcp_server) -> None:
    def answer_then_reset(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"last words")
        time.sleep(0.2)  # let them reach the proxy, as a reset comes after them on the wire
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    host, port = tcp_server(answer_then_reset)
    with FaultProxy(host, port) as proxy, socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(b"hi")
        assert sock.recv(100) == b"last words"
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
        assert wait_until(lambda: proxy.live == 0, 10)

    # A server that is not there: the client's connection is reset, not left hanging.
    with socket.create_server(("127.0.0.1", 0)) as gone:
        dead_port = gone.getsockname()[1]
    # The reset can even beat the end of connect(): with a timeout it polls, then reads SO_ERROR.
    with (
        FaultProxy("127.0.0.1", dead_port) as proxy,
        pytest.raises(ConnectionResetError),
        socket.create_connection((proxy.host, proxy.port), timeout=10) as sock,
    ):
        sock.recv(100)


def test_changing_the_delay_keeps_the_byte_order(tcp_server) -> None:
    host, port = tcp_server(echo)
    with FaultProxy(host, port) as proxy, socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        proxy.delay(0.2)
        sock.sendall(b"first ")
        time.sleep(0.05)
        proxy.delay(0)  # a chunk read now must still wait behind the delayed one
        sock.sendall(b"second")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"first second"


def test_many_connections_pool_and_pipelining(
    redis_proxy: FaultProxy, valkey_url: str, pg_proxy: FaultProxy, pg_admin_url: str
) -> None:
    n_sets, workers, queries = 20_000, 8, 25
    with no_retry_redis(redis_proxy.url_for(valkey_url)) as client:
        pipe = client.pipeline(transaction=False)
        for i in range(n_sets):
            pipe.set(f"key:{i}", f"{i:0100d}")  # ~2.4 MB up in one burst: exercises backpressure
        assert pipe.execute() == [True] * n_sets
        pipe = client.pipeline(transaction=False)
        for i in range(n_sets):
            pipe.get(f"key:{i}")
        assert pipe.execute() == [f"{i:0100d}".encode() for i in range(n_sets)]

    with ConnectionPool(
        pg_proxy.url_for(pg_admin_url), min_size=workers, max_size=workers, kwargs={"autocommit": True}, open=True
    ) as pool:
        pool.wait(timeout=30)
        assert pg_proxy.live == workers

        def work(k: int) -> list[int]:
            results = []
            for q in range(queries):
                with pool.connection() as conn:
                    (doubled,) = conn.execute("SELECT %s::int * 2", [k * 1000 + q]).fetchall()[0]
                    results.append(doubled)
            return results

        jobs = [Background(functools.partial(work, k)) for k in range(workers * 2)]
        for k, job in enumerate(jobs):
            assert job.wait(60) == [2 * (k * 1000 + q) for q in range(queries)]
    # The pool closed its connections: the proxy passes each EOF on and closes when both ends did.
    assert wait_until(lambda: pg_proxy.live == 0, 10), pg_proxy.stats()


def test_close_leaves_no_thread_and_frees_the_port(redis_proxy: FaultProxy, valkey_url: str) -> None:
    before = {t.ident for t in threading.enumerate()}
    parts = urlsplit(valkey_url)
    proxies = [FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) for _ in range(5)]
    clients = [no_retry_redis(p.url_for(valkey_url)) for p in proxies for _ in range(3)]
    for client in clients:
        client.ping()
    for proxy in proxies:
        proxy.close()
        proxy.close()  # idempotent
    leftover = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("fault-proxy")]
    assert leftover == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxies[0].port), timeout=5).close()
    with pytest.raises(redis.ConnectionError):
        clients[0].ping()  # the proxy reset it on close
    for client in clients:
        client.close()
    with pytest.raises(RuntimeError):
        proxies[0].cut()


# -- cut -------------------------------------------------------------------------------------


def test_cut_fails_the_next_command_and_a_new_connection_works(
    redis_proxy: FaultProxy, valkey_url: str, pg_proxy: FaultProxy, pg_admin_url: str
) -> None:
    client = no_retry_redis(redis_proxy.url_for(valkey_url))
    conn = psycopg.connect(pg_proxy.url_for(pg_admin_url), autocommit=True)
    try:
        assert client.ping() and conn.execute("SELECT 1").fetchone() == (1,)
        # The handshake and PING already passed the proxy: wait for BLPOP's own bytes, or the
        # cut can land first, redis-py reconnects and its default 5 s socket timeout fires.
        sent = redis_proxy.bytes_to_server
        blocked = Background(lambda: client.blpop(["nothing"], timeout=30))  # like XREADGROUP BLOCK
        blpop = b"*3\r\n$5\r\nBLPOP\r\n$7\r\nnothing\r\n$2\r\n30\r\n"
        assert wait_until(lambda: redis_proxy.bytes_to_server >= sent + len(blpop), 10)
        redis_proxy.cut()
        pg_proxy.cut()
        assert redis_proxy.live == 0 and pg_proxy.live == 0
        assert isinstance(blocked.wait(), redis.ConnectionError)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        assert conn.closed
        assert client.ping()  # redis-py opens a new connection for the next command
        with psycopg.connect(pg_proxy.url_for(pg_admin_url), autocommit=True) as again:
            assert again.execute("SELECT 1").fetchone() == (1,)
        assert redis_proxy.accepted == 2
    finally:
        client.close()
        conn.close()


def test_cut_between_commands_is_hidden_by_redis_py(redis_proxy: FaultProxy, valkey_url: str) -> None:
    """Worth knowing for fault tests: redis-py's pool checks a connection when it is taken
    (readable = reset or stale data) and reconnects, retries or not; only a command in flight
    sees a cut."""
    with no_retry_redis(redis_proxy.url_for(valkey_url)) as client:
        client.ping()
        redis_proxy.cut()
        assert client.ping()
        assert redis_proxy.accepted == 2


# -- blackhole -------------------------------------------------------------------------------


def test_blackhole_hangs_psycopg_until_a_client_timeout(pg_proxy: FaultProxy, pg_admin_url: str) -> None:
    # TCP-level timeouts as short as libpq takes them: none can fire through a proxy, whose
    # kernel ACKs the query and answers the keepalive probes. They are set to prove that.
    url = pg_proxy.url_for(pg_admin_url)
    tcp_opts: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": 1,
        "keepalives_interval": 1,
        "keepalives_count": 1,
        "tcp_user_timeout": 500,
    }
    hung = psycopg.connect(url, autocommit=True, **tcp_opts)
    probe = psycopg.connect(url, autocommit=True, **tcp_opts)
    try:
        pg_proxy.blackhole()
        started = time.monotonic()
        query = Background(lambda: hung.execute("SELECT 1").fetchone())

        # A client-side socket timeout does fire: send a query, wait for the socket with one.
        probe.pgconn.send_query(b"SELECT 1")
        assert probe.pgconn.flush() == 0
        waited, ready = elapsed(lambda: select.select([probe.pgconn.socket], [], [], 0.5)[0])
        assert ready == [] and 0.45 <= waited < 2.0

        # So does libpq's connect_timeout (2 s at least): the connect succeeds, the startup hangs.
        took, outcome = elapsed(lambda: psycopg.connect(url, connect_timeout=2))
        assert isinstance(outcome, psycopg.OperationalError), outcome
        assert 1.9 <= took < 6, took
        assert pg_proxy.live == 3  # held, not refused

        time.sleep(max(0.0, 2.5 - (time.monotonic() - started)))
        assert query.running(), "keepalives/tcp_user_timeout cannot end it through a proxy"

        pg_proxy.restore()
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)
        time.sleep(0.3)
        assert query.running(), "a blackholed connection stays dead after restore()"

        pg_proxy.cut()  # what finally frees it here (in real life: an application timeout)
        assert isinstance(query.wait(), psycopg.OperationalError)
    finally:
        pg_proxy.cut()
        hung.close()
        probe.close()


def test_blackhole_redis_socket_timeout_and_revive(redis_proxy: FaultProxy, valkey_url: str) -> None:
    url = redis_proxy.url_for(valkey_url)
    patient = no_retry_redis(url)  # no socket timeout: waits for ever
    impatient = no_retry_redis(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        patient.set("k", "v")
        impatient.ping()
        redis_proxy.blackhole()
        pending = Background(lambda: patient.get("k"))

        took, outcome = elapsed(impatient.ping)
        assert isinstance(outcome, redis.TimeoutError), outcome
        assert 0.45 <= took < 2.0, took
        # A new connection is accepted then held: the client's socket timeout fires again.
        with no_retry_redis(url, socket_timeout=0.5) as fresh:
            took, outcome = elapsed(fresh.ping)
            assert isinstance(outcome, redis.TimeoutError) and took < 2.0, outcome

        time.sleep(0.5)
        assert pending.running()
        redis_proxy.restore(revive=True)  # the network heals before the client gave up
        assert pending.wait() == b"v"
        assert patient.get("k") == b"v"  # and the connection is in step: held bytes were kept
    finally:
        patient.close()
        impatient.close()


def test_restore_without_revive_leaves_old_connections_dead(redis_proxy: FaultProxy, valkey_url: str) -> None:
    url = redis_proxy.url_for(valkey_url)
    old = no_retry_redis(url, socket_timeout=0.5)
    try:
        old.ping()
        redis_proxy.blackhole()
        redis_proxy.restore()
        with no_retry_redis(url, socket_timeout=5) as fresh:
            assert fresh.ping()
        with pytest.raises(redis.TimeoutError):
            old.ping()
    finally:
        old.close()


# -- refuse ----------------------------------------------------------------------------------


def test_refuse_then_restore_on_the_same_port(
    redis_proxy: FaultProxy, valkey_url: str, pg_proxy: FaultProxy, pg_admin_url: str
) -> None:
    client = no_retry_redis(redis_proxy.url_for(valkey_url))
    conn = psycopg.connect(pg_proxy.url_for(pg_admin_url), autocommit=True)
    try:
        client.ping()
        port = redis_proxy.port
        redis_proxy.refuse()
        pg_proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")  # the live connection was cut
        took, outcome = elapsed(lambda: psycopg.connect(pg_proxy.url_for(pg_admin_url), connect_timeout=5))
        assert isinstance(outcome, psycopg.OperationalError) and "refused" in str(outcome), outcome
        assert took < 1.5, took  # refused at once, unlike a blackhole

        redis_proxy.restore()
        pg_proxy.restore()
        assert redis_proxy.port == port
        assert client.ping()
        with psycopg.connect(pg_proxy.url_for(pg_admin_url), autocommit=True) as again:
            assert again.execute("SELECT 1").fetchone() == (1,)
    finally:
        client.close()
        conn.close()


# -- delay -----------------------------------------------------------------------------------


def best_round_trip(fn: Callable[[], object], n: int = 5) -> float:
    """The fastest of n round trips: the others include scheduling noise on a busy machine."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def test_delay_adds_twice_the_one_way_latency(
    redis_proxy: FaultProxy, valkey_url: str, pg_proxy: FaultProxy, pg_admin_url: str
) -> None:
    with (
        no_retry_redis(redis_proxy.url_for(valkey_url)) as client,
        psycopg.connect(pg_proxy.url_for(pg_admin_url), autocommit=True) as conn,
    ):
        client.ping()
        base_redis = best_round_trip(client.ping)
        base_pg = best_round_trip(lambda: conn.execute("SELECT 1"))
        redis_proxy.delay(0.05)
        pg_proxy.delay(0.05)
        slow_redis = best_round_trip(client.ping)
        slow_pg = best_round_trip(lambda: conn.execute("SELECT 1"))
        assert 0.1 <= slow_redis < base_redis + 0.1 + 0.1, (base_redis, slow_redis)
        assert 0.1 <= slow_pg < base_pg + 0.1 + 0.1, (base_pg, slow_pg)
        # A pipeline is one round trip, however many commands: the latency does not add up.
        pipe = client.pipeline(transaction=False)
        for _ in range(1000):
            pipe.incr("n")
        took, results = elapsed(pipe.execute)
        assert results == list(range(1, 1001)) and 0.1 <= took < 0.5, took
        redis_proxy.delay(0)
        assert best_round_trip(client.ping) < 0.05


def test_a_delayed_chunk_that_fell_due_unwatched_wakes_the_loop_at_once() -> None:
    """A chunk that falls due between the loop's last look at a connection and its next
    select: with nothing watched for writing, the loop slept for ever (a COPY held back for
    minutes behind delay(), seen in the scaling benchmark)."""
    import fault_proxy

    left, right = socket.socketpair()
    try:
        conn = fault_proxy._Conn(left)
        conn.server = right
        conn.up.queue.append((time.monotonic() - 0.001, memoryview(b"x")))
        proxy = FaultProxy.__new__(FaultProxy)  # only what _timeout() reads
        proxy._commands, proxy._queued = fault_proxy.collections.deque(), {conn}
        assert proxy._timeout() == 0
        conn.events[right] = fault_proxy._W  # watched: select wakes when it can be written
        assert proxy._timeout() is None
    finally:
        left.close()
        right.close()
