"""Ledger per stream: one progress row per stream and consumer instead of a row per batch;
checked-through marks for reconciliation; one dead letter per entry; a registry row per
sensor and worker.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Written by hand. The old per-batch ledger is folded into db_writer_progress (its counts
included entries that were duplicates, so `entries` and `rows_inserted` of migrated rows
are upper bounds), then dropped. No stream gets a checked-through mark: the first worker
to start checks every acknowledged entry still in Redis once. Duplicate dead letters (the
same entry dead-lettered again after a redelivery) keep the first one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TIMESTAMPTZ = postgresql.TIMESTAMP(timezone=True)
ID_ORDER = "string_to_array({}, '-')::numeric[]"  # entry ids compared as (milliseconds, sequence)


def upgrade() -> None:
    op.create_table(
        "db_writer_streams",
        sa.Column("consumer_group", sa.Text(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("checked_through", sa.Text(), nullable=False),
        sa.Column("checked_position", sa.BigInteger(), nullable=True),
        sa.Column("checked_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("consumer_group", "stream", name="db_writer_streams_pkey"),
        postgresql_with={"fillfactor": "70"},
    )
    op.create_table(
        "db_writer_progress",
        sa.Column("consumer_group", sa.Text(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("first_id", sa.Text(), nullable=False),
        sa.Column("last_id", sa.Text(), nullable=False),
        sa.Column("entries", sa.BigInteger(), nullable=False),
        sa.Column("rows_inserted", sa.BigInteger(), nullable=False),
        sa.Column("dead_letters", sa.BigInteger(), nullable=False),
        sa.Column("first_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("consumer_group", "stream", "consumer", name="db_writer_progress_pkey"),
        postgresql_with={"fillfactor": "70"},
    )
    first, last = ID_ORDER.format("s.first_id"), ID_ORDER.format("s.last_id")
    op.execute(
        "INSERT INTO db_writer_progress (consumer_group, stream, consumer, first_id, last_id, entries,"
        " rows_inserted, dead_letters, first_at, updated_at)"
        " SELECT b.consumer_group, s.stream, b.consumer,"
        f" (array_agg(s.first_id ORDER BY {first}))[1], (array_agg(s.last_id ORDER BY {last} DESC))[1],"
        " sum(s.n), sum(s.n), 0, min(b.committed_at), max(b.committed_at)"
        " FROM db_writer_batches b, unnest(b.streams, b.first_ids, b.last_ids, b.counts) AS s(stream, first_id,"
        " last_id, n) GROUP BY 1, 2, 3"
    )
    op.drop_table("db_writer_batches")

    op.execute(
        "DELETE FROM db_writer_dead_letters d USING db_writer_dead_letters e"
        " WHERE d.original_stream = e.original_stream AND d.original_id = e.original_id AND d.id > e.id"
    )
    op.drop_index("ix_db_writer_dead_letters_original_stream_original_id", "db_writer_dead_letters")
    op.create_index(
        "ix_db_writer_dead_letters_original_stream_original_id",
        "db_writer_dead_letters",
        ["original_stream", "original_id"],
        unique=True,
    )

    # Registry rows of this version belong to a worker; the counts so far go to consumer ''.
    op.add_column("db_writer_sensors", sa.Column("consumer", sa.Text(), server_default="", nullable=False))
    op.alter_column("db_writer_sensors", "consumer", server_default=None)
    op.drop_constraint("db_writer_sensors_pkey", "db_writer_sensors", type_="primary")
    op.create_primary_key("db_writer_sensors_pkey", "db_writer_sensors", ["device_id", "sensor_type", "consumer"])


def downgrade() -> None:
    op.execute(
        "CREATE TEMP TABLE dbw_folded ON COMMIT DROP AS SELECT device_id, sensor_type, min(first_seen) AS first_seen,"
        " max(last_seen) AS last_seen, max(last_written_at) AS last_written_at, sum(readings) AS readings"
        " FROM db_writer_sensors GROUP BY 1, 2"
    )
    op.execute("DELETE FROM db_writer_sensors")
    op.drop_constraint("db_writer_sensors_pkey", "db_writer_sensors", type_="primary")
    op.drop_column("db_writer_sensors", "consumer")
    op.create_primary_key("db_writer_sensors_pkey", "db_writer_sensors", ["device_id", "sensor_type"])
    op.execute(
        "INSERT INTO db_writer_sensors (device_id, sensor_type, first_seen, last_seen, last_written_at, readings)"
        " SELECT * FROM dbw_folded"
    )

    op.drop_index("ix_db_writer_dead_letters_original_stream_original_id", "db_writer_dead_letters")
    op.create_index(
        "ix_db_writer_dead_letters_original_stream_original_id",
        "db_writer_dead_letters",
        ["original_stream", "original_id"],
    )
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
    op.drop_table("db_writer_progress")
    op.drop_table("db_writer_streams")
