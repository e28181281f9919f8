"""A TCP proxy that injects network faults between a client and a server, for tests and benchmarks.

Redis and PostgreSQL run on 127.0.0.1 here, where no byte is ever lost, late or reset, so
db-writer's retry and outage code only meets those faults through a proxy that makes them.
Plain sockets and one selector thread per proxy: no dependency, no thread per connection.

What a proxy cannot fake: it owns both TCP connections, so the client's kernel always sees a
live peer (its bytes are ACKed, its keepalive probes answered). A blackhole() here hangs a
client until an application-level timeout fires (a socket timeout, libpq's connect_timeout);
TCP-level ones (keepalives, tcp_user_timeout) never fire through it. For those, drop packets
for real in a network namespace: see netns.py.
"""

from __future__ import annotations

import collections
import errno
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["FaultProxy", "ProxyStats"]

_T = TypeVar("_T")
_CHUNK = 64 * 1024
_HIGH_WATER = 1 << 20  # bytes queued one way before that side is no longer read (backpressure)
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on with 0 s: close() sends RST, not FIN
_EOF = object()  # queue marker: the source half-closed; forward a SHUT_WR
_RESET = object()  # queue marker: the source failed; reset the whole connection
_CALL_TIMEOUT_S = 30.0
_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the counters, to assert on what went through (or did not)."""

    accepted: int  # client connections accepted since the proxy started
    live: int  # connections open now (held ones included)
    bytes_to_server: int  # bytes written to the server
    bytes_to_client: int  # bytes written to the client


class _Pipe:
    """One direction of a connection: chunks wait in `queue` until their release time."""

    __slots__ = ("ended", "queue", "queued", "shut")

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[float, Any]] = collections.deque()
        self.queued = 0  # bytes waiting in queue
        self.ended = False  # the source gave EOF or an error: read it no more
        self.shut = False  # the EOF was forwarded (SHUT_WR) to the destination


class _Conn:
    __slots__ = ("client", "connecting", "down", "events", "held", "server", "up")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None  # None while held before reaching the server
        self.connecting = False
        self.held = False  # blackholed: nothing is read or written on either side
        self.up = _Pipe()  # client -> server
        self.down = _Pipe()  # server -> client
        self.events: dict[socket.socket, int] = {}  # what each socket is registered for


class FaultProxy:
    """Forwards TCP connections from a local port to a server, and breaks them on demand.

    Faults, each taking effect before the call returns (they run on the proxy's thread):
    cut() resets connections, blackhole() silences them, refuse() refuses new ones,
    delay() adds latency; restore() undoes blackhole() and refuse().
    """

    def __init__(
        self, target_host: str, target_port: int, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self._target = _resolve(target_host, target_port)
        family, sockaddr = _resolve(listen_host, listen_port)
        self._listen_family = family
        self._listener: socket.socket | None = self._listen(family, sockaddr)
        self.host: str = self._listener.getsockname()[0]
        self.port: int = self._listener.getsockname()[1]
        self._mode = "forward"  # "forward" | "blackhole" | "refuse"
        self._delay = 0.0
        self._conns: set[_Conn] = set()
        self._queued: set[_Conn] = set()  # conns with chunks queued (maybe for later)
        self._accepted = self._to_server = self._to_client = 0
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._errors: list[BaseException] = []
        self._stopping = False
        self._closed = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, _R, ("wake", None))
        self._sel.register(self._listener, _R, ("listen", None))
        self._thread = threading.Thread(target=self._run, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.host}:{self.port} -> {self.target[0]}:{self.target[1]}, {self._mode})"

    def url_for(self, url: str) -> str:
        """`url` (redis://, rediss://, postgresql://, postgres://) with its host:port replaced
        by the proxy's, so the same client settings go through the proxy."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "postgresql", "postgres"):
            raise ValueError(f"not a redis:// or postgresql:// URL: {url!r}")
        host = f"[{self.host}]" if ":" in self.host else self.host
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}{host}:{self.port}"
        query = parts.query
        if parts.scheme.startswith("postgres") and query:
            # libpq takes host/hostaddr/port from the query over the netloc's.
            params = [
                (k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in ("host", "hostaddr", "port")
            ]
            query = urlencode(params)
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def cut(self) -> None:
        """Reset every live connection on both sides (RST, as a crashed peer or a middlebox
        would); new connections are accepted as before."""
        self._call(self._abort_all)

    def blackhole(self) -> None:
        """Stop all traffic without closing anything, as when packets are dropped: the client
        waits until one of its own timeouts fires.

        Live connections are held: nothing more is read or written on either side, and their
        FIN or RST is not passed on either. New connections are accepted (the client's connect
        succeeds, as the kernel's backlog would let it) and held, without reaching the server.
        Held bytes stay in the sockets, not discarded: a real network retransmits them once it
        heals, which is what restore(revive=True) does.
        """

        def go() -> None:
            if self._listener is None:
                self._reopen()
            self._mode = "blackhole"
            for conn in list(self._conns):
                conn.held = True
                self._flush(conn)

        self._call(go)

    def refuse(self) -> None:
        """Close the listening socket, so connecting gets ECONNREFUSED (the server is down);
        live connections are reset. restore() listens again on the same port."""

        def go() -> None:
            self._abort_all()
            if self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
            self._mode = "refuse"

        self._call(go)

    def restore(self, revive: bool = False) -> None:
        """End blackhole() or refuse(): new connections work again.

        Connections held by blackhole() stay dead but open (the client has to notice and
        reconnect) unless `revive`: then they forward again, held bytes first, as when a
        network heals before either side gave up. delay() is left as set.
        """

        def go() -> None:
            if self._listener is None:
                self._reopen()
            self._mode = "forward"
            if revive:
                for conn in list(self._conns):
                    if conn.held:
                        conn.held = False
                        if conn.server is None:
                            self._connect_upstream(conn)
                        if conn in self._conns:
                            self._flush(conn)

        self._call(go)

    def delay(self, seconds: float) -> None:
        """Hold every chunk `seconds` before forwarding it, each way, so a round trip takes
        2 × `seconds` more; 0 clears it. Applies to chunks read from now on, order kept."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, not {seconds}")

        def go() -> None:
            self._delay = float(seconds)

        self._call(go)

    @property
    def accepted(self) -> int:
        return self._accepted

    @property
    def live(self) -> int:
        return len(self._conns)

    @property
    def bytes_to_server(self) -> int:
        return self._to_server

    @property
    def bytes_to_client(self) -> int:
        return self._to_client

    def stats(self) -> ProxyStats:
        """The counters, read on the proxy's thread so they are consistent with each other."""
        return self._call(lambda: ProxyStats(self._accepted, len(self._conns), self._to_server, self._to_client))

    def close(self) -> None:
        """Reset all connections, stop listening and join the proxy's thread.

        Raises if the proxy hit an internal error meanwhile: that is a bug in the proxy,
        not a fault it was asked to inject, and a test should not pass over it."""
        if self._closed:
            return
        if self._thread.is_alive():

            def stop() -> None:
                self._abort_all()
                if self._listener is not None:
                    self._sel.unregister(self._listener)
                    self._listener.close()
                    self._listener = None
                self._stopping = True

            try:
                self._call(stop)
            finally:
                self._thread.join(_CALL_TIMEOUT_S)
        self._closed = True
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._listener is not None:
            self._listener.close()
        if self._thread.is_alive():
            raise RuntimeError(f"{self!r}: its thread did not stop")
        if self._errors:
            raise RuntimeError(f"{self!r} had {len(self._errors)} internal error(s)") from self._errors[0]

    # -- the proxy's thread ------------------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the proxy's thread, which owns every socket, and wait for it."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._closed or self._stopping or not self._thread.is_alive():
            raise RuntimeError(f"{self!r} is closed")
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        self._commands.append(run)
        self._wake()
        if not done.wait(_CALL_TIMEOUT_S):
            raise TimeoutError(f"{self!r}: its thread did not answer in {_CALL_TIMEOUT_S:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # full: the loop is awake already; closed: it is gone

    def _run(self) -> None:
        while not self._stopping:
            try:
                for key, mask in self._sel.select(self._timeout()):
                    self._dispatch(key, mask)
                while self._commands:
                    self._commands.popleft()()
                for conn in list(self._queued):
                    if conn in self._conns:
                        self._flush(conn)
            except Exception as exc:  # a bug here; close() reports it
                self._errors.append(exc)
                self._abort_all()
        while self._commands:  # a call that raced with close(): let it fail, not hang
            self._commands.popleft()()

    def _timeout(self) -> float | None:
        """Seconds until the next delayed chunk is due; None (wait for I/O) if none is."""
        if self._commands:
            return 0
        now, soonest = time.monotonic(), None
        for conn in self._queued:
            for pipe, dst in ((conn.up, conn.server), (conn.down, conn.client)):
                if not pipe.queue:
                    continue
                due = pipe.queue[0][0]
                if due <= now:
                    # Fell due since _interest() looked: unless its socket is watched for
                    # writing, nothing would wake the loop for it (a stall, seen behind delay()).
                    if dst is None or not conn.events.get(dst, 0) & _W:
                        return 0
                    continue
                soonest = due if soonest is None else min(soonest, due)
        return None if soonest is None else max(0.0, soonest - now)

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        kind, conn = key.data
        if kind == "wake":
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        elif kind == "listen":
            self._accept()
        elif conn in self._conns:  # not reset earlier in this batch
            sock = cast(socket.socket, key.fileobj)
            if sock is conn.server and conn.connecting:
                self._connected(conn)
                return
            if mask & _R:
                self._read(conn, sock)
            if mask & _W and conn in self._conns:
                self._flush(conn)

    def _listen(self, family: int, sockaddr: tuple[Any, ...]) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # So restore() can bind the same port again while old connections are in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(512)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _reopen(self) -> None:
        sockaddr = (self.host, self.port) if self._listen_family == socket.AF_INET else (self.host, self.port, 0, 0)
        self._listener = self._listen(self._listen_family, sockaddr)
        self._sel.register(self._listener, _R, ("listen", None))

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError:  # EMFILE and the like: try again on the next readiness
                return
            client.setblocking(False)
            _nodelay(client)
            conn = _Conn(client)
            self._conns.add(conn)
            self._accepted += 1
            if self._mode == "blackhole":
                conn.held = True
            else:
                self._connect_upstream(conn)
            if conn in self._conns:
                self._flush(conn)

    def _connect_upstream(self, conn: _Conn) -> None:
        family, sockaddr = self._target
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setblocking(False)
        _nodelay(server)
        conn.server, conn.connecting = server, True
        err = server.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._abort(conn)  # the client sees a reset where a direct connect would be refused
            return
        self._interest(conn)

    def _connected(self, conn: _Conn) -> None:
        assert conn.server is not None
        if conn.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._abort(conn)
            return
        conn.connecting = False
        self._flush(conn)

    def _read(self, conn: _Conn, sock: socket.socket) -> None:
        pipe = conn.up if sock is conn.client else conn.down
        try:
            data: bytes | None = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = None
        due = time.monotonic() + self._delay
        if pipe.queue:
            due = max(due, pipe.queue[-1][0])  # a shorter delay must not reorder chunks
        if data:
            pipe.queue.append((due, memoryview(data)))
            pipe.queued += len(data)
        else:  # EOF or a reset, passed on after the bytes before it
            pipe.queue.append((due, _EOF if data == b"" else _RESET))
            pipe.ended = True
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        """Write what is due each way, forward half-closes, then update what to wait for."""
        if not conn.held:
            now = time.monotonic()
            for pipe, dst, to_server in ((conn.up, conn.server, True), (conn.down, conn.client, False)):
                if dst is None or (to_server and conn.connecting):
                    continue
                while pipe.queue and pipe.queue[0][0] <= now:
                    due, item = pipe.queue[0]
                    if item is _RESET:
                        self._abort(conn)
                        return
                    if item is _EOF:
                        pipe.queue.popleft()
                        try:
                            dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            self._abort(conn)
                            return
                        pipe.shut = True
                        continue
                    try:
                        sent = dst.send(item)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        self._abort(conn)
                        return
                    pipe.queued -= sent
                    if to_server:
                        self._to_server += sent
                    else:
                        self._to_client += sent
                    if sent < len(item):
                        pipe.queue[0] = (due, item[sent:])
                        break
                    pipe.queue.popleft()
            if conn.up.shut and conn.down.shut:
                self._close(conn, reset=False)
                return
        self._interest(conn)

    def _interest(self, conn: _Conn) -> None:
        client_ev = server_ev = 0
        if not conn.held:
            now = time.monotonic()
            ready = conn.server is not None and not conn.connecting
            if not conn.up.ended and conn.up.queued < _HIGH_WATER:
                client_ev |= _R
            if ready and not conn.down.ended and conn.down.queued < _HIGH_WATER:
                server_ev |= _R
            if conn.down.queue and conn.down.queue[0][0] <= now:
                client_ev |= _W
            if conn.server is not None and conn.connecting:
                server_ev |= _W  # writable = connect finished
            elif ready and conn.up.queue and conn.up.queue[0][0] <= now:
                server_ev |= _W
        self._register(conn, conn.client, client_ev)
        if conn.server is not None:
            self._register(conn, conn.server, server_ev)
        if not conn.held and (conn.up.queue or conn.down.queue):
            self._queued.add(conn)
        else:
            self._queued.discard(conn)

    def _register(self, conn: _Conn, sock: socket.socket, events: int) -> None:
        old = conn.events.get(sock, 0)
        if events == old:
            return
        if not old:
            self._sel.register(sock, events, ("conn", conn))
        elif not events:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, events, ("conn", conn))
        conn.events[sock] = events

    def _abort(self, conn: _Conn) -> None:
        self._close(conn, reset=True)

    def _abort_all(self) -> None:
        for conn in list(self._conns):
            self._abort(conn)

    def _close(self, conn: _Conn, reset: bool) -> None:
        self._conns.discard(conn)
        self._queued.discard(conn)
        for sock in (conn.client, conn.server):
            if sock is None:
                continue
            if conn.events.get(sock):
                self._sel.unregister(sock)
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            sock.close()
        conn.events.clear()


def _resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) for host:port, IPv4 first: the servers here listen on 127.0.0.1."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][0], infos[0][4]


def _nodelay(sock: socket.socket) -> None:
    """Forward each chunk as it comes: Nagle would hold small ones and skew latency tests."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
