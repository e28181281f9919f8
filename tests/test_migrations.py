"""./migrate.sh as a user runs it, against a real empty database."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]


def migrate(database_url: str, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_", "TABLE_", "ENABLE_"))}
    environ.update(DATABASE_URL=database_url, **env)
    return subprocess.run(
        [str(ROOT / "migrate.sh"), *args], cwd=cwd or "/", env=environ, capture_output=True, text=True, timeout=120
    )


def tables(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_upgrade_check_downgrade_round_trip(database_url):
    pending = migrate(database_url, "check")
    assert pending.returncode == 1 and "pending migrations: 0001" in pending.stderr and "0004" in pending.stderr

    assert migrate(database_url, "upgrade").returncode == 0
    assert {
        "sensor_readings",
        "db_writer_progress",
        "db_writer_streams",
        "db_writer_dead_letters",
        "db_writer_sensors",
        "alembic_version",
    } <= tables(database_url)
    assert "db_writer_batches" not in tables(database_url)
    ok = migrate(database_url, "check")
    assert ok.returncode == 0 and "up to date" in ok.stdout

    assert migrate(database_url, "downgrade", "3").returncode == 0
    assert "db_writer_sensors" not in tables(database_url) and "sensor_readings" in tables(database_url)
    assert "db_writer_batches" in tables(database_url) and "db_writer_progress" not in tables(database_url)
    three_pending = migrate(database_url, "check")
    assert three_pending.returncode == 1 and "pending migrations: 0002 (Sensor registry" in three_pending.stderr
    assert "0003 (Ledger per stream" in three_pending.stderr and "0004 (Dead letters remember" in three_pending.stderr
    assert migrate(database_url, "upgrade").returncode == 0
    assert migrate(database_url, "downgrade", "4").returncode == 0
    assert "sensor_readings" not in tables(database_url)
    assert migrate(database_url, "upgrade").returncode == 0
    assert migrate(database_url, "check").returncode == 0
    assert migrate(database_url, "current").stdout.strip().startswith("0")


def test_table_name_is_honoured(database_url):
    assert migrate(database_url, "upgrade", TABLE_NAME="readings_eu").returncode == 0
    assert "readings_eu" in tables(database_url) and "sensor_readings" not in tables(database_url)
    assert migrate(database_url, "check", TABLE_NAME="readings_eu").returncode == 0
    drift = migrate(database_url, "check")  # the default name is not what was migrated
    assert drift.returncode == 1 and "add_table sensor_readings" in drift.stderr


def test_check_names_a_model_change_without_a_migration(database_url, tmp_path):
    assert migrate(database_url, "upgrade").returncode == 0
    with psycopg.connect(database_url) as conn:
        conn.execute("ALTER TABLE sensor_readings DROP COLUMN created_at")
    drift = migrate(database_url, "check")
    assert drift.returncode == 1 and "created_at" in drift.stderr and "./migrate.sh create" in drift.stderr


def test_create_autogenerates_a_revision(database_url, tmp_path):
    """`create` on a copy of the project, so the real alembic/versions stays untouched."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".standalone"))
    os.symlink(ROOT / ".venv", copy / ".venv")
    models = copy / "models.py"
    models.write_text(
        models.read_text().replace(
            "    created_at: Mapped[datetime | None] = mapped_column(TIMESTAMPTZ, server_default=func.now())",
            "    created_at: Mapped[datetime | None] = mapped_column(TIMESTAMPTZ, server_default=func.now())\n"
            "    quality: Mapped[int | None] = mapped_column(Integer)",
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_"))}
    env["DATABASE_URL"] = database_url
    # The copy shares the real .venv: `uv run` must not sync it, or the project's editable
    # install would be pointed at this temporary copy (and break when it is removed).
    env["UV_NO_SYNC"] = "1"

    def run(*a):
        return subprocess.run([str(copy / "migrate.sh"), *a], env=env, capture_output=True, text=True, timeout=120)

    assert run("upgrade").returncode == 0
    assert run("check").returncode == 1
    created = run("create", "add quality")
    assert created.returncode == 0, created.stderr
    new = list((copy / "alembic/versions").glob("*add_quality*.py"))
    assert len(new) == 1 and "add_column" in new[0].read_text() and "quality" in new[0].read_text()
    assert run("upgrade").returncode == 0 and run("check").returncode == 0


def test_unreachable_database_is_one_line():
    done = migrate("postgresql://u:secret@127.0.0.1:1/x", "upgrade")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "cannot reach PostgreSQL" in done.stderr and "secret" not in done.stderr


def test_missing_database_url_is_one_line():
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_"))}
    done = subprocess.run([str(ROOT / "migrate.sh"), "check"], cwd="/", env=environ, capture_output=True, text=True)
    assert done.returncode == 2 and "DATABASE_URL" in done.stderr and done.stderr.count("\n") == 1


def test_the_head_read_without_alembic_is_alembics_head():
    import migrations
    import schema_version

    assert schema_version.head() == migrations.head_revision() is not None
