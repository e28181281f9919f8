"""db-writer behind a real PgBouncer in transaction pooling mode (the setup seed 003's team
needed): no server-side prepared statements, no session state outliving a transaction."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from main import DatabaseWriterService
from test_pipeline import pending, publish, rows, settings_for

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed (Debian package pgbouncer)")


@pytest.fixture
def bouncer_url(migrated_database_url) -> Iterator[str]:
    """A PgBouncer with only 2 server connections per database, so transactions from
    several clients really do share server sessions."""
    target = conninfo_to_dict(migrated_database_url)
    tmp_path = Path(tempfile.mkdtemp(prefix="dbw-pgbouncer-"))
    tmp_path.chmod(0o755)  # pgbouncer drops root for nobody, who must read its files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "userlist.txt").write_text(f'"{target.get("user", "postgres")}" ""\n')
    (tmp_path / "pgbouncer.ini").write_text(f"""
[databases]
* = host={target.get("host", "127.0.0.1")} port={target.get("port", 5432)}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {tmp_path}/userlist.txt
pool_mode = transaction
default_pool_size = 2
max_client_conn = 50
logfile =
""")
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [PGBOUNCER, *as_user, str(tmp_path / "pgbouncer.ini")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = migrated_database_url.replace(f"{target.get('host')}:{target.get('port')}", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {proc.stdout.read().decode()}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_two_workers_through_pgbouncer_transaction_pooling(redis_client, redis_url, bouncer_url, migrated_database_url):
    expected = publish(redis_client, devices=20, sensors=("t", "h"), per_stream=50)
    bad = redis_client.xadd("mqtt_stream:dev0:t", {"value": "oops"})  # a dead letter, through the same path
    services = [
        DatabaseWriterService(
            settings_for(redis_url, bouncer_url, consumer_name=f"w{i}", batch_size=100, db_pool_max_size=3)
        )
        for i in (1, 2)
    ]
    threads = [threading.Thread(target=s.run, kwargs={"until_idle": True}) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert rows(migrated_database_url) == expected
    assert pending(redis_client) == 0
    with psycopg.connect(migrated_database_url) as conn:
        assert conn.execute("SELECT original_id FROM db_writer_dead_letters").fetchall() == [(bad.decode(),)]
        assert conn.execute("SELECT sum(entries) FROM db_writer_progress").fetchone()[0] == len(expected) + 1
    assert sum(s.stats.batches_processed for s in services) > 2
    assert all(s.stats.errors == 0 for s in services)
