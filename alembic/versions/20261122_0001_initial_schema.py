"""Initial schema: readings table (optionally a hypertable), batch ledger, dead letters.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Reviewed by hand. The readings table takes its name from TABLE_NAME. With
ENABLE_TIMESCALE=true it becomes a hypertable on "timestamp", chunked by
TIMESCALE_CHUNK_INTERVAL; its indexes are the same as on plain PostgreSQL
(create_default_indexes => false), so `./migrate.sh check` agrees in both modes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIMESTAMPTZ = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    settings = context.config.attributes["settings"]
    table = settings.table_name
    op.create_table(
        table,
        sa.Column("timestamp", TIMESTAMPTZ, nullable=False),
        sa.Column("device_id", sa.String(100), nullable=False),
        sa.Column("sensor_type", sa.String(100), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "sensor_type", "timestamp", name=f"{table}_pkey"),
    )
    op.create_index(f"ix_{table}_timestamp", table, ["timestamp"], postgresql_using="brin")
    if settings.enable_timescale:
        _make_hypertable(table, settings.timescale_chunk_interval)

    op.create_table(
        "db_writer_batches",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), primary_key=True),
        sa.Column("committed_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False),
        sa.Column("consumer_group", sa.Text(), nullable=False),
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.Column("rows_inserted", sa.Integer(), nullable=False),
        sa.Column("streams", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("first_ids", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("last_ids", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("counts", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.PrimaryKeyConstraint("id", name="db_writer_batches_pkey"),
    )
    op.create_index("ix_db_writer_batches_streams", "db_writer_batches", ["streams"], postgresql_using="gin")
    op.create_index("ix_db_writer_batches_committed_at", "db_writer_batches", ["committed_at"])

    op.create_table(
        "db_writer_dead_letters",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), primary_key=True),
        sa.Column("failed_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False),
        sa.Column("original_stream", sa.Text(), nullable=False),
        sa.Column("original_id", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text()),
        sa.Column("sensor_type", sa.Text()),
        sa.Column("value", sa.Text()),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("consumer_group", sa.Text(), nullable=False),
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.Column("fields", postgresql.JSONB(), nullable=False),
        sa.Column("replayed_at", TIMESTAMPTZ),
        sa.PrimaryKeyConstraint("id", name="db_writer_dead_letters_pkey"),
    )
    op.create_index(
        "ix_db_writer_dead_letters_original_stream_original_id",
        "db_writer_dead_letters",
        ["original_stream", "original_id"],
    )
    op.create_index("ix_db_writer_dead_letters_failed_at", "db_writer_dead_letters", ["failed_at"])


def downgrade() -> None:
    settings = context.config.attributes["settings"]
    op.drop_table("db_writer_dead_letters")
    op.drop_table("db_writer_batches")
    op.drop_table(settings.table_name)


def _make_hypertable(table: str, chunk_interval: str) -> None:
    bind = op.get_bind()
    available = bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")).scalar()
    if not available:
        raise RuntimeError(
            "ENABLE_TIMESCALE=true, but the timescaledb extension is not installed on this "
            "PostgreSQL server; install TimescaleDB or set ENABLE_TIMESCALE=false"
        )
    op.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    bind.execute(
        sa.text(
            "SELECT create_hypertable(CAST(:table AS regclass), 'timestamp', "
            "chunk_time_interval => CAST(:interval AS interval), "
            "create_default_indexes => false, if_not_exists => true)"
        ),
        {"table": f'"{table}"', "interval": chunk_interval},
    )
