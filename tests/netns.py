"""Network namespaces for tests and benchmarks that need a real network path: round-trip time
added by the kernel (netem) and packets really dropped, which 127.0.0.1 never has.

A Netns is a namespace joined to the root one by a veth pair on a private /30,
10.203.N.0/30: `host_addr` (.1) on the root side, `ns_addr` (.2) inside. Servers stay in
the root namespace and listen on `host_addr` (not 0.0.0.0: never a real interface); clients
run inside (run(), popen(), or entered() for the calling thread) and connect to `host_addr`.
The namespace has no other interface and no default route, so nothing in it reaches
anything else. Everything is removed on close().

Unlike FaultProxy (fault_proxy.py), the faults here are below TCP: the client's kernel sees
the delay in its RTT estimate, and a blackhole() leaves its bytes unacknowledged, so
keepalives and tcp_user_timeout do fire. Needs root, iproute2, and for delay sch_netem in
the kernel: available() says what is missing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["Netns", "available"]

SUBNET_PREFIX = "10.203"  # 10.203.N.0/30, N in 0..255: inside namespaces made here only
NAME_PREFIX = "dbwnet"  # namespaces are dbwnet-<creator pid>-<N>
GUARD_METRIC = 4242  # the guard route's metric: below it, the veth's own route wins
_DROP_ALL = "1,6 0 0 2,"  # classic BPF "ret #2": TC_ACT_SHOT for every packet (needs no act_gact)
_CLONE_NEWNET = 0x40000000
_TIMEOUT_S = 30


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT_S, check=check)


def _tc(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["-n", netns] if netns else []
    return subprocess.run(["tc", *prefix, *args], capture_output=True, text=True, timeout=_TIMEOUT_S, check=check)


def _why(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"


@functools.cache
def available(netem: bool = True, drop: bool = False) -> str | None:
    """None if a Netns can be made here (with netem delay, with blackhole() if `drop`), else
    the reason, for pytest.skip. Probed once per process in a throwaway namespace, so the
    root namespace is not touched."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"needs {tool} (iproute2)"
    probe = f"{NAME_PREFIX}-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {_why(made)}"
    try:
        veth = _ip("-n", probe, "link", "add", "name", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {_why(veth)}"
        if netem:
            qdisc = _tc(probe, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms", check=False)
            if qdisc.returncode != 0:
                return f"no netem qdisc in this kernel (sch_netem): {_why(qdisc)}"
        if drop:
            clsact = _tc(probe, "qdisc", "add", "dev", "p1", "clsact", check=False)
            bpf = clsact.returncode == 0 and _tc(probe, *_drop_filter("add", "p1"), check=False)
            if not bpf or bpf.returncode != 0:
                return f"cannot drop packets with a tc bpf filter: {_why(bpf or clsact)}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _drop_filter(action: str, dev: str) -> list[str]:
    rule = ["filter", action, "dev", dev, "ingress", "pref", "1"]
    return rule + (["bpf", "da", "bytecode", _DROP_ALL] if action == "add" else [])


class Netns:
    """A network namespace with a veth pair to the root namespace; a context manager.

    `delay_ms` is added one way on each end (netem), so a round trip takes 2 × `delay_ms`
    more. Processes started with popen() are stopped on close(), by PID.
    """

    def __init__(self, delay_ms: float = 0) -> None:
        if reason := available(netem=bool(delay_ms)):
            raise RuntimeError(f"network namespaces are not usable here: {reason}")
        _remove_stale()
        self.index = self._claim_subnet()
        n = self.index
        self.name = f"{NAME_PREFIX}-{os.getpid()}-{n}"
        self.subnet = f"{SUBNET_PREFIX}.{n}.0/30"
        self.host_addr = f"{SUBNET_PREFIX}.{n}.1"
        self.ns_addr = f"{SUBNET_PREFIX}.{n}.2"
        self.host_dev = f"dbwh{n}"
        self.ns_dev = f"dbwn{n}"
        self._procs: list[subprocess.Popen[Any]] = []
        self._blackholed = False
        self._closed = False
        try:
            self._create()
            if delay_ms:
                self.set_delay(delay_ms)
        except BaseException:
            self.close()
            raise

    def _claim_subnet(self) -> int:
        """The first free 10.203.N.0/30, claimed by adding its guard route (which fails if
        another process just did: the route is the lock)."""
        for n in range(256):
            subnet = f"{SUBNET_PREFIX}.{n}.0/30"
            if _ip("-4", "route", "show", "table", "all", "root", subnet).stdout.strip():
                continue
            if _ip("-4", "-o", "addr", "show", "to", subnet).stdout.strip():
                continue
            # Blackhole, not unreachable: nothing for 10.203.N.x may leave by the default
            # route if the veth is gone while a socket still talks to it (close() relies on it).
            if _ip("route", "add", "blackhole", subnet, "metric", str(GUARD_METRIC), check=False).returncode == 0:
                return n
        raise RuntimeError(f"no free {SUBNET_PREFIX}.N.0/30 left")

    def _create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", "name", self.host_dev, "type", "veth", "peer", "name", self.ns_dev, "netns", self.name)
        # No IPv6 on the pair: no router solicitations or DAD, only the traffic a test sends.
        _write(f"/proc/sys/net/ipv6/conf/{self.host_dev}/disable_ipv6", "1")
        self.run(["sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{self.ns_dev}/disable_ipv6"], capture_output=True)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_dev)
        _ip("-n", self.name, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_dev)
        _ip("link", "set", self.host_dev, "up")
        _ip("-n", self.name, "link", "set", self.ns_dev, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        route = _ip("-4", "route", "get", self.ns_addr).stdout
        if f"dev {self.host_dev}" not in route:
            raise RuntimeError(f"{self.ns_addr} is not routed to {self.host_dev}: {route.strip()}")

    # -- faults --------------------------------------------------------------------------------

    def set_delay(self, delay_ms: float) -> None:
        """netem delay on both ends of the veth (0 removes it): RTT += 2 × `delay_ms`."""
        for netns, dev in ((None, self.host_dev), (self.name, self.ns_dev)):
            if delay_ms:
                _tc(netns, "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{delay_ms}ms")
            else:
                _tc(netns, "qdisc", "del", "dev", dev, "root", check=False)

    def blackhole(self) -> None:
        """Drop every packet arriving at either end, nothing closed: the senders think they
        sent them, so TCP retransmits and its timers (keepalive, tcp_user_timeout) run."""
        if self._blackholed:
            return
        for netns, dev in ((None, self.host_dev), (self.name, self.ns_dev)):
            _tc(netns, "qdisc", "replace", "dev", dev, "clsact")
            _tc(netns, *_drop_filter("add", dev))
        self._blackholed = True

    def restore(self) -> None:
        """Let packets through again: connections whose peers did not give up meanwhile
        recover by retransmission, as on a real network."""
        for netns, dev in ((None, self.host_dev), (self.name, self.ns_dev)):
            _tc(netns, *_drop_filter("del", dev), check=False)
        self._blackholed = False

    # -- running things inside -------------------------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the namespace (`ip netns exec`)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("check", True)
        kwargs.setdefault("timeout", _TIMEOUT_S)
        return subprocess.run(self.command(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """A process inside the namespace, stopped (by PID) on close() if still running."""
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self._procs.append(proc)
        return proc

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread (only it) into the namespace for the block.

        Sockets belong to the namespace they are created in, so a client connected inside
        the block stays inside after it (psycopg, redis-py, plain sockets alike), while the
        rest of the process, servers and proxies included, stays in the root namespace."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.name}") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    # -- teardown --------------------------------------------------------------------------------

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Netns({self.name}, {self.host_addr} <-> {self.ns_addr})"

    def close(self) -> None:
        """Stop our processes, delete the veth and the namespace, then the guard route.

        Root-side sockets still talking to `ns_addr` are aborted (ss -K) while the veth can
        carry their RST, and again once it is gone, when the guard route drops what they
        send: no packet for 10.203.N.x takes the default route. The veth is deleted by name
        because a socket made inside keeps the namespace, and so its end, alive."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if not hasattr(self, "index"):
            return  # no subnet was claimed: nothing was made
        if hasattr(self, "name"):
            self.restore()
            _kill_sockets(self.ns_addr)
            _ip("link", "del", self.host_dev, check=False)
            _ip("netns", "del", self.name, check=False)
            _kill_sockets(self.ns_addr)
        _ip("route", "del", "blackhole", f"{SUBNET_PREFIX}.{self.index}.0/30", "metric", str(GUARD_METRIC), check=False)


def _kill_sockets(addr: str) -> None:
    if shutil.which("ss"):
        subprocess.run(["ss", "-t", "-a", "-K", "dst", addr], capture_output=True, timeout=_TIMEOUT_S, check=False)


def _remove_stale() -> None:
    """Delete what a Netns of a process that died without close() left: its namespace (with
    its veth) and its guard route. Only names made here, only if that process is gone."""
    listed = _ip("netns", "list", check=False).stdout
    for name, pid, n in re.findall(rf"^({NAME_PREFIX}-(\d+)-(\d+))\b", listed, re.MULTILINE):
        if _pid_alive(int(pid)):
            continue
        _kill_sockets(f"{SUBNET_PREFIX}.{n}.2")
        _ip("link", "del", f"dbwh{n}", check=False)
        _ip("netns", "del", name, check=False)
        _ip("route", "del", "blackhole", f"{SUBNET_PREFIX}.{n}.0/30", "metric", str(GUARD_METRIC), check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write(path: str, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """setns(2) for the network namespace: os.setns only exists from Python 3.12."""
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")
